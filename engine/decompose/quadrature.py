"""Quadrature rules for the path integral ``φ_s = ∫_0^1 ∇g(θ_s + tΔ_s) dt``.

Specs (strings, as on the command line):

- ``midpoint:N`` — ``t_m = (m + ½)/N``, weights ``1/N``; the published method uses N = 100.
  Error ∝ N⁻² for a smooth integrand.
- ``gauss:N`` — Gauss–Legendre on [0, 1]; exact for polynomials of degree ``2N − 1``.
- ``adaptive`` or ``adaptive:N`` — per step and test example: the segment is cut at the
  kinks of piecewise-linear operations (ReLU, abs, clamp, …) and at the switch points of
  selections (max pooling, amax, topk, sort, comparisons, …; see ``SwitchRecorder``) and each
  piece gets Gauss–Legendre with 1 and 2 nodes; until the error estimated from two successive
  rules is at round-off and the measured step residual ``r_s`` is small (see ``accept``), the
  pieces that hold more than their share of the estimated error (see ``unconverged``) go up
  to 4, 8, … up to N nodes (default 16). Fixed rules never cut at kinks. Kinks of
  switching values that cannot reach ``g`` — a ReLU at a position the model's output slices
  away — are not cut at (see ``live_switches``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from engine.decompose.at_point import argument
from engine.errors import BadInputError

KINDS = ("midpoint", "gauss", "adaptive")
DEFAULT_ADAPTIVE_MAX = 16
MAX_NODES = 4096
# Adaptive acceptance (see ``accept``): the estimated error of a rule must lie within
# TOLERANCE_ULPS machine epsilons of the size of the values involved, the measured step
# residual r_s within RESIDUAL_ULPS of the step's change (plus one of g itself).
TOLERANCE_ULPS = 16.0
RESIDUAL_ULPS = 16.0
MAX_BREAKPOINTS = 64  # kinks kept per step and test example
MIN_PANEL = 1e-12  # narrower panels are merged with their neighbour

_SPEC = re.compile(r"^(midpoint|gauss|adaptive)(?::(\d+))?$")


@dataclass(frozen=True)
class Rule:
    """Nodes ``t_m ∈ (0, 1)`` and weights ``w_m`` (summing to 1) of one quadrature rule."""

    name: str
    nodes: tuple[float, ...]
    weights: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.nodes)

    def tensors(self, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """``(nodes (M,), weights (M,))`` as tensors."""
        return (torch.tensor(self.nodes, dtype=dtype, device=device),
                torch.tensor(self.weights, dtype=dtype, device=device))


@cache
def midpoint(n: int) -> Rule:
    """Midpoint rule with ``n`` equal panels."""
    _check_count(n)
    nodes = tuple((m + 0.5) / n for m in range(n))
    return Rule(f"midpoint:{n}", nodes, tuple(1.0 / n for _ in range(n)))


@cache
def gauss(n: int) -> Rule:
    """``n``-node Gauss–Legendre rule mapped from [−1, 1] to [0, 1]."""
    _check_count(n)
    x, w = np.polynomial.legendre.leggauss(n)
    return Rule(f"gauss:{n}", tuple(float(v) for v in (x + 1.0) / 2.0), tuple(float(v) for v in w / 2.0))


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NODES:
        raise BadInputError(f"quadrature node count must be an integer in 1..{MAX_NODES}, got {n!r}")


@dataclass(frozen=True)
class QuadratureSpec:
    """A parsed quadrature spec; ``n`` is the node count, or the largest one for ``adaptive``."""

    kind: str
    n: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"unknown quadrature {self.kind!r}; choose one of {', '.join(KINDS)}")
        _check_count(self.n)
        if self.kind == "adaptive" and self.n < 2:
            raise BadInputError("an adaptive quadrature compares two rules: its node count must be at least 2")

    def __str__(self) -> str:
        if self.kind == "adaptive" and self.n == DEFAULT_ADAPTIVE_MAX:
            return "adaptive"
        return f"{self.kind}:{self.n}"

    @property
    def adaptive(self) -> bool:
        return self.kind == "adaptive"

    def rule(self) -> Rule:
        """The fixed rule (``midpoint``/``gauss``); for ``adaptive``, its largest rule."""
        return midpoint(self.n) if self.kind == "midpoint" else gauss(self.n)

    def ladder(self) -> list[Rule]:
        """The Gauss rules an adaptive step tries in order: 1, 2, 4, … nodes, capped at ``n``."""
        if not self.adaptive:
            return [self.rule()]
        counts, n = [], 1
        while n < self.n:
            counts.append(n)
            n *= 2
        counts.append(self.n)
        return [gauss(c) for c in counts]


def parse_quadrature(spec: str | QuadratureSpec) -> QuadratureSpec:
    """``"midpoint:100"``, ``"gauss:4"``, ``"adaptive"``, ``"adaptive:32"`` → ``QuadratureSpec``."""
    if isinstance(spec, QuadratureSpec):
        return spec
    if not isinstance(spec, str):
        raise BadInputError(f"quadrature spec must be a string like 'gauss:4', got {type(spec).__name__}")
    match = _SPEC.match(spec.strip().lower())
    if not match:
        raise BadInputError(
            f"bad quadrature spec {spec!r}; use 'midpoint:N', 'gauss:N', 'adaptive' or 'adaptive:N' "
            f"with N in 1..{MAX_NODES}"
        )
    kind, count = match.group(1), match.group(2)
    if count is None:
        if kind != "adaptive":
            raise BadInputError(f"quadrature spec {spec!r} needs a node count, e.g. '{kind}:8'")
        return QuadratureSpec("adaptive", DEFAULT_ADAPTIVE_MAX)
    return QuadratureSpec(kind, int(count))


def tolerance(scale: Tensor, dtype: torch.dtype, ulps: float = TOLERANCE_ULPS) -> Tensor:
    """Round-off tolerance for values of magnitude ``scale`` computed in ``dtype``."""
    return ulps * torch.finfo(dtype).eps * scale


def accept(q: Tensor, q_prev: Tensor | None, residual: Tensor, g_scale: Tensor, dtype: torch.dtype,
           budget: Tensor | None = None) -> Tensor:
    """Which units may stop at the rule that gave ``q``: bool of ``q``'s shape without the last axis.

    ``q = φ̂·Δ`` by the current rule, ``q_prev`` with each piece by its previous rule (half
    the nodes), ``residual = r_s = g(θ_{s+1}) − g(θ_s) − q`` and ``g_scale = |g(θ_s)| + |g(θ_{s+1})|``,
    all ``(..., O)``. On a smooth piece Gauss–Legendre converges at least quadratically from
    one rule to the next (for an integrand analytic on a scale L the error of n nodes is about
    |f| L^{-2n} (n!)⁴/(2n)!³…): the current rule's error is estimated by ``e²/max(|q|, e)``
    with ``e = |q − q_prev|``, never more than ``e``. A unit stops when, for every output,
    that estimate is at round-off of ``g_scale + |q|`` and ``r_s`` is within ``RESIDUAL_ULPS``
    round-offs of the change ``|r_s + q| + |q|`` plus one round-off of ``g_scale`` (a guard
    against rules that agree but are both off, as at a kink the switching values do not
    reveal). The true change is evaluated in float64 (``engine.decompose.evaluator``), so ``r_s`` is the
    rule's error and not the round-off of ``g`` in the compute dtype.

    With an error ``budget (...)`` per unit a unit also stops when the norms over outputs of
    the estimate and of ``r_s`` are both within it.
    """
    true = residual + q
    ok = (residual.abs() <= tolerance(true.abs() + q.abs(), dtype, RESIDUAL_ULPS)
          + tolerance(g_scale, dtype, 1.0)).all(dim=-1)
    if q_prev is None:
        return torch.zeros_like(ok)
    ok &= agreed(q, q_prev, g_scale, dtype)
    if budget is None:
        return ok
    return ok | ((residual.norm(dim=-1) <= budget) & (estimate(q, q_prev).norm(dim=-1) <= budget))


def agreed(q: Tensor, q_prev: Tensor, g_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``accept``'s test of the estimated error alone: the rule that gave ``q`` and the previous
    one agree to round-off for every output. Where they agree and the residual still fails, either
    the integrand is evaluated with more round-off than the tolerance (float32 gradients) or the
    rules are both off (a kink the switching values at the ends of the step do not reveal)."""
    return (estimate(q, q_prev) <= tolerance(g_scale + q.abs(), dtype)).all(dim=-1)


