"""What ``engine.decompose.explain`` explains and how: ``ExplainConfig``, the test spec and the device.

``ExplainConfig`` validates every option on construction (``BadInputError`` names the bad one);
``parse_test`` turns a CLI test spec such as ``val:16`` into its keyword arguments and
``resolve_device`` turns ``auto`` into CUDA when available.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.decompose.quadrature import QuadratureSpec, parse_quadrature
from engine.errors import BadInputError
from engine.model.groups import check_granularity
from engine.model.outputs import get_quantity

VIEWS = ("components", "data", "importance")
ENGINES = ("auto", "jvp", "vjp")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPLITS = ("train", "val")
_TEST_SPEC = re.compile(r"^(train|val)(?::(all|\d+|ids=\d+(?:,\d+)*))?$")


@dataclass(frozen=True)
class ExplainConfig:
    """What to explain and how; validated at construction.

    Attributes:
        test_split: split whose examples are explained (``"val"`` by default).
        test_size: explain its first ``test_size`` examples (``None``: all); ignored if ``test_ids``.
        test_ids: explicit example ids of ``test_split``.
        quantity: ``logits``, ``true-logit``, ``logprob``, ``loss``, ``margin`` or a callable
            ``fn(output, labels)`` (see ``engine.model.outputs``).
        quadrature: ``adaptive`` (default), ``adaptive:N``, ``gauss:N`` or ``midpoint:N``.
        views: any of ``components``, ``data``, ``importance``; completeness is always computed.
        window: steps per stored window of the components and data views.
        granularity: ``tensor``, ``module`` or ``layer`` groups of the components view.
        partitions: splits finer than a tensor whose units (heads, neurons, embedding rows,
            Fourier frequencies, …) the components view also sums (``engine.model.units``):
            the task's built-in names (``heads``, ``neurons``, ``tokens``, ``embed-fourier``,
            …; ``all`` for every one) or partition specs (dicts). They need the Jacobians of
            reverse mode.
        steps: ``(lo, hi)`` — explain steps ``lo ≤ s < hi`` only (default: all).
        subsample: fraction of steps computed, those with the largest |loss change| on their
            batch; the rest count fully as quadrature residual.
        dtype: ``float32`` or ``float64`` (certification).
        rtol: error budget of the adaptive rule (``None``: every step to round-off). Each
            explained example's summed residual stays within ``rtol`` of its change over the
            steps: every (step, example) may leave ``rtol/steps`` of that change, and in
            float32 the units whose round-off exceeds their share are recomputed in float64.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        test_chunk: test examples per vectorised call (default: from ``memory_mb``).
        train_chunk: training examples per vectorised per-example gradient call.
        engine: ``auto``, ``jvp`` (forward mode) or ``vjp`` (reverse mode, full Jacobians).
        optimizer_residual: measure ``φ̂·ρ_s`` (costs one batch gradient per step).
        decay_split: split each component into its weight-decay share (and measure the
            optimizer residual). Off, each group costs one forward-mode direction instead of two:
            the granularity of a plain path kernel. The data view needs it.
        block: steps evaluated together in one vectorised call (default: from the budgets).
        max_batch: most (step × node × direction × test example) evaluations in one vectorised call.
        memory_mb: budget for Jacobians and per-element accumulators; a quarter of it bounds the
            activations of one vectorised call (from what g's forward allocates per example), an
            eighth of that a call of the adaptive rule's search.
    """

    test_split: str = "val"
    test_size: int | None = 16
    test_ids: tuple[int, ...] | None = None
    quantity: str | Callable[[Tensor, Tensor], Tensor] = "logits"
    quadrature: str = "adaptive"
    views: tuple[str, ...] = ("components",)
    window: int = 1
    granularity: str = "tensor"
    partitions: tuple[str | dict, ...] = ()
    steps: tuple[int, int] | None = None
    subsample: float = 1.0
    dtype: str = "float32"
    rtol: float | None = None
    device: str = "auto"
    test_chunk: int | None = None
    train_chunk: int = 128
    engine: str = "auto"
    optimizer_residual: bool = True
    decay_split: bool = True
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
        if isinstance(self.partitions, str):
            object.__setattr__(self, "partitions", tuple(u.strip() for u in self.partitions.split(",") if u.strip()))
        object.__setattr__(self, "partitions", tuple(self.partitions))
        if any(not isinstance(u, (str, dict)) for u in self.partitions):
            raise BadInputError("partitions must be names of built-in partitions or partition specs (dicts)")
        if self.partitions and "components" not in self.views:
            raise BadInputError("partitions split the components view finer; add 'components' to the views")
        if self.steps is not None:
            lo, hi = (int(v) for v in self.steps)
            if not 0 <= lo < hi:
                raise BadInputError(f"steps must be (lo, hi) with 0 <= lo < hi, got {self.steps!r}")
            object.__setattr__(self, "steps", (lo, hi))
        if not 0.0 < float(self.subsample) <= 1.0:
            raise BadInputError(f"subsample must be a fraction in (0, 1], got {self.subsample!r}")
        if self.dtype not in DTYPES:
            raise BadInputError(f"dtype {self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.rtol is not None:
            if isinstance(self.rtol, bool) or not isinstance(self.rtol, (int, float)) or not 0.0 < self.rtol < 1.0:
                raise BadInputError(f"rtol must be a fraction in (0, 1) or None, got {self.rtol!r}")
            if not self.quadrature_spec.adaptive:
                raise BadInputError(f"rtol budgets the adaptive rule; quadrature {self.quadrature!r} is fixed")
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", str(self.device)):
            raise BadInputError(f"device {self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.test_chunk is not None:
            _positive("test_chunk", self.test_chunk)
        _positive("train_chunk", self.train_chunk)
        _positive("max_batch", self.max_batch)
        if self.block is not None:
            _positive("block", self.block)
        _positive("memory_mb", self.memory_mb)
        if not self.decay_split and "data" in self.views:
            raise BadInputError("the data view splits the update by training example and weight decay: "
                                "it needs decay_split=True")
        if self.engine not in ENGINES:
            raise BadInputError(f"engine {self.engine!r} must be one of {', '.join(ENGINES)}")

    @property
    def quadrature_spec(self) -> QuadratureSpec:
        return parse_quadrature(self.quadrature)

    def test_ids_in(self, split_size: int) -> tuple[int, ...]:
        """The explained example ids of a ``test_split`` with ``split_size`` examples."""
        if self.test_ids is None:
            return tuple(range(min(split_size, self.test_size or split_size)))
        if max(self.test_ids) >= split_size:
            raise BadInputError(f"test id {max(self.test_ids)} is outside the {self.test_split} split "
                                f"(0..{split_size - 1})")
        return self.test_ids

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
