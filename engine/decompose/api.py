"""The exact path decomposition (MATH.md): stream over recorded steps, accumulate views.

For every step ``s`` the engine integrates ``φ_s(x) = ∫_0^1 ∇g(x; θ_s + tΔ_s) dt`` by
quadrature and contracts it, never materialising the ``N·D·M·O`` influence tensor:

- **components** — ``φ̂_s·Δ_s`` restricted to each parameter group, summed over step
  windows, with its weight-decay part ``φ̂_s·ψ_s(reg)``. The sum over training examples
  is ``Δ_s`` itself, so no per-example training gradient is needed. With partitions finer
  than a tensor (``ExplainConfig.partitions``: heads, neurons, embedding rows, Fourier
  frequencies, user groups) the same sums per unit of each partition, from φ̂ itself.
- **data** — ``Γ = φ̂_s·ψ_s(k)`` per training example ``k`` (and the regularizer, id −1),
  from per-example gradients and per-example optimizer buffers carried forward.
- **importance** — per parameter element, scores that rank it (``IMPORTANCE_SCORES``): the
  kernel importance ``Ψ̄(θ_i) = Σ_x Σ_j |Ψ|`` of the signed net influence
  ``Ψ = Σ_s φ_s(x)[j,i] Δ_s[i]``, and from its split ``Ψ = Ψ_grad + Ψ_reg`` (decay part
  ``Ψ_reg = Σ_s φ_s(x)[j,i] ψ_s(reg)[i]``, gradient part everything else) the gradient and
  decay parts' own absolute sums and their balance ``D = Ψ̄_grad − Ψ̄_reg``; beside them the
  first-order Taylor score ``Σ_x Σ_j |θ_hi[i] ∂g_j(x; θ_hi)/∂θ_i|`` at the last point, which
  needs no path, and the magnitude ``|θ_hi[i]|``.
- **completeness** (always) — per step, test example and output: the true change
  ``g(θ_{s+1}) − g(θ_s)``, the reconstruction ``φ̂_s·Δ_s``, the quadrature residual and the
  optimizer residual ``φ̂_s·ρ_s`` with ``ρ_s = Δ_s − (Σ_k ψ_s(k) + ψ_s(reg))``. Optimizer
  state carried from before the recording, and differences between the training-mode and
  the (always used) eval-mode forward pass, land in ρ_s.

How. Steps are processed in blocks (``vmap`` over steps, quadrature nodes, directions and
test examples, so a small model costs a few vectorised calls per block). The adaptive rule
(``engine.decompose.quadrature``) cuts each step at the kinks of ReLU-like operations, per test example,
and raises the Gauss order of the pieces that need it until the error estimate is at
round-off; the search runs in forward mode along Δ_s only (in reverse mode for models without
forward-mode AD). ``φ̂`` is then evaluated in one of two ways, chosen by
cost (``ExplainConfig.engine``): ``φ̂`` contracted with the directions the views need (Δ_s and
ψ_s(reg) per group, ρ_s, and for the data view ψ_s(k) per training example), or the full
Jacobian of each test example (reverse mode, ``engine.decompose.reverse``), which the importance view needs and which is
cheaper when there are many more directions than outputs. The contractions come by forward
mode (one tangent per direction) or by reverse mode with the directions injected into the
parameters they touch (one cotangent per output, ``engine.decompose.at_point.Injected``):
under ``engine="auto"`` each pass times both on its first units with rules of their own and
keeps the faster, and the notes give the measured costs; units under a rule the chunk shares
stay in forward mode, vectorised over its nodes and test examples. A "gradient evaluation" counts one derivative of one
example at one node: one JVP direction, one reverse pass of one output, or one training
example's gradient.

Frame order: components by (step_lo, group in model order, test, output); data by (step_lo,
train with the regularizer −1 first, test, output); completeness by (step, test, output).

Interrupting (Ctrl-C) stops after the current block of steps and raises
``ExplainInterrupted``, whose ``partial`` holds an ``Explanation`` of the steps finished
(``partial=True``); a second Ctrl-C interrupts at once.

Modules. This one is the entry point: ``explain``, ``explain_history``, ``element_influence``,
``compare_quadratures``, the ``Explanation`` they return and its frames. The configuration
(``ExplainConfig``, re-exported here) is in ``engine.decompose.config``; the set-up of a call in
``engine.decompose.setup``; the optimizer replay (training side) in ``engine.decompose.train_side``; the
derivatives of ``g`` (test side) in ``engine.decompose.evaluator``; one streaming pass over the steps in
``engine.decompose.stream``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from engine.decompose.config import DTYPES, ENGINES, SPLITS, VIEWS, ExplainConfig, parse_test, resolve_device
from engine.decompose.evaluator import _Evaluator
from engine.decompose.heap import retained_heap
from engine.decompose.setup import BufferGroup, _math_attention, _Setup, _setup, buffer_groups
from engine.decompose.stream import REGULARIZER, _Pass, _Window
from engine.errors import BadInputError, ExplaindError, UnsupportedOptimizerError
from engine.model.groups import GroupMap, ParamLayout
from engine.model.task import Task, short_numbers
from engine.run.history import History, StepRecord
from engine.run.spec import check_model_matches
from engine.run.updates import UpdateRule, initial_buffer, rule_for

__all__ = [
    "DTYPES",
    "ENGINES",
    "IMPORTANCE_SCORES",
    "REGULARIZER",
    "SPLITS",
    "VIEWS",
    "ExplainConfig",
    "ExplainInterrupted",
    "Explanation",
    "compare_quadratures",
    "element_influence",
    "explain",
    "explain_history",
    "merge_tests",
    "parse_test",
    "prediction_agreement",
    "resolve_device",
]


SPLIT_NOTE_THRESHOLD = 1e-3  # a data view missing more than this, relative, is named in the notes
# Columns of the importance frame that rank elements (higher = more important), besides ``magnitude``;
# ``gradient``, ``decay`` and ``balance`` need the decay split (null without it).
IMPORTANCE_SCORES = ("importance", "gradient", "decay", "balance", "taylor")


# ============================================================================ results
class ExplainInterrupted(ExplaindError):
    """Ctrl-C during ``explain``; ``partial`` is the Explanation of the finished steps."""

    signum = signal.SIGINT  # the command line reports it as the interruption it is

    def __init__(self, message: str, partial: Explanation) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class Explanation:
    """The views of one run (polars frames, columns as in the ``engine.store`` schema) and summary numbers.

    ``max_rel_residual`` is ``max_x ‖Σ_s r_s‖ / ‖Σ_s true change‖`` over test examples ``x``, the
    norms taken over the explained outputs (the denominator floored at the dtype's round-off of
    ``|g(θ_lo)| + |g(θ_hi)|``); ``max_rel_residual_output`` is the same ratio for the worst single
    output, which is large when one logit barely moves. ``max_abs_residual`` is the largest
    ``|Σ_s r_s|`` of one output; skipped steps (subsampling) count fully as residual.

    The data view's own error, the *split residual* ``Σ_s φ̂_s·ρ_s`` (what the per-example sum
    misses of each update), is ``max_optimizer_residual`` (largest of one output) and
    ``max_rel_split_residual`` (the same ratio as ``max_rel_residual``), with its likely cause in
    ``split_residual_cause``; ``data_split`` says how batch gradients were split into examples.
    The buffer terms (MATH.md §6) are exact components, part of ``reconstructed``; no residual.
    """

    config: ExplainConfig
    quantity: str
    quadrature: str
    test_split: str
    test_ids: tuple[int, ...]
    steps: tuple[int, int]
    outputs: int
    engine: str
    device: str
    components: pl.DataFrame | None
    data: pl.DataFrame | None
    importance: pl.DataFrame | None
    completeness: pl.DataFrame
    predictions: pl.DataFrame | None
    step_stats: pl.DataFrame
    max_rel_residual: float
    max_rel_residual_output: float
    max_abs_residual: float
    max_optimizer_residual: float | None
    gradient_evaluations: int
    seconds: float
    decay_split: bool
    escalated: int = 0  # (step, example) units recomputed in float64 to meet ``config.rtol``
    regression: bool = False  # the run's targets are floating-point numbers, not classes
    partial: bool = False
    notes: tuple[str, ...] = ()
    max_rel_split_residual: float | None = None
    split_residual_cause: str | None = None
    data_split: str | None = None  # "batched" or "per-example" (None: the update was not split)
    units: pl.DataFrame | None = None            # (unit,) the units of config.partitions (UnitMap.frame)
    unit_components: pl.DataFrame | None = None  # (window, unit, test, output) value, decay

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (the CLI prints it)."""
        nodes = self.completeness["nodes"]
        computed = nodes.filter(nodes > 0)
        return {
            "quantity": self.quantity,
            "quadrature": self.quadrature,
            "engine": self.engine,
            "device": self.device,
            "dtype": self.config.dtype,
            "rtol": self.config.rtol,
            "escalated": self.escalated,
            "test_split": self.test_split,
            "tests": len(self.test_ids),
            "outputs": self.outputs,
            "steps": list(self.steps),
            "views": list(self.config.views),
            "max_rel_residual": self.max_rel_residual,
            "max_rel_residual_output": self.max_rel_residual_output,
            "max_abs_residual": self.max_abs_residual,
            "max_optimizer_residual": self.max_optimizer_residual,
            "max_rel_split_residual": self.max_rel_split_residual,
            "split_residual_cause": self.split_residual_cause,
            "data_split": self.data_split,
            "gradient_evaluations": self.gradient_evaluations,
            "mean_nodes": float(computed.mean()) if computed.len() else 0.0,
            "max_nodes": int(computed.max()) if computed.len() else 0,
            "seconds": self.seconds,
            "partial": self.partial,
            "notes": list(self.notes),
        }

    def exactness(self) -> pl.DataFrame | None:
        """One ``exactness`` row (agreement and KL of reconstructed vs true final logits); None
        without class predictions (another quantity, or floating-point targets)."""
        if self.predictions is None or self.regression:
            return None
        return pl.DataFrame([{
            "quadrature": self.quadrature, **prediction_agreement(self.predictions),
            "gradient_evaluations": self.gradient_evaluations, "max_rel_residual": self.max_rel_residual,
        }], schema={"quadrature": pl.String, "agreement": pl.Float64, "kl": pl.Float64,
                    "gradient_evaluations": pl.Int64, "max_rel_residual": pl.Float64})

    def to_bundle(self, history: History, task: Task, exactness: pl.DataFrame | None = None) -> Any:
        """The ``engine.store.RunBundle`` of this explanation (components must be at tensor level)."""
        from engine.store import RunBundle

        if self.components is not None and self.config.granularity != "tensor":
            raise BadInputError("the run database stores components per tensor; explain with granularity='tensor'")
        model = check_model_matches(history, task)
        final = {n: t.to(torch.float32) for n, t in history.params(history.num_steps).items()}
        final.update({n: b.to(torch.float32) for n, b in history.buffers(history.num_steps).items()})
        groups = GroupMap.build(ParamLayout(tuple(history.param_names),
                                            tuple(history.param_shapes[n] for n in history.param_names)),
                                layer_of=task.layer_of)
        changing = history.changing_buffers
        buffers = buffer_groups(ParamLayout(tuple(changing), tuple(history.buffer_shapes[n] for n in changing)),
                                groups, task.layer_of)
        optimizer = history.manifest["optimizer"]
        meta = {
            "task": str(history.model_spec.get("task", "imported")),
            "targets": "float" if self.regression else "class",
            "model_spec": history.model_spec,
            "model_summary": {"parameters": history.num_parameters(), "tensors": len(history.param_names)},
            "optimizer": {"class": optimizer["class"], "family": optimizer["family"],
                          "groups": optimizer.get("groups", []),
                          "data_axis_reason": optimizer.get("data_axis_reason")},
            "quantity": self.quantity,
            "quadrature": self.quadrature,
            "data_fingerprint": history.manifest["data"]["fingerprint"],
            "run_dir": str(history.path),
            "steps": history.num_steps,
            "explained_steps": list(self.steps),
            "test_split": self.test_split,
            "outputs": self.outputs,
            "dtype": self.config.dtype,
            "rtol": self.config.rtol,
            "escalated": self.escalated,
            "device": self.device,
            "engine": self.engine,
            "window": self.config.window,
            "subsample": self.config.subsample,
            "views": list(self.config.views),
            "decay_split": self.decay_split,
            "partitions": list(self.config.partitions),
            "seconds": self.seconds,
            "gradient_evaluations": self.gradient_evaluations,
            "max_rel_residual": _finite(self.max_rel_residual),
            "max_rel_residual_output": _finite(self.max_rel_residual_output),
            "max_abs_residual": _finite(self.max_abs_residual),
            "max_optimizer_residual": None if self.max_optimizer_residual is None
            else _finite(self.max_optimizer_residual),
            "max_rel_split_residual": None if self.max_rel_split_residual is None
            else _finite(self.max_rel_split_residual),
            "split_residual_cause": self.split_residual_cause,
            "data_split": self.data_split,
            "buffer_groups": [group.label for group in buffers],
            "partial": self.partial,
            "notes": list(self.notes),
        }
        own = self.exactness()
        if exactness is None:
            exactness = own
        elif own is not None and self.quadrature not in exactness["quadrature"].to_list():
            exactness = pl.concat([exactness, own])
        return RunBundle(
            meta=meta,
            steps=_steps_frame(history, self.step_stats),
            groups=_groups_frame(groups, buffers),
            examples=_examples_frame(task, model, final, self.test_split, self.test_ids),
            components=self.components,
            data=self.data,
            importance=self.importance,
            completeness=self.completeness,
            predictions=self.predictions,
            exactness=exactness,
            pruning=None,
            units=self.units,
            unit_components=self.unit_components,
        )