def lowered(hi: Tensor, lo: Tensor, q: Tensor, residual: Tensor, g_scale: Tensor, valid: Tensor,
            dtype: torch.dtype) -> Tensor:
    """Pieces of accepted units that may keep their previous rule (half the nodes): bool ``(U, P)``.

    ``hi``, ``lo`` ``(U, P, O)``: each piece by its rule and by its previous one; ``q``,
    ``residual`` and ``g_scale`` ``(U, O)`` of the unit by ``hi`` as in ``accept``. The previous
    rule's error is about ``|hi − lo|`` itself (``estimate``'s square is the error of the rule
    that gave ``hi``); a piece may go down where that is within its share of the tolerance
    ``accept`` applies to the unit. Of those, a unit lowers as many as keep its residual within
    ``accept``'s residual test, smallest error first: the longest such run of them whose lowered
    residual passes. (That test allows one round-off of ``g_scale``, the shares sixteen, so
    lowering every candidate at once often fails it where most of them would pass.) Short pieces
    between crowded kinks mostly go down: a smooth integrand is nearly linear over them, and one
    node integrates a line exactly.
    """
    share = valid.sum(1, keepdim=True).clamp_min(1).to(hi.dtype)  # (U, 1)
    error = hi - lo
    relative = (error.abs() / (tolerance(g_scale + q.abs(), dtype) / share)[:, None, :]).amax(-1)  # (U, P)
    candidate = valid & (relative <= 1)
    order = torch.where(candidate, relative, math.inf).argsort(dim=1)  # candidates first, smallest error first
    ranked = candidate.gather(1, order)
    lowered_by = torch.cumsum(torch.where(ranked[..., None], error.gather(1, order[..., None].expand_as(error)), 0.0),
                              dim=1)  # (U, P, O): q − (q with the first j + 1 ranked pieces lowered)
    q_low = q[:, None] - lowered_by
    r_low = residual[:, None] + lowered_by
    passes = ranked & (r_low.abs() <= tolerance((residual + q).abs()[:, None] + q_low.abs(), dtype, RESIDUAL_ULPS)
                       + tolerance(g_scale, dtype, 1.0)[:, None]).all(-1)
    count = torch.where(passes, torch.arange(1, passes.shape[1] + 1, device=passes.device), 0).amax(1)  # (U,)
    chosen = torch.arange(passes.shape[1], device=passes.device)[None] < count[:, None]
    return torch.zeros_like(candidate).scatter(1, order, chosen)


