"""Set-up of one explain call: ``_Setup`` and the choices made from the budgets.

``_Setup`` holds what stays fixed while the steps stream: the model as functions of the flat
parameter vector and the flat vector of the buffers that change during training (MATH.md §6:
each step is evaluated with its own buffers ``b_s``), the test (and, when needed, training)
examples on the device, the parameter groups and the modules whose buffers change, the
explained step range, the optimizer split's availability and how the batch gradient is split
into examples (``engine.run.replay``). ``_setup`` builds it and picks the engine (forward mode
``jvp`` or reverse mode ``vjp``, by cost), the test examples per vectorised call and the steps
per block. Also here: the helpers the streaming pass runs
under, ``_math_attention`` (differentiable, vmap-able attention kernels) and ``_release_memory``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from engine.decompose.at_point import AtPoint, Injected
from engine.decompose.config import DTYPES, ExplainConfig, resolve_device
from engine.decompose.quadrature import LiveSwitches, live_switches, live_tensors, selections
from engine.decompose.scalar_ops import ScalarOps
from engine.errors import BadInputError, UnsupportedOptimizerError
from engine.model.groups import GroupMap, ParamLayout
from engine.model.outputs import Quantity, get_quantity
from engine.model.task import Task
from engine.model.units import UnitMap, resolve_partitions
from engine.run.history import History
from engine.run.replay import (
    PER_EXAMPLE,
    RANDOM_PROBE_EXAMPLES,
    DataSplit,
    TrainingForward,
    choose_split,
    in_training_modes,
)
from engine.run.spec import check_data_matches, check_model_matches

log = logging.getLogger(__name__)

JVP_PER_ROW = 2  # forward-mode directions costing about one reverse-mode Jacobian row (measured 2–3)
# An output's backward pass with the directions injected costs at least this share of one forward-mode
# direction (measured 0.83 at 25 outputs and 0.50 at 115 on the benchmark's transformer, where more
# outputs share one forward; 0.4 leaves a margin): with more outputs than directions ÷ share, reverse
# mode at the final nodes cannot win and is not timed
INJECTED_ROW_SHARE = 0.4
MAX_BLOCK = 32  # most steps per vectorised block
PROBE_EXAMPLES = 16  # test examples in the forwards that find which switching values and tensors can change g


@dataclass(frozen=True)
class BufferGroup:
    """The changing buffers of one module: its component label, module, layer and flat columns."""

    label: str
    module: str
    layer: str
    columns: Tensor  # (k,) int64 positions in the flat buffer vector
    size: int


def buffer_label(module: str) -> str:
    """The component label of a module's buffer term: ``bn1.<buffers>`` (``<buffers>`` for the model's own)."""
    return f"{module}.<buffers>" if module else "<buffers>"


def buffer_groups(layout: ParamLayout, groups: GroupMap, layer_of: Callable[[str], str],
                  device: torch.device | str = "cpu") -> list[BufferGroup]:
    """One group per module owning a changing buffer (``layout``), in model order. A buffer belongs to
    the module its name leads to, and to that module's layer (``layer_of`` of the buffer's name for a
    module without parameters)."""
    owners: dict[str, list[int]] = {}
    first: dict[str, str] = {}
    for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True):
        module = name.rpartition(".")[0]
        owners.setdefault(module, []).extend(range(offset, offset + size))
        first.setdefault(module, name)
    layers = dict(zip(groups.modules, groups.layers, strict=True))
    return [BufferGroup(buffer_label(m), m, layers.get(m) or layer_of(first[m]),
                        torch.tensor(cols, dtype=torch.int64, device=device), len(cols))
            for m, cols in owners.items()]


@dataclass
class _Setup:
    """Everything fixed for one explain call: model functions, data, groups, rule availability."""

    history: History
    task: Task
    config: ExplainConfig
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    buffers: dict[str, Tensor]   # buffers that stay fixed (floating ones at b_0), in the compute dtype
    buffer_layout: ParamLayout   # the buffers that change during training, as one flat vector
    layout: ParamLayout
    groups: GroupMap
    group_labels: list[str]
    element_group: Tensor        # (D,) int64
    quantity: Quantity
    test_ids: tuple[int, ...]
    test_x: Tensor               # (test, ...)
    test_y: Tensor               # (test,) class ids or (test, ...) float targets
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
    example_bytes: int = 0                   # what g's forward allocates per test example (``_example_bytes``)
    directional: str | None = "forward"      # directions at the final nodes: forward, reverse, None: time both
    notes: list[str] = field(default_factory=list)
    loss_changes: np.ndarray | None = None   # (hi − lo,) batch loss change per step (subsampling)
    live_switches: LiveSwitches | None = None  # switching values that can change g (adaptive rule)
    live_tensors: frozenset[str] | None = None  # parameter tensors g is computed from (None: all)
    split: DataSplit | None = None           # how batch gradients split into examples (training side)
    train_forward: TrainingForward | None = None  # the replayed training forward (batched split)
    train_model: nn.Module | None = None     # the model in its training modes (per-example split)
    buffer_groups: list[BufferGroup] = field(default_factory=list)  # modules whose buffers change
    component_labels: list[str] = field(default_factory=list)  # component rows: parameter groups, then buffers
    buffer_rows: list[int] = field(default_factory=list)  # the component row of each buffer group
    _fixed: dict[torch.dtype, dict[str, Tensor]] = field(default_factory=dict)
    selections: dict[str, bool] = field(default_factory=dict)  # selections in g: switch points located?
    fine: UnitMap | None = None  # partitions finer than a tensor (config.partitions)

    # -------------------------------------------------------------- functions of flat params and buffers
    def _state(self, flat: Tensor, bufs: Tensor) -> dict[str, Tensor]:
        """Parameters and buffers for ``functional_call``; the fixed floating buffers in ``bufs``' dtype."""
        fixed = self._fixed.get(bufs.dtype)
        if fixed is None:
            fixed = {n: b.to(bufs.dtype) if b.is_floating_point() else b for n, b in self.buffers.items()}
            self._fixed[bufs.dtype] = fixed
        changing = self.buffer_layout.unflatten(bufs) if self.buffer_layout.names else {}
        return {**self.layout.unflatten(flat), **fixed, **changing}

    def _call(self, flat: Tensor, bufs: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, self._state(flat, bufs), (x,))

    def _call_at(self, flat: Tensor, delta: Tensor, t: Tensor, bufs: Tensor, x: Tensor,
                 injected: Injected | None = None) -> Tensor:
        """The model at ``flat + t·delta``, its parameters left at ``flat`` (``engine.decompose.at_point``)."""
        state = self._state(flat, bufs)
        params = [state[n] for n in self.layout.names]
        with AtPoint(params, list(self.layout.unflatten(delta).values()), t, injected):
            return functional_call(self.model, state, (x,))

    def g_one_at(self, flat: Tensor, delta: Tensor, t: Tensor, bufs: Tensor, x: Tensor, y: Tensor,
                 injected: Injected | None = None) -> Tensor:
        """One example at ``flat + t·delta`` with buffers ``bufs``: ``(D,), (D,), (), (Db,), (...), () → (O,)``;
        with ``injected`` directions ``+ Σ_k α_k V_k`` as well (``engine.decompose.at_point``)."""
        return self.quantity(self._call_at(flat, delta, t, bufs, x[None], injected), y[None])[0]

    def g_batch(self, flat: Tensor, bufs: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(D,), (Db,), (n, ...), (n,) → (n, O)``."""
        return self.quantity(self._call(flat, bufs, x), y)

    def g_one(self, flat: Tensor, bufs: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """One example: ``(D,), (Db,), (...), () → (O,)``."""
        return self.quantity(self._call(flat, bufs, x[None]), y[None])[0]

    def loss_weighted(self, flat: Tensor, bufs: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """The weighted loss of a batch in evaluation mode (ranks steps for subsampling)."""
        return (self.task.per_example_loss(self._call(flat, bufs, x), y) * w).sum()

    def train_loss_one(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """One example's loss in the training modes (the per-example split, chosen only when no buffer
        changes, so the fixed buffers are all there is)."""
        state = self._state(flat, flat.new_zeros(0))
        return self.task.per_example_loss(functional_call(self.train_model, state, (x[None],)), y[None])[0]

    def train_loss_weighted(self, flat: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        state = self._state(flat, flat.new_zeros(0))
        return (self.task.per_example_loss(functional_call(self.train_model, state, (x,)), y) * w).sum()

    def flat(self, params: dict[str, Tensor]) -> Tensor:
        return self.layout.flatten(params, dtype=self.dtype, device=self.device)

    def flat_buffers(self, buffers: dict[str, Tensor]) -> Tensor:
        """The changing buffers of a step as one ``(Db,)`` vector (``(0,)`` when none change)."""
        if not self.buffer_layout.names:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return self.buffer_layout.flatten(buffers, dtype=self.dtype, device=self.device)


def _data_on(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def _setup(history: History, task: Task, config: ExplainConfig) -> _Setup:
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    rebuilt = check_model_matches(history, task)
    model = copy.deepcopy(rebuilt).to(device=device, dtype=dtype).eval()
    changing = history.changing_buffers
    initial = history.initial_buffers()
    buffers = {n: _data_on(initial.get(n, b), dtype, device) for n, b in model.named_buffers() if n not in changing}
    buffer_layout = ParamLayout(tuple(changing), tuple(history.buffer_shapes[n] for n in changing))
    layout = ParamLayout(tuple(history.param_names), tuple(history.param_shapes[n] for n in history.param_names))
    groups = GroupMap.build(layout, layer_of=task.layer_of)
    quantity = get_quantity(config.quantity, loss=task.per_example_loss)
    n_steps = history.num_steps
    lo, hi = config.steps or (0, n_steps)
    if hi > n_steps:
        raise BadInputError(f"steps ({lo}, {hi}) reach beyond the {n_steps} recorded steps of {history.path}")

    test = task.dataset(config.test_split)
    test_ids = config.test_ids_in(len(test))
    index = torch.tensor(test_ids, dtype=torch.int64)
    test_x, test_y = _data_on(test.inputs[index], dtype, device), _data_on(test.labels[index], dtype, device)

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
        train_x, train_y = _data_on(train.inputs, dtype, device), _data_on(train.labels, dtype, device)

    setup = _Setup(history, task, config, device, dtype, model, buffers, buffer_layout, layout, groups,
                   groups.labels(config.granularity), groups.element_index(config.granularity, device),
                   quantity, test_ids, test_x, test_y, train_x, train_y, 0, lo, hi,
                   split_ok, split_reason, engine="jvp", test_chunk=1,
                   buffer_groups=buffer_groups(buffer_layout, groups, task.layer_of, device))
    setup.component_labels, setup.buffer_rows = _component_rows(setup)
    params0, bufs0 = setup.flat(history.params(lo)), setup.flat_buffers(history.buffers(lo))
    with torch.no_grad():
        setup.outputs = int(setup.g_batch(params0, bufs0, test_x[:1], test_y[:1]).shape[1])
        setup.example_bytes = _example_bytes(setup, params0, bufs0)
    if needs_train:
        _training_side(setup, rebuilt)
    if config.partitions:
        setup.fine = UnitMap(layout, resolve_partitions(config.partitions, task.partitions(layout), layout), device)
    setup.engine = _choose_engine(setup, params0, bufs0)
    if setup.engine == "jvp":  # a direction on tensors g does not use needs no evaluation
        setup.live_tensors = _live_tensors(setup, params0, bufs0)
        if config.engine == "auto":  # forward mode or reverse with the directions injected: measured per pass
            setup.directional = _directional_mode(setup)
    if config.quadrature_spec.adaptive:
        setup.live_switches = _live_switches(setup, params0, bufs0)
        setup.selections = _selections(setup, params0, bufs0)
    setup.test_chunk = _test_chunk(setup)
    setup.block = _block_size(setup)
    setup.notes.append(f"evaluation: blocks of {setup.block} steps per vectorised call "
                       f"({'as asked' if config.block is not None else 'from the budgets'}; fewer hold less memory)")
    return setup


def _component_rows(setup: _Setup) -> tuple[list[str], list[int]]:
    """The component rows — the parameter groups at the configured granularity, then the label of
    each buffer term not among them — and the row of each buffer group. At tensor granularity a
    module's buffer term has a row of its own (``bn1.<buffers>``); coarser, it joins its module or
    layer."""
    labels = list(setup.group_labels)
    rows = []
    for group in setup.buffer_groups:
        label = {"tensor": group.label, "module": group.module or group.label,
                 "layer": group.layer}[setup.config.granularity]
        if label not in labels:
            labels.append(label)
        rows.append(labels.index(label))
    return labels, rows


def _training_side(setup: _Setup, rebuilt: nn.Module) -> None:
    """How the batch gradient is split into examples (``engine.run.replay``), said in the notes."""
    setup.split = choose_split(setup.history, rebuilt, setup.device, setup.train_x[:RANDOM_PROBE_EXAMPLES])
    setup.notes.append(setup.split.note)
    if setup.split.mode == PER_EXAMPLE:
        setup.train_model = in_training_modes(setup.history, setup.model)
    else:
        setup.train_forward = TrainingForward(setup.history, setup.task, rebuilt, setup.device)


def _live_switches(setup: _Setup, params0: Tensor, bufs0: Tensor) -> LiveSwitches | None:
    """The switching values whose kinks can change ``g`` (``quadrature.live_switches``), probed in
    float64 so that no attention weight underflows to an exact zero."""
    wide = setup if setup.dtype == torch.float64 else _widened(setup)
    n = min(len(setup.test_y), PROBE_EXAMPLES)
    try:
        with _math_attention():
            return live_switches(lambda p: wide.g_batch(p, bufs0.double(), wide.test_x[:n], setup.test_y[:n]),
                                 params0.double(), n)
    except Exception as exc:  # the model's own code on the smoothed network (e.g. a check that a ReLU is ≥ 0)
        setup.notes.append(f"kink probe failed ({type(exc).__name__}: {exc}): every kink is cut at")
        return None


def _selections(setup: _Setup, params0: Tensor, bufs0: Tensor) -> dict[str, bool]:
    """The selections ``g`` applies to values that depend on the parameters (``quadrature.selections``)."""
    n = min(len(setup.test_y), PROBE_EXAMPLES)
    try:
        with _math_attention():
            return selections(lambda p: setup.g_batch(p, bufs0, setup.test_x[:n], setup.test_y[:n]), params0, n)
    except Exception as exc:  # the model's own code on the smoothed network, as for the kink probe
        setup.notes.append(f"selection probe failed ({type(exc).__name__}: {exc})")
        return {}


def _live_tensors(setup: _Setup, params0: Tensor, bufs0: Tensor) -> frozenset[str] | None:
    """The parameter tensors ``g`` is computed from (``quadrature.live_tensors``), None for all."""
    n = min(len(setup.test_y), PROBE_EXAMPLES)
    state = setup._state(params0, bufs0)

    def g(params: dict[str, Tensor]) -> Tensor:
        return setup.quantity(functional_call(setup.model, {**state, **params}, (setup.test_x[:n],)),
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
    return replace(setup, dtype=torch.float64, model=model, _fixed={},
                   example_bytes=setup.example_bytes * 8 // setup.dtype.itemsize,  # its activations in float64
                   test_x=_data_on(setup.test_x, torch.float64, setup.device),
                   test_y=_data_on(setup.test_y, torch.float64, setup.device),
                   train_x=None if setup.train_x is None else _data_on(setup.train_x, torch.float64, setup.device),
                   train_y=None if setup.train_y is None else _data_on(setup.train_y, torch.float64, setup.device))


class _ActivationBytes(TorchFunctionMode):
    """Counts the bytes of one forward's activations: every tensor an operation returns in new
    storage (not a view of one of its inputs) and every tensor autograd saves for the backward
    pass (inside fused operations too: attention weights) that is not one of the ``known``
    tensors (parameters, inputs). Each storage once, however many views of it are seen; they are
    kept alive until the count ends, so a freed address reused later is not mistaken for them.
    (A dispatch mode would see every allocation, but entering one imports PyTorch's compiler
    stack: a second of start-up and ~70 MiB resident, for one forward.)"""

    def __init__(self, known: list[Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.counted: dict[int, Any] = {}  # address → storage

    def _count(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.known:
            self.counted.setdefault(storage.data_ptr(), storage)
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._count(t)
        return out

    @property
    def bytes(self) -> int:
        return sum(storage.nbytes() for storage in self.counted.values())

    @contextlib.contextmanager
    def counting(self) -> Iterator[_ActivationBytes]:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._count, lambda t: t), self:
            yield self


def _example_bytes(setup: _Setup, params0: Tensor, bufs0: Tensor) -> int:
    """Bytes of ``g``'s activations per test example (``_ActivationBytes``): those of two copies of
    the first example less those of one, so what a call allocates once (weight copies) is left out. The
    evaluator sizes its vectorised calls by it (``_Evaluator.call_evaluations``); 0 (calls sized by
    ``max_batch`` alone, said in the notes) where the model's forward fails under the count."""
    x, y = setup.test_x[:1], setup.test_y[:1]
    params = params0.detach().requires_grad_()
    allocated = []
    try:
        for inputs in ((x, y), (torch.cat([x, x]), torch.cat([y, y]))):
            with _ActivationBytes([params, bufs0, *inputs]).counting() as counter:
                setup.g_batch(params, bufs0, *inputs)
            allocated.append(counter.bytes)
    except Exception as exc:  # the model's own code under the count's hooks, as for the probes
        setup.notes.append(f"activation probe failed ({type(exc).__name__}: {exc}): vectorised calls are sized "
                           "by max_batch alone")
        return 0
    return max(0, allocated[1] - allocated[0])


