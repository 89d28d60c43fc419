"""Pruning: does kernel importance find the parameters that matter (vs magnitude and random)?"""

import polars as pl
import streamlit as st

from app import charts, state

run = state.current_run()
style = state.style()

st.title(f"Pruning · {state.escaped(run.name)}")
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
    state.note_slice(f"{scope} pruning", scope)
    selected = pruning.filter(pl.col("scope") == scope)
    state.show_figure(charts.pruning_figure(selected, style), "curves")
    state.hint(
        "Parameters outside the kept top fraction are zeroed without retraining; agreement is with the unpruned "
        "(dense) model's predictions, KL is KL(dense ‖ pruned). Methods with several seeds: mean over seeds, "
        "band = min–max."
    )
    state.show_table(
        charts.pruning_table(selected), "means",
        column_config={"sparsity": st.column_config.NumberColumn(format="percent"),
                       "achieved_sparsity": st.column_config.NumberColumn("achieved sparsity", format="percent"),
                       "agreement": st.column_config.NumberColumn(format="%.4f"),
                       "accuracy": st.column_config.NumberColumn(format="%.4f"),
                       "kl": st.column_config.NumberColumn("KL (nats)", format="%.4g")},
    )  # fmt: skip
