"""Set-up of one explain call: ``_Setup`` and the choices made from the budgets.

``_Setup`` holds what stays fixed while the steps stream: the model as functions of the flat
parameter vector, the test (and, when needed, training) examples on the device, the parameter
groups, the explained step range and the optimizer split's availability. ``_setup`` builds it
and picks the engine (forward mode ``jvp`` or reverse mode ``vjp``, by cost), the test examples
per vectorised call and the steps per block. Also here: the helpers the streaming pass runs
under, ``_math_attention`` (differentiable, vmap-able attention kernels) and ``_release_memory``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from engine.decompose.at_point import AtPoint
from engine.decompose.config import DTYPES, ExplainConfig, resolve_device
from engine.decompose.quadrature import LiveSwitches, live_switches, live_tensors
from engine.decompose.scalar_ops import ScalarOps
from engine.errors import BadInputError, UnsupportedOptimizerError
from engine.model.groups import GroupMap, ParamLayout
from engine.model.outputs import Quantity, get_quantity
from engine.model.task import Task
from engine.model.units import UnitMap, resolve_partitions
from engine.run.history import History
from engine.run.verify import check_data_matches, check_model_matches

log = logging.getLogger(__name__)

JVP_PER_ROW = 2  # forward-mode directions costing about one reverse-mode Jacobian row (measured 2–3)
MAX_BLOCK = 32  # most steps per vectorised block
PROBE_EXAMPLES = 16  # test examples in the forwards that find which switching values and tensors can change g


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
    live_switches: LiveSwitches | None = None  # switching values that can change g (adaptive rule)
    live_tensors: frozenset[str] | None = None  # parameter tensors g is computed from (None: all)
    fine: UnitMap | None = None  # partitions finer than a tensor (config.partitions)

    # -------------------------------------------------------------- functions of flat params
    def _call(self, flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, {**self.layout.unflatten(flat), **self.buffers}, (x,))

    def _call_at(self, flat: Tensor, delta: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """The model at ``flat + t·delta``, its parameters left at ``flat`` (``engine.decompose.at_point``)."""
        params = self.layout.unflatten(flat)
        with AtPoint(list(params.values()), list(self.layout.unflatten(delta).values()), t):
            return functional_call(self.model, {**params, **self.buffers}, (x,))

    def g_one_at(self, flat: Tensor, delta: Tensor, t: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """One example at ``flat + t·delta``: ``(D,), (D,), (), (...), () → (O,)``."""
        return self.quantity(self._call_at(flat, delta, t, x[None]), y[None])[0]

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
    test_ids = config.test_ids_in(len(test))
    index = torch.tensor(test_ids, dtype=torch.int64)
    test_x, test_y = _data_on(test.inputs[index], dtype, device), test.labels[index].to(device)

    split_ok, split_reason = history.optimizer_family in ("sgd", "adam"), history.data_axis_reason
    if not split_ok and split_reason is None:
        split_reason = f"optimizer {history.manifest['optimizer']['class']} has no per-example split"
    if not config.decay_split:
        split_ok, split_reason = False, "the decay split is off (decay_split=False)"
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
    if config.partitions:
        setup.fine = UnitMap(layout, resolve_partitions(config.partitions, task.partitions(layout), layout), device)
    setup.engine = _choose_engine(setup, params0)
    if setup.engine == "jvp":  # a direction on tensors g does not use needs no evaluation
        setup.live_tensors = _live_tensors(setup, params0)
    if config.quadrature_spec.adaptive:
        setup.live_switches = _live_switches(setup, params0)
    setup.test_chunk = _test_chunk(setup)
    setup.block = _block_size(setup)
    return setup


def _live_switches(setup: _Setup, params0: Tensor) -> LiveSwitches | None:
    """The switching values whose kinks can change ``g`` (``quadrature.live_switches``), probed in
    float64 so that no attention weight underflows to an exact zero."""
    wide = setup if setup.dtype == torch.float64 else _widened(setup)
    n = min(len(setup.test_y), PROBE_EXAMPLES)
    try:
        with _math_attention():
            return live_switches(lambda p: wide.g_batch(p, wide.test_x[:n], setup.test_y[:n]), params0.double(), n)
    except Exception as exc:  # the model's own code on the smoothed network (e.g. a check that a ReLU is ≥ 0)
        setup.notes.append(f"kink probe failed ({type(exc).__name__}: {exc}): every kink is cut at")
        return None


def _live_tensors(setup: _Setup, params0: Tensor) -> frozenset[str] | None:
    """The parameter tensors ``g`` is computed from (``quadrature.live_tensors``), None for all."""
    n = min(len(setup.test_y), PROBE_EXAMPLES)

    def g(params: dict[str, Tensor]) -> Tensor:
        return setup.quantity(functional_call(setup.model, {**params, **setup.buffers}, (setup.test_x[:n],)),
                              setup.test_y[:n])
    try:
        with _math_attention():
            live = live_tensors(g, setup.layout.unflatten(params0), n)
    except Exception as exc:  # the model's own code on the smoothed network, as for the kink probe
        setup.notes.append(f"parameter probe failed ({type(exc).__name__}: {exc}): every tensor is evaluated")
        return None
    unused = [] if live is None else [name for name in setup.layout.names if name not in live]
    if not unused:
        return None
    setup.notes.append(f"the output does not depend on {', '.join(unused)}: components exactly 0, not evaluated")
    return live


def _widened(setup: _Setup) -> _Setup:
    """The same set-up computing in float64 (for the units the compute dtype cannot resolve)."""
    model = copy.deepcopy(setup.model).to(torch.float64)
    return replace(setup, dtype=torch.float64, model=model, buffers=dict(model.named_buffers()),
                   test_x=_data_on(setup.test_x, torch.float64, setup.device),
                   train_x=None if setup.train_x is None else _data_on(setup.train_x, torch.float64, setup.device))


def _choose_engine(setup: _Setup, params0: Tensor) -> str:
    """Forward mode when the model allows it and the directions cost less than the Jacobian rows.

    Directions: Δ_s and ψ_s(reg) on each group, ρ_s, and for the data view ψ_s(k) of up to
    every training example; a JVP direction costs about ``1 / JVP_PER_ROW`` of a Jacobian row.
    The importance view and partitions finer than a tensor need the Jacobians themselves.
    """
    config = setup.config
    setup.forward_ad = _jvp_works(setup, params0)
    if not setup.forward_ad:
        setup.notes.append("forward-mode AD unsupported by the model: reverse mode used for all derivatives")
    if "importance" in config.views or config.partitions:
        what = "the importance view" if "importance" in config.views else "partitions finer than a tensor"
        if config.engine == "jvp":
            raise BadInputError(f"{what} needs full Jacobians; use engine='vjp' or 'auto'")
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
        with _math_attention(), ScalarOps():
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