def _choose_engine(setup: _Setup, params0: Tensor, bufs0: Tensor) -> str:
    """Forward mode when the model allows it and the directions cost less than the Jacobian rows.

    Directions: Δ_s and ψ_s(reg) on each group, ρ_s, and for the data view ψ_s(k) of up to
    every training example; a JVP direction costs about ``1 / JVP_PER_ROW`` of a Jacobian row.
    The importance view and partitions finer than a tensor need the Jacobians themselves.
    """
    config = setup.config
    setup.forward_ad = _jvp_works(setup, params0, bufs0)
    if not setup.forward_ad:
        setup.notes.append("forward-mode AD unsupported by the model: reverse mode used for all derivatives")
    if "importance" in config.views or config.partitions:
        what = "the importance view" if "importance" in config.views else "partitions finer than a tensor"
        if config.engine == "jvp":
            raise BadInputError(f"{what} needs full Jacobians; use engine='vjp' or 'auto'")
        setup.notes.append(f"evaluation: vjp, {setup.outputs} Jacobian rows per node ({what} needs them)")
        return "vjp"
    directions = _direction_count(setup)
    cheaper = "jvp" if directions <= JVP_PER_ROW * setup.outputs else "vjp"
    wanted = cheaper if config.engine == "auto" else config.engine
    if wanted == "jvp" and not setup.forward_ad:
        if config.engine == "jvp":
            raise BadInputError("forward-mode JVP is not implemented for an operation of this model; "
                                "use engine='vjp' or 'auto'")
        wanted = "vjp"
    why = "as asked" if config.engine != "auto" else "the cheaper" if wanted == cheaper else "no forward mode"
    setup.notes.append(
        f"evaluation: {wanted} ({why}); cost per node and test example: {directions} forward-mode directions "
        f"≈ {directions / JVP_PER_ROW:g} Jacobian rows (jvp) against {setup.outputs} rows, one per output (vjp)")
    return wanted


