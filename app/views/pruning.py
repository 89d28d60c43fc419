"""Pruning: does kernel importance find the parameters that matter (vs magnitude and random)?"""

import polars as pl
import streamlit as st

from app import charts, state

run = state.current_run()
style = state.style()

st.title(f"Pruning · {run.name}")
pruning = run.pruning()
if pruning.height == 0:
    st.info(
        f"This run has no pruning curves. Add them with `python -m engine prune {run.path}` (the run must have "
        "been explained with `--views components,importance`); the curves compare kernel importance with "
        "magnitude and random pruning.",
        icon="ℹ️",
    )
else:
    scopes = sorted(pruning.get_column("scope").unique().to_list())
    scope = state.url_widget(
        "scope", state.choice(scopes), scopes[0],
        lambda key: st.segmented_control("Scope", scopes, required=True, key=key,
                                         help="Which parameters were candidates for pruning."),
    )  # fmt: skip
    selected = pruning.filter(pl.col("scope") == scope)
    state.show_figure(charts.pruning_figure(selected, style), f"pruning-{scope}")
    state.hint(
        "Parameters outside the kept top fraction are zeroed without retraining; agreement is with the unpruned "
        "model's predictions, KL is KL(unpruned ‖ pruned). Random pruning: mean over seeds, band = min–max."
    )
    state.show_table(selected, f"pruning-{scope}")
