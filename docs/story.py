"""Print the numbers behind the sample-run sections of docs/samples.md and docs/grokking.md as Markdown tables.

    .venv/bin/python docs/story.py sample_runs/grokking.duckdb

The exactness table (agreement and KL of reconstructed vs true final predictions per
quadrature), the pruning table (kernel importance vs magnitude vs random, random averaged
over seeds), the two leading modules of every 100 steps, and per training phase — read
off the logged accuracy curves by the dashboard's rule (``app.phases``) — every module's
share of the absolute influence, its signed influence and the weight-decay part of it:
the numbers the Components page shows for the same step ranges. For a run with Fourier
partitions and progress measures also: the key frequencies, their share of each Fourier
partition's absolute influence per 100 steps and per phase, the leading heads and neurons
per phase, and the progress measures at the phase boundaries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from app.phases import find_phases, find_spikes
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


def key_share_table(db: RunDB, partition: str, keys: list[int], window: int = 100) -> pl.DataFrame:
    """Per ``window`` steps: the key frequencies' share of the partition's absolute influence,
    and the signed influence of the key and of the other frequencies."""
    matrix = db.unit_matrix(partition, window=window, measure="absolute").join(
        db.unit_matrix(partition, window=window).select("step_lo", "unit", pl.col("value").alias("signed")),
        on=["step_lo", "unit"])
    key = pl.col("label").is_in(keys)
    return matrix.group_by("step_lo", "step_hi").agg(
        (pl.col("value").filter(key).sum() / pl.col("value").sum() * 100).round(1).alias("key share %"),
        pl.col("signed").filter(key).sum().round(3).alias("key signed"),
        pl.col("signed").filter(~key).sum().round(3).alias("other signed"),
    ).sort("step_lo").select(
        pl.concat_str(pl.col("step_lo").cast(pl.String), pl.lit("–"), (pl.col("step_hi") - 1).cast(pl.String))
        .alias("steps"), "key share %", "key signed", "other signed")


def leading_units(db: RunDB, partition: str, start: int, end: int, count: int = 3) -> str:
    """The ``count`` units of largest absolute influence in steps ``start … end`` with their shares."""
    totals = db.unit_totals(partition, steps=(start, end + 1)).sort("absolute", descending=True).head(count)
    return ", ".join(f"{r['unit']} {100 * r['share']:.1f} %" for r in totals.iter_rows(named=True))


def progress_table(db: RunDB, phases: list) -> pl.DataFrame:
    """Train, validation, restricted and excluded loss at the start and end of every phase."""
    steps = db.steps().select("step", "train_loss", "val_loss")
    wide = db.progress().pivot(on="measure", index="step", values="value")
    table = steps.join(wide, on="step", how="inner")
    marks = sorted({p.start for p in phases} | {p.end for p in phases})
    return table.filter(pl.col("step").is_in(marks)).with_columns(pl.exclude("step").round(4))


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
        print(f"### loss spikes\n\n{find_spikes(db.steps()) or 'none'}\n")
        partitions = db.partitions()
        norms = db.frequency_norms()
        keys = norms.filter(pl.col("key"))["frequency"].to_list()
        if norms.height:
            share = norms.with_columns((pl.col("norm") / pl.col("norm").sum() * 100).round(1).alias("share %"))
            print(f"### key frequencies {keys}\n\n{markdown(share.filter(pl.col('key')))}\n")
        for partition in partitions.filter(pl.col("kind") == "basis")["partition"].to_list():
            table = key_share_table(db, partition, keys)
            print(f"### {partition}: key frequencies per 100 steps\n\n{markdown(table)}\n")
            for phase in phases:
                rows = db.unit_totals(partition, steps=(phase.start, phase.end + 1))
                key = rows.filter(pl.col("label").is_in(keys))
                print(f"- {partition}, {phase.name}: key frequencies {100 * key['share'].sum():.1f} % of |influence| "
                      f"(signed {key['value'].sum():.3f} of {rows['value'].sum():.3f}); leading "
                      f"{leading_units(db, partition, phase.start, phase.end)}")
            print()
        for partition in partitions.filter(pl.col("kind") == "groups")["partition"].to_list():
            for phase in phases:
                print(f"- {partition}, {phase.name}: {leading_units(db, partition, phase.start, phase.end)}")
            print()
        if db.progress().height:
            print(f"### progress measures at the phase boundaries\n\n{markdown(progress_table(db, phases))}\n")


if __name__ == "__main__":
    main()
