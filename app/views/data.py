"""Data: which training examples pushed the selected test predictions, and when."""

import polars as pl
import streamlit as st

from app import charts, controls, state

RENDER_COLUMNS = 5

run = state.current_run()
style = state.style()
quantity = state.quantity_label(run.meta())

st.title(f"Data · {state.escaped(run.name)}")
if run.views()["data"] == 0 and run.meta().get("kind") == "checkpoints":
    st.info(
        "This run explains a series of checkpoints: it has no data axis. Between two checkpoints the change of a "
        "prediction splits exactly into components, but splitting it by training example needs every step's batch "
        "and optimizer state, which checkpoints do not keep. To get one, record the training loop with "
        "`engine.run.record.Recorder` and explain the recording: "
        "`python -m engine explain RUN_DIR --out RUN.duckdb --views components,data`.",
        icon="ℹ️",
    )
elif run.views()["data"] == 0:
    st.info(
        "This run has no data view (influence of single training examples). Explain the run again with it: "
        "`python -m engine explain RUN_DIR --out RUN.duckdb --views components,data` "
        "(SGD- and Adam-family optimizers).",
        icon="ℹ️",
    )
else:
    c1, c2, c3 = st.columns([2, 1, 1])
    steps, tests = controls.steps_and_tests(run, c1, c2)
    with c3:
        k = state.url_widget(
            "k", state.integer(1, 50), 10,
            lambda key: st.number_input("Examples per side", min_value=1, max_value=50, step=1, key=key),
        )  # fmt: skip
        state.note_slice(f"top {k} per side", f"k{k}")
    controls.describe_example(run, tests)

    with st.spinner("Ranking training examples…"):
        top = run.top_train_examples(tests, steps, int(k))
    if top.height == 0:
        st.info("No training example influenced this selection: widen the steps or choose other test examples.",
                icon="ℹ️")
    else:
        state.show_figure(charts.top_examples_bar(top, quantity, style), "top-examples")
        multiline = any("\n" in (t or "") for t in top.get_column("text").to_list())
        if multiline:
            for side in ("proponent", "opponent"):
                rows = top.filter(pl.col("side") == side).sort("rank").to_dicts()
                if not rows:
                    continue
                st.subheader(f"Top {side}s")
                for start in range(0, len(rows), RENDER_COLUMNS):
                    chunk = rows[start : start + RENDER_COLUMNS]
                    for column, row in zip(st.columns(RENDER_COLUMNS), chunk, strict=False):
                        with column:
                            controls.example_text(row["text"], f"#{row['train']} · {row['value']:+.3g}")
        columns = ["side", "rank", "train", "value", "label", "text"]
        if top.get_column("label").null_count() == top.height:  # floating-point targets: shown in the text
            columns.remove("label")
        state.show_table(
            top.select(columns), "top-examples",
            column_config={"text": st.column_config.TextColumn("example", width="large"),
                           "value": st.column_config.NumberColumn(f"influence (Δ {quantity})", format="%.4g")},
        )  # fmt: skip

    st.subheader("One training example over time")
    train_ids = run.examples("train").get_column("example")
    lo, hi = (-1, int(train_ids.max())) if train_ids.len() else (-1, -1)
    default = int(top.get_column("train")[0]) if top.height else max(lo, 0)
    train = state.url_widget(
        "train", state.integer(lo, hi), default,
        lambda key: st.number_input("Training example id (−1: weight decay)", min_value=lo, max_value=hi, step=1,
                                    key=key),
    )  # fmt: skip
    if train >= 0:
        row = run.examples("train").filter(pl.col("example") == train)
        if row.height:
            label = row["label"][0]
            controls.example_text(row["text"][0], f"training #{train}" + ("" if label is None else f" · label {label}"))
    with st.spinner("Reading its influence…"):
        over_time = run.train_example_over_time(int(train), tests)
    state.show_figure(charts.example_over_time(over_time, int(train), quantity, style), "example-over-time")

    st.subheader("Distribution of influences")
    with st.spinner("Summing every training example…"):
        dist = run.data_distribution(tests, steps)
        decay = run.train_example_over_time(-1, tests)
    in_range = decay.filter((pl.col("step_lo") >= steps[0]) & (pl.col("step_lo") < steps[1]))
    if in_range.height and in_range["value"].abs().sum() > 0:
        regularizer = pl.DataFrame({"train": [-1], "value": [in_range["value"].sum()]})
        dist = pl.concat([dist, regularizer], how="vertical_relaxed")
    state.show_figure(charts.influence_histogram(dist, quantity, style), "influence-histogram")
    state.hint("Green bins push the selected predictions up, red bins down; the dashed line is weight decay.")
