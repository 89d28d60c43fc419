"""Explain a checkpoint series: one interval at a time, resumable, written as a run database.

Interval ``k`` (checkpoints ``k`` and ``k + 1``) is one step of the path identity (MATH.md §7):
``explain_interval`` decomposes it with the engine's own pass (``explain_history`` over the
series, restricted to that step: adaptive quadrature, ``rtol`` escalation, every component
per tensor) and returns its rows, labelled with the checkpoints' training steps. It is a pure
unit of work: it needs the series, the task, the configuration and ``k``, nothing of the
other intervals. There is no data view and no weight-decay split: a series has no batches
and no optimizer state.

``explain_series`` runs the intervals in order, keeping two checkpoints in memory. With a
work folder each finished interval is saved there, under a name made from the content
hashes of its two checkpoints and the hash of everything else that determines its numbers
(``run_key``); a run killed and restarted with the same arguments reads the saved intervals
back and computes only the others. ``explain_checkpoints`` does all of it for a run database
path: work folder beside it, database written atomically, work folder removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from engine.decompose.api import ExplainInterrupted, explain_history, prediction_agreement
from engine.decompose.config import ExplainConfig, parse_test
from engine.errors import BadInputError, ExplaindError
from engine.model.groups import GroupMap, ParamLayout
from engine.model.lm import lm_quantity
from engine.model.outputs import get_quantity
from engine.run.checkpoints import CheckpointSeries, SeriesTask
from engine.run.series import OpenedSeries

FORMAT = 1  # layout of a saved interval; part of every interval's key
FORWARD_BATCH = 64  # inputs per forward pass when measuring the loss at a checkpoint
# Checkpoints lie many optimizer steps apart: along the straight segment between them ∇g varies
# far more than along one step, and the Gauss rules of the adaptive ladder go up to 256 nodes
# (each unit stops at the first rule that meets its tolerance).
QUADRATURE = "adaptive:256"


class SeriesInterrupted(ExplaindError):
    """Ctrl-C while a series was explained; the finished intervals stay saved."""


def checkpoint_config(opened: OpenedSeries, quantity: str = "loss", quadrature: str = QUADRATURE,
                      **options: Any) -> ExplainConfig:
    """The ``ExplainConfig`` of a series: the components view per tensor, no decay split (there
    is no optimizer), the explained inputs as the test split; ``options`` are the numerical
    settings (``dtype``, ``rtol``, ``device``, budgets)."""
    fixed = {"views", "granularity", "decay_split", "optimizer_residual", "window", "steps", "subsample"}
    clash = sorted(fixed & set(options))
    if clash:
        raise BadInputError(f"a checkpoint series sets {', '.join(clash)} itself")
    test = {"test_split": "val", "test_size": None, "test_ids": None}
    if opened.test_spec is not None:
        test = {**parse_test(opened.test_spec), "test_split": "val"}
    explained = lm_quantity(quantity) if opened.task.language_model else get_quantity(quantity)
    return ExplainConfig(**test, quantity=explained, quadrature=quadrature, views=("components",),
                         granularity="tensor", decay_split=False, optimizer_residual=False, **options)


# ------------------------------------------------------------------------------------ one interval
@dataclass(frozen=True)
class IntervalResult:
    """The rows and numbers of one interval ``index``: checkpoints at ``step_lo`` and ``step_hi``.

    ``components``: step_lo, step_hi, tensor, test, output, value, decay (0: no decay split);
    ``completeness``: step (= step_lo), test, output, true_change, reconstructed,
    quadrature_residual, optimizer_residual (null), nodes; ``predictions`` (quantity
    ``logits`` only): test, output, initial, true_final, reconstructed_final; ``numbers``:
    norms, the loss (and accuracy) at both checkpoints, residuals, cost, digests.
    """

    index: int
    step_lo: int
    step_hi: int
    components: pl.DataFrame
    completeness: pl.DataFrame
    predictions: pl.DataFrame | None
    numbers: dict[str, Any]


def explain_interval(series: CheckpointSeries, task: SeriesTask, config: ExplainConfig, k: int) -> IntervalResult:
    """Decompose interval ``k`` of ``series``: checkpoints ``k`` and ``k + 1`` only.

    With ``rtol`` in float32, an input whose reconstruction still misses the budget is explained
    again in float64: the engine holds each quadrature rule to the budget, but the float32 sum
    of the components carries round-off of the size of the components, which exceeds the
    budget where they cancel to a small change (a converged model's loss between checkpoints).
    """
    if not 0 <= k < series.num_steps:
        raise BadInputError(f"interval {k} is outside the series' 0..{series.num_steps - 1}")
    started = time.perf_counter()
    unit = replace(config, steps=(k, k + 1))
    explanation = explain_history(series, task, unit, progress=False)
    components, completeness, predictions = explanation.components, explanation.completeness, explanation.predictions
    evaluations, escalated = explanation.gradient_evaluations, explanation.escalated
    missed = _over_budget(completeness, config.rtol) if config.rtol is not None and config.dtype != "float64" else []
    if missed:
        wide = explain_history(series, task, replace(unit, dtype="float64", test_ids=tuple(missed), test_size=None),
                               progress=False)
        position = {name: i for i, name in enumerate(series.param_names)}
        components = _replaced(components, wide.components, missed,
                               ["step_lo", pl.col("tensor").replace_strict(position), "test", "output"])
        completeness = _replaced(completeness, wide.completeness, missed, ["step", "test", "output"])
        if predictions is not None:
            predictions = _replaced(predictions, wide.predictions, missed, ["test", "output"])
        evaluations += wide.gradient_evaluations
        escalated += len(missed)
    lo, hi = series.steps[k], series.steps[k + 1]
    components = components.with_columns(pl.lit(lo, dtype=pl.Int64).alias("step_lo"),
                                         pl.lit(hi, dtype=pl.Int64).alias("step_hi"))
    completeness = completeness.with_columns(pl.lit(lo, dtype=pl.Int64).alias("step"))
    stats = explanation.step_stats.row(0, named=True)
    loss_lo, acc_lo = _loss_at(series, task, config, k)
    loss_hi, acc_hi = _loss_at(series, task, config, k + 1)
    numbers = {
        "update_norm": stats["update_norm"], "param_norm_lo": stats["param_norm"],
        "param_norm_hi": _norm(series.params(k + 1)),
        "loss_lo": loss_lo, "loss_hi": loss_hi, "acc_lo": acc_lo, "acc_hi": acc_hi,
        **_residuals(completeness),
        "gradient_evaluations": evaluations, "escalated": escalated, "recomputed_inputs": len(missed),
        "engine": explanation.engine, "device": explanation.device, "notes": list(explanation.notes),
        "seconds": time.perf_counter() - started,
        "digest_lo": series.digest(k), "digest_hi": series.digest(k + 1),
    }
    return IntervalResult(k, lo, hi, components, completeness, predictions, numbers)


def _norms(completeness: pl.DataFrame) -> pl.DataFrame:
    """Per input: the norms over outputs of the true change and of the residual."""
    return completeness.group_by("test").agg((pl.col("true_change") ** 2).sum().sqrt().alias("true"),
                                              (pl.col("quadrature_residual") ** 2).sum().sqrt().alias("residual"))


def _over_budget(completeness: pl.DataFrame, rtol: float) -> list[int]:
    norms = _norms(completeness)
    return sorted(norms.filter(pl.col("residual") > rtol * pl.col("true"))["test"].to_list())


def _replaced(frame: pl.DataFrame, wide: pl.DataFrame, tests: list[int], order: list) -> pl.DataFrame:
    """``frame`` with the rows of ``tests`` taken from ``wide``, in the frame's order."""
    kept = frame.filter(~pl.col("test").is_in(tests))
    return pl.concat([kept, wide.select(frame.columns).cast(frame.schema)]).sort(order)


def _residuals(completeness: pl.DataFrame) -> dict[str, float]:
    """Worst ``‖residual‖ / ‖true change‖`` of one input (norms over outputs), worst ratio of one
    output (outputs that do not change, as padded positions, left out) and worst absolute residual."""
    tiny = np.finfo(np.float64).tiny
    norms = _norms(completeness)
    moving = completeness.filter(pl.col("true_change") != 0)
    per_output = (moving["quadrature_residual"].abs() / moving["true_change"].abs()).max() if moving.height else 0.0
    return {"max_rel_residual": _finite(float((norms["residual"] / norms["true"].clip(lower_bound=tiny)).max())),
            "max_rel_residual_output": _finite(float(per_output or 0.0)),
            "max_abs_residual": float(completeness["quadrature_residual"].abs().max())}


def _norm(params: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(p.double().pow(2).sum()) for p in params.values()))


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float(np.finfo(np.float64).max)


