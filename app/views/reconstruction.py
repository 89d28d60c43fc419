"""Reconstruction: how exactly the decomposition adds up to the true change of the predictions."""

import streamlit as st

from app import charts, controls, state

run = state.current_run()
style = state.style()
meta = run.meta()
quantity = state.quantity_label(meta)

st.title(f"Reconstruction · {state.escaped(run.name)}")
c1, c2 = st.columns([2, 1])
steps, tests = controls.steps_and_tests(run, c1, c2)
controls.describe_example(run, tests)

with st.spinner("Reading completeness…"):
    comp = run.completeness(steps, tests)
if comp.height == 0:
    st.info("No completeness rows in this selection: widen the steps or choose other test examples.", icon="ℹ️")
else:
    true_total = float(comp["true_change"].sum())
    error = true_total - float(comp["reconstructed"].sum())
    split = comp["optimizer_residual"].drop_nulls()
    tiles = st.columns(5)
    tiles[0].metric(f"true Δ {quantity}", f"{true_total:.4g}")
    tiles[1].metric("reconstruction error", f"{error:.2e}")
    tiles[2].metric("Σ |quadrature residual|", f"{float(comp['abs_residual'].sum()):.2e}")
    tiles[3].metric("data-split residual (relative)",
                    f"{abs(float(split.sum())) / abs(true_total):.2e}" if split.len() and true_total else "—",
                    help="What the data view's sum over training examples misses of the true change, relative to it.")
    tiles[4].metric("nodes per step (max)", f"{int(comp['nodes'].max())}")
    state.hint(f"Summed over {controls.describe_tests(tests)} and every explained output, per step.")
    buffers = meta.get("buffer_groups") or []
    if buffers and run.views()["components"]:
        totals = run.component_totals("tensor", steps, tests)
        term = float(totals.filter(totals["group"].is_in(buffers))["value"].sum())
        state.hint(f"Of the reconstruction, {term:.4g} is the buffer term ({', '.join(buffers)}): the exact change "
                   "of the prediction as the running statistics moved, a component of its own, not a residual.")
    path, relative = meta.get("max_rel_residual"), meta.get("max_rel_split_residual")
    if relative is not None:
        state.hint(f"Whole run, worst test example: path residual {path:.2e} and data-split residual "
                   f"{relative:.2e} of the change (relative); the split residual is "
                   f"{meta.get('split_residual_cause') or 'unexplained'}.")
    state.show_figure(charts.reconstruction_change(comp, quantity, style), "reconstruction-change")
    state.show_figure(charts.residual_figure(comp, quantity, style), "residuals")
    with st.expander("Per-step table"):
        state.show_table(comp, "completeness", height=320)

st.subheader("Exactness per quadrature rule")
exactness = run.exactness()
if exactness.height == 0 and state.regression(meta):
    st.info("The exactness table compares predicted classes (agreement, KL); this run's targets are floating-point "
            "numbers, so the reconstruction above is its exactness.", icon="ℹ️")
elif exactness.height == 0:
    st.info(
        "This run has no exactness table (reconstructed vs true predictions per quadrature rule). Explain it with "
        "`--quantity logits --exactness midpoint:100,midpoint:10` to compare quadrature rules.",
        icon="ℹ️",
    )
else:
    state.show_figure(charts.exactness_figure(exactness, style), "exactness")
    state.show_table(
        exactness, "exactness",
        column_config={"agreement": st.column_config.NumberColumn(format="%.4f"),
                       "kl": st.column_config.NumberColumn("KL", format="%.3e"),
                       "max_rel_residual": st.column_config.NumberColumn(format="%.2e")},
    )  # fmt: skip
    state.hint("Agreement: share of test examples whose reconstructed prediction (argmax) equals the true one.")