def merge_tests(parts: list[Explanation]) -> Explanation:
    """One explanation from explanations of the same run, steps and configuration over
    disjoint test examples (e.g. computed in parallel): frames concatenated, importance
    summed, worst residuals kept, gradient evaluations and seconds added up."""
    first = parts[0]
    keys = ("quantity", "quadrature", "test_split", "steps", "outputs", "decay_split")
    if any(getattr(p, k) != getattr(first, k) for p in parts for k in keys):
        raise BadInputError(f"explanations to merge must agree in {', '.join(keys)}")
    test_ids = tuple(i for p in parts for i in p.test_ids)
    if len(set(test_ids)) != len(test_ids):
        raise BadInputError("explanations to merge must cover disjoint test examples")

    def cat(name: str) -> pl.DataFrame | None:
        frames = [getattr(p, name) for p in parts]
        return None if frames[0] is None else pl.concat(frames, rechunk=True)

    importance = first.importance
    if importance is not None:  # sums over test examples; the magnitude is the same in every part
        importance = importance.with_columns(**{name: sum(p.importance[name] for p in parts)
                                                for name in IMPORTANCE_SCORES})
    optimizer = [p.max_optimizer_residual for p in parts if p.max_optimizer_residual is not None]
    split = [p.max_rel_split_residual for p in parts if p.max_rel_split_residual is not None]
    return replace(
        first, config=replace(first.config, test_ids=test_ids), test_ids=test_ids,
        components=cat("components"), data=cat("data"), importance=importance, completeness=cat("completeness"),
        predictions=cat("predictions"), unit_components=cat("unit_components"),
        max_rel_residual=max(p.max_rel_residual for p in parts),
        max_rel_residual_output=max(p.max_rel_residual_output for p in parts),
        max_abs_residual=max(p.max_abs_residual for p in parts),
        max_optimizer_residual=max(optimizer) if optimizer else None,
        max_rel_split_residual=max(split) if split else None,
        gradient_evaluations=sum(p.gradient_evaluations for p in parts), seconds=sum(p.seconds for p in parts),
        escalated=sum(p.escalated for p in parts),
        partial=any(p.partial for p in parts), notes=tuple(dict.fromkeys(n for p in parts for n in p.notes)),
    )


