"""The unit of parallel work: one explanation of a (test chunk × step segment), written as shards.

A ``WorkUnit`` names a run directory, an ``ExplainConfig`` restricted to some test examples and
steps, and the folder its shards go to. ``run_unit`` is a plain function (Ray calls it on a
worker; nothing here imports Ray): it explains the unit and writes each frame of the result as a
Parquet file plus ``manifest.json`` with the summary numbers, into a temporary folder renamed
into place when complete — so a unit's folder exists only when all of it does. A unit whose
folder exists is not computed again (resume). Every attempt leaves a file named by the worker's
process id in ``<unit>.attempts/``, which counts retries and lets a test kill the worker.

How an explanation splits (``plan_units``):

- over **test examples** always: every view of one test example depends on that example only;
  importance is a sum over test examples, so chunks add up.
- over **step segments** only where the pieces merge exactly: the components view and the
  completeness rows (each step's path identity needs only θ_s and θ_{s+1}; components are sums
  over windows, and segments start on window boundaries), with the quantity ``logits`` (whose
  predictions give each test example's starting value, needed for the relative residuals), every
  step computed (``subsample`` ranks steps over the whole range) and no ``rtol`` (its budget is
  shared out over the steps of the range). Importance is ``Σ |Σ_s …|`` — the absolute value of a
  sum over *all* steps — so it does not add over segments; the data view carries per-example
  optimizer state from step to step (MATH.md §3), so a segment would replay every step before it.
  Both split over test examples only. A segment that starts after step 0 replays the optimizer
  from step 0 to carry its state (the training side only: one batch gradient per earlier step).

``merge_units`` puts the pieces back together: segments of one chunk in step order (residual
summaries recomputed from the merged rows, as ``explain`` computes them), then chunks with
``merge_tests``, frames sorted in the order ``explain`` returns them.

A checkpoint series splits by interval (``IntervalUnit``, MATH.md §7: interval ``k`` needs
checkpoints ``k`` and ``k + 1`` only). ``run_interval`` saves it in the series' own work folder,
where ``explain_checkpoints`` reads every interval back; nothing is merged here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from engine.decompose import DTYPES, ExplainConfig, Explanation, explain_history, merge_tests
from engine.decompose.checkpoints import checkpoint_config, saved_interval
from engine.model.outputs import get_quantity
from engine.model.task import get_task
from engine.run.history import History
from engine.run.series import SeriesSource, open_series

FRAMES = ("components", "data", "importance", "completeness", "predictions", "step_stats", "units", "unit_components")
TUPLES = ("test_ids", "steps", "notes")


@dataclass(frozen=True)
class WorkUnit:
    """One task: explain ``config`` (its ``test_ids`` and ``steps`` set) of the run at ``run_dir``."""

    run_dir: str
    config: ExplainConfig
    folder: str                    # the unit's shard folder (exists only when complete)
    pass_index: int                # which of the driver's explanations this unit belongs to
    chunk: int                     # test chunk index within that explanation
    segment: int                   # step segment index within that chunk
    allow_incomplete: bool = False

    @property
    def attempts_folder(self) -> Path:
        return Path(self.folder + ".attempts")

    def done(self) -> bool:
        return (Path(self.folder) / "manifest.json").exists()


def segmentable(config: ExplainConfig) -> bool:
    """Whether ``config`` may be split over step segments (see the module docstring)."""
    return (set(config.views) <= {"components"} and config.quantity_name == "logits"
            and config.subsample >= 1.0 and config.rtol is None and not config.partitions)


def plan_units(history: History, config: ExplainConfig, test_ids: tuple[int, ...], slots: int, folder: Path,
               pass_index: int, allow_incomplete: bool = False, segments: int = 2) -> list[WorkUnit]:
    """About two units per slot (so that slots stay busy until the end): ``segments`` step segments
    (window-aligned) of test chunks where the configuration allows it, else ``2·slots`` test chunks."""
    lo, hi = config.steps or (0, history.num_steps)
    windows = -(-(hi - lo) // config.window)
    segments = min(segments, windows) if segmentable(config) else 1
    chunks = min(len(test_ids), max(1, -(-2 * slots // segments)))
    size = -(-len(test_ids) // chunks)
    parts = [test_ids[a:a + size] for a in range(0, len(test_ids), size)]
    per = -(-windows // segments)
    bounds = [(lo + k * per * config.window, min(hi, lo + (k + 1) * per * config.window)) for k in range(segments)]
    bounds = [b for b in bounds if b[0] < b[1]]
    return [WorkUnit(str(history.path), replace(config, test_ids=tuple(part), steps=steps),
                     str(folder / f"pass{pass_index}-chunk{c:03d}-seg{k:02d}"), pass_index, c, k, allow_incomplete)
            for c, part in enumerate(parts) for k, steps in enumerate(bounds)]


def content_key(history: History, configs: list[ExplainConfig], slots: int) -> str:
    """A hash of the run's record and every argument that shapes the units: shards are reused
    only by the same command on the same run."""
    import hashlib

    def described(config: ExplainConfig) -> dict[str, Any]:
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        fields["quantity"] = get_quantity(config.quantity).name
        return fields

    text = json.dumps({"run": (Path(history.path) / "manifest.json").read_text(), "slots": slots,
                       "configs": [described(c) for c in configs]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- on a worker
def run_unit(unit: WorkUnit) -> dict[str, Any]:
    """Explain one unit and write its shards, unless they exist; returns its timing report."""
    started = time.perf_counter()
    attempts = unit.attempts_folder
    if unit.done():
        return _report(unit, 0.0, reused=True)
    attempts.mkdir(parents=True, exist_ok=True)
    (attempts / str(os.getpid())).touch()
    explanation = explain_unit(unit)
    write_shards(explanation, Path(unit.folder))
    return _report(unit, time.perf_counter() - started, reused=False)


def explain_unit(unit: WorkUnit) -> Explanation:
    """``explain`` of the unit's test examples and steps of a recorded run."""
    history = History.open(unit.run_dir, allow_incomplete=unit.allow_incomplete)
    return explain_history(history, get_task(history.model_spec), unit.config, progress=False)