def above_tolerance(q: Tensor, residual: Tensor, g_scale: Tensor, dtype: torch.dtype,
                    budget: Tensor | None = None) -> Tensor:
    """Units whose measured residual is more than round-off: bool of ``q``'s shape without the last axis.

    The norm over outputs of ``r_s`` exceeds ``RESIDUAL_ULPS`` round-offs of the norm of
    ``|r_s + q| + |q| + g_scale`` (arguments as in ``accept``) — or, with a ``budget``, the
    unit's budget. ``accept`` asks more: every output's residual within round-off of its own
    change, so a unit it turns down may still be at round-off here.
    """
    norm = residual.norm(dim=-1)
    if budget is not None:
        return norm > budget
    return norm > tolerance(((residual + q).abs() + q.abs() + g_scale).norm(dim=-1), dtype, RESIDUAL_ULPS)


def unconverged(error: Tensor, q: Tensor, g_scale: Tensor, valid: Tensor, dtype: torch.dtype,
                budget: Tensor | None = None) -> Tensor:
    """Pieces of a unit that is not accepted to integrate by the next rule: bool ``(U, P)``.

    ``error (U, P, O)`` is each piece's error estimate (``estimate``), ``q`` and ``g_scale``
    ``(U, O)`` and ``budget (U,)`` as in ``accept``, ``valid (U, P)`` marks the unit's pieces. A
    piece is refined where its estimate exceeds its share — one over the unit's piece count —
    of the tolerance ``accept`` applies to the unit (of the budget as well, with one). Where no
    piece does (the unit failed on ``r_s``, or only the pieces together miss the tolerance),
    every piece is refined.
    """
    share = valid.sum(1, keepdim=True).clamp_min(1).to(error.dtype)  # (U, 1)
    refine = (error > (tolerance(g_scale + q.abs(), dtype) / share)[:, None, :]).any(dim=-1)
    if budget is not None:
        refine &= error.norm(dim=-1) > budget[:, None] / share
    refine &= valid
    return torch.where(refine.any(dim=1, keepdim=True), refine, valid)


def estimate(q: Tensor, q_prev: Tensor) -> Tensor:
    """Error estimate of the rule that gave ``q`` from the previous one's ``q_prev`` (see ``accept``)."""
    change = (q - q_prev).abs()
    size = torch.maximum(torch.maximum(q.abs(), q_prev.abs()), change)
    return torch.where(size > 0, change * change / size.clamp_min(torch.finfo(q.dtype).tiny), change)


# ---------------------------------------------------------------------------- kinks
# A ReLU network is only piecewise smooth along θ_s + tΔ: where a pre-activation crosses
# zero, ∇g jumps and any fixed rule converges like 1/n. The switching values of such
# operations (the argument whose sign picks the branch) are recorded in the forward passes
# at θ_s and θ_{s+1}; a sign change places a breakpoint at the linear interpolant of the
# zero (then refined by a root search), and the adaptive rule integrates each smooth piece
# separately. A value that crosses zero and comes back within the step shows no sign change
# at the ends; where the top rule still fails, the values are searched on a grid of the step.

def _diff(a: Any, b: Any) -> Tensor | None:
    if not isinstance(a, Tensor) or b is None:
        return None
    return a - b


@cache
def _switch_table() -> dict[Callable, Callable[[tuple, dict], list[Tensor | None]]]:
    F = torch.nn.functional
    table: dict[Callable, Callable[[tuple, dict], list[Tensor | None]]] = {}
    for fn in (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.leaky_relu, F.leaky_relu_,
               torch.abs, Tensor.abs, Tensor.__abs__):
        table[fn] = lambda args, kwargs: [args[0]]
    table[F.relu6] = lambda args, kwargs: [args[0], _diff(args[0], 6.0)]
    for fn in (F.hardtanh, F.hardtanh_):
        table[fn] = lambda args, kwargs: [_diff(args[0], argument(args, kwargs, 1, "min_val", -1.0)),
                                          _diff(args[0], argument(args, kwargs, 2, "max_val", 1.0))]
    table[F.threshold] = lambda args, kwargs: [_diff(args[0], argument(args, kwargs, 1, "threshold"))]
    for fn in (torch.clamp, torch.clip, Tensor.clamp, Tensor.clip):
        table[fn] = lambda args, kwargs: [_diff(args[0], argument(args, kwargs, 1, "min")),
                                          _diff(args[0], argument(args, kwargs, 2, "max"))]
    for fn in (torch.maximum, torch.minimum, torch.fmax, torch.fmin):
        table[fn] = lambda args, kwargs: [_diff(args[0], args[1])]
    for fn in (torch.max, torch.min, Tensor.max, Tensor.min):  # of two tensors; along a dimension: a selection
        table[fn] = lambda args, kwargs: [_diff(args[0], _other(args, kwargs))] if _binary(args, kwargs) else []
    return table


