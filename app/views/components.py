"""Components: influence by layer, module or tensor over step windows, the weight-decay balance,
and inside a layer its heads, neurons or Fourier frequencies."""

import polars as pl
import streamlit as st

from app import charts, controls, state

run = state.current_run()
style = state.style()
meta = run.meta()
quantity = state.quantity_label(meta)

st.title(f"Components · {state.escaped(run.name)}")
if run.views()["components"] == 0:
    st.info(
        "This run has no component view. Explain the run again with it: "
        "`python -m engine explain RUN_DIR --out RUN.duckdb --views components`.",
        icon="ℹ️",
    )
else:
    windows = run.windows("components")
    base = int((windows["step_hi"] - windows["step_lo"]).min())
    c1, c2, c3 = st.columns([1, 1, 2])
    with c1:
        level = controls.level()
    with c2:
        measure = controls.measure()
    with c3:
        window = controls.window_size(run, base)
    c4, c5 = st.columns([2, 1])
    steps, tests = controls.steps_and_tests(run, c4, c5)
    controls.describe_example(run, tests)
    state.hint(
        f"Summed over {controls.describe_tests(tests)} and every explained output, "
        f"steps {steps[0]} ≤ step < {steps[1]}."
    )

    phases, spikes = controls.marks(run)
    with st.spinner("Aggregating the component view…"):
        matrix = run.component_matrix(level, window, steps, tests, measure)
        totals = run.component_totals(level, steps, tests)
    order = charts.group_order(run.groups(), level)
    colors = charts.group_colors(order)
    if matrix.height == 0:
        st.info("No component influence in this selection: widen the steps or choose other test examples.", icon="ℹ️")
    else:
        state.show_figure(charts.component_heatmap(matrix, order, measure, quantity, style, phases, spikes),
                          "component-heatmap")
        cumulative = controls.toggle(
            "cumulative", "Running sum over windows", help="Show each group's influence summed up to each window."
        )
        state.show_figure(
            charts.component_lines(matrix, colors, order, measure, quantity, style, cumulative=cumulative,
                                   phases=phases, spikes=spikes),
            "component-lines",
        )
        state.show_figure(charts.decay_balance(totals, colors, order, quantity, style), "decay-balance")
        state.hint("Gradient part: what the training data moved; weight-decay part: what the decay term moved.")
        if meta.get("buffer_groups"):
            state.hint("Tensors named `<module>.<buffers>` are buffer terms: the exact change of the prediction "
                       "when that module's running statistics moved during training (at module and layer level "
                       "they join their module).")
        st.subheader(f"Totals per {level}")
        state.show_table(totals, f"component-totals-{level}")

    partitions = run.partitions()
    if partitions.height:
        st.subheader("Inside a layer: heads, neurons, frequencies")
        names = partitions["partition"].to_list()
        labels = {r["partition"]: f"{r['layer'] or r['tensors']} → {r['partition']} ({r['units']} units)"
                  for r in partitions.iter_rows(named=True)}
        kinds = dict(zip(names, partitions["kind"].to_list(), strict=True))
        d1, d2 = st.columns([2, 1])
        with d1:
            chosen = state.url_widget(
                "open", state.choice(names), names[0],
                lambda key: st.selectbox("Open", names, key=key, format_func=labels.__getitem__,
                                         help="A partition of a layer into heads, neurons, embedding rows or "
                                              "Fourier frequencies; its units sum to the layer's tensors exactly."),
            )  # fmt: skip
        basis = kinds[chosen] == "basis"
        top = None
        if not basis:
            with d2:
                top = state.url_widget(
                    "top", state.integer(1, 50), 8,
                    lambda key: st.number_input("Units shown", min_value=1, max_value=50, step=1, key=key,
                                                help="The units of largest absolute influence over the selected "
                                                     "steps; the others are summed into one row."),
                )  # fmt: skip
        if tests.kind not in controls.UNIT_SELECTORS:
            st.info("Heads, neurons and frequencies are stored summed over all, correctly or incorrectly predicted "
                    "test examples; choose one of those to open them.", icon="ℹ️")
        else:
            norms = run.frequency_norms()
            keys = norms.filter(pl.col("key"))["frequency"].to_list() if basis else []
            with st.spinner("Aggregating the units…"):
                units = run.unit_matrix(chosen, window, steps, tests, measure, top)
                unit_totals = run.unit_totals(chosen, steps, tests)
            layer = partitions.filter(pl.col("partition") == chosen)["layer"][0]
            title = f"{chosen}{f' of {layer}' if layer else ''}: influence per unit and step window"
            state.show_figure(charts.unit_heatmap(units, measure, quantity, style, title, keys, phases, spikes),
                              f"units-{chosen}")
            if basis and keys:
                state.hint(f"{charts.KEY_MARK} key frequencies of the final model (largest Fourier norms of its "
                           f"token embedding): {', '.join(map(str, keys))}.")
            shown = unit_totals if basis else unit_totals.sort("absolute", descending=True).head(int(top))
            state.show_figure(charts.unit_totals_bar(shown, quantity, style, "Gradient vs weight-decay part per unit",
                                                     keys), f"unit-totals-{chosen}")
            state.show_table(unit_totals, f"unit-totals-{chosen}")
