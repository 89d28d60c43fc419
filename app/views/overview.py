"""Overview: training curves with phases, parameter and optimizer curves, the run card."""

import streamlit as st

from app import charts, controls, state
from app.phases import HOLD, TRAIN_FIT, VAL_FIT, find_phases

run = state.current_run()
style = state.style()
meta = run.meta()
steps = run.steps()

st.title(f"Overview · {state.escaped(run.name)}")
state.hint(f"{meta.get('task', 'run')} · {state.num_steps(run):,} steps · explaining {state.quantity_label(meta)}")
log_x = controls.toggle("logx", "Log step axis", help="Logarithmic step axis (step 0 is not drawn).")

phases = find_phases(steps)
last = steps.sort("step").tail(1).to_dicts()[0] if steps.height else {}
tiles = st.columns(4)
measure, column, form = ("loss", "loss", "{:.4g}") if state.regression(meta) else ("accuracy", "acc", "{:.1%}")
for tile, split, prefix in ((tiles[0], "train", "train"), (tiles[1], "validation", "val")):
    value = last.get(f"{prefix}_{column}")
    tile.metric(f"final {split} {measure}", "—" if value is None else form.format(value))
tiles[2].metric("steps", f"{state.num_steps(run):,}")
residual = meta.get("max_rel_residual")
tiles[3].metric("max relative residual", "—" if residual is None else f"{residual:.2e}")

left, right = st.columns([3, 2], gap="large")
with left:
    state.show_figure(charts.training_curves(steps, phases, style, log_x=log_x), "training-curves")
with right:
    st.subheader("Run card")
    state.show_table(charts.run_card(meta), "run-card", wrap=True)
    with st.expander("All metadata"):
        st.json(meta, expanded=False)

state.show_figure(charts.optimizer_curves(steps, phases, style, log_x=log_x), "optimizer-curves")

st.subheader("Training phases")
if phases:
    state.show_table(charts.phase_table(phases), "phases", wrap=True)
else:
    st.info("No phases: this run logged no train and validation accuracy.", icon="ℹ️")
state.hint(
    "Each phase runs from its first step to its last step, both included; the next phase starts one step later. "
    f"Rule: memorization lasts until train accuracy reaches {TRAIN_FIT:.0%} and holds it; circuit formation "
    f"until validation accuracy reaches {VAL_FIT:.0%} and holds it; clean-up after. *Holds* means the "
    f"accuracy stays at or above the threshold in at least {HOLD:.0%} of the later logged steps."
)
