"""Print the numbers behind the sample-run sections of docs/samples.md as Markdown tables.

    .venv/bin/python docs/story.py sample_runs/grokking.duckdb

The exactness table (agreement and KL of reconstructed vs true final predictions per
quadrature), the pruning table (kernel importance vs magnitude vs random, random averaged
over seeds), the two leading modules of every 100 steps, and per training phase — read
off the logged accuracy curves by the dashboard's rule (``app.phases``) — every module's
share of the absolute influence, its signed influence and the weight-decay part of it:
the numbers the Components page shows for the same step ranges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from app.phases import find_phases
from engine.store import RunDB


def phase_table(db: RunDB, start: int, end: int) -> pl.DataFrame:
    totals = db.component_totals("module", steps=(start, end + 1))
    return totals.select(
        "group",
        (pl.col("share") * 100).round(1).alias("share %"),
        pl.col("value").round(3).alias("signed"),
        pl.col("decay").round(3).alias("weight-decay part"),
    ).sort("share %", descending=True)


def leaders_table(db: RunDB, window: int = 100) -> pl.DataFrame:
    """The two modules with the largest share of absolute influence in each ``window`` steps."""
    matrix = db.component_matrix("module", window=window, measure="absolute").with_columns(
        (pl.col("value") / pl.col("value").sum().over("step_lo") * 100).round(1).alias("share"))
    top = matrix.sort("value", descending=True).group_by("step_lo", "step_hi", maintain_order=True).head(2)
    return top.group_by("step_lo", "step_hi").agg(
        pl.concat_str(pl.col("group"), pl.lit(" "), pl.col("share").cast(pl.String), pl.lit(" %"))
        .str.join(", ").alias("leading modules (share of absolute influence)")).sort("step_lo").select(
        pl.concat_str(pl.col("step_lo").cast(pl.String), pl.lit("–"), (pl.col("step_hi") - 1).cast(pl.String))
        .alias("steps"), pl.exclude("step_lo", "step_hi"))


def markdown(frame: pl.DataFrame) -> str:
    rows = [frame.columns, ["---"] * frame.width, *[[str(v) for v in row] for row in frame.iter_rows()]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def exactness_table(db: RunDB) -> pl.DataFrame:
    return db.exactness().select(
        "quadrature", "agreement", pl.col("kl").map_elements(lambda v: f"{v:.1e}", return_dtype=pl.String),
        "gradient_evaluations", pl.col("max_rel_residual").map_elements(lambda v: f"{v:.1e}", return_dtype=pl.String))


def pruning_table(db: RunDB) -> pl.DataFrame:
    mean = (db.pruning().filter(pl.col("scope") == "global")
            .group_by("method", "sparsity").agg(pl.col("agreement", "accuracy", "kl").mean()))
    wide = mean.pivot(on="method", index="sparsity", values=["agreement", "accuracy", "kl"]).sort("sparsity")
    columns = [pl.col("sparsity")]
    for measure in ("agreement", "accuracy", "kl"):
        parts = [pl.col(f"{measure}_{m}").round(3).cast(pl.String) for m in ("kernel", "magnitude", "random")]
        columns.append(pl.concat_str(parts, separator=" / ").alias(f"{measure} kernel / magnitude / random"))
    return wide.select(columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    with RunDB.open(args.run) as db:
        print(f"### exactness\n\n{markdown(exactness_table(db))}\n")
        if db.pruning().height:
            print(f"### pruning\n\n{markdown(pruning_table(db))}\n")
        print(f"### leading modules per 100 steps\n\n{markdown(leaders_table(db))}\n")
        phases = find_phases(db.steps())
        for phase in phases:
            table = phase_table(db, phase.start, phase.end)
            decay = table["weight-decay part"].abs().sum() / max(table["signed"].abs().sum(), 1e-30)
            print(f"### {phase.name}: steps {phase.start}–{phase.end}\n")
            print(markdown(table))
            print(f"\nΣ|weight-decay part| / Σ|signed| = {decay:.2f}\n")


if __name__ == "__main__":
    main()