def _groups_frame(groups: GroupMap, buffers: list[BufferGroup]) -> pl.DataFrame:
    """The store's ``groups`` rows: every parameter tensor and, after the last tensor of its module,
    each module's buffer term (``bn1.<buffers>``, size = its buffer elements), positions in that order."""
    rows = groups.frame().drop("position").to_dicts()
    last = {module: i for i, module in enumerate(groups.modules)}
    after: dict[int, list[dict[str, Any]]] = {}
    for group in buffers:
        row = {"tensor": group.label, "module": group.module or group.label, "layer": group.layer,
               "size": group.size}
        after.setdefault(last.get(group.module, len(rows) - 1), []).append(row)
    ordered = [r for i, row in enumerate(rows) for r in (row, *after.get(i, []))]
    return pl.DataFrame(ordered, schema={"tensor": pl.String, "module": pl.String, "layer": pl.String,
                                         "size": pl.Int64}).with_row_index("position").with_columns(
        pl.col("position").cast(pl.Int32)).select("tensor", "module", "layer", "size", "position")


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float(np.finfo(np.float64).max)


def prediction_agreement(predictions: pl.DataFrame) -> dict[str, float]:
    """Arg-max agreement and mean ``KL(softmax(true) ‖ softmax(reconstructed))`` over tests."""
    frame = predictions.sort(["test", "output"])
    tests = frame["test"].n_unique()
    true = torch.tensor(frame["true_final"].to_numpy().reshape(tests, -1))
    recon = torch.tensor(frame["reconstructed_final"].to_numpy().reshape(tests, -1))
    agreement = float((true.argmax(1) == recon.argmax(1)).double().mean())
    log_p, log_q = torch.log_softmax(true, 1), torch.log_softmax(recon, 1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean().clamp_min(0.0))
    return {"agreement": agreement, "kl": kl}


