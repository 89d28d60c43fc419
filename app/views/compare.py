"""Compare: two runs side by side on the same charts."""

import streamlit as st

from app import charts, controls, state
from engine.errors import ExplaindError
from engine.store import ALL_TESTS

run = state.current_run()
style = state.style()

st.title("Compare runs")
others = [r for r in state.run_choices() if r.name != run.name]
if not others:
    st.info("There is only one run in this directory; add another run database to compare.", icon="ℹ️")
else:
    names = [r.name for r in others]
    c1, c2, c3 = st.columns([2, 1, 1])
    with c1:
        other_name = state.url_widget(
            "other", state.choice(names), names[0],
            lambda key: st.selectbox(f"Compare {run.name} with", names, key=key),
        )  # fmt: skip
    with c2:
        level = controls.level()
    with c3:
        log_x = controls.toggle("logx", "Log step axis")
    other = others[names.index(other_name)]
    try:
        other.open()
    except ExplaindError as exc:
        st.error(f"Cannot open `{other.name}`: {exc}", icon="🚫")
    else:
        runs = (run, other)
        st.caption(f"Solid lines: {run.name} · dashed lines: {other.name}")
        state.show_figure(charts.compare_curves([(r.name, r.steps()) for r in runs], style, log_x=log_x),
                          "compare-curves")
        with st.spinner("Summing component shares…"):
            totals = [(r.name, r.component_totals(level, None, ALL_TESTS)) for r in runs]
        order = list(dict.fromkeys(charts.group_order(run.groups(), level) + charts.group_order(other.groups(), level)))
        state.show_figure(charts.compare_shares(totals, charts.group_colors(order), order, style), "compare-shares")
        state.hint("Share of the total absolute influence over all steps and test examples; hatched: second run.")
        cards = st.columns(2)
        for column, r in zip(cards, runs, strict=True):
            with column:
                st.subheader(r.name)
                state.show_table(charts.run_card(r.meta()), f"run-card-{r.name}", height="content")