def _directional_mode(setup: _Setup) -> str | None:
    """``forward`` where the outputs outnumber what reverse mode could afford (``INJECTED_ROW_SHARE``),
    else None: both timed on each pass's first units."""
    directions = _direction_count(setup)
    if setup.outputs * INJECTED_ROW_SHARE <= directions:
        return None
    setup.notes.append(f"evaluation: forward mode at the final nodes, reverse mode not timed: its {setup.outputs} "
                       f"backward passes, one per output, cost more than {directions} forward-mode directions")
    return "forward"


def _group_count(setup: _Setup) -> int:
    """Groups the update is split into: the components view's, else one (the whole update)."""
    return len(setup.group_labels) if "components" in setup.config.views else 1


def _direction_count(setup: _Setup) -> int:
    """Most forward-mode directions of one step."""
    count = _group_count(setup) * (2 if setup.split_ok else 1) + 1
    if "data" in setup.config.views:
        count += setup.train_y.shape[0]
    return count


def _jvp_works(setup: _Setup, params0: Tensor, bufs0: Tensor) -> bool:
    try:
        with _math_attention(), ScalarOps():
            jvp(lambda p: setup.g_batch(p, bufs0, setup.test_x[:1], setup.test_y[:1]), (params0,), (params0,))
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
    """Steps per block: ``config.block``, else as many as fit ``max_batch`` and ``memory_mb`` (at most 32);
    never more than the explained steps."""
    config = setup.config
    steps = max(1, setup.hi - setup.lo)
    if config.block is not None:
        return min(config.block, steps)
    d, itemsize = setup.layout.total, setup.dtype.itemsize
    directions = _direction_count(setup)
    memory = config.memory_mb * 2**20
    if setup.engine == "vjp":  # φ̂ of every step, plus the two-rule search
        per_step = 4 * setup.test_chunk * setup.outputs * d * itemsize
    else:  # directions and the points of every step
        per_step = (directions + 4) * d * itemsize
    return int(max(1, min(MAX_BLOCK, steps, memory // per_step, config.max_batch // (directions * setup.test_chunk))))


def _test_chunk(setup: _Setup) -> int:
    config, n = setup.config, len(setup.test_ids)
    if config.test_chunk is not None:
        return min(config.test_chunk, n)
    if setup.engine == "vjp":  # leave room for blocks of 8 steps of Jacobians
        per_example = 4 * 8 * setup.outputs * setup.layout.total * setup.dtype.itemsize
        return max(1, min(n, config.memory_mb * 2**20 // per_example))
    return max(1, min(n, config.max_batch // 64))