def _steps_frame(history: History, stats: pl.DataFrame) -> pl.DataFrame:
    metrics = history.metrics()
    cols = ("train_loss", "val_loss", "train_acc", "val_acc")
    table = pl.DataFrame({"step": np.arange(history.num_steps, dtype=np.int64)})
    if metrics.height:
        keep = ["step", *[c for c in cols if c in metrics.columns]]
        table = table.join(metrics.select(keep).with_columns(pl.col("step").cast(pl.Int64)), on="step", how="left")
    for c in cols:
        if c not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
        table = table.with_columns(pl.col(c).cast(pl.Float64).fill_nan(None))
    hp = history.hparams_table().filter(pl.col("group") == 0).select(
        pl.col("step").cast(pl.Int64), pl.col("lr").cast(pl.Float64), pl.col("weight_decay").cast(pl.Float64))
    table = table.join(hp, on="step", how="left")
    table = table.join(stats.select("step", "update_norm", "param_norm", "loss_change"), on="step", how="left")
    if "train_loss" in metrics.columns:
        diff = table["train_loss"].shift(-1) - table["train_loss"]
        table = table.with_columns(pl.coalesce(pl.col("loss_change"), diff).alias("loss_change"))
    missing = table.filter(pl.col("update_norm").is_null())["step"].to_list()
    if missing:
        norms = _norms(history, missing)
        fill = pl.DataFrame({"step": missing, "u": [n[0] for n in norms], "p": [n[1] for n in norms]},
                            schema={"step": pl.Int64, "u": pl.Float64, "p": pl.Float64})
        table = table.join(fill, on="step", how="left").with_columns(
            pl.coalesce("update_norm", "u").alias("update_norm"),
            pl.coalesce("param_norm", "p").alias("param_norm")).drop("u", "p")
    return table.select("step", "lr", "weight_decay", *cols, "update_norm", "param_norm", "loss_change")


def _norms(history: History, steps: list[int]) -> list[tuple[float, float]]:
    wanted, out = set(steps), {}
    for record in history.iter_steps(min(steps), max(steps) + 1):
        if record.step in wanted:
            out[record.step] = (
                math.sqrt(sum(float(u.double().pow(2).sum()) for u in record.update.values())),
                math.sqrt(sum(float(p.double().pow(2).sum()) for p in record.params.values())),
            )
    return [out[s] for s in steps]


def _examples_frame(task: Task, model: nn.Module, final: dict[str, Tensor], test_split: str,
                    test_ids: tuple[int, ...]) -> pl.DataFrame:
    """Train examples and the explained test examples with the final model's predictions (``final``: its
    parameters and buffers).

    With floating-point targets there is no class: label, prediction and correctness are null,
    and the text of a test example ends with the final model's output beside its target."""
    model = model.to(torch.float32).eval()
    rows = []
    for split, data, ids in (("train", task.dataset("train"), None), ("test", task.dataset(test_split), test_ids)):
        index = torch.arange(len(data)) if ids is None else torch.tensor(ids)
        inputs = data.inputs[index]
        inputs = inputs.float() if inputs.is_floating_point() else inputs
        with torch.no_grad():
            output = functional_call(model, {**dict(model.named_buffers()), **final}, (inputs,))
        text = [data.render(int(i)) for i in index]
        if data.regression:
            if split == "test":
                text = [f"{t} · final output {short_numbers(o)}" for t, o in zip(text, output, strict=True)]
            empty = [None] * len(index)
            label, predicted, correct = (pl.Series(empty, dtype=pl.Int64), pl.Series(empty, dtype=pl.Int64),
                                         pl.Series(empty, dtype=pl.Boolean))
        else:
            labels, classes = data.labels[index], output.argmax(-1)
            label, predicted, correct = (labels.numpy().astype(np.int64), classes.numpy().astype(np.int64),
                                         (classes == labels).numpy())
        rows.append(pl.DataFrame({"split": split, "example": index.numpy().astype(np.int64), "label": label,
                                  "text": text, "predicted": predicted, "correct": correct}))
    return pl.concat(rows)


# ============================================================================ driver
def explain(run_dir: str | Path, config: ExplainConfig | None = None, progress: bool = True,
            allow_incomplete: bool = False, trust_run: bool = False) -> Explanation:
    """Decompose a recorded run (see the module docstring); ``python -m engine explain`` calls this.

    The run's model and data code is imported only for a built-in task or with ``trust_run``.
    """
    history = History.open(run_dir, allow_incomplete=allow_incomplete)
    return explain_history(history, history.task(trust_run), config or ExplainConfig(), progress)