def _other(args: tuple, kwargs: dict) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("other")


def _binary(args: tuple, kwargs: dict) -> bool:
    """``max(a, b)`` of two tensors, as opposed to ``max(a)`` or ``max(a, dim)``."""
    return isinstance(_other(args, kwargs), Tensor)


def _recorded(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 1 and value.shape[0] == batch


# ---------------------------------------------------------------------------- selections
# Max pooling, amax/amin, max/min/argmax/argmin along a dimension, topk, sort/argsort, kthvalue
# and median output order statistics of windows of their input, or where they sit. Along a step
# such an output is smooth while the order within every window stays the same; where two
# elements swap it has a kink (a jump, where positions are used as indices). The switching value
# of element j for "among the r largest of its window" is its margin
#
#     m_{j,r} = v_j − (the r-th largest of the other elements of the window),
#
# positive exactly while j is among the r largest: its sign changes exactly where j enters or
# leaves them, at the swap, which the kink search (``crossings``, ``refine_zero``, the
# hidden-kink grid) then locates like a ReLU's. Elements that are equal wherever they are
# evaluated (computed alike) get a second margin, against the elements of a different value
# (see ``margins``). A comparison ``a > b`` switches where ``a − b`` changes sign, ``sign(a)``
# where ``a`` does.

SELECTION_COLUMNS = 1 << 16  # most switching values per example of one selection of several ranks


def margins(window: Tensor, ranks: tuple[int, int]) -> Tensor:
    """Switching values of ranks ``lo..hi`` (1 = the largest) of each window ``(..., K)``: ``(..., K, 2R)``.

    Entry ``[..., j, i]`` is ``v_j`` minus the ``(lo + i)``-th largest of the other elements of
    its window. Entry ``[..., j, R + i]`` is the same against the other elements of a different
    value, for an element equal to another one (0 for the rest): elements computed alike — a
    constant region under a convolution, zeros after a ReLU — are equal wherever they are
    evaluated, and every margin among them is 0 on both sides of a switch between two such
    groups. Ranks from ``K`` on are left out (every element is among the ``K`` largest);
    padding and masked elements (±∞) give 0, never a sign change.
    """
    window = window.contiguous()  # (searchsorted copies anything else)
    size = window.shape[-1]
    lo, hi = ranks[0], min(ranks[1], size - 1)
    ascending = window.sort(dim=-1).values.contiguous()
    descending = torch.cat([ascending.flip(-1), torch.full_like(ascending[..., :1], float("-inf"))], dim=-1)
    right = torch.searchsorted(ascending, window, right=True)
    above = (size - right)[..., None]                                       # (..., K, 1) larger than v_j
    equal = (right - torch.searchsorted(ascending, window))[..., None]      # (..., K, 1) equal to v_j
    rank = torch.arange(lo, hi + 1, device=window.device)                   # (R,)
    before = rank <= above                                                  # the rank-th largest is above v_j
    margin = window[..., None] - _take(descending, torch.where(before, rank - 1, rank))
    grouped = window[..., None] - _take(descending, torch.where(before, rank - 1, rank - 1 + equal))
    value = torch.cat([margin, torch.where(equal > 1, grouped, 0.0)], dim=-1)
    return torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)


def _take(descending: Tensor, position: Tensor) -> Tensor:
    """``descending (..., K + 1)`` at ``position (..., K, R)`` (clamped to the −∞ at ``K``)."""
    size = descending.shape[-1] - 1
    flat = descending.gather(-1, position.clamp(max=size).flatten(-2))
    return flat.unflatten(-1, position.shape[-2:])


def _pool_positions(length: int, out: int, kernel: int, stride: int, padding: int, dilation: int) -> Tensor:
    """Input positions ``(out, kernel)`` of the max-pooling windows along one axis, −1 outside the input."""
    position = (torch.arange(out) * stride - padding)[:, None] + dilation * torch.arange(kernel)
    return torch.where((position >= 0) & (position < length), position, -1)


def _adaptive_positions(length: int, out: int) -> Tensor:
    """Input positions ``(out, widest)`` of the adaptive max-pooling windows along one axis, −1 as padding:
    window ``o`` covers ``⌊o·L/out⌋ ≤ i < ⌈(o + 1)·L/out⌉``."""
    o = torch.arange(out)
    start, end = o * length // out, -(-(o + 1) * length // out)
    position = start[:, None] + torch.arange(int((end - start).max()))
    return torch.where(position < end[:, None], position, -1)


