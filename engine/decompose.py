"""The exact path decomposition (MATH.md): stream over recorded steps, accumulate views.

For every step ``s`` the engine integrates ``φ_s(x) = ∫_0^1 ∇g(x; θ_s + tΔ_s) dt`` by
quadrature and contracts it, never materialising the ``N·D·M·O`` influence tensor:

- **components** — ``φ̂_s·Δ_s`` restricted to each parameter group, summed over step
  windows, with its weight-decay part ``φ̂_s·ψ_s(reg)``. The sum over training examples
  is ``Δ_s`` itself, so no per-example training gradient is needed.
- **data** — ``Γ = φ̂_s·ψ_s(k)`` per training example ``k`` (and the regularizer, id −1),
  from per-example gradients and per-example optimizer buffers carried forward.
- **importance** — ``Ψ̄(θ_i) = Σ_x Σ_j |Σ_s φ_s(x)[j,i] Δ_s[i]|`` per parameter element.
- **completeness** (always) — per step, test example and output: the true change
  ``g(θ_{s+1}) − g(θ_s)``, the reconstruction ``φ̂_s·Δ_s``, the quadrature residual and the
  optimizer residual ``φ̂_s·ρ_s`` with ``ρ_s = Δ_s − (Σ_k ψ_s(k) + ψ_s(reg))``. Optimizer
  state carried from before the recording, and differences between the training-mode and
  the (always used) eval-mode forward pass, land in ρ_s.

How. Steps are processed in blocks (``vmap`` over steps, quadrature nodes, directions and
test examples, so a small model costs a few vectorised calls per block). The adaptive rule
(``engine.quadrature``) cuts each step at the kinks of ReLU-like operations, per test example,
and raises the Gauss order per example until the error estimate is at round-off; the search
runs in forward mode along Δ_s only. ``φ̂`` is then evaluated in one of two ways, chosen by
cost (``ExplainConfig.engine``): forward-mode ``jvp`` along the directions the views need
(Δ_s and ψ_s(reg) per group, ρ_s, and for the data view ψ_s(k) per training example), or
reverse mode — the full Jacobian of each test example (``jacrev``), which the importance view
needs and which is cheaper when there are many more directions than outputs. A "gradient
evaluation" counts one derivative of one example at one node: one JVP direction, one Jacobian
row, or one training example's gradient.

Frame order: components by (step_lo, group in model order, test, output); data by (step_lo,
train with the regularizer −1 first, test, output); completeness by (step, test, output).

Interrupting (Ctrl-C) stops after the current block of steps and raises
``ExplainInterrupted``, whose ``partial`` holds an ``Explanation`` of the steps finished
(``partial=True``); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from tqdm.auto import tqdm

from engine.errors import BadInputError, ExplaindError, UnsupportedOptimizerError
from engine.groups import GroupMap, ParamLayout, check_granularity
from engine.history import History, StepRecord
from engine.outputs import Quantity, get_quantity
from engine.quadrature import (
    QuadratureSpec,
    Rule,
    SwitchRecorder,
    accept,
    breakpoints,
    composite,
    crossings,
    parse_quadrature,
    refine_zero,
)
from engine.tasks import get_task
from engine.tasks.base import Task
from engine.updates import StepSplit, UpdateRule, initial_buffer, rule_for
from engine.verify import check_data_matches, check_model_matches

log = logging.getLogger(__name__)

VIEWS = ("components", "data", "importance")
ENGINES = ("auto", "jvp", "vjp")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPLITS = ("train", "val")
JVP_PER_ROW = 2  # forward-mode directions costing about one reverse-mode Jacobian row (measured 2–3)
MAX_BLOCK = 32  # most steps per vectorised block
KINK_ITERATIONS = 6  # most root-search steps refining each kink position …
KINK_TOLERANCE = 1e-13  # … stopping once no position moves more than this
REGULARIZER = -1  # train id of the weight-decay pseudo-example in the data view
_TEST_SPEC = re.compile(r"^(train|val)(?::(all|\d+|ids=\d+(?:,\d+)*))?$")


# ============================================================================ configuration
@dataclass(frozen=True)
class ExplainConfig:
    """What to explain and how; validated at construction.

    Attributes:
        test_split: split whose examples are explained (``"val"`` by default).
        test_size: explain its first ``test_size`` examples (``None``: all); ignored if ``test_ids``.
        test_ids: explicit example ids of ``test_split``.
        quantity: ``logits``, ``true-logit``, ``logprob``, ``loss``, ``margin`` or a callable
            ``fn(output, labels)`` (see ``engine.outputs``).
        quadrature: ``adaptive`` (default), ``adaptive:N``, ``gauss:N`` or ``midpoint:N``.
        views: any of ``components``, ``data``, ``importance``; completeness is always computed.
        window: steps per stored window of the components and data views.
        granularity: ``tensor``, ``module`` or ``layer`` groups of the components view.
        steps: ``(lo, hi)`` — explain steps ``lo ≤ s < hi`` only (default: all).
        subsample: fraction of steps computed, those with the largest |loss change| on their
            batch; the rest count fully as quadrature residual.
        dtype: ``float32`` or ``float64`` (certification).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        test_chunk: test examples per vectorised call (default: from ``memory_mb``).
        train_chunk: training examples per vectorised per-example gradient call.
        engine: ``auto``, ``jvp`` (forward mode) or ``vjp`` (reverse mode, full Jacobians).
        optimizer_residual: measure ``φ̂·ρ_s`` (costs one batch gradient per step).
        block: steps evaluated together in one vectorised call (default: from the budgets).
        max_batch: most (step × node × direction × test example) evaluations in one vectorised call.
        memory_mb: budget for Jacobians and per-element accumulators.
    """

    test_split: str = "val"
    test_size: int | None = 16
    test_ids: tuple[int, ...] | None = None
    quantity: str | Callable[[Tensor, Tensor], Tensor] = "logits"
    quadrature: str = "adaptive"
    views: tuple[str, ...] = ("components",)
    window: int = 1
    granularity: str = "tensor"
    steps: tuple[int, int] | None = None
    subsample: float = 1.0
    dtype: str = "float32"
    device: str = "auto"
    test_chunk: int | None = None
    train_chunk: int = 128
    engine: str = "auto"
    optimizer_residual: bool = True
    block: int | None = None
    max_batch: int = 16384
    memory_mb: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.views, str):
            object.__setattr__(self, "views", tuple(v for v in self.views.split(",") if v))
        object.__setattr__(self, "views", tuple(dict.fromkeys(self.views)))
        bad = [v for v in self.views if v not in VIEWS]
        if bad:
            raise BadInputError(f"unknown view(s) {', '.join(bad)}; choose from {', '.join(VIEWS)}")
        if self.test_split not in SPLITS:
            raise BadInputError(f"test split {self.test_split!r} must be one of {', '.join(SPLITS)}")
        if self.test_ids is not None:
            ids = tuple(int(i) for i in self.test_ids)
            if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
                raise BadInputError("test_ids must be distinct non-negative example ids, at least one")
            object.__setattr__(self, "test_ids", ids)
        elif self.test_size is not None and (not isinstance(self.test_size, int) or self.test_size < 1):
            raise BadInputError(f"test_size must be a positive integer or None, got {self.test_size!r}")
        get_quantity(self.quantity)
        parse_quadrature(self.quadrature)
        _positive("window", self.window)
        check_granularity(self.granularity, allow_element=False)
        if self.steps is not None:
            lo, hi = (int(v) for v in self.steps)
            if not 0 <= lo < hi:
                raise BadInputError(f"steps must be (lo, hi) with 0 <= lo < hi, got {self.steps!r}")
            object.__setattr__(self, "steps", (lo, hi))
        if not 0.0 < float(self.subsample) <= 1.0:
            raise BadInputError(f"subsample must be a fraction in (0, 1], got {self.subsample!r}")
        if self.dtype not in DTYPES:
            raise BadInputError(f"dtype {self.dtype!r} must be one of {', '.join(DTYPES)}")
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", str(self.device)):
            raise BadInputError(f"device {self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.test_chunk is not None:
            _positive("test_chunk", self.test_chunk)
        _positive("train_chunk", self.train_chunk)
        _positive("max_batch", self.max_batch)
        if self.block is not None:
            _positive("block", self.block)
        _positive("memory_mb", self.memory_mb)
        if self.engine not in ENGINES:
            raise BadInputError(f"engine {self.engine!r} must be one of {', '.join(ENGINES)}")

    @property
    def quadrature_spec(self) -> QuadratureSpec:
        return parse_quadrature(self.quadrature)

    @property
    def quantity_name(self) -> str:
        return get_quantity(self.quantity).name


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadInputError(f"{name} must be a positive integer, got {value!r}")


def parse_test(spec: str) -> dict[str, Any]:
    """``"val:16"``, ``"val:all"``, ``"val"`` or ``"val:ids=3,7"`` → ``ExplainConfig`` keyword arguments."""
    match = _TEST_SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if not match:
        raise BadInputError(f"bad test spec {spec!r}; use SPLIT, SPLIT:N, SPLIT:all or SPLIT:ids=I,J,... "
                            f"with SPLIT one of {', '.join(SPLITS)}")
    split, what = match.group(1), match.group(2)
    if what is None or what == "all":
        return {"test_split": split, "test_size": None, "test_ids": None}
    if what.startswith("ids="):
        return {"test_split": split, "test_ids": tuple(int(v) for v in what[4:].split(","))}
    if int(what) < 1:
        raise BadInputError(f"test spec {spec!r} asks for no examples; N must be at least 1")
    return {"test_split": split, "test_size": int(what), "test_ids": None}


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device {device!r} was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


# ============================================================================ results
class ExplainInterrupted(ExplaindError):
    """Ctrl-C during ``explain``; ``partial`` is the Explanation of the finished steps."""

    def __init__(self, message: str, partial: Explanation) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class Explanation:
    """The views of one run (polars frames; see INTERFACES.md) and summary numbers.

    ``max_rel_residual`` is ``max_x ‖Σ_s r_s‖ / ‖Σ_s true change‖`` over test examples ``x``, the
    norms taken over the explained outputs (the denominator floored at the dtype's round-off of
    ``|g(θ_lo)| + |g(θ_hi)|``); ``max_rel_residual_output`` is the same ratio for the worst single
    output, which is large when one logit barely moves. ``max_abs_residual`` is the largest
    ``|Σ_s r_s|`` of one output; skipped steps (subsampling) count fully as residual.
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
    partial: bool = False
    notes: tuple[str, ...] = ()

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
            "test_split": self.test_split,
            "tests": len(self.test_ids),
            "outputs": self.outputs,
            "steps": list(self.steps),
            "views": list(self.config.views),
            "max_rel_residual": self.max_rel_residual,
            "max_rel_residual_output": self.max_rel_residual_output,
            "max_abs_residual": self.max_abs_residual,
            "max_optimizer_residual": self.max_optimizer_residual,
            "gradient_evaluations": self.gradient_evaluations,
            "mean_nodes": float(computed.mean()) if computed.len() else 0.0,
            "max_nodes": int(computed.max()) if computed.len() else 0,
            "seconds": self.seconds,
            "partial": self.partial,
            "notes": list(self.notes),
        }

    def exactness(self) -> pl.DataFrame | None:
        """One ``exactness`` row (agreement and KL of reconstructed vs true final logits)."""
        if self.predictions is None:
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
        groups = GroupMap.build(ParamLayout(tuple(history.param_names),
                                            tuple(history.param_shapes[n] for n in history.param_names)),
                                layer_of=task.layer_of)
        optimizer = history.manifest["optimizer"]
        meta = {
            "task": str(history.model_spec.get("task", "imported")),
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
            "device": self.device,
            "engine": self.engine,
            "window": self.config.window,
            "subsample": self.config.subsample,
            "views": list(self.config.views),
            "decay_split": self.decay_split,
            "seconds": self.seconds,
            "gradient_evaluations": self.gradient_evaluations,
            "max_rel_residual": _finite(self.max_rel_residual),
            "max_rel_residual_output": _finite(self.max_rel_residual_output),
            "max_abs_residual": _finite(self.max_abs_residual),
            "max_optimizer_residual": None if self.max_optimizer_residual is None
            else _finite(self.max_optimizer_residual),
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
            groups=groups.frame(),
            examples=_examples_frame(task, model, final, self.test_split, self.test_ids),
            components=self.components,
            data=self.data,
            importance=self.importance,
            completeness=self.completeness,
            predictions=self.predictions,
            exactness=exactness,
            pruning=None,
        )


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
    """Train examples and the explained test examples with the final model's predictions."""
    model = model.to(torch.float32).eval()
    rows = []
    for split, data, ids in (("train", task.dataset("train"), None), ("test", task.dataset(test_split), test_ids)):
        index = torch.arange(len(data)) if ids is None else torch.tensor(ids)
        inputs = data.inputs[index]
        inputs = inputs.float() if inputs.is_floating_point() else inputs
        with torch.no_grad():
            predicted = functional_call(model, {**final, **dict(model.named_buffers())}, (inputs,)).argmax(-1)
        labels = data.labels[index]
        rows.append(pl.DataFrame({
            "split": split,
            "example": index.numpy().astype(np.int64),
            "label": labels.numpy().astype(np.int64),
            "text": [data.render(int(i)) for i in index],
            "predicted": predicted.numpy().astype(np.int64),
            "correct": (predicted == labels).numpy(),
        }))
    return pl.concat(rows)