@retained_heap()
@torch.inference_mode(False)  # the engine differentiates: a caller's inference mode would forbid it
def explain_history(history: History, task: Task, config: ExplainConfig | None = None,
                    progress: bool = True) -> Explanation:
    """Like ``explain`` for an opened history and task (with freed memory kept, ``engine.decompose.heap``)."""
    config = config or ExplainConfig()
    started = time.perf_counter()
    s = _setup(history, task, config)
    rule = _rule_for(s)
    kept = _kept_steps(s)
    passes = _passes(s)
    start = 0 if rule else s.lo
    results: list[_Pass] = []
    # the bar opens once Ctrl-C is deferred, so that an interruption always finds it to close
    with _deferred_interrupt() as stop, tqdm(total=(s.hi - start) * len(passes), desc="explain", unit="step",
                                              disable=not progress, dynamic_ncols=True) as bar:
        for tests in passes:
            current = _Pass(s, tests, kept, _rule_for(s) if rule else None)  # rules are stateful: one per pass
            results.append(current)
            for segment in _segments(s, start):
                current.step(*segment)
                bar.update(1)
                if stop.is_set():
                    break
            if stop.is_set():
                current.flush_all()
                break
    interrupted = stop.is_set()
    taylor = _taylor(s) if "importance" in s.config.views else None
    explanation = _assemble(s, results, kept, time.perf_counter() - started, interrupted, taylor)
    if interrupted:
        raise ExplainInterrupted(
            f"explain of {history.path} was interrupted after step {results[-1].done - 1}; nothing was written "
            "(Python callers find the finished steps in the exception's .partial)", explanation)
    return explanation


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a flag checked between steps; a second one interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _rule_for(s: _Setup) -> UpdateRule | None:
    """The optimizer's update rule if the split is available (decay part, optimizer residual, data)."""
    if not s.split_ok:
        return None
    try:
        rule = rule_for(s.history)
    except UnsupportedOptimizerError as exc:
        s.notes.append(str(exc))
        s.split_ok = False
        return None
    initial_buffer(s.history, rule)  # marks already-started momentum buffers in the rule
    return rule


def _segments(s: _Setup, start: int) -> Iterator[tuple[StepRecord, Tensor, Tensor, Tensor, Tensor]]:
    """(record, θ_s, θ_{s+1}, b_s, b_{s+1}) for steps start..hi−1, from the stored parameters and
    buffers (exact path; ``b`` flat over the buffers that change)."""
    previous: StepRecord | None = None
    theta_prev: Tensor | None = None
    for record in s.history.iter_steps(start, s.hi):
        theta = s.flat(record.params)
        if previous is not None:
            yield previous, theta_prev, theta, s.flat_buffers(previous.buffers), s.flat_buffers(previous.buffers_after)
        previous, theta_prev = record, theta
    if previous is not None:
        yield (previous, theta_prev, s.flat(s.history.params(s.hi)), s.flat_buffers(previous.buffers),
               s.flat_buffers(previous.buffers_after))


def _kept_steps(s: _Setup) -> np.ndarray:
    """Boolean mask over steps lo..hi−1: the top ``subsample`` fraction by |batch loss change|."""
    count = s.hi - s.lo
    if s.config.subsample >= 1.0:
        return np.ones(count, dtype=bool)
    changes = np.zeros(count)
    with torch.no_grad():
        for record, theta, theta_next, bufs, bufs_next in _segments(s, start=s.lo):
            ids = record.batch_ids.to(s.device)
            w = record.batch_weights.to(device=s.device, dtype=s.dtype)
            x, y = s.train_x[ids], s.train_y[ids]
            changes[record.step - s.lo] = float(s.loss_weighted(theta_next, bufs_next, x, y, w)
                                                - s.loss_weighted(theta, bufs, x, y, w))
    keep = max(1, math.ceil(s.config.subsample * count))
    kept = np.zeros(count, dtype=bool)
    kept[np.argsort(-np.abs(changes), kind="stable")[:keep]] = True
    s.notes.append(f"subsample: {keep} of {count} steps computed, ranked by |batch loss change|")
    s.loss_changes = changes
    return kept