def _windows(x: Tensor, positions: list[Tensor]) -> Tensor:
    """``x (..., L_1, …, L_n)`` gathered at ``positions[d] (O_d, K_d)`` along its last ``n`` axes:
    ``(..., O_1, …, O_n, K_1·…·K_n)``, −∞ where a position is −1."""
    n = len(positions)
    first = x.dim() - n
    for d, position in enumerate(positions):  # axis d becomes (O_d, …) in place and K_d goes last
        axis, length = first + d, x.shape[first + d]
        padded = torch.cat([x, torch.full_like(x.narrow(axis, 0, 1), float("-inf"))], dim=axis)
        index = torch.where(position >= 0, position, length).reshape(-1).to(x.device)
        x = padded.index_select(axis, index).unflatten(axis, tuple(position.shape)).movedim(axis + 1, -1)
    return x.flatten(-n)


def _sizes(value: Any, n: int) -> tuple[int, ...]:
    """A pooling argument (one int, or one per axis) as ``n`` ints."""
    values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
    return values * n if len(values) == 1 else values


def pooling_windows(n: int, adaptive: bool, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """The windows ``(..., O_1, …, O_n, K)`` of a call ``max_pool{n}d(*args, **kwargs)`` (or of
    ``adaptive_max_pool{n}d``) that returned ``out``; −∞ where a window reaches over the edge."""
    x = argument(args, kwargs, 0, "input")
    values = out[0] if isinstance(out, tuple) else out
    lengths, sizes = x.shape[-n:], values.shape[-n:]
    if adaptive:
        return _windows(x, [_adaptive_positions(length, size) for length, size in zip(lengths, sizes, strict=True)])
    kernel = _sizes(argument(args, kwargs, 1, "kernel_size"), n)
    stride = argument(args, kwargs, 2, "stride")
    stride = kernel if stride in (None, [], ()) else _sizes(stride, n)  # none given: the kernel size
    padding = _sizes(argument(args, kwargs, 3, "padding", 0), n)
    dilation = _sizes(argument(args, kwargs, 4, "dilation", 1), n)
    return _windows(x, [_pool_positions(*axis) for axis in zip(lengths, sizes, kernel, stride, padding, dilation,
                                                               strict=True)])


def _reduce(args: tuple, kwargs: dict, dim: Any, largest: bool,
            ranks: Callable[[int], tuple[int, int]] = lambda size: (1, 1)) -> list[Tensor | None]:
    """Switching values of order statistics ``ranks(K)`` of ``args[0]`` over the axes ``dim`` (windows
    of ``K`` elements); ``[None]`` where they cannot be recorded per example: a reduction over
    every axis or over the first (the examples), or a sort whose margins exceed ``SELECTION_COLUMNS``."""
    x = args[0]
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return []
    dims = (dim,) if isinstance(dim, int) else tuple(dim or ())
    dims = tuple(sorted({d % max(x.dim(), 1) for d in dims}))
    if not dims or 0 in dims or x.dim() < 2:
        return [None]
    window = x.movedim(dims, tuple(range(x.dim() - len(dims), x.dim()))).flatten(-len(dims))
    lo, hi = ranks(window.shape[-1])
    if hi > lo and window[0].numel() * (hi - lo + 1) > SELECTION_COLUMNS:
        return [None]
    return [margins(window if largest else -window, (lo, hi))]


def _kth(k: int) -> tuple[int, int]:
    """Ranks of the windows' largest whose change moves the k-th largest: the k − 1 and the k largest."""
    return max(k - 1, 1), k


@cache
def _selection_table() -> dict[Callable, Callable[[tuple, dict, Any], list[Tensor | None]]]:
    """Selection → ``extract(args, kwargs, output)``: its switching values (``[]`` when the call is
    none, as ``max`` of two tensors; ``None`` entries where they cannot be recorded)."""
    F = torch.nn.functional
    table: dict[Callable, Callable[[tuple, dict, Any], list[Tensor | None]]] = {}
    for n in (1, 2, 3):
        for prefix, adaptive in (("max_pool", False), ("adaptive_max_pool", True)):
            for name in (f"{prefix}{n}d", f"{prefix}{n}d_with_indices"):
                table[getattr(F, name)] = lambda a, k, out, n=n, adaptive=adaptive: [
                    margins(pooling_windows(n, adaptive, a, k, out), (1, 1))]
    for fns, largest in (((torch.amax, Tensor.amax), True), ((torch.amin, Tensor.amin), False)):
        for fn in fns:
            table[fn] = lambda a, k, out, largest=largest: _reduce(a, k, argument(a, k, 1, "dim", ()), largest)
    for fns, largest in (((torch.max, Tensor.max, torch.argmax, Tensor.argmax), True),
                         ((torch.min, Tensor.min, torch.argmin, Tensor.argmin), False)):
        for fn in fns:
            table[fn] = lambda a, k, out, largest=largest: (
                [] if _binary(a, k) else _reduce(a, k, argument(a, k, 1, "dim"), largest))
    for fn in (torch.topk, Tensor.topk):
        table[fn] = lambda a, k, out: _reduce(a, k, argument(a, k, 2, "dim", -1), argument(a, k, 3, "largest", True),
                                              lambda size: (1, int(argument(a, k, 1, "k"))))
    for fn in (torch.sort, Tensor.sort, torch.argsort, Tensor.argsort):
        table[fn] = lambda a, k, out: _reduce(a, k, argument(a, k, 1, "dim", -1), True, lambda size: (1, size - 1))
    for fn in (torch.kthvalue, Tensor.kthvalue):
        table[fn] = lambda a, k, out: _reduce(a, k, argument(a, k, 2, "dim", -1), False,
                                              lambda size: _kth(int(argument(a, k, 1, "k"))))
    for fn in (torch.median, Tensor.median):  # the lower median: the ⌊(K − 1)/2⌋ + 1-th smallest
        table[fn] = lambda a, k, out: _reduce(a, k, argument(a, k, 1, "dim"), False,
                                              lambda size: _kth((size - 1) // 2 + 1))
    for fn in (torch.gt, torch.lt, torch.ge, torch.le, torch.greater, torch.less, torch.greater_equal,
               torch.less_equal, Tensor.gt, Tensor.lt, Tensor.ge, Tensor.le, Tensor.greater, Tensor.less,
               Tensor.greater_equal, Tensor.less_equal, Tensor.__gt__, Tensor.__lt__, Tensor.__ge__, Tensor.__le__):
        table[fn] = lambda a, k, out: _comparison(a, k)
    for fn in (torch.sign, Tensor.sign, torch.sgn, Tensor.sgn, torch.heaviside, Tensor.heaviside):
        table[fn] = lambda a, k, out: [a[0]] if _floating(a[0]) else []
    return table


def _floating(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _comparison(args: tuple, kwargs: dict) -> list[Tensor | None]:
    """``a − b`` of a comparison ``a > b`` (or ``<``, ``≥``, ``≤``) of floating-point values."""
    a, b = args[0], _other(args, kwargs)
    if not _floating(a) or (isinstance(b, Tensor) and b.dtype == torch.bool):
        return []
    return [_diff(a, b)]


def _selected(select: Callable[[tuple, dict, Any], list[Tensor | None]], args: tuple, kwargs: dict,
              out: Any) -> list[Tensor | None]:
    """``select(args, kwargs, out)``; ``[None]`` (not recorded) for a call it cannot read."""
    try:
        return select(args, kwargs, out)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return [None]


class SwitchRecorder(TorchFunctionMode):
    """Records, during one batched forward, the switching values of piecewise-linear operations
    and selections.

    ReLU (and leaky, 6, hard-tanh, threshold), abs, clamp/clip and the element-wise
    maximum/minimum of two tensors are seen whatever way they are called (module, functional
    or method), and so are the selections of ``_selection_table`` (max pooling, amax, topk,
    sort, comparisons, …). Values whose first axis is not the batch axis are ignored. With
    ``live`` (from ``live_switches``) only the columns that can change the output are kept.
    """

    def __init__(self, batch: int, live: LiveSwitches | None = None) -> None:
        super().__init__()
        self.batch = batch
        self.live = live
        self.table = _switch_table()
        self.selections = _selection_table()
        self.parts: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        extract = self.table.get(func)
        if extract is not None:
            self._add(extract(args, kwargs))
        out = func(*args, **kwargs)
        select = self.selections.get(func)
        if select is not None:
            self._add(_selected(select, args, kwargs, out))
        return out

    def _add(self, values: list[Tensor | None]) -> None:
        for value in values:
            if _recorded(value, self.batch):
                self.parts.append(value.detach().reshape(self.batch, -1).clone())

    def values(self) -> Tensor | None:
        """``(batch, U)`` the recorded (live) switching values, or None if there were none."""
        if not self.parts:
            return None
        values = torch.cat(self.parts, dim=1)
        if self.live is not None and values.shape[1] == self.live.columns:
            values = values.index_select(1, self.live.index.to(values.device))
        return values


# Operations whose gradient depends on which of their inputs is selected (comparisons, sorting,
# max pooling, rounding): a zero derivative through them at one point says nothing elsewhere.
_SELECTIONS = frozenset({
    "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal", "not_equal",
    "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__", "sign", "sgn", "heaviside",
    "argmax", "argmin", "sort", "argsort", "msort", "topk", "kthvalue", "median", "nanmedian", "mode",
    "amax", "amin", "aminmax", "cummax", "cummin", "round", "floor", "ceil", "trunc", "fix", "nonzero",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "fractional_max_pool2d", "fractional_max_pool3d", "max_unpool1d", "max_unpool2d", "max_unpool3d",
})


@dataclass(frozen=True)
class LiveSwitches:
    """The switching-value columns (of ``columns`` recorded) that can change the output: ``index``."""

    columns: int
    index: Tensor


class _SwitchProbe(TorchFunctionMode):
    """One forward in which every switching operation becomes the sum of its tensor arguments
    plus a zero probe of its output's shape, so that ``g`` is smooth and each probe's gradient
    is zero only where the operation's output cannot reach ``g`` (a later slice, a mask).
    Selections on values that depend on the parameters run as they are and make the probe
    inconclusive; ``found`` names them, each with whether ``SwitchRecorder`` records its
    switching values.
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.table = _switch_table()
        self.selections = _selection_table()
        self.probes: list[tuple[Tensor, list[Tensor]]] = []   # (probe, recorded values)
        self.selects = False
        self.found: dict[str, bool] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        depends = any(t.requires_grad for t in tensors)
        name = getattr(func, "__name__", "")
        extract = self.table.get(func)
        extracted = extract(args, kwargs) if extract is not None else []
        floating = [t for t in tensors if t.is_floating_point()]
        if not extracted or not floating:  # no kink: a selection, or any other operation
            out = func(*args, **kwargs)
            select = self.selections.get(func)
            with torch.no_grad():
                values = _selected(select, args, kwargs, out) if select else [None] if name in _SELECTIONS else []
            if depends and values:
                self.selects = True
                located = all(_recorded(v, self.batch) for v in values)
                name = name.strip("_")
                self.found[name] = self.found.get(name, True) and located
            return out
        values = [v for v in extracted if _recorded(v, self.batch)]
        if len(values) < len(extracted) and depends:
            self.selects = True  # a value not on the batch axis
        out = floating[0]
        for t in floating[1:]:
            out = out + t
        probe = torch.zeros(out.shape, dtype=out.dtype, device=out.device, requires_grad=True)  # broadcast shape
        self.probes.append((probe, values))
        if (name.endswith("_") and not name.endswith("__")) or kwargs.get("inplace") is True:
            return args[0].add_(probe)  # in place: the caller may read args[0] rather than the result
        return out + probe


def live_switches(g: Callable[[Tensor], Tensor], params: Tensor, batch: int) -> LiveSwitches | None:
    """Which switching values of ``g(params) (batch, O)`` can change it, from one probe forward.

    None when nothing is recorded, every column can matter, or the model selects among values
    that depend on the parameters (max pooling, sorting, comparisons), where no single point
    can tell.
    """
    params = params.detach().requires_grad_()
    with torch.enable_grad(), _SwitchProbe(batch) as probe:
        out = g(params)
    recorded = [(p, v) for p, v in probe.probes if v]
    if probe.selects or not recorded:
        return None
    weights = torch.randn(out.shape, dtype=out.dtype, device=out.device,
                          generator=torch.Generator(out.device).manual_seed(0))
    grads = torch.autograd.grad((out * weights).sum(), [p for p, _ in recorded], allow_unused=True)
    live = []
    for (p, values), grad in zip(recorded, grads, strict=True):
        reach = torch.zeros_like(p, dtype=torch.bool) if grad is None else grad != 0
        for value in values:
            column = reach if reach.shape == value.shape else torch.ones(value.shape, dtype=torch.bool)
            live.append(column.reshape(batch, -1).any(0).to(reach.device))
    live = torch.cat(live)
    if bool(live.all()):
        return None
    return LiveSwitches(len(live), live.nonzero().squeeze(1))


def selections(g: Callable[[Tensor], Tensor], params: Tensor, batch: int) -> dict[str, bool]:
    """The selections (max pooling, sorting, comparisons, …) that one forward of ``g(params)
    (batch, O)`` applies to values depending on the parameters, by name: whether their switch
    points are located (``SwitchRecorder`` records their switching values) or not."""
    params = params.detach().requires_grad_()
    with torch.enable_grad(), _SwitchProbe(batch) as probe:
        g(params)
    return probe.found


def live_tensors(g: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
                 batch: int) -> frozenset[str] | None:
    """Names of the tensors of ``params`` that ``g(params) (batch, O)`` is computed from: those the
    autograd graph of one forward connects to the output (a structural fact, not a zero gradient).

    None when the model selects among values that depend on the parameters (comparisons,
    sorting, max pooling): its graph, and so the tensors it uses, may differ at other points.
    """
    leaves = {name: value.detach().requires_grad_() for name, value in params.items()}
    with torch.enable_grad(), _SwitchProbe(batch) as probe:
        out = g(leaves)
    if probe.selects:
        return None
    if not out.requires_grad:
        return frozenset()
    grads = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
    return frozenset(name for name, grad in zip(leaves, grads, strict=True) if grad is not None)


def crossings(before: Tensor | None, after: Tensor | None,
              limit: int = MAX_BREAKPOINTS) -> tuple[Tensor, Tensor, Tensor]:
    """Zero crossings of switching values between t = 0 (``before``) and t = 1 (``after``).

    Returns ``(t (n, B), unit (n, B), counts (n,))``: per example the first ``counts`` columns
    are crossings (the unit's column in the switching values and ``t* = s₀ / (s₀ − s₁)``, the
    zero of the linear interpolant); the rest is padding (t = 1, unit = −1). Beyond ``limit``
    per example, the crossings with the largest ``|s₁ − s₀|`` are kept.
    """
    if before is None or after is None or before.shape != after.shape or before.shape[1] == 0:
        n = 0 if before is None else before.shape[0]
        device = None if before is None else before.device
        return (torch.ones(n, 0, dtype=torch.float64, device=device),
                torch.zeros(n, 0, dtype=torch.int64, device=device),
                torch.zeros(n, dtype=torch.int64, device=device))
    before, after = before.double(), after.double()
    cross = before * after < 0
    counts = cross.sum(1).clamp(max=limit)
    width = int(counts.max())
    t = torch.where(cross, before / torch.where(cross, before - after, 1.0), 1.0)
    strength = torch.where(cross, (after - before).abs(), -1.0)
    unit = strength.topk(width, dim=1).indices  # (n, width)
    valid = torch.arange(width, device=before.device)[None] < counts[:, None]
    return torch.where(valid, t.gather(1, unit), 1.0), torch.where(valid, unit, -1), counts


def breakpoints(t: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted, de-duplicated kink positions ``(n, B)`` (padding 1.0) and their counts."""
    valid = torch.arange(t.shape[1], device=t.device)[None] < counts[:, None]
    points = torch.where(valid, t.clamp(0.0, 1.0), 1.0).sort(dim=1).values
    dup = points >= 1.0 - MIN_PANEL
    dup |= points <= MIN_PANEL
    dup[:, 1:] |= points[:, 1:] - points[:, :-1] <= MIN_PANEL
    points = torch.where(dup, 1.0, points).sort(dim=1).values
    return points, (points < 1.0).sum(1)


def refine_zero(t: Tensor, value: Tensor, history: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One step of a safeguarded root search for switching values ``s(t) = 0``.

    ``history`` holds earlier ``(t, s(t))`` pairs, starting with both ends ``(0, s₀), (1, s₁)``;
    ``(t, value)`` is the newest. Inverse quadratic interpolation through the newest three
    points, kept only where it falls strictly inside the current sign bracket; elsewhere the
    secant of the bracket (regula falsi); and the bracket's midpoint where the last two steps
    did not halve the bracket (a secant stalls at a corner or a jump of ``s``). Appends to
    ``history``; returns the new ``t``.
    """
    history.append((t, value))
    lo_t, lo_s = history[0]
    hi_t, hi_s = history[1]
    widths = [hi_t - lo_t]
    for ht, hs in history[2:]:
        left = torch.sign(hs) == torch.sign(lo_s)
        lo_t, lo_s = torch.where(left, ht, lo_t), torch.where(left, hs, lo_s)
        hi_t, hi_s = torch.where(left, hi_t, ht), torch.where(left, hi_s, hs)
        widths.append(hi_t - lo_t)
    (ta, sa), (tb, sb), (tc, sc) = history[-3:]
    with torch.no_grad():
        iqi = (ta * sb * sc / ((sa - sb) * (sa - sc)) + tb * sa * sc / ((sb - sa) * (sb - sc))
               + tc * sa * sb / ((sc - sa) * (sc - sb)))
        secant = lo_t - lo_s * (hi_t - lo_t) / (hi_s - lo_s)
    inside = torch.isfinite(iqi) & (iqi > lo_t) & (iqi < hi_t)
    new = torch.where(inside, iqi, secant)
    if len(widths) >= 3:
        new = torch.where(widths[-1] > 0.5 * widths[-3], (lo_t + hi_t) / 2, new)
    return torch.where(torch.isfinite(new), new, t)


def panels(points: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pieces of [0, 1] between consecutive breakpoints ``points (n, B)`` (from ``breakpoints``).

    Returns ``(start (n, P), width (n, P), valid (n, P))`` with ``P = B + 1``; an example's
    first ``counts + 1`` pieces are valid, the rest have width 0.
    """
    n, device = points.shape[0], points.device
    edges = torch.cat([torch.zeros(n, 1, dtype=torch.float64, device=device), points.double(),
                       torch.ones(n, 1, dtype=torch.float64, device=device)], dim=1)  # (n, B + 2)
    valid = torch.arange(edges.shape[1] - 1, device=device)[None] <= counts[:, None]
    return edges[:, :-1], edges[:, 1:] - edges[:, :-1], valid


def composite(start: Tensor, width: Tensor, level: Tensor, ladder: list[Rule]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example composite rule: piece ``p`` (from ``panels``) by the rule ``ladder[level[:, p]]``;
    pieces with a negative level get no nodes.

    Returns ``(t (n, M), w (n, M), nodes (n,))``: an example's valid nodes come first, piece by
    piece; the rest have weight 0.
    """
    n, device = start.shape[0], start.device
    sizes = torch.tensor([len(rule) for rule in ladder], device=device)
    per_piece = torch.where(level >= 0, sizes[level.clamp_min(0)], 0)  # (n, P)
    count = per_piece.sum(1)
    offset = per_piece.cumsum(1) - per_piece
    width_m = int(count.max()) if n else 0
    t = torch.zeros(n, width_m, dtype=torch.float64, device=device)
    w = torch.zeros(n, width_m, dtype=torch.float64, device=device)
    for index, rule in enumerate(ladder):
        row, piece = (level == index).nonzero(as_tuple=True)
        if not len(row):
            continue
        tau, omega = rule.tensors(torch.float64, device)
        column = offset[row, piece][:, None] + torch.arange(len(rule), device=device)
        t[row[:, None], column] = start[row, piece][:, None] + width[row, piece][:, None] * tau
        w[row[:, None], column] = width[row, piece][:, None] * omega
    return t, w, count
