"""Components: influence by layer, module or tensor over step windows, and the weight-decay balance."""

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

    with st.spinner("Aggregating the component view…"):
        matrix = run.component_matrix(level, window, steps, tests, measure)
        totals = run.component_totals(level, steps, tests)
    order = charts.group_order(run.groups(), level)
    colors = charts.group_colors(order)
    if matrix.height == 0:
        st.info("No component influence in this selection: widen the steps or choose other test examples.", icon="ℹ️")
    else:
        state.show_figure(charts.component_heatmap(matrix, order, measure, quantity, style), "component-heatmap")
        cumulative = controls.toggle(
            "cumulative", "Running sum over windows", help="Show each group's influence summed up to each window."
        )
        state.show_figure(
            charts.component_lines(matrix, colors, order, measure, quantity, style, cumulative=cumulative),
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