# ============================================================================ set-up
@dataclass
class _Setup:
    """Everything fixed for one explain call: model functions, data, groups, rule availability."""

    history: History
    task: Task
    config: ExplainConfig
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    buffers: dict[str, Tensor]
    layout: ParamLayout
    groups: GroupMap
    group_labels: list[str]
    element_group: Tensor        # (D,) int64
    quantity: Quantity
    test_ids: tuple[int, ...]
    test_x: Tensor               # (test, ...)
    test_y: Tensor               # (test,)
    train_x: Tensor | None       # (train, ...)
    train_y: Tensor | None
    outputs: int
    lo: int
    hi: int
    split_ok: bool
    split_reason: str | None
    engine: str
    test_chunk: int
    block: int = 1                           # steps per vectorised block
    forward_ad: bool = True                  # the model supports forward-mode AD
    notes: list[str] = field(default_factory=list)
    loss_changes: np.ndarray | None = None   # (hi − lo,) batch loss change per step (subsampling)

    # -------------------------------------------------------------- functions of flat params
    def _call(self, flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, {**self.layout.unflatten(flat), **self.buffers}, (x,))

    def g_batch(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(D,), (n, ...), (n,) → (n, O)``."""
        return self.quantity(self._call(flat, x), y)

    def g_one(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """One example: ``(D,), (...), () → (O,)``."""
        return self.quantity(self._call(flat, x[None]), y[None])[0]

    def loss_one(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.task.per_example_loss(self._call(flat, x[None]), y[None])[0]

    def loss_weighted(self, flat: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        return (self.task.per_example_loss(self._call(flat, x), y) * w).sum()

    def flat(self, params: dict[str, Tensor]) -> Tensor:
        return self.layout.flatten(params, dtype=self.dtype, device=self.device)


def _data_on(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def _setup(history: History, task: Task, config: ExplainConfig) -> _Setup:
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    model = check_model_matches(history, task).to(device=device, dtype=dtype).eval()
    buffers = {n: b.to(device) for n, b in model.named_buffers()}
    layout = ParamLayout(tuple(history.param_names), tuple(history.param_shapes[n] for n in history.param_names))
    groups = GroupMap.build(layout, layer_of=task.layer_of)
    quantity = get_quantity(config.quantity)
    n_steps = history.num_steps
    lo, hi = config.steps or (0, n_steps)
    if hi > n_steps:
        raise BadInputError(f"steps ({lo}, {hi}) reach beyond the {n_steps} recorded steps of {history.path}")

    test = task.dataset(config.test_split)
    if config.test_ids is not None:
        test_ids = config.test_ids
        if max(test_ids) >= len(test):
            raise BadInputError(f"test id {max(test_ids)} is outside the {config.test_split} split "
                                f"(0..{len(test) - 1})")
    else:
        test_ids = tuple(range(min(len(test), config.test_size or len(test))))
    index = torch.tensor(test_ids, dtype=torch.int64)
    test_x, test_y = _data_on(test.inputs[index], dtype, device), test.labels[index].to(device)

    split_ok, split_reason = history.optimizer_family in ("sgd", "adam"), history.data_axis_reason
    if not split_ok and split_reason is None:
        split_reason = f"optimizer {history.manifest['optimizer']['class']} has no per-example split"
    needs_train = split_ok and (config.optimizer_residual or "data" in config.views or config.subsample < 1.0)
    if "data" in config.views and (not split_ok or split_reason is not None):
        raise UnsupportedOptimizerError(
            f"the data view of {history.path} is unavailable: {split_reason}; explain the components view only"
        )
    if config.subsample < 1.0:
        needs_train = True
    train_x = train_y = None
    if needs_train:
        train = check_data_matches(history, task)
        train_x, train_y = _data_on(train.inputs, dtype, device), train.labels.to(device)

    params0 = layout.flatten(history.params(lo), dtype=dtype, device=device)
    with torch.no_grad():
        out = quantity(functional_call(model, {**layout.unflatten(params0), **buffers}, (test_x[:1],)),
                       test_y[:1])
    outputs = int(out.shape[1])

    setup = _Setup(history, task, config, device, dtype, model, buffers, layout, groups,
                   groups.labels(config.granularity), groups.element_index(config.granularity, device),
                   quantity, test_ids, test_x, test_y, train_x, train_y, outputs, lo, hi,
                   split_ok, split_reason, engine="jvp", test_chunk=1)
    setup.engine = _choose_engine(setup, params0)
    setup.test_chunk = _test_chunk(setup)
    setup.block = _block_size(setup)
    return setup


def _choose_engine(setup: _Setup, params0: Tensor) -> str:
    """Forward mode when the model allows it and the directions cost less than the Jacobian rows.

    Directions: Δ_s and ψ_s(reg) on each group, ρ_s, and for the data view ψ_s(k) of up to
    every training example; a JVP direction costs about ``1 / JVP_PER_ROW`` of a Jacobian row.
    The importance view needs the Jacobians themselves.
    """
    config = setup.config
    setup.forward_ad = _jvp_works(setup, params0)
    if not setup.forward_ad:
        setup.notes.append("forward-mode AD unsupported by the model: reverse mode used for all derivatives")
    if "importance" in config.views:
        if config.engine == "jvp":
            raise BadInputError("the importance view needs full Jacobians; use engine='vjp' or 'auto'")
        return "vjp"
    directions = _direction_count(setup)
    wanted = config.engine if config.engine != "auto" else (
        "jvp" if directions <= JVP_PER_ROW * setup.outputs else "vjp")
    if wanted == "jvp" and not setup.forward_ad:
        if config.engine == "jvp":
            raise BadInputError("forward-mode JVP is not implemented for an operation of this model; "
                                "use engine='vjp' or 'auto'")
        return "vjp"
    return wanted


def _group_count(setup: _Setup) -> int:
    """Groups the update is split into: the components view's, else one (the whole update)."""
    return len(setup.group_labels) if "components" in setup.config.views else 1


def _direction_count(setup: _Setup) -> int:
    """Most forward-mode directions of one step."""
    count = _group_count(setup) * (2 if setup.split_ok else 1) + 1
    if "data" in setup.config.views:
        count += setup.train_y.shape[0]
    return count


def _jvp_works(setup: _Setup, params0: Tensor) -> bool:
    try:
        with _math_attention():
            jvp(lambda p: setup.g_batch(p, setup.test_x[:1], setup.test_y[:1]), (params0,), (params0,))
    except (NotImplementedError, RuntimeError) as exc:
        log.info("forward-mode AD failed (%s); using reverse mode", exc)
        return False
    return True


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def _release_memory(device: torch.device) -> None:
    """Hand freed block buffers back to the system (glibc keeps them otherwise, and the heap
    fragments: resident memory would grow with the number of steps)."""
    if device.type == "cpu" and _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Attention through differentiable, vmap-able kernels: the math SDPA backend and no
    ``nn.MultiheadAttention`` fast path (which has neither forward- nor reverse-mode rules)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _block_size(setup: _Setup) -> int:
    """Steps per block: ``config.block``, else as many as fit ``max_batch`` and ``memory_mb`` (at most 32)."""
    config = setup.config
    if config.block is not None:
        return config.block
    d, itemsize = setup.layout.total, setup.dtype.itemsize
    directions = _direction_count(setup)
    memory = config.memory_mb * 2**20
    if setup.engine == "vjp":  # φ̂ of every step, plus the two-rule search
        per_step = 4 * setup.test_chunk * setup.outputs * d * itemsize
    else:  # directions and the points of every step
        per_step = (directions + 4) * d * itemsize
    return int(max(1, min(MAX_BLOCK, memory // per_step, config.max_batch // (directions * setup.test_chunk))))


def _test_chunk(setup: _Setup) -> int:
    config, n = setup.config, len(setup.test_ids)
    if config.test_chunk is not None:
        return min(config.test_chunk, n)
    if setup.engine == "vjp":  # leave room for blocks of 8 steps of Jacobians
        per_example = 4 * 8 * setup.outputs * setup.layout.total * setup.dtype.itemsize
        return max(1, min(n, config.memory_mb * 2**20 // per_example))
    return max(1, min(n, config.max_batch // 64))


# ============================================================================ training side
@dataclass
class _StepTerms:
    """What the optimizer split gives for one step (flat ``(D,)`` vectors unless noted)."""

    psi_reg: Tensor | None = None          # ψ_s(reg)
    rho: Tensor | None = None              # Δ_s − Σ_k ψ_s(k) − ψ_s(reg)
    active: Tensor | None = None           # (A,) train ids with ψ_s(k) ≠ 0
    psi_rows: Callable[[int, int], Tensor] | None = None  # rows [a, b) of ψ_s(active): (b − a, D)
    psi: Tensor | None = None              # (A, D) ψ_s(active), materialised for forward mode


class _TrainSide:
    """Replays the optimizer: the regularizer's, the batch sum's and (data view) each example's buffer.

    Gradients of a block of steps are computed together (``vmap`` over steps and examples);
    the buffers then advance step by step (``advance``).
    """

    def __init__(self, setup: _Setup, rule: UpdateRule, per_example: bool, residual: bool) -> None:
        self.s = setup
        self.rule = rule
        self.per_example = per_example
        self.residual = residual or per_example
        self.evaluations = 0
        d = setup.layout.total
        self.buf_reg = torch.zeros(d, dtype=setup.dtype, device=setup.device)
        self.buf_sum = torch.zeros(d, dtype=setup.dtype, device=setup.device)
        self.buf_ex: Tensor | None = None  # (train, D)
        self.seen: Tensor | None = None    # (train,) bool
        one = vmap(grad(setup.loss_one), in_dims=(None, 0, 0))               # (D,), (b, ...) → (b, D)
        self._example_grads = vmap(one, in_dims=(0, 0, 0))                     # steps × examples
        self._batch_grads = vmap(grad(setup.loss_weighted), in_dims=(0, 0, 0, 0))  # steps → (B, D)

    def gradients(self, thetas: Tensor, records: list[StepRecord]) -> list[Any]:
        """Per step: ``None``; the weighted batch gradient ``(D,)``; or, for the data view,
        ``(unique train ids (U,), weighted per-example gradients (U, D))``."""
        if not self.residual:
            return [None] * len(records)
        s = self.s
        sizes = [len(r.batch_ids) for r in records]
        self.evaluations += sum(sizes)
        width = max(sizes)
        ids = torch.zeros(len(records), width, dtype=torch.int64)
        weights = torch.zeros(len(records), width, dtype=torch.float64)
        for b, r in enumerate(records):
            ids[b, :sizes[b]] = r.batch_ids
            weights[b, :sizes[b]] = r.batch_weights
        ids, weights = ids.to(s.device), weights.to(device=s.device, dtype=s.dtype)
        steps = max(1, s.config.train_chunk // width)
        out: list[Any] = []
        for a in range(0, len(records), steps):
            part = slice(a, a + steps)
            if not self.per_example:
                x, y = s.train_x[ids[part]], s.train_y[ids[part]]
                out.extend(self._batch_grads(thetas[part], x, y, weights[part]))
                continue
            for b in range(a, min(a + steps, len(records))):
                out.append(self._one_step_examples(thetas[b], ids[b, :sizes[b]], weights[b, :sizes[b]]))
        return out

    def _one_step_examples(self, theta: Tensor, ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        s = self.s
        unique, inverse = torch.unique(ids, return_inverse=True)
        d_ex = torch.zeros(len(unique), s.layout.total, dtype=s.dtype, device=s.device)  # (U, D)
        for a in range(0, len(ids), s.config.train_chunk):
            part = slice(a, a + s.config.train_chunk)
            g = self._example_grads(theta[None], s.train_x[ids[part]][None], s.train_y[ids[part]][None])[0]
            d_ex.index_add_(0, inverse[part], g * weights[part, None])
        return unique, d_ex

    def advance(self, record: StepRecord, delta: Tensor, gradient: Any) -> _StepTerms:
        """Apply step ``record.step``'s split to the buffers; ψ_s(reg), ρ_s and (data) ψ_s(k)."""
        s, layout = self.s, self.s.layout
        split: StepSplit = self.rule.split(record)

        def vec(values: dict) -> Tensor:
            return layout.expand(values, s.dtype, s.device)

        decay, inject = vec(split.buffer_decay), vec(split.buffer_inject)
        out_buffer, out_direct = vec(split.out_buffer), vec(split.out_direct)
        zero = dict.fromkeys(layout.names, 0.0)
        reg = vec({**zero, **split.reg_grad}) if split.reg_grad else None
        self.buf_reg = decay * self.buf_reg + (inject * reg if reg is not None else 0.0)
        psi_reg = out_buffer * self.buf_reg
        if reg is not None:
            psi_reg = psi_reg + out_direct * reg
        if split.decoupled:
            psi_reg = psi_reg + vec({**zero, **split.decoupled})
        terms = _StepTerms(psi_reg=psi_reg)
        if gradient is None:
            return terms
        scale = vec(split.grad_scale)
        if self.per_example:
            unique, d_ex = gradient
            d_ex = d_ex * scale
            d_batch = d_ex.sum(0)
            self._advance_examples(unique, d_ex, decay, inject, out_buffer, out_direct, terms)
        else:
            d_batch = scale * gradient
        self.buf_sum = decay * self.buf_sum + inject * d_batch
        terms.rho = delta - (out_buffer * self.buf_sum + out_direct * d_batch) - psi_reg
        return terms

    def _advance_examples(self, unique: Tensor, d_ex: Tensor, decay: Tensor, inject: Tensor,
                          out_buffer: Tensor, out_direct: Tensor, terms: _StepTerms) -> None:
        s = self.s
        n_train = s.train_y.shape[0]
        if self.buf_ex is None and bool((inject != 0).any()):
            self.buf_ex = torch.zeros(n_train, s.layout.total, dtype=s.dtype, device=s.device)
            self.seen = torch.zeros(n_train, dtype=torch.bool, device=s.device)
        if self.buf_ex is None:
            terms.active = unique
            terms.psi_rows = lambda a, b: out_direct * d_ex[a:b]
            return
        self.buf_ex.mul_(decay)
        self.buf_ex.index_add_(0, unique, inject * d_ex)
        self.seen[unique] = True
        active = self.seen.nonzero().squeeze(1)
        position = torch.full((n_train,), -1, dtype=torch.int64, device=s.device)
        position[unique] = torch.arange(len(unique), device=s.device)
        buf_ex = self.buf_ex

        def rows(a: int, b: int) -> Tensor:
            ids = active[a:b]
            psi = out_buffer * buf_ex[ids]
            where = position[ids]
            has = where >= 0
            psi[has] += out_direct * d_ex[where[has]]
            return psi

        terms.active = active
        terms.psi_rows = rows


# ============================================================================ test side
def _pack(step: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group units into rows of one step each, at most the mean units per step wide.

    Returns ``row_step (R,)`` (the step of each row), ``slot (R, W)`` (unit index per position)
    and ``valid (R, W)``; a step with many units spans several rows, so one busy step does not
    pad every other step to its width.
    """
    count = torch.bincount(step, minlength=steps)
    width = max(1, math.ceil(len(step) / max(1, int((count > 0).sum()))))
    rows_per_step = (count + width - 1) // width
    order = torch.argsort(step, stable=True)
    start = torch.cumsum(count, 0) - count
    position = torch.arange(len(step), device=step.device) - start[step[order]]
    row_start = torch.cumsum(rows_per_step, 0) - rows_per_step
    row = row_start[step[order]] + position // width
    rows = int(rows_per_step.sum())
    slot = torch.zeros(rows, width, dtype=torch.int64, device=step.device)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=step.device)
    slot[row, position % width] = order
    valid[row, position % width] = True
    row_step = torch.repeat_interleave(torch.arange(steps, device=step.device), rows_per_step)
    return row_step, slot, valid


class _Evaluator:
    """Derivatives of ``g`` at points ``θ_b + t Δ_b`` of a block of steps ``b``.

    *Shared* evaluations put every test example of a chunk at the same nodes ``t_m`` of each
    step (``vmap`` over steps, nodes and directions). *Unit* evaluations give each (step,
    node, example) unit its own point, for examples whose rule is cut at kinks or refined;
    units are grouped by step so that a step's directions are not copied per unit.
    """

    def __init__(self, setup: _Setup) -> None:
        self.s = setup
        self.evaluations = 0

        def along_batch(theta: Tensor, delta: Tensor, t: Tensor, v: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return jvp(lambda p: setup.g_batch(p, x, y), (theta + t * delta,), (v,))[1]

        def along_one(theta: Tensor, delta: Tensor, t: Tensor, v: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return jvp(lambda p: setup.g_one(p, x, y), (theta + t * delta,), (v,))[1]

        def phi_one(theta: Tensor, delta: Tensor, t: Tensor, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
            # ∇_θ Σ_m w_m g(x; θ + t_m Δ) = Σ_m w_m ∇g(x; θ + t_m Δ) = φ̂: one (O, D) Jacobian for all nodes
            def weighted(th: Tensor) -> Tensor:
                values = vmap(lambda tm: setup.g_one(th + tm * delta, x, y))(t)  # (M, O)
                return (w[:, None] * values).sum(0)
            return jacrev(weighted)(theta)

        def switches_one(theta: Tensor, delta: Tensor, t: Tensor, x: Tensor) -> Tensor:
            with SwitchRecorder(1) as recorder:
                setup._call(theta + t * delta, x[None])
            values = recorder.values()
            return values[0] if values is not None else theta.new_zeros(0)

        def forward(theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            with SwitchRecorder(x.shape[0]) as recorder:
                g = setup.g_batch(theta, x, y)
            values = recorder.values()
            return g, values if values is not None else g.new_zeros(x.shape[0], 0)

        step_dims = (0, 0, 0, 0, None, None)
        # steps (B, D), (B, D); nodes (B, M); directions (B, K, D); batch → (B, M, K, n, O)
        self._jvp_shared = vmap(vmap(vmap(along_batch, in_dims=(None, None, None, 0, None, None)),
                                     in_dims=(None, None, 0, None, None, None)), in_dims=step_dims)
        # steps; unit nodes (B, U), inputs (B, U, ...) → (B, U, K, O)
        self._jvp_units = vmap(vmap(vmap(along_one, in_dims=(None, None, None, 0, None, None)),
                                    in_dims=(None, None, 0, None, 0, 0)), in_dims=(0, 0, 0, 0, 0, 0))
        # steps; shared nodes (M,) and weights (M,); batch → φ̂ (B, n, O, D)
        self._phi_shared = vmap(vmap(phi_one, in_dims=(None, None, None, None, 0, 0)),
                                in_dims=(0, 0, None, None, None, None))
        self._phi_rows = vmap(phi_one)  # rows with own nodes (R, M), weights, one input each → (R, O, D)
        self._switches = vmap(vmap(switches_one, in_dims=(None, None, 0, 0)))  # → (B, U, S)
        self._forward = vmap(forward, in_dims=(0, None, None))      # steps → (B, n, O), (B, n, S)
        self._g = vmap(setup.g_batch, in_dims=(0, None, None))      # steps → (B, n, O)

    def forward(self, thetas: Tensor, x: Tensor, y: Tensor, switches: bool) -> tuple[Tensor, Tensor | None]:
        """``g`` at each point ``(B, n, O)`` and, if asked, the switching values ``(B, n, S)``."""
        budget = max(1, self.s.config.max_batch // x.shape[0])
        outs, sws = [], []
        for a in range(0, len(thetas), budget):
            if switches:
                g, sw = self._forward(thetas[a:a + budget], x, y)
                outs.append(g)
                sws.append(sw)
            else:
                outs.append(self._g(thetas[a:a + budget], x, y))
        return torch.cat(outs), torch.cat(sws) if switches else None

    def shared(self, thetas: Tensor, deltas: Tensor, t: Tensor, directions: Tensor, x: Tensor,
               y: Tensor) -> Tensor:
        """Directional derivatives at shared nodes ``t (M,)``: ``(B, M, K, n, O)``."""
        s = self.s
        b_count, k, n = directions.shape[0], directions.shape[1], x.shape[0]
        per_step = len(t) * k * n
        steps = max(1, s.config.max_batch // per_step)
        nodes = t.to(s.dtype).expand(b_count, -1)
        out = [self._jvp_shared(thetas[a:a + steps], deltas[a:a + steps], nodes[a:a + steps],
                                directions[a:a + steps], x, y) for a in range(0, b_count, steps)]
        self.evaluations += b_count * per_step
        return torch.cat(out)

    def units(self, thetas: Tensor, deltas: Tensor, step: Tensor, t: Tensor, directions: Tensor,
              x: Tensor, y: Tensor) -> Tensor:
        """Directional derivatives per unit (step ``step[u]``, node ``t[u]``, input ``x[u]``): ``(U, K, O)``."""
        s = self.s
        k = directions.shape[1]
        out = torch.zeros(len(t), k, s.outputs, dtype=s.dtype, device=s.device)
        if not len(t):
            return out
        row_step, slot, valid = _pack(step, len(thetas))
        rows = max(1, s.config.max_batch // (slot.shape[1] * k))
        for a in range(0, len(row_step), rows):
            b, sl, ok = row_step[a:a + rows], slot[a:a + rows], valid[a:a + rows]
            value = self._jvp_units(thetas[b], deltas[b], t[sl].to(s.dtype), directions[b], x[sl], y[sl])
            out[sl[ok]] = value[ok]  # value: (rows, W, K, O)
        self.evaluations += len(t) * k
        return out

    def phi_shared(self, thetas: Tensor, deltas: Tensor, t: Tensor, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """φ̂ ``(B, n, O, D)`` of every example under one rule ``t, w (M,)`` shared by all.

        Nodes and steps are chunked: the backward pass holds one gradient per node before the sum.
        """
        s = self.s
        b_count, n, d = len(thetas), x.shape[0], s.layout.total
        row = 3 * n * s.outputs * d * s.dtype.itemsize  # bytes per (step, node)
        budget = max(1, s.config.memory_mb * 2**20 // row)
        m_chunk = max(1, min(len(t), budget))
        steps = max(1, budget // m_chunk)
        out = torch.zeros(b_count, n, s.outputs, d, dtype=s.dtype, device=s.device)
        tt, ww = t.to(s.dtype), w.to(s.dtype)
        for a in range(0, b_count, steps):
            for m in range(0, len(t), m_chunk):
                out[a:a + steps] += self._phi_shared(thetas[a:a + steps], deltas[a:a + steps], tt[m:m + m_chunk],
                                                     ww[m:m + m_chunk], x, y)
        self.evaluations += b_count * len(t) * n * s.outputs
        return out

    def phi_rows(self, thetas: Tensor, deltas: Tensor, step: Tensor, t: Tensor, w: Tensor, count: Tensor,
                 x: Tensor, y: Tensor) -> Tensor:
        """φ̂ ``(R, O, D)`` of rows (step ``step[r]``, input ``x[r]``) with own nodes ``t, w (R, M)``.

        Rows are grouped by node count, so padding nodes are never evaluated.
        """
        s = self.s
        d = s.layout.total
        out = torch.zeros(len(step), s.outputs, d, dtype=s.dtype, device=s.device)
        for m in torch.unique(count).tolist():
            rows = (count == m).nonzero().squeeze(1)
            chunk = max(1, s.config.memory_mb * 2**20 // (3 * m * s.outputs * d * s.dtype.itemsize))
            m_chunk = max(1, min(m, s.config.memory_mb * 2**20 // (3 * s.outputs * d * s.dtype.itemsize)))
            for a in range(0, len(rows), chunk):
                r = rows[a:a + chunk]
                b = step[r]
                for k in range(0, m, m_chunk):
                    out[r] += self._phi_rows(thetas[b], deltas[b], t[r, k:min(k + m_chunk, m)].to(s.dtype),
                                             w[r, k:min(k + m_chunk, m)].to(s.dtype), x[r], y[r])
            self.evaluations += len(rows) * m * s.outputs
        return out

    def switches(self, thetas: Tensor, deltas: Tensor, step: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """Switching values per unit at its own point: ``(U, S)``."""
        s = self.s
        row_step, slot, valid = _pack(step, len(thetas))
        rows = max(1, s.config.max_batch // slot.shape[1])
        out = None
        for a in range(0, len(row_step), rows):
            b, sl, ok = row_step[a:a + rows], slot[a:a + rows], valid[a:a + rows]
            value = self._switches(thetas[b], deltas[b], t[sl].to(s.dtype), x[sl])
            if out is None:
                out = value.new_zeros(len(t), value.shape[-1])
            out[sl[ok]] = value[ok]
        return out


# ============================================================================ one pass
@dataclass
class _Window:
    lo: int
    hi: int
    value: np.ndarray | None = None      # (G, n, O)
    decay: np.ndarray | None = None      # (G, n, O)
    data: np.ndarray | None = None       # (1 + A, n, O) over `train`
    train: np.ndarray | None = None      # (1 + A,) train ids, the regularizer (−1) first


@dataclass
class _Chunk:
    """One slice of the pass's test examples and its accumulators."""

    x: Tensor
    y: Tensor
    g_prev: Tensor | None = None                 # (n, O) g(θ_s) of the next step to process
    switch_prev: Tensor | None = None            # (n, S) switching values at θ_s (adaptive rule)
    g_first: Tensor | None = None                # (n, O) g(θ_lo)
    value: Tensor | None = None                  # (G, n, O) window accumulators, float64
    decay: Tensor | None = None
    data: Tensor | None = None                   # (train, n, O) float64
    data_reg: Tensor | None = None               # (n, O)
    importance: Tensor | None = None             # (n, O, D) float64 signed Σ_s φ̂ ⊙ Δ
    rows: dict[str, list[Tensor]] = field(default_factory=dict)  # completeness per step
    windows: list[_Window] = field(default_factory=list)
    window_lo: int = 0                           # first step of the open window
    window_active: Tensor | None = None          # train ids with ψ ≠ 0 in the open window (data view)


@dataclass
class _Block:
    """Consecutive explained steps processed together."""

    records: list[StepRecord]
    thetas: Tensor      # (B, D) θ_b
    nexts: Tensor       # (B, D) θ_{b+1}
    compute: list[bool]
    gradients: list[Any]

    @property
    def deltas(self) -> Tensor:
        return self.nexts - self.thetas


@dataclass
class _Rules:
    """Final per-(step, example) quadrature rule of a chunk in a block.

    ``shared[b, x]`` marks units integrated by the shared base rule (nodes ``base_t`` with
    weights ``base_w``); the others use their own nodes ``t, w (B, n, M)`` (valid where
    ``w`` was set, ``count`` nodes) with φ̂ precomputed in ``phi`` for reverse mode.
    """

    base_t: Tensor              # (M0,)
    base_w: Tensor              # (M0,)
    shared: Tensor              # (B, n) bool
    t: Tensor                   # (B, n, M)
    w: Tensor                   # (B, n, M)
    count: Tensor               # (B, n) int64
    phi: Tensor | None = None   # (B, n, O, D) reverse mode


class _Pass:
    """Streams the steps once for one set of test examples and accumulates every view."""

    def __init__(self, setup: _Setup, tests: slice, kept: np.ndarray, rule: UpdateRule | None) -> None:
        self.s = setup
        self.kept = kept
        self.views = set(setup.config.views)
        self.evaluator = _Evaluator(setup)
        self.quad = setup.config.quadrature_spec
        self.search_reverse = setup.engine == "vjp" and (not setup.forward_ad or setup.outputs == 1)
        f64 = dict(dtype=torch.float64, device=setup.device)
        groups, o = _group_count(setup), setup.outputs
        self.chunks: list[_Chunk] = []
        for a in range(tests.start, tests.stop, setup.test_chunk):
            sel = slice(a, min(a + setup.test_chunk, tests.stop))
            c = _Chunk(setup.test_x[sel], setup.test_y[sel], window_lo=setup.lo)
            n = c.y.shape[0]
            c.value = torch.zeros(groups, n, o, **f64)
            c.decay = torch.zeros(groups, n, o, **f64)
            if "data" in self.views:
                c.data = torch.zeros(setup.train_y.shape[0], n, o, **f64)
                c.data_reg = torch.zeros(n, o, **f64)
            if "importance" in self.views:
                c.importance = torch.zeros(n, o, setup.layout.total, **f64)
            self.chunks.append(c)
        self.train: _TrainSide | None = None
        if rule is not None:
            self.train = _TrainSide(setup, rule, per_example="data" in self.views,
                                    residual=setup.config.optimizer_residual and setup.train_x is not None)
        if "components" in self.views:
            element, index = setup.element_group, setup.groups.tensor_index(setup.config.granularity)
        else:  # one group: the whole update (completeness and data views need no component split)
            element, index = torch.zeros_like(setup.element_group), [0] * len(setup.layout.names)
        self.mask = (element[None, :] == torch.arange(groups, device=setup.device)[:, None]).to(setup.dtype)  # (G, D)
        index = torch.tensor(index, device=setup.device)
        self.tensor_to_group = (index[:, None] == torch.arange(groups, device=setup.device)).to(setup.dtype)
        self.stats: list[dict[str, float]] = []
        self.pending: list[tuple[StepRecord, Tensor, Tensor]] = []
        self.done = setup.lo

    @property
    def evaluations(self) -> int:
        return self.evaluator.evaluations + (self.train.evaluations if self.train else 0)

    # -------------------------------------------------------------- streaming
    def step(self, record: StepRecord, theta: Tensor, theta_next: Tensor) -> int:
        """Queue one step; returns how many steps were completed by this call."""
        self.pending.append((record, theta, theta_next))
        if len(self.pending) >= self.s.block or record.step + 1 == self.s.hi:
            return self.finish_block()
        return 0

    def finish_block(self) -> int:
        """Process the queued steps; returns their number."""
        items, self.pending = self.pending, []
        if not items:
            return 0
        s = self.s
        thetas = torch.stack([t for _, t, _ in items])
        nexts = torch.stack([t for _, _, t in items])
        records = [r for r, _, _ in items]
        gradients = self.train.gradients(thetas, records) if self.train else [None] * len(items)
        explained = [i for i, r in enumerate(records) if r.step >= s.lo]
        if len(explained) < len(records):  # steps before lo: training side only
            for i in range(len(records)):
                if i not in explained:
                    self.train.advance(records[i], nexts[i] - thetas[i], gradients[i])
            records = [records[i] for i in explained]
            thetas, nexts = thetas[explained], nexts[explained]
            gradients = [gradients[i] for i in explained]
        if records:
            block = _Block(records, thetas, nexts, [bool(self.kept[r.step - s.lo]) for r in records], gradients)
            with _math_attention():  # grad mode stays on: modules such as MultiheadAttention check it
                self._process(block)
            self.done = records[-1].step + 1
        _release_memory(s.device)
        return len(items)

    def _process(self, block: _Block) -> None:
        s = self.s
        deltas = block.deltas
        norms = torch.stack([deltas.double().norm(dim=1), block.thetas.double().norm(dim=1)], dim=1).tolist()
        for r, (update_norm, param_norm) in zip(block.records, norms, strict=True):  # one sync per block
            hp = r.hparams[0]
            self.stats.append({"step": r.step, "update_norm": update_norm, "param_norm": param_norm, "lr": hp.lr,
                               "weight_decay": hp.weight_decay})
        forward_mode = s.engine == "jvp"
        if forward_mode or "data" not in self.views:
            # ψ_s(reg), ρ_s (and ψ_s(k)) of every step first (the forward-mode directions); then one chunk
            # at a time
            terms = [self._advance(block, b) for b in range(len(block.records))]
            examples = max((len(t.psi) for t in terms if t.psi is not None), default=0)
            directions = torch.stack([self._directions(block.deltas[b], t, examples)
                                      for b, t in enumerate(terms)]) if forward_mode else None
            for c in self.chunks:
                values, rules, true = self._chunk_block(c, block, directions)
                for b in range(len(block.records)):
                    self._accumulate(c, b, block, values, rules, true, terms[b])
                del values, rules
            return
        # data view (reverse mode): ψ_s(k) exists only while the per-example buffers are at step s,
        # so φ̂ of the block comes first and the buffers advance step by step (one chunk per pass)
        outs = [self._chunk_block(c, block, None) for c in self.chunks]
        for b in range(len(block.records)):
            terms = self._advance(block, b)
            for c, (values, rules, true) in zip(self.chunks, outs, strict=True):
                self._accumulate(c, b, block, values, rules, true, terms)

    def _advance(self, block: _Block, b: int) -> _StepTerms:
        if self.train is None:
            return _StepTerms()
        terms = self.train.advance(block.records[b], block.deltas[b], block.gradients[b])
        if self.s.engine == "jvp" and terms.active is not None:  # the buffers move on: keep this step's ψ
            terms.psi = terms.psi_rows(0, len(terms.active))
        return terms

    def _directions(self, delta: Tensor, terms: _StepTerms, examples: int = 0) -> Tensor:
        """(K, D): Δ on each group, ψ_s(reg) on each group (if split), ρ_s (if measured), then
        (data view) ψ_s(k) of the active training examples, zero-padded to ``examples`` rows."""
        rows = [self.mask * delta]
        if self.train is not None:
            rows.append(self.mask * terms.psi_reg)
            if self.train.residual:
                rows.append(terms.rho[None])
        if examples:
            psi = terms.psi if terms.psi is not None else delta.new_zeros(0, delta.shape[0])
            rows.extend([psi, delta.new_zeros(examples - len(psi), delta.shape[0])])
        return torch.cat(rows)

    # -------------------------------------------------------------- one chunk of a block
    def _chunk_block(self, c: _Chunk, block: _Block, directions: Tensor | None) -> tuple[Tensor | None, _Rules | None,
                                                                                          Tensor]:
        """Forward passes, rules and (forward mode) directional derivatives of a chunk for a block."""
        s, ev = self.s, self.evaluator
        adaptive = self.quad.adaptive
        if c.g_prev is None:
            g0, sw0 = ev.forward(block.thetas[:1], c.x, c.y, adaptive)
            c.g_prev, c.g_first = g0[0], g0[0]
            c.switch_prev = sw0[0] if adaptive else None
        g_next, sw_next = ev.forward(block.nexts, c.x, c.y, adaptive)  # (B, n, O), (B, n, S)
        g_prev = torch.cat([c.g_prev[None], g_next[:-1]])
        sw_prev = torch.cat([c.switch_prev[None], sw_next[:-1]]) if adaptive else None
        c.g_prev = g_next[-1]
        c.switch_prev = sw_next[-1] if adaptive else None
        true = g_next.double() - g_prev.double()  # (B, n, O)
        computed = torch.tensor(block.compute, device=s.device)
        if not bool(computed.any()):
            return None, None, true
        idx = computed.nonzero().squeeze(1)
        rules = self._rules(c, block, idx, true[idx], g_prev[idx], g_next[idx],
                            sw_prev[idx] if adaptive else None, sw_next[idx] if adaptive else None)
        if directions is None:
            return None, rules, true
        return self._directional(c, block, idx, rules, directions[idx]), rules, true

    def _rules(self, c: _Chunk, block: _Block, idx: Tensor, true: Tensor, g_prev: Tensor, g_next: Tensor,
               sw_prev: Tensor | None, sw_next: Tensor | None) -> _Rules:
        """Quadrature rule of every (computed step, example); see ``quadrature`` for the adaptive one.

        The search evaluates ``φ̂·Δ`` by forward mode when the model allows it; in reverse mode
        the Jacobians are then built at the final nodes only (``rules.phi``).
        """
        s, ev = self.s, self.evaluator
        b_count, n = len(idx), c.y.shape[0]
        thetas, deltas = block.thetas[idx], block.deltas[idx]
        f64 = dict(dtype=torch.float64, device=s.device)
        if not self.quad.adaptive:
            base_t, base_w = self.quad.rule().tensors(torch.float64, s.device)
            rules = _Rules(base_t, base_w, torch.ones(b_count, n, dtype=torch.bool, device=s.device),
                           torch.zeros(b_count, n, 0, **f64), torch.zeros(b_count, n, 0, **f64),
                           torch.full((b_count, n), len(base_t), device=s.device))
            if s.engine == "vjp":
                rules.phi = ev.phi_shared(thetas, deltas, base_t, base_w, c.x, c.y)
            return rules

        points, counts = self._kinks(c, thetas, deltas, sw_prev, sw_next)  # (B, n, P), (B, n)
        scale = g_prev.abs() + g_next.abs()
        ladder = self.quad.ladder()
        base = ladder[1]
        base_t, base_w = base.tensors(torch.float64, s.device)
        width = (points.shape[2] + 1) * len(ladder[-1])
        rules = _Rules(base_t, base_w, torch.zeros(b_count, n, dtype=torch.bool, device=s.device),
                       torch.zeros(b_count, n, width, **f64), torch.zeros(b_count, n, width, **f64),
                       torch.zeros(b_count, n, dtype=torch.int64, device=s.device),
                       torch.zeros(b_count, n, s.outputs, s.layout.total, dtype=s.dtype, device=s.device)
                       if self.search_reverse else None)

        # first level: Gauss 1 and 2 per piece; plain (kink-free) units at shared nodes
        plain = counts == 0
        q1, q2 = self._first_level(c, thetas, deltas, plain, points, counts, ladder[0], base, rules)
        done = accept(q2, q1, true.to(q2.dtype) - q2, scale, s.dtype)  # (B, n)
        if len(ladder) == 2:
            done[:] = True
        rules.shared = plain & done
        self._set_composite(rules, ~plain & done, points, counts, base)
        pending = (~done).nonzero()  # (P, 2) rows (b, x)
        q_prev = q2[~done]
        for level, rule in enumerate(ladder[2:], start=2):
            if not len(pending):
                break
            bi, xi = pending[:, 0], pending[:, 1]
            t, w, cnt = composite(points[bi, xi], counts[bi, xi], rule)
            q, phi = self._evaluate_units(c, thetas, deltas, bi, xi, t, w, cnt)
            ok = accept(q, q_prev, true[bi, xi].to(q.dtype) - q, scale[bi, xi], s.dtype)
            if level == len(ladder) - 1:
                ok[:] = True
            sel = ok.nonzero().squeeze(1)
            m = t.shape[1]
            rules.t[bi[sel], xi[sel], :m] = t[sel]
            rules.w[bi[sel], xi[sel], :m] = w[sel]
            rules.count[bi[sel], xi[sel]] = cnt[sel]
            if phi is not None:
                rules.phi[bi[sel], xi[sel]] = phi[sel]
            pending, q_prev = pending[~ok], q[~ok]
        rules.count[rules.shared] = len(base)
        if s.engine == "vjp" and not self.search_reverse:
            rules.phi = self._final_phi(c, thetas, deltas, rules)
        return rules

    def _final_phi(self, c: _Chunk, thetas: Tensor, deltas: Tensor, rules: _Rules) -> Tensor:
        """φ̂ ``(B, n, O, D)`` of every unit under its final rule (reverse mode)."""
        ev = self.evaluator
        phi = ev.phi_shared(thetas, deltas, rules.base_t, rules.base_w, c.x, c.y)
        own = (~rules.shared).nonzero()
        if len(own):
            bi, xi = own[:, 0], own[:, 1]
            phi[bi, xi] = ev.phi_rows(thetas, deltas, bi, rules.t[bi, xi], rules.w[bi, xi], rules.count[bi, xi],
                                      c.x[xi], c.y[xi])
        return phi

    def _first_level(self, c: _Chunk, thetas: Tensor, deltas: Tensor, plain: Tensor, points: Tensor,
                     counts: Tensor, low: Rule, base: Rule, rules: _Rules) -> tuple[Tensor, Tensor]:
        """``φ̂·Δ`` by the two lowest rules for every unit (plain ones at shared nodes); (B, n, O) each."""
        s, ev = self.s, self.evaluator
        lt, lw = low.tensors(torch.float64, s.device)
        bt, bw = base.tensors(torch.float64, s.device)
        if self.search_reverse:
            q1 = torch.einsum("bnod,bd->bno", ev.phi_shared(thetas, deltas, lt, lw, c.x, c.y), deltas)
            rules.phi[:] = ev.phi_shared(thetas, deltas, bt, bw, c.x, c.y)
            q2 = torch.einsum("bnod,bd->bno", rules.phi, deltas)
        else:
            t = torch.cat([lt, bt])                                             # (M,)
            w = torch.zeros(len(t), 2, dtype=s.dtype, device=s.device)          # (M, 2)
            w[:len(lt), 0], w[len(lt):, 1] = lw.to(s.dtype), bw.to(s.dtype)
            values = ev.shared(thetas, deltas, t, deltas[:, None], c.x, c.y)[:, :, 0]  # (B, M, n, O)
            q1, q2 = torch.einsum("bmno,mr->rbno", values, w)
        kinked = (~plain).nonzero()
        if len(kinked):
            bi, xi = kinked[:, 0], kinked[:, 1]
            t1, w1, c1 = composite(points[bi, xi], counts[bi, xi], low)
            t2, w2, c2 = composite(points[bi, xi], counts[bi, xi], base)
            q1[bi, xi], _ = self._evaluate_units(c, thetas, deltas, bi, xi, t1, w1, c1)
            q2[bi, xi], phi = self._evaluate_units(c, thetas, deltas, bi, xi, t2, w2, c2)
            if phi is not None:
                rules.phi[bi, xi] = phi
        return q1, q2

    def _evaluate_units(self, c: _Chunk, thetas: Tensor, deltas: Tensor, bi: Tensor, xi: Tensor, t: Tensor,
                        w: Tensor, count: Tensor) -> tuple[Tensor, Tensor | None]:
        """``φ̂·Δ`` of units (bi, xi) with own nodes ``t, w (P, M)`` (first ``count`` valid): ``(P, O)``.

        When the search runs in reverse mode, φ̂ itself ``(P, O, D)`` is returned as well.
        """
        s, ev = self.s, self.evaluator
        valid = torch.arange(t.shape[1], device=s.device)[None] < count[:, None]
        unit, node = valid.nonzero(as_tuple=True)
        b, ex, tt, ww = bi[unit], xi[unit], t[unit, node], w[unit, node]
        x, y = c.x[ex], c.y[ex]
        if self.search_reverse:
            phi = ev.phi_rows(thetas, deltas, bi, t, w, count, c.x[xi], c.y[xi])  # (P, O, D)
            return torch.einsum("pod,pd->po", phi, deltas[bi]), phi
        values = ev.units(thetas, deltas, b, tt, deltas[:, None], x, y)[:, 0]  # (U, O)
        q = torch.zeros(len(bi), s.outputs, dtype=s.dtype, device=s.device)
        q.index_add_(0, unit, values * ww.to(s.dtype)[:, None])
        return q, None

    @staticmethod
    def _set_composite(rules: _Rules, units: Tensor, points: Tensor, counts: Tensor, rule: Rule) -> None:
        sel = units.nonzero()
        if not len(sel):
            return
        bi, xi = sel[:, 0], sel[:, 1]
        t, w, cnt = composite(points[bi, xi], counts[bi, xi], rule)
        rules.t[bi, xi, :t.shape[1]] = t
        rules.w[bi, xi, :t.shape[1]] = w
        rules.count[bi, xi] = cnt

    def _kinks(self, c: _Chunk, thetas: Tensor, deltas: Tensor, sw_prev: Tensor,
               sw_next: Tensor) -> tuple[Tensor, Tensor]:
        """Kink positions ``(B, n, P)`` (padding 1.0) and counts ``(B, n)`` of every unit."""
        b_count, n = sw_prev.shape[:2]
        t, unit, counts = crossings(sw_prev.reshape(b_count * n, -1), sw_next.reshape(b_count * n, -1))
        if t.shape[1]:
            valid = torch.arange(t.shape[1], device=t.device)[None] < counts[:, None]
            row, column = valid.nonzero(as_tuple=True)
            u = unit[row, column]
            step, example = row // n, row % n
            before = sw_prev.reshape(b_count * n, -1)[row, u].double()
            after = sw_next.reshape(b_count * n, -1)[row, u].double()
            guess = t[row, column]
            history = [(torch.zeros_like(guess), before), (torch.ones_like(guess), after)]
            rows = torch.arange(len(row), device=t.device)
            for _ in range(KINK_ITERATIONS):
                value = self.evaluator.switches(thetas, deltas, step, guess, c.x[example])[rows, u].double()
                new = refine_zero(guess, value, history)
                moved = float((new - guess).abs().max())
                guess = new
                if moved <= KINK_TOLERANCE:
                    break
            t = t.clone()
            t[row, column] = guess
        points, counts = breakpoints(t, counts)
        return points.reshape(b_count, n, -1), counts.reshape(b_count, n)

    def _directional(self, c: _Chunk, block: _Block, idx: Tensor, rules: _Rules, directions: Tensor) -> Tensor:
        """``φ̂·v_k`` of every computed (step, example) under its rule: ``(B, K, n, O)``."""
        s, ev = self.s, self.evaluator
        thetas, deltas = block.thetas[idx], block.deltas[idx]
        b_count, k, n = directions.shape[0], directions.shape[1], c.y.shape[0]
        out = torch.zeros(b_count, k, n, s.outputs, dtype=s.dtype, device=s.device)
        if bool(rules.shared.any()):
            values = ev.shared(thetas, deltas, rules.base_t, directions, c.x, c.y)  # (B, M, K, n, O)
            weights = rules.base_w.to(s.dtype)[None, :, None] * rules.shared.to(s.dtype)[:, None, :]  # (B, M, n)
            out += torch.einsum("bmkno,bmn->bkno", values, weights)
        own = (~rules.shared).nonzero()
        if len(own):
            bi, xi = own[:, 0], own[:, 1]
            count = rules.count[bi, xi]
            valid = torch.arange(rules.t.shape[2], device=s.device)[None] < count[:, None]
            unit, node = valid.nonzero(as_tuple=True)
            b, ex = bi[unit], xi[unit]
            values = ev.units(thetas, deltas, b, rules.t[b, ex, node], directions, c.x[ex], c.y[ex])  # (U, K, O)
            values = values * rules.w[b, ex, node].to(s.dtype)[:, None, None]
            flat = out.permute(0, 2, 1, 3).reshape(b_count * n, k, s.outputs)
            flat.index_add_(0, b * n + ex, values)
            out = flat.reshape(b_count, n, k, s.outputs).permute(0, 2, 1, 3)
        return out

    # -------------------------------------------------------------- accumulation
    def _accumulate(self, c: _Chunk, b: int, block: _Block, values: Tensor | None, rules: _Rules | None,
                    true: Tensor, terms: _StepTerms) -> None:
        """Add step ``b`` of the block to chunk ``c``'s accumulators; close its window at a boundary."""
        s = self.s
        step = block.records[b].step
        self._accumulate_step(c, step, b, block, values, rules, true, terms)
        if (step + 1 - s.lo) % s.config.window == 0 or step + 1 == s.hi:
            self.flush(c, step + 1)

    def _accumulate_step(self, c: _Chunk, step: int, b: int, block: _Block, values: Tensor | None,
                         rules: _Rules | None, true: Tensor, terms: _StepTerms) -> None:
        s = self.s
        n_groups = self.mask.shape[0]
        true_b = true[b]
        n = c.y.shape[0]
        if not block.compute[b]:
            self._record(c, step, true_b, torch.zeros_like(true_b), None,
                         torch.zeros(n, dtype=torch.int64, device=s.device))
            return
        j = sum(block.compute[:b])  # index among computed steps
        if c.data is not None and terms.active is not None:
            c.window_active = terms.active if c.window_active is None else torch.unique(
                torch.cat([c.window_active, terms.active]))
        phi = rules.phi[j] if values is None else None           # (n, O, D)
        decay = opt = None
        if phi is None:
            out = values[j]                                        # (K, n, O)
            value = out[:n_groups].double()
            if self.train is not None:
                decay = out[n_groups:2 * n_groups].double()
                if self.train.residual:
                    opt = out[2 * n_groups].to(torch.float64, copy=True)  # kept per step: no view of the block
            if c.data is not None and terms.psi is not None:
                first = 2 * n_groups + 1
                c.data.index_add_(0, terms.active, out[first:first + len(terms.active)].double())
        else:
            prod = phi * block.deltas[b]
            value = self._group_sums(prod).double()
            if self.train is not None:
                decay = self._group_sums(phi * terms.psi_reg).double()
                if self.train.residual:
                    opt = (phi @ terms.rho).double()
            if c.importance is not None:
                c.importance += prod.double()
            if c.data is not None and terms.active is not None:
                self._data_step(c, phi, terms)
        recon = value.sum(0)
        c.value += value
        if decay is not None:
            c.decay += decay
            if c.data_reg is not None:
                c.data_reg += decay.sum(0)
        self._record(c, step, true_b, recon, opt, rules.count[j])

    def _group_sums(self, prod: Tensor) -> Tensor:
        """``(n, O, D) → (G, n, O)``: sums over each group's elements (tensor slices, then groups)."""
        per_tensor = torch.stack([part.sum(-1) for part in prod.split(self.s.layout.sizes, -1)], dim=-1)
        return (per_tensor @ self.tensor_to_group).permute(2, 0, 1)

    def _data_step(self, c: _Chunk, phi: Tensor, terms: _StepTerms) -> None:
        s = self.s
        rows = max(1, s.config.memory_mb * 2**20 // (4 * s.layout.total * s.dtype.itemsize))
        flat = phi.reshape(-1, phi.shape[-1])  # (n·O, D)
        for a in range(0, len(terms.active), rows):
            psi = terms.psi_rows(a, a + rows)  # (A, D)
            gamma = (psi @ flat.T).reshape(psi.shape[0], *phi.shape[:2])  # (A, n, O)
            c.data.index_add_(0, terms.active[a:a + rows], gamma.double())

    def _record(self, c: _Chunk, step: int, true: Tensor, recon: Tensor, opt: Tensor | None,
                count: Tensor) -> None:
        rows = c.rows
        rows.setdefault("step", []).append(torch.tensor([step]))
        rows.setdefault("true", []).append(true)
        rows.setdefault("recon", []).append(recon)
        rows.setdefault("opt", []).append(opt if opt is not None else torch.full_like(true, float("nan")))
        rows.setdefault("nodes", []).append(count)

    # -------------------------------------------------------------- windows
    def flush(self, c: _Chunk, hi: int) -> None:
        """Close chunk ``c``'s window ``[c.window_lo, hi)`` into a ``_Window`` and reset its accumulators."""
        if hi <= c.window_lo:
            return
        window = _Window(c.window_lo, hi, c.value.cpu().numpy().copy(), c.decay.cpu().numpy().copy())
        c.value.zero_()
        c.decay.zero_()
        if c.data is not None:
            ids = c.window_active.cpu().numpy() if c.window_active is not None else np.zeros(0, dtype=np.int64)
            window.data = np.concatenate([c.data_reg.cpu().numpy()[None],
                                          c.data[torch.from_numpy(ids).to(c.data.device)].cpu().numpy()])
            window.train = np.concatenate([[REGULARIZER], ids]).astype(np.int64)
            c.data.zero_()
            c.data_reg.zero_()
        c.windows.append(window)
        c.window_lo = hi
        c.window_active = None

    def flush_all(self) -> None:
        for c in self.chunks:
            self.flush(c, self.done)


# ============================================================================ driver
def explain(run_dir: str | Path, config: ExplainConfig | None = None, progress: bool = True,
            allow_incomplete: bool = False) -> Explanation:
    """Decompose a recorded run (see the module docstring); ``python -m engine explain`` calls this."""
    history = History.open(run_dir, allow_incomplete=allow_incomplete)
    return explain_history(history, get_task(history.model_spec), config or ExplainConfig(), progress)


def explain_history(history: History, task: Task, config: ExplainConfig | None = None,
                    progress: bool = True) -> Explanation:
    """Like ``explain`` for an opened history and task."""
    config = config or ExplainConfig()
    started = time.perf_counter()
    s = _setup(history, task, config)
    rule = _rule_for(s)
    kept = _kept_steps(s)
    passes = _passes(s)
    start = 0 if rule else s.lo
    bar = tqdm(total=(s.hi - start) * len(passes), desc="explain", unit="step", disable=not progress,
               dynamic_ncols=True)
    results: list[_Pass] = []
    with _deferred_interrupt() as stop, bar:
        for tests in passes:
            current = _Pass(s, tests, kept, _rule_for(s) if rule else None)  # rules are stateful: one per pass
            results.append(current)
            for record, theta, theta_next in _segments(s, start):
                current.step(record, theta, theta_next)
                bar.update(1)
                if stop.is_set():
                    break
            if stop.is_set():
                current.flush_all()
                break
    interrupted = stop.is_set()
    explanation = _assemble(s, results, kept, time.perf_counter() - started, interrupted)
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


def _segments(s: _Setup, start: int) -> Iterator[tuple[StepRecord, Tensor, Tensor]]:
    """(record, θ_s, θ_{s+1}) for steps start..hi−1, θ from the stored parameters (exact path)."""
    previous: StepRecord | None = None
    theta_prev: Tensor | None = None
    for record in s.history.iter_steps(start, s.hi):
        theta = s.flat(record.params)
        if previous is not None:
            yield previous, theta_prev, theta
        previous, theta_prev = record, theta
    if previous is not None:
        yield previous, theta_prev, s.flat(s.history.params(s.hi))


def _kept_steps(s: _Setup) -> np.ndarray:
    """Boolean mask over steps lo..hi−1: the top ``subsample`` fraction by |batch loss change|."""
    count = s.hi - s.lo
    if s.config.subsample >= 1.0:
        return np.ones(count, dtype=bool)
    changes = np.zeros(count)
    with torch.no_grad():
        for record, theta, theta_next in _segments(s, start=s.lo):
            ids = record.batch_ids.to(s.device)
            w = record.batch_weights.to(device=s.device, dtype=s.dtype)
            x, y = s.train_x[ids], s.train_y[ids]
            changes[record.step - s.lo] = float(s.loss_weighted(theta_next, x, y, w) - s.loss_weighted(theta, x, y, w))
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
    accumulators allow in ``memory_mb``.
    """
    n = len(s.test_ids)
    size = n
    if "data" in s.config.views and s.engine == "vjp":
        size = s.test_chunk
    if "importance" in s.config.views:
        size = min(size, max(1, s.config.memory_mb * 2**20 // (8 * s.outputs * s.layout.total)))
    if size < n:
        s.notes.append(f"{math.ceil(n / size)} passes over the steps, {size} test examples each")
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


# ============================================================================ frames
def _assemble(s: _Setup, results: list[_Pass], kept: np.ndarray, seconds: float, partial: bool) -> Explanation:
    test_ids = np.asarray(s.test_ids, dtype=np.int64)
    group_col = s.config.granularity
    comp_frames, data_frames, compl_frames, pred_frames, imp = [], [], [], [], None
    max_rel = max_rel_output = max_abs = 0.0
    max_opt: float | None = None
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
            floor = torch.finfo(s.dtype).eps * (np.abs(g_first) + np.abs(g_first + total_true))
            max_abs = max(max_abs, float(np.abs(total_resid).max()))
            max_rel_output = max(max_rel_output, float(
                (np.abs(total_resid) / np.maximum(np.abs(total_true), floor)).max()))
            norm_true = np.maximum(np.linalg.norm(total_true, axis=1), np.linalg.norm(floor, axis=1))
            max_rel = max(max_rel, float((np.linalg.norm(total_resid, axis=1) / norm_true).max()))
            if not np.isnan(opt).all():
                value = float(np.nanmax(np.abs(np.nansum(opt, axis=0))))
                max_opt = value if max_opt is None else max(max_opt, value)
            if s.config.quantity_name == "logits":
                pred_frames.append(_grid_frame({}, tests, s.outputs, {
                    "initial": g_first, "true_final": g_first + total_true,
                    "reconstructed_final": g_first + recon.sum(0)}))
            if "components" in s.config.views and c.windows:
                comp_frames.append(_components_frame(c.windows, s.group_labels, tests, s.outputs, group_col))
            if "data" in s.config.views and c.windows:
                data_frames.extend(_data_frame(w, tests, s.outputs) for w in c.windows)
            if c.importance is not None:
                part = c.importance.abs().sum(dim=(0, 1))
                imp = part if imp is None else imp + part
    importance = None
    if imp is not None:
        final = s.layout.flatten(s.history.params(s.hi), dtype=torch.float64).abs().numpy()
        importance = pl.DataFrame({
            "tensor": np.repeat(np.array(s.layout.names, dtype=object), s.layout.sizes).astype(str),
            "index": np.concatenate([np.arange(n) for n in s.layout.sizes]).astype(np.int64),
            "importance": imp.cpu().numpy(),
            "magnitude": final,
        })
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
    order = {label: i for i, label in enumerate(s.group_labels)}
    completeness = _combine(compl_frames, ["step", "test", "output"], one) if compl_frames \
        else _empty_completeness()
    return Explanation(
        config=s.config, quantity=s.config.quantity_name, quadrature=str(s.config.quadrature_spec),
        test_split=s.config.test_split, test_ids=s.test_ids, steps=(s.lo, s.hi), outputs=s.outputs,
        engine=s.engine, device=str(s.device),
        components=_combine(comp_frames, ["step_lo", pl.col(group_col).replace_strict(order, return_dtype=pl.Int64),
                                          "test", "output"], one) if "components" in s.config.views else None,
        data=_combine(data_frames, ["step_lo", "train", "test", "output"], one) if "data" in s.config.views
        else None,
        importance=importance,
        completeness=completeness,
        predictions=_combine(pred_frames, ["test", "output"], one) if pred_frames else None,
        step_stats=stats,
        max_rel_residual=max_rel, max_rel_residual_output=max_rel_output, max_abs_residual=max_abs,
        max_optimizer_residual=max_opt,
        gradient_evaluations=sum(p.evaluations for p in results),
        seconds=seconds, decay_split=s.split_ok, partial=partial, notes=tuple(s.notes),
    )


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
        pl.Series(column, np.array(labels, dtype=object)[frame["group"].to_numpy()].astype(str)),
        "test", "output", "value", "decay")


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
                      progress: bool = False) -> tuple[tuple[int, ...], dict[str, Tensor]]:
    """Signed ``Σ_s φ̂_s(x)[j, i] Δ_s[i]`` per test example, output and parameter element.

    Returns ``(test_ids, {tensor name: (test, out, *shape) float64})`` over the configured
    step range; memory is ``tests × O × D`` doubles.
    """
    history = run if isinstance(run, History) else History.open(run)
    task = get_task(history.model_spec)
    config = replace(config or ExplainConfig(), views=("importance",))
    s = _setup(history, task, config)
    rule = _rule_for(s)
    kept = _kept_steps(s)
    current = _Pass(s, slice(0, len(s.test_ids)), kept, rule)
    for record, theta, theta_next in tqdm(_segments(s, start=0 if rule else s.lo), disable=not progress,
                                          total=s.hi - (0 if rule else s.lo), desc="elements", unit="step"):
        current.step(record, theta, theta_next)
    signed = torch.cat([c.importance for c in current.chunks]).cpu()  # (test, O, D)
    return s.test_ids, s.layout.unflatten(signed)


def compare_quadratures(run: str | Path | History, quadratures: tuple[str, ...] = ("midpoint:10", "midpoint:100",
                        "gauss:2", "adaptive"), config: ExplainConfig | None = None,
                        progress: bool = False) -> pl.DataFrame:
    """The ``exactness`` table: reconstruction of the final logits under several quadrature rules."""
    history = run if isinstance(run, History) else History.open(run)
    task = get_task(history.model_spec)
    base = replace(config or ExplainConfig(), views=(), quantity="logits", optimizer_residual=False)
    rows = [explain_history(history, task, replace(base, quadrature=q), progress).exactness() for q in quadratures]
    return pl.concat(rows)