@torch.no_grad()
def _loss_at(series: CheckpointSeries, task: SeriesTask, config: ExplainConfig, k: int) -> tuple[float, float | None]:
    """Mean loss over the explained inputs at checkpoint ``k`` (language models: each sequence's
    mean next-token loss), and the accuracy of a classifier; in the compute dtype."""
    model = task.build_model()
    parameter = next(model.parameters())
    params = {n: p.to(device=parameter.device, dtype=parameter.dtype) for n, p in series.params(k).items()}
    buffers = dict(model.named_buffers())
    data = task.dataset("val")
    ids = torch.tensor(config.test_ids_in(len(data)), dtype=torch.int64)
    loss = lm_quantity("loss") if task.language_model else get_quantity("loss")
    total, correct = 0.0, 0
    for a in range(0, len(ids), FORWARD_BATCH):
        index = ids[a:a + FORWARD_BATCH]
        x = data.inputs[index].to(parameter.device)
        x = x.to(parameter.dtype) if x.is_floating_point() else x
        y = data.labels[index].to(parameter.device)
        out = functional_call(model, {**params, **buffers}, (x,))
        total += float(loss(out, y).sum())
        if not task.language_model:
            correct += int((out.argmax(-1) == y).sum())
    return total / len(ids), None if task.language_model else correct / len(ids)


