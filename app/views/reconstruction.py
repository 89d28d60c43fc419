"""Reconstruction: how exactly the decomposition adds up to the true change of the predictions."""

import streamlit as st

from app import charts, controls, state

run = state.current_run()
style = state.style()
meta = run.meta()
quantity = state.quantity_label(meta)

st.title(f"Reconstruction · {run.name}")
c1, c2 = st.columns([2, 1])
steps, tests = controls.steps_and_tests(run, c1, c2)
controls.describe_example(run, tests)

phases, spikes = controls.marks(run)
with st.spinner("Reading completeness…"):
    comp = run.completeness(steps, tests)
if comp.height == 0:
    st.info("No completeness rows in this selection: widen the steps or choose other test examples.", icon="ℹ️")
else:
    true_total = float(comp["true_change"].sum())
    error = true_total - float(comp["reconstructed"].sum())
    tiles = st.columns(4)
    tiles[0].metric(f"true Δ {quantity}", f"{true_total:.4g}")
    tiles[1].metric("reconstruction error", f"{error:.2e}")
    tiles[2].metric("Σ |quadrature residual|", f"{float(comp['abs_residual'].sum()):.2e}")
    tiles[3].metric("nodes per step (max)", f"{int(comp['nodes'].max())}")
    state.hint(f"Summed over {controls.describe_tests(tests)} and every explained output, per step.")
    state.show_figure(charts.reconstruction_change(comp, quantity, style, phases, spikes), "reconstruction-change")
    state.show_figure(charts.residual_figure(comp, quantity, style, phases, spikes), "residuals")
    with st.expander("Per-step table"):
        state.show_table(comp, "completeness", height=320)

st.subheader("Exactness per quadrature rule")
exactness = run.exactness()
if exactness.height == 0:
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
