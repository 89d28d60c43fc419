"""Overview: training curves with phases and loss spikes, progress measures, parameter and optimizer
curves, the run card."""

import polars as pl
import streamlit as st

from app import charts, controls, state
from app.phases import HOLD, SPIKE_FACTOR, SPIKE_WINDOW, TRAIN_FIT, VAL_FIT

run = state.current_run()
style = state.style()
meta = run.meta()
steps = run.steps()

st.title(f"Overview · {state.escaped(run.name)}")
state.hint(f"{meta.get('task', 'run')} · {state.num_steps(run):,} steps · explaining {state.quantity_label(meta)}")
log_x = controls.toggle("logx", "Log step axis", help="Logarithmic step axis (step 0 is not drawn).")

phases, spikes = controls.marks(run)
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
    state.show_figure(charts.training_curves(steps, phases, style, log_x=log_x, spikes=spikes), "training-curves")
with right:
    st.subheader("Run card")
    state.show_table(charts.run_card(meta), "run-card", wrap=True)
    with st.expander("All metadata"):
        st.json(meta, expanded=False)

progress = run.progress()
if progress.height:
    keys = run.frequency_norms().filter(pl.col("key"))["frequency"].to_list()
    state.show_figure(charts.progress_curves(steps, progress, keys, phases, style, log_x=log_x, spikes=spikes),
                      "progress-measures")
    state.hint(
        "Restricted loss: validation loss of the logits kept to the key frequencies' waves cos, sin of 2πk(a+b)/p "
        "(and the constant); excluded loss: training loss with those waves removed. A falling restricted and a "
        "rising excluded loss show the final model's mechanism taking over from memorisation."
    )

state.show_figure(charts.optimizer_curves(steps, phases, style, log_x=log_x, spikes=spikes), "optimizer-curves")

st.subheader("Training phases")
if phases:
    state.show_table(charts.phase_table(phases), "phases", wrap=True)
else:
    st.info("No phases: this run logged no train and validation accuracy.", icon="ℹ️")
if spikes:
    st.markdown(f"**Loss spikes** (↯ on every chart with a step axis) at steps {', '.join(map(str, spikes))}.")
state.hint(
    "Each phase runs from its first step to its last step, both included; the next phase starts one step later. "
    f"Rule: memorization lasts until train accuracy reaches {TRAIN_FIT:.0%} and holds it; circuit formation "
    f"until validation accuracy reaches {VAL_FIT:.0%} and holds it; clean-up after. *Holds* means the "
    f"accuracy stays at or above the threshold in at least {HOLD:.0%} of the later logged steps. A loss spike is "
    f"the peak of a run of steps whose train loss is at least {SPIKE_FACTOR:g}× the median of the "
    f"{SPIKE_WINDOW} steps before it (Adam's slingshot)."
)