# ------------------------------------------------------------------------------------ saved intervals
def run_key(opened: OpenedSeries, config: ExplainConfig) -> str:
    """SHA-256 of what, besides the two checkpoints, determines an interval's numbers."""
    settings = {
        "format": FORMAT, "model": opened.series.model_spec, "inputs": opened.inputs, "test": opened.test_spec,
        "quantity": config.quantity_name, "quadrature": config.quadrature, "dtype": config.dtype,
        "rtol": config.rtol, "engine": config.engine, "test_chunk": config.test_chunk, "block": config.block,
        "max_batch": config.max_batch, "memory_mb": config.memory_mb,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _interval_name(key: str, series: CheckpointSeries, k: int) -> str:
    """The saved name of interval ``k``: its position, its checkpoints' steps and contents, ``key``."""
    ends = f"{series.steps[k]}:{series.digest(k)}:{series.steps[k + 1]}:{series.digest(k + 1)}"
    ident = hashlib.sha256(f"{key}:{ends}".encode()).hexdigest()
    return f"interval-{k:05d}-{ident[:20]}"


def _save(result: IntervalResult, folder: Path) -> None:
    """Write an interval under a temporary name and rename it into place (a folder appears whole)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    result.components.write_parquet(tmp / "components.parquet")
    result.completeness.write_parquet(tmp / "completeness.parquet")
    if result.predictions is not None:
        result.predictions.write_parquet(tmp / "predictions.parquet")
    (tmp / "interval.json").write_text(json.dumps(
        {"index": result.index, "step_lo": result.step_lo, "step_hi": result.step_hi, "numbers": result.numbers}))
    try:
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp)  # another process saved the same interval (same key: the same numbers) first


def _load(folder: Path) -> IntervalResult:
    head = json.loads((folder / "interval.json").read_text())
    predictions = folder / "predictions.parquet"
    return IntervalResult(head["index"], head["step_lo"], head["step_hi"],
                          pl.read_parquet(folder / "components.parquet"),
                          pl.read_parquet(folder / "completeness.parquet"),
                          pl.read_parquet(predictions) if predictions.exists() else None, head["numbers"])


# ------------------------------------------------------------------------------------ the series
@dataclass(frozen=True)
class SeriesExplanation:
    """Every interval of a series and the run-level numbers; ``to_bundle`` gives the run database."""

    opened: OpenedSeries
    config: ExplainConfig
    intervals: tuple[IntervalResult, ...]
    resumed: int      # intervals read back from the work folder
    seconds: float    # wall time of this call (``summary()["seconds"]``: the intervals' own compute time)

    @property
    def completeness(self) -> pl.DataFrame:
        return pl.concat([r.completeness for r in self.intervals])

    @property
    def components(self) -> pl.DataFrame:
        return pl.concat([r.components for r in self.intervals])

    def residuals(self) -> dict[str, float]:
        """Worst relative residual of one interval and input (norm over outputs), and of the whole
        series per input (residuals and changes summed over intervals first)."""
        totals = self.completeness.group_by("test", "output").agg(pl.col("true_change").sum(),
                                                                   pl.col("quadrature_residual").sum())
        return {"max_rel_residual": _residuals(totals)["max_rel_residual"],
                "max_rel_residual_interval": max(r.numbers["max_rel_residual"] for r in self.intervals),
                "max_abs_residual": max(r.numbers["max_abs_residual"] for r in self.intervals)}

    def summary(self) -> dict[str, Any]:
        series = self.opened.series
        return {
            "checkpoints": len(series.checkpoints), "steps": list(series.steps),
            "quantity": self.config.quantity_name, "quadrature": str(self.config.quadrature_spec),
            "dtype": self.config.dtype, "rtol": self.config.rtol,
            "engine": self.intervals[0].numbers["engine"], "device": self.intervals[0].numbers["device"],
            "inputs": self.opened.inputs, "tests": self.completeness["test"].n_unique(),
            **self.residuals(),
            "gradient_evaluations": sum(r.numbers["gradient_evaluations"] for r in self.intervals),
            "escalated": sum(r.numbers["escalated"] for r in self.intervals),
            "recomputed_inputs": sum(r.numbers["recomputed_inputs"] for r in self.intervals),
            "seconds": sum(r.numbers["seconds"] for r in self.intervals), "wall_seconds": self.seconds,
            "resumed_intervals": self.resumed,
            "loss": [self.intervals[0].numbers["loss_lo"], *[r.numbers["loss_hi"] for r in self.intervals]],
            "notes": self.notes(),
        }

    def notes(self) -> list[str]:
        found = [*self.opened.series.notes, *(n for r in self.intervals for n in r.numbers["notes"])]
        return list(dict.fromkeys(found))

    def to_bundle(self, extra: dict[str, Any] | None = None) -> Any:
        """The ``engine.store.RunBundle`` of the series (``extra`` is added to its metadata)."""
        from engine.store import RunBundle

        series, task = self.opened.series, self.opened.task
        layout = ParamLayout(tuple(series.param_names), tuple(series.param_shapes[n] for n in series.param_names))
        groups = GroupMap.build(layout, layer_of=task.layer_of)
        predictions = exactness = None
        if self.intervals[0].predictions is not None:
            predictions = _chain_predictions([r.predictions for r in self.intervals])
            exactness = pl.DataFrame([{
                "quadrature": str(self.config.quadrature_spec), **prediction_agreement(predictions),
                "gradient_evaluations": sum(r.numbers["gradient_evaluations"] for r in self.intervals),
                "max_rel_residual": self.residuals()["max_rel_residual"]}])
        summary = self.summary()
        checkpoints = [{"step": c.step, "label": c.label, "digest": d} for c, d in zip(
            series.checkpoints, [r.numbers["digest_lo"] for r in self.intervals]
            + [self.intervals[-1].numbers["digest_hi"]], strict=True)]
        spec = series.model_spec
        meta = {
            "kind": "checkpoints",
            "task": f"{spec.get('model_type') or spec.get('task') or spec.get('model')} checkpoints",
            "model_spec": spec,
            "model_summary": {"parameters": series.num_parameters(), "tensors": len(series.param_names)},
            "optimizer": series.manifest["optimizer"],
            "data_axis_reason": series.data_axis_reason,
            "source": str(series.path),
            "checkpoints": checkpoints,
            "inputs": self.opened.inputs,
            "steps": series.steps[-1],
            "explained_steps": [series.steps[0], series.steps[-1]],
            "test_split": self.opened.test_spec or "inputs",
            "outputs": int(self.completeness["output"].max()) + 1,
            "views": ["components"],
            "decay_split": False,
            "window": None,
            "granularity": "tensor",
            **{k: summary[k] for k in ("quantity", "quadrature", "dtype", "rtol", "escalated", "device", "engine",
                                       "recomputed_inputs", "seconds", "gradient_evaluations", "max_rel_residual",
                                       "max_rel_residual_interval", "max_abs_residual", "resumed_intervals",
                                       "notes")},
            **(extra or {}),
        }
        return RunBundle(meta=meta, steps=self._steps_frame(), groups=groups.frame(), examples=self._examples(),
                         components=self.components, data=None, importance=None, completeness=self.completeness,
                         predictions=predictions, exactness=exactness, pruning=None)

    def _steps_frame(self) -> pl.DataFrame:
        """One row per checkpoint (the explained loss, norms) and per step the trainer logged."""
        rows = [{"step": r.step_lo, "val_loss": r.numbers["loss_lo"], "val_acc": r.numbers["acc_lo"],
                 "update_norm": r.numbers["update_norm"], "param_norm": r.numbers["param_norm_lo"],
                 "loss_change": r.numbers["loss_hi"] - r.numbers["loss_lo"]} for r in self.intervals]
        last = self.intervals[-1]
        rows.append({"step": last.step_hi, "val_loss": last.numbers["loss_hi"], "val_acc": last.numbers["acc_hi"],
                     "update_norm": None, "param_norm": last.numbers["param_norm_hi"], "loss_change": None})
        floats = {c: pl.Float64 for c in ("val_loss", "val_acc", "update_norm", "param_norm", "loss_change")}
        table = pl.DataFrame(rows, schema={"step": pl.Int64, **floats})
        log_rows = self.opened.series.trainer_log()
        table = table.join(log_rows, on="step", how="full", coalesce=True)
        return table.select(
            "step", pl.col("lr"), pl.lit(None, dtype=pl.Float64).alias("weight_decay"), "train_loss", "val_loss",
            pl.lit(None, dtype=pl.Float64).alias("train_acc"), "val_acc", "update_norm", "param_norm",
            "loss_change").sort("step")

    def _examples(self) -> pl.DataFrame:
        """The explained inputs: a language model's label is the sequence's last token; a
        classifier's prediction is the final checkpoint's."""
        task = self.opened.task
        data = task.dataset("val")
        ids = self.config.test_ids_in(len(data))
        index = torch.tensor(ids, dtype=torch.int64)
        if task.language_model:
            lengths = data.labels[index]
            labels = data.inputs[index].gather(1, (lengths - 1)[:, None])[:, 0]
            predicted = pl.Series(values=[None] * len(ids), dtype=pl.Int64)
            correct = pl.Series(values=[None] * len(ids), dtype=pl.Boolean)
        else:
            labels = data.labels[index]
            series = self.opened.series
            model = task.build_model()
            parameter = next(model.parameters())
            params = {n: p.to(parameter) for n, p in series.params(series.num_steps).items()}
            with torch.no_grad():
                x = data.inputs[index].to(parameter.device)
                x = x.to(parameter.dtype) if x.is_floating_point() else x
                out = functional_call(model, {**params, **dict(model.named_buffers())}, (x,))
            predicted = pl.Series(out.argmax(-1).cpu().numpy().astype(np.int64))
            correct = pl.Series((out.argmax(-1).cpu() == labels).numpy())
        return pl.DataFrame({
            "split": "test", "example": np.asarray(ids, dtype=np.int64),
            "label": labels.numpy().astype(np.int64), "text": [task.render(i) for i in ids],
            "predicted": predicted, "correct": correct})


def _chain_predictions(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """Final predictions over the series from each interval's: initial at the first checkpoint,
    true and reconstructed changes added up."""
    first = parts[0].sort("test", "output")
    true = sum(p.sort("test", "output")["true_final"] - p.sort("test", "output")["initial"] for p in parts)
    recon = sum(p.sort("test", "output")["reconstructed_final"] - p.sort("test", "output")["initial"] for p in parts)
    return first.with_columns(true_final=first["initial"] + true, reconstructed_final=first["initial"] + recon)


def interval_folder(opened: OpenedSeries, config: ExplainConfig, work: Path, k: int) -> Path:
    """Where interval ``k`` is saved in ``work`` (a folder that exists only when complete)."""
    return work / _interval_name(run_key(opened, config), opened.series, k)


def saved_interval(opened: OpenedSeries, config: ExplainConfig, work: Path | None, k: int) -> tuple[
        IntervalResult, bool]:
    """Interval ``k``: read back from ``work`` if it was saved there (``True``), else computed
    (and saved there when ``work`` is given)."""
    series = opened.series
    folder = interval_folder(opened, config, work, k) if work is not None else None
    if folder is not None and folder.is_dir():
        return _load(folder), True
    result = explain_interval(series, opened.task, config, k)
    if folder is not None:
        _save(result, folder)
    return result, False


def explain_series(opened: OpenedSeries, config: ExplainConfig, work: Path | None = None,
                   progress: bool = True) -> SeriesExplanation:
    """Every interval in order; with ``work``, finished intervals are saved there and read back."""
    series = opened.series
    started = time.perf_counter()
    results, resumed = [], 0
    for k in tqdm(range(series.num_steps), desc="intervals", unit="interval", disable=not progress,
                  dynamic_ncols=True):
        try:
            result, saved = saved_interval(opened, config, work, k)
        except ExplainInterrupted:
            kept = f"; {len(results)} finished intervals are saved in {work}: run the same command again to " \
                "continue" if work is not None else ""
            raise SeriesInterrupted(f"interrupted in interval {k} (steps {series.steps[k]} to "
                                    f"{series.steps[k + 1]}){kept}") from None
        results.append(result)
        resumed += saved
    return SeriesExplanation(opened, config, tuple(results), resumed, time.perf_counter() - started)


def work_folder(out: Path, opened: OpenedSeries, config: ExplainConfig) -> Path:
    """Where the intervals of run database ``out`` are saved until it is written."""
    return out.parent / f".{out.name}.intervals-{run_key(opened, config)[:16]}"


def explain_checkpoints(opened: OpenedSeries, config: ExplainConfig, out: Path, progress: bool = True,
                        meta: dict[str, Any] | None = None) -> SeriesExplanation:
    """Explain the series into run database ``out`` (``meta`` added to its metadata); resumable
    until it is written (then the saved intervals of ``out`` are removed)."""
    from engine.store import write_run

    out = Path(out)
    work = work_folder(out, opened, config)
    explanation = explain_series(opened, config, work, progress)
    write_run(out, explanation.to_bundle(meta))
    for stale in out.parent.glob(f".{out.name}.intervals-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return explanation