def _passes(s: _Setup) -> list[slice]:
    """Test-example ranges, each streamed over the steps once.

    One pass normally; the data view in reverse mode takes one test chunk per pass (its
    per-example buffers advance with the steps), and the importance view as many tests as its per-element
    accumulators (the signed influence, and its decay part with the decay split) allow in ``memory_mb``.
    """
    n = len(s.test_ids)
    size = n
    if "data" in s.config.views and s.engine == "vjp":
        size = s.test_chunk
    if "importance" in s.config.views:
        accumulators = 2 if s.split_ok else 1
        size = min(size, max(1, s.config.memory_mb * 2**20 // (accumulators * 8 * s.outputs * s.layout.total)))
    if size < n:
        s.notes.append(f"{math.ceil(n / size)} passes over the steps, {size} test examples each")
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


# ============================================================================ frames
def _assemble(s: _Setup, results: list[_Pass], kept: np.ndarray, seconds: float, partial: bool,
              taylor: Tensor | None = None) -> Explanation:
    test_ids = np.asarray(s.test_ids, dtype=np.int64)
    group_col = s.config.granularity
    comp_frames, data_frames, compl_frames, pred_frames, fine_frames = [], [], [], [], []
    scores: dict[str, Tensor] = {}  # absolute sums over test examples and outputs, (D,) float64
    max_rel = max_rel_output = max_abs = 0.0
    max_opt: float | None = None
    max_split: float | None = None
    offset = 0
    for p in results:
        for c in p.chunks:
            n = c.y.shape[0]
            tests = test_ids[offset:offset + n]
            offset += n
            if not c.rows:
                continue
            steps = torch.cat(c.rows["step"]).numpy()
            true = torch.stack(c.rows["true"]).cpu().numpy()       # (S, n, O)
            recon = torch.stack(c.rows["recon"]).cpu().numpy()
            opt = torch.stack(c.rows["opt"]).double().cpu().numpy()
            nodes = torch.stack(c.rows["nodes"]).cpu().numpy()   # (S, n)
            resid = true - recon
            compl_frames.append(_grid_frame(
                {"step": steps}, tests, s.outputs,
                {"true_change": true, "reconstructed": recon, "quadrature_residual": resid,
                 "optimizer_residual": opt}, extra={"nodes": np.broadcast_to(nodes[:, :, None], true.shape)}))
            total_true, total_resid = true.sum(0), resid.sum(0)
            g_first = c.g_first.double().cpu().numpy()
            # (an output that is identically 0, as a padded position, has no round-off either: tiny keeps 0/0 out)
            floor = np.maximum(torch.finfo(s.dtype).eps * (np.abs(g_first) + np.abs(g_first + total_true)),
                               np.finfo(np.float64).tiny)
            max_abs = max(max_abs, float(np.abs(total_resid).max()))
            max_rel_output = max(max_rel_output, float(
                (np.abs(total_resid) / np.maximum(np.abs(total_true), floor)).max()))
            norm_true = np.maximum(np.linalg.norm(total_true, axis=1), np.linalg.norm(floor, axis=1))
            max_rel = max(max_rel, float((np.linalg.norm(total_resid, axis=1) / norm_true).max()))
            if not np.isnan(opt).all():
                split = np.nansum(opt, axis=0)  # (n, O): what the data view misses over the steps
                value = float(np.nanmax(np.abs(split)))
                max_opt = value if max_opt is None else max(max_opt, value)
                relative = float((np.linalg.norm(split, axis=1) / norm_true).max())
                max_split = relative if max_split is None else max(max_split, relative)
            if s.config.quantity_name == "logits":
                pred_frames.append(_grid_frame({}, tests, s.outputs, {
                    "initial": g_first, "true_final": g_first + total_true,
                    "reconstructed_final": g_first + recon.sum(0)}))
            if "components" in s.config.views and c.windows:
                comp_frames.append(_components_frame(c.windows, s.component_labels, tests, s.outputs, group_col))
            if "data" in s.config.views and c.windows:
                data_frames.extend(_data_frame(w, tests, s.outputs) for w in c.windows)
            if s.fine is not None and c.windows:
                fine_frames.append(_units_frame(c.windows, tests, s.outputs))
            if c.importance is not None:
                parts = {"importance": c.importance}
                if c.importance_decay is not None:
                    parts |= {"gradient": c.importance - c.importance_decay, "decay": c.importance_decay}
                for name, signed in parts.items():
                    scores[name] = scores.get(name, 0) + signed.abs().sum(dim=(0, 1))
    importance = _importance_frame(s, scores, taylor) if scores else None
    taylor_rows = len(s.test_ids) * s.outputs if taylor is not None else 0  # one Jacobian row each
    stats = pl.DataFrame(results[0].stats if results else [],
                         schema={"step": pl.Int64, "update_norm": pl.Float64, "param_norm": pl.Float64,
                                 "lr": pl.Float64, "weight_decay": pl.Float64})
    changes = s.loss_changes
    stats = stats.with_columns(
        (pl.Series(changes[: stats.height]) if changes is not None else pl.lit(None, dtype=pl.Float64))
        .alias("loss_change"),
        pl.Series("kept", kept[: stats.height]))
    # one chunk builds every frame in its documented order; several chunks interleave tests
    one = sum(len(p.chunks) for p in results) == 1
    order = {label: i for i, label in enumerate(s.component_labels)}
    completeness = _combine(compl_frames, ["step", "test", "output"], one) if compl_frames \
        else _empty_completeness()
    cause = _split_cause(s) if max_split is not None else None
    engine, notes = _evaluation(s, results)
    if max_split is not None and max_split > SPLIT_NOTE_THRESHOLD:
        notes.append(f"the data view misses the change by {max_split:.2g} relative (split residual, more than "
                     f"{SPLIT_NOTE_THRESHOLD:g}): {cause}")
    return Explanation(
        config=s.config, quantity=s.config.quantity_name, quadrature=str(s.config.quadrature_spec),
        test_split=s.config.test_split, test_ids=s.test_ids, steps=(s.lo, s.hi), outputs=s.outputs,
        engine=engine, device=str(s.device),
        components=_combine(comp_frames, ["step_lo", pl.col(group_col).replace_strict(order, return_dtype=pl.Int64),
                                          "test", "output"], one) if "components" in s.config.views else None,
        data=_combine(data_frames, ["step_lo", "train", "test", "output"], one) if "data" in s.config.views
        else None,
        importance=importance,
        completeness=completeness,
        predictions=_combine(pred_frames, ["test", "output"], one) if pred_frames else None,
        step_stats=stats,
        max_rel_residual=max_rel, max_rel_residual_output=max_rel_output, max_abs_residual=max_abs,
        max_optimizer_residual=max_opt, max_rel_split_residual=max_split, split_residual_cause=cause,
        data_split=s.split.mode if s.split is not None else None,
        gradient_evaluations=sum(p.evaluations for p in results) + taylor_rows,
        escalated=sum(p.escalated for p in results),
        seconds=seconds, decay_split=s.split_ok, partial=partial, notes=(*notes, *_tolerance_notes(s, results)),
        regression=s.test_y.is_floating_point(),
        units=s.fine.frame(s.groups.frame()) if s.fine is not None else None,
        unit_components=_combine(fine_frames, ["step_lo", "unit_id", "test", "output"], one) if s.fine is not None
        else None,
    )


def _evaluation(s: _Setup, results: list[_Pass]) -> tuple[str, list[str]]:
    """The engine as run — ``jvp+vjp`` where directions at the final nodes went by reverse mode
    (the rule's search stays in forward mode) — and the notes, with the measured costs of the
    directional derivatives where they were timed (on the first pass)."""
    evaluators = [p.evaluator for p in results]
    engine = "jvp+vjp" if any("reverse" in (e.mode, e.shared_mode) for e in evaluators) else s.engine
    notes = list(s.notes)
    for kind, measured, mode in (("with rules of their own", "measured", "mode"),
                                 ("under a rule their chunk shares", "measured_shared", "shared_mode")):
        timed = next((e for e in evaluators if getattr(e, measured)), None)
        if timed is None:
            continue
        m = getattr(timed, measured)
        chosen = ("reverse mode with the directions injected" if getattr(timed, mode) == "reverse"
                  else "forward mode")
        notes.append(f"evaluation: {chosen} at the final nodes of units {kind}, measured the faster on "
                     f"{m['units']:.0f} (step, node, test example) units: {m['forward'] * 1e3:.3g} ms per unit by "
                     f"forward mode ({m['directions']:.0f} directions) against {m['reverse'] * 1e3:.3g} ms by "
                     f"reverse mode ({s.outputs} outputs)")
    return engine, notes


NOTE_STEPS = 10  # steps named in a note


def _tolerance_notes(s: _Setup, results: list[_Pass]) -> list[str]:
    """Where the adaptive rule's residual stays above its tolerance — its top rule missed it, or its
    rules agree and meet it in float64 but not in the compute dtype — and the likely cause:
    selections whose switch points are not located, or the compute dtype's round-off."""
    unlocated = sorted(name for name, located in s.selections.items() if not located)
    cause = f"the switch points of {', '.join(unlocated)} are not located" if unlocated else ""
    tolerance = f"its error budget (rtol {s.config.rtol:g})" if s.config.rtol is not None else "round-off"
    quadrature = s.config.quadrature_spec
    agreed = (f"the {str(s.dtype).removeprefix('torch.')} round-off of the gradients, which more nodes do not "
              "lower (dtype float64, or an rtol budget, reaches it)")
    notes = []
    top = cause or ("no selection without located switch points was found; a rule with more nodes (adaptive:N) "
                    "may reach it")
    for kind, where, why in (("above", f"with {quadrature.n} Gauss nodes per piece ({quadrature})", top),
                             ("off", "where their quadrature rules agree and meet it in float64", agreed)):
        missed: dict[int, int] = {}
        for p in results:
            for step, units in getattr(p, kind).items():
                missed[step] = missed.get(step, 0) + units
        if missed:
            steps = sorted(missed)
            named = ", ".join(map(str, steps[:NOTE_STEPS])) + (", …" if len(steps) > NOTE_STEPS else "")
            notes.append(f"the residual of {sum(missed.values())} (step, test example) pairs stays above {tolerance} "
                         f"{where}, in steps {named} ({len(steps)} of {s.hi - s.lo}): {why}")
    if cause and not notes:
        return [f"{cause}; every step met the adaptive rule's tolerance"]
    return notes


def _split_cause(s: _Setup) -> str:
    """What the split residual ``ρ_s`` is made of, as far as the record tells."""
    if s.split is not None and s.split.unreplayed is not None:
        return f"unreplayed training forward: {s.split.unreplayed}"
    replayed = str(s.train_forward.dtype if s.train_forward else s.dtype).removeprefix("torch.")
    return (f"float rounding of the recorded update (parameters stored in {s.history.manifest['dtype']}, "
            f"the batch gradient recomputed in {replayed})")


def _importance_frame(s: _Setup, scores: dict[str, Tensor], taylor: Tensor | None) -> pl.DataFrame:
    """One row per parameter element in layout order: every score of ``IMPORTANCE_SCORES`` (null
    where not computed) and the magnitude ``|θ_hi|``."""
    final = s.layout.flatten(s.history.params(s.hi), dtype=torch.float64)
    columns = {**scores, "taylor": taylor}
    if "gradient" in scores:
        columns["balance"] = scores["gradient"] - scores["decay"]
    rows = pl.DataFrame({
        "tensor": np.repeat(np.array(s.layout.names, dtype=object), s.layout.sizes).astype(str),
        "index": np.concatenate([np.arange(n) for n in s.layout.sizes]).astype(np.int64),
    })
    return rows.with_columns(
        *[pl.Series(name, columns[name].cpu().numpy()) if columns.get(name) is not None
          else pl.lit(None, dtype=pl.Float64).alias(name) for name in IMPORTANCE_SCORES],
        pl.Series("magnitude", final.abs().numpy()))


def _taylor(s: _Setup) -> Tensor:
    """``Σ_x Σ_j |θ_hi ⊙ ∇g_j(x; θ_hi)|`` per element ``(D,)`` float64: the first-order Taylor estimate of
    zeroing each element at the last explained point, summed over the test examples and outputs."""
    ev = _Evaluator(s)
    theta = s.flat(s.history.params(s.hi))  # (D,)
    bufs = s.flat_buffers(s.history.buffers(s.hi))  # (Db,)
    node, weight = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    total = torch.zeros(s.layout.total, dtype=torch.float64, device=s.device)
    with _math_attention():
        for a in range(0, len(s.test_ids), s.test_chunk):
            x, y = s.test_x[a:a + s.test_chunk], s.test_y[a:a + s.test_chunk]
            jacobian = ev.phi_shared(theta[None], torch.zeros_like(theta)[None], bufs[None], node, weight, x,
                                      y)[0]  # (n, O, D)
            total += (jacobian.double() * theta.double()).abs().sum(dim=(0, 1))
    return total


def _grid_frame(lead: dict[str, np.ndarray], tests: np.ndarray, outputs: int, values: dict[str, np.ndarray],
                extra: dict[str, np.ndarray] | None = None) -> pl.DataFrame:
    """Rows of a ``(*lead, test, output)`` grid; each ``lead`` entry labels one leading axis."""
    shape = (*[len(v) for v in lead.values()], len(tests), outputs)
    axes = np.meshgrid(*lead.values(), tests, np.arange(outputs, dtype=np.int64), indexing="ij")
    cols: dict[str, Any] = {k: a.reshape(-1).astype(np.int64) for k, a in zip([*lead, "test", "output"], axes,
                                                                              strict=True)}
    for k, v in values.items():
        cols[k] = np.ascontiguousarray(np.broadcast_to(v, shape)).reshape(-1).astype(np.float64)
    for k, v in (extra or {}).items():
        cols[k] = np.ascontiguousarray(np.broadcast_to(v, shape)).reshape(-1).astype(np.int32)
    frame = pl.DataFrame(cols)
    if "optimizer_residual" in frame.columns:
        frame = frame.with_columns(pl.col("optimizer_residual").fill_nan(None))
    return frame


def _components_frame(windows: list[_Window], labels: list[str], tests: np.ndarray, outputs: int,
                      column: str) -> pl.DataFrame:
    value = np.stack([w.value for w in windows])  # (W, G, n, O)
    decay = np.stack([w.decay for w in windows])
    frame = _grid_frame({"window": np.arange(len(windows)), "group": np.arange(len(labels))}, tests, outputs,
                        {"value": value, "decay": decay})
    lo = np.array([w.lo for w in windows], dtype=np.int64)
    hi = np.array([w.hi for w in windows], dtype=np.int64)
    return frame.select(
        pl.Series("step_lo", lo[frame["window"].to_numpy()]),
        pl.Series("step_hi", hi[frame["window"].to_numpy()]),
        pl.Series(column, labels, dtype=pl.String).gather(frame["group"]),
        "test", "output", "value", "decay")


def _units_frame(windows: list[_Window], tests: np.ndarray, outputs: int) -> pl.DataFrame:
    value = np.stack([w.fine_value for w in windows])  # (W, U, n, O)
    decay = np.stack([w.fine_decay for w in windows])
    frame = _grid_frame({"window": np.arange(len(windows)), "unit_id": np.arange(value.shape[1])}, tests, outputs,
                        {"value": value, "decay": decay})
    lo = np.array([w.lo for w in windows], dtype=np.int64)
    hi = np.array([w.hi for w in windows], dtype=np.int64)
    return frame.select(pl.Series("step_lo", lo[frame["window"].to_numpy()]),
                        pl.Series("step_hi", hi[frame["window"].to_numpy()]), "unit_id", "test", "output", "value",
                        "decay")


def _data_frame(window: _Window, tests: np.ndarray, outputs: int) -> pl.DataFrame:
    frame = _grid_frame({"train": window.train}, tests, outputs, {"value": window.data})
    return frame.select(pl.lit(window.lo, dtype=pl.Int64).alias("step_lo"),
                        pl.lit(window.hi, dtype=pl.Int64).alias("step_hi"), "train", "test", "output", "value")


def _combine(frames: list[pl.DataFrame], keys: list, ordered: bool) -> pl.DataFrame | None:
    """Concatenate frames; sort by ``keys`` unless they are already in that order."""
    if not frames:
        return None
    frame = pl.concat(frames, rechunk=True)
    return frame if ordered else frame.sort(keys)


def _empty_completeness() -> pl.DataFrame:
    return pl.DataFrame(schema={"step": pl.Int64, "test": pl.Int64, "output": pl.Int64, "true_change": pl.Float64,
                                "reconstructed": pl.Float64, "quadrature_residual": pl.Float64,
                                "optimizer_residual": pl.Float64, "nodes": pl.Int32})


# ============================================================================ other entry points
def element_influence(run: str | Path | History, config: ExplainConfig | None = None,
                      progress: bool = False, trust_run: bool = False) -> tuple[tuple[int, ...], dict[str, Tensor]]:
    """Signed ``Σ_s φ̂_s(x)[j, i] Δ_s[i]`` per test example, output and parameter element.

    Returns ``(test_ids, {tensor name: (test, out, *shape) float64})`` over the configured
    step range; memory is ``tests × O × D`` doubles. ``trust_run`` as for ``explain``.
    """
    history = run if isinstance(run, History) else History.open(run)
    task = history.task(trust_run)
    config = replace(config or ExplainConfig(), views=("importance",))
    s = _setup(history, task, config)
    rule = _rule_for(s)
    kept = _kept_steps(s)
    current = _Pass(s, slice(0, len(s.test_ids)), kept, rule)
    for segment in tqdm(_segments(s, start=0 if rule else s.lo), disable=not progress,
                        total=s.hi - (0 if rule else s.lo), desc="elements", unit="step"):
        current.step(*segment)
    signed = torch.cat([c.importance for c in current.chunks]).cpu()  # (test, O, D)
    return s.test_ids, s.layout.unflatten(signed)


def compare_quadratures(run: str | Path | History, quadratures: tuple[str, ...] = ("midpoint:10", "midpoint:100",
                        "gauss:2", "adaptive"), config: ExplainConfig | None = None,
                        progress: bool = False, trust_run: bool = False) -> pl.DataFrame:
    """The ``exactness`` table: reconstruction of the final logits under several quadrature rules
    (``trust_run`` as for ``explain``)."""
    history = run if isinstance(run, History) else History.open(run)
    task = history.task(trust_run)
    base = replace(config or ExplainConfig(), views=(), quantity="logits", optimizer_residual=False)
    if task.dataset("train").regression:
        raise BadInputError(f"{history.path} has floating-point targets: the exactness table compares predicted "
                            "classes (agreement, KL)")
    rows = [explain_history(history, task, replace(base, quadrature=q), progress).exactness() for q in quadratures]
    return pl.concat(rows)