def _report(unit: WorkUnit, seconds: float, reused: bool) -> dict[str, Any]:
    return {"unit": Path(unit.folder).name, "tests": len(unit.config.test_ids or ()),
            "steps": list(unit.config.steps or ()), "seconds": seconds, "reused": reused,
            "retries": _retries(unit.attempts_folder), "worker_pid": os.getpid()}


def _retries(attempts: Path) -> int:
    return max(0, len(list(attempts.iterdir())) - 1) if attempts.exists() else 0


@dataclass(frozen=True)
class IntervalUnit:
    """One task of a checkpoint series: interval ``k`` of the series at ``source``, explained with
    ``checkpoint_config(opened, **options)`` and saved in ``work`` (``work_folder`` of the run
    database)."""

    source: SeriesSource
    options: tuple[tuple[str, Any], ...]   # the numerical settings, as (name, value) pairs
    work: str
    k: int
    tests: int                             # explained inputs (for the progress bar's throughput)
    steps: tuple[int, int]                 # training steps of the two checkpoints

    @property
    def name(self) -> str:
        return f"interval-{self.k:05d}"

    @property
    def attempts_folder(self) -> Path:
        return Path(self.work) / f"{self.name}.attempts"


def run_interval(unit: IntervalUnit) -> dict[str, Any]:
    """Explain and save one interval (on a worker); returns its timing report."""
    started = time.perf_counter()
    unit.attempts_folder.mkdir(parents=True, exist_ok=True)
    (unit.attempts_folder / str(os.getpid())).touch()
    opened = open_series(unit.source)
    saved_interval(opened, checkpoint_config(opened, **dict(unit.options)), Path(unit.work), unit.k)
    return interval_report(unit, time.perf_counter() - started, reused=False)


def interval_report(unit: IntervalUnit, seconds: float, reused: bool) -> dict[str, Any]:
    return {"unit": unit.name, "tests": unit.tests, "steps": list(unit.steps), "seconds": seconds,
            "reused": reused, "retries": _retries(unit.attempts_folder), "worker_pid": os.getpid()}


def write_shards(explanation: Explanation, folder: Path) -> None:
    """Each frame as ``<name>.parquet`` and the summary as ``manifest.json``, published by renaming
    a temporary folder (a crash leaves no half-written unit)."""
    temp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    manifest: dict[str, Any] = {"frames": []}
    for field in dataclasses.fields(explanation):
        value = getattr(explanation, field.name)
        if field.name in FRAMES:
            if value is not None:
                value.write_parquet(temp / f"{field.name}.parquet")
                manifest["frames"].append(field.name)
        elif field.name != "config":
            manifest[field.name] = list(value) if isinstance(value, tuple) else value
    (temp / "manifest.json").write_text(json.dumps(manifest))
    try:
        os.replace(temp, folder)
    except OSError:
        if not (folder / "manifest.json").exists():
            raise
        shutil.rmtree(temp)  # another attempt of the same unit finished first


