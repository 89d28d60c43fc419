"""Compare: two runs side by side on the same charts.

The second run defaults to one of the same task (their components can be compared one to
one); without one, the page asks which run to compare with and says why the components
differ.
"""

import streamlit as st

from app import charts, controls, state
from engine.errors import ExplaindError
from engine.store import ALL_TESTS

run = state.current_run()
style = state.style()

st.title("Compare runs")


def task_of(r: state.Run) -> str:
    try:
        r.open()
        return str(r.meta().get("task") or "unknown task")
    except ExplaindError:
        return "unreadable run"


def choose_other(others: list[state.Run], task: str) -> str:
    """The run to compare with: one of the same task by default, else none (the user chooses)."""
    same = [r.name for r in others if task_of(r) == task]
    names = same + [r.name for r in others if r.name not in same]
    labels = {r.name: f"{r.name} ({task_of(r)})" for r in others}
    return state.url_widget(
        "other", state.choice(["", *names]), same[0] if same else "",
        lambda key: st.selectbox(
            f"Compare {state.escaped(run.name)} with", ["", *names], key=key,
            format_func=lambda n: labels.get(n, "choose a run…"),
            help="Runs of the same task come first: their components can be compared one to one.",
        ),
    )  # fmt: skip


def explain_components(other: state.Run, task: str, orders: list[list[str]], level: str) -> None:
    """Say when the two runs' components are not the same ones, and why."""
    shared = set(orders[0]) & set(orders[1])
    if not shared:
        other_task = task_of(other)
        why = " (same task, another model configuration)" if other_task == task else ""
        st.warning(
            f"{state.escaped(run.name)} ({state.escaped(task)}) and {state.escaped(other.name)} "
            f"({state.escaped(other_task)}) share no {level}{why}: their models are built from different components "
            f"({state.escaped(', '.join(orders[0][:3]))}… vs {state.escaped(', '.join(orders[1][:3]))}…). The share "
            "chart shows each run's own components side by side; no bar of one run has a partner in the other. "
            "Choose a run of the same task to compare components one to one.",
            icon="⚠️",
        )
    elif len(shared) < max(len(orders[0]), len(orders[1])):
        st.info(f"{len(shared)} {level}s are in both runs; the others belong to one run only (no partner bar).",
                icon="ℹ️")  # fmt: skip


def compare(other: state.Run, task: str, level: str, log_x: bool) -> None:
    runs = (run, other)
    state.hint(f"Solid lines: {run.name} · dashed lines: {other.name}")
    state.show_figure(charts.compare_curves([(r.name, r.steps()) for r in runs], style, log_x=log_x), "curves")
    orders = [charts.group_order(r.groups(), level) for r in runs]
    explain_components(other, task, orders, level)
    with st.spinner("Summing component shares…"):
        totals = [(r.name, r.component_totals(level, None, ALL_TESTS)) for r in runs]
    order = list(dict.fromkeys(orders[0] + orders[1]))
    state.show_figure(charts.compare_shares(totals, charts.group_colors(order), order, style), "shares")
    state.hint("Share of the total absolute influence over all steps and test examples; hatched: second run.")
    for column, r in zip(st.columns(2), runs, strict=True):
        with column:
            st.subheader(state.escaped(r.name))
            state.show_table(charts.run_card(r.meta()), f"run-card-{r.name}", wrap=True)


others = [r for r in state.run_choices() if r.name != run.name]
if not others:
    st.info("There is only one run in this directory; add another run database to compare.", icon="ℹ️")
else:
    task = task_of(run)
    c1, c2, c3 = st.columns([2, 1, 1])
    with c1:
        other_name = choose_other(others, task)
    with c2:
        level = controls.level()
    with c3:
        log_x = controls.toggle("logx", "Log step axis")
    if not other_name:
        st.info(
            f"No other run here is of the task {state.escaped(task)}. Choose a run to compare anyway: the training "
            "curves share their axes, the components do not.",
            icon="ℹ️",
        )
    else:
        other = next(r for r in others if r.name == other_name)
        state.note_slice(f"compared with {other.name}", f"vs-{other.name}")
        try:
            other.open()
        except ExplaindError as exc:
            st.error(f"Cannot open {state.escaped(other.name)}: {exc}", icon="🚫")
        else:
            compare(other, task, level, log_x)