def read_shards(unit: WorkUnit) -> Explanation:
    folder = Path(unit.folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    frames = manifest.pop("frames")
    values = {name: (pl.read_parquet(folder / f"{name}.parquet") if name in frames else None) for name in FRAMES}
    values.update({k: tuple(v) if k in TUPLES else v for k, v in manifest.items()})
    return Explanation(config=unit.config, **values)


# ---------------------------------------------------------------------------- on the driver
def merge_units(units: list[WorkUnit], parts: list[Explanation], config: ExplainConfig,
                test_ids: tuple[int, ...]) -> Explanation:
    """One explanation of ``config`` from its units' explanations (``units[i]`` ↔ ``parts[i]``)."""
    chunks: dict[int, list[tuple[int, Explanation]]] = {}
    for unit, part in zip(units, parts, strict=True):
        chunks.setdefault(unit.chunk, []).append((unit.segment, part))
    merged = [_merge_segments([p for _, p in sorted(chunks[c], key=lambda sp: sp[0])], config)
              for c in sorted(chunks)]
    whole = merge_tests(merged) if len(merged) > 1 else merged[0]
    return _in_explain_order(replace(whole, config=config, test_ids=test_ids))


def _merge_segments(parts: list[Explanation], config: ExplainConfig) -> Explanation:
    """Consecutive step segments of the same test examples (components and completeness only)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    completeness = pl.concat([p.completeness for p in parts], rechunk=True)
    initial = first.predictions.select("test", "output", "initial")
    totals = completeness.group_by("test", "output").agg(
        pl.col("true_change").sum().alias("total_true"), pl.col("reconstructed").sum().alias("total_recon"),
        pl.col("quadrature_residual").sum().alias("total_resid"),
        pl.col("optimizer_residual").sum().alias("total_opt")).join(
        initial, on=["test", "output"]).sort("test", "output")
    tests, outputs = totals["test"].n_unique(), first.outputs
    grid = {c: totals[c].to_numpy().reshape(tests, outputs)
            for c in ("initial", "total_true", "total_resid", "total_opt")}
    predictions = totals.select(
        "test", "output", "initial", (pl.col("initial") + pl.col("total_true")).alias("true_final"),
        (pl.col("initial") + pl.col("total_recon")).alias("reconstructed_final"))
    eps = torch.finfo(DTYPES[config.dtype]).eps
    g0, total_true, total_resid = grid["initial"], grid["total_true"], grid["total_resid"]
    floor = eps * (np.abs(g0) + np.abs(g0 + total_true))
    norm_true = np.maximum(np.linalg.norm(total_true, axis=1), np.linalg.norm(floor, axis=1))
    max_opt = max_split = None
    if completeness["optimizer_residual"].is_not_null().any():
        split = grid["total_opt"]  # (test, out): what the data view misses over the steps
        max_opt = float(np.nanmax(np.abs(split)))
        max_split = float((np.linalg.norm(split, axis=1) / norm_true).max())
    return replace(
        first, steps=(first.steps[0], parts[-1].steps[1]),
        components=None if first.components is None else pl.concat([p.components for p in parts], rechunk=True),
        completeness=completeness, predictions=predictions,
        step_stats=pl.concat([p.step_stats for p in parts], rechunk=True),
        max_rel_residual=float((np.linalg.norm(total_resid, axis=1) / norm_true).max()),
        max_rel_residual_output=float((np.abs(total_resid) / np.maximum(np.abs(total_true), floor)).max()),
        max_abs_residual=float(np.abs(total_resid).max()),
        max_optimizer_residual=max_opt, max_rel_split_residual=max_split,
        gradient_evaluations=sum(p.gradient_evaluations for p in parts), seconds=sum(p.seconds for p in parts),
        escalated=sum(p.escalated for p in parts), partial=any(p.partial for p in parts),
        notes=tuple(dict.fromkeys(n for p in parts for n in p.notes)))


def _in_explain_order(e: Explanation) -> Explanation:
    """Frames sorted as ``explain`` returns them (components in model group order)."""
    components = e.components
    if components is not None:
        column = e.config.granularity
        order = {label: i for i, label in enumerate(components[column].unique(maintain_order=True))}
        components = components.sort(["step_lo", pl.col(column).replace_strict(order, return_dtype=pl.Int64),
                                      "test", "output"])
    return replace(
        e, components=components, completeness=e.completeness.sort("step", "test", "output"),
        data=None if e.data is None else e.data.sort("step_lo", "train", "test", "output"),
        predictions=None if e.predictions is None else e.predictions.sort("test", "output"),
        unit_components=None if e.unit_components is None
        else e.unit_components.sort("step_lo", "unit_id", "test", "output"),
        step_stats=e.step_stats.sort("step"))

