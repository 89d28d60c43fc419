"""Quadrature rules for the path integral ``φ_s = ∫_0^1 ∇g(θ_s + tΔ_s) dt``.

Specs (strings, as on the command line):

- ``midpoint:N`` — ``t_m = (m + ½)/N``, weights ``1/N``; the published method uses N = 100.
  Error ∝ N⁻² for a smooth integrand.
- ``gauss:N`` — Gauss–Legendre on [0, 1]; exact for polynomials of degree ``2N − 1``.
- ``adaptive`` or ``adaptive:N`` — per step and test example: the segment is cut at the
  kinks of piecewise-linear operations (ReLU, abs, clamp, …; see ``SwitchRecorder``) and each
  piece gets Gauss–Legendre with 1 and 2 nodes; until the error estimated from two successive
  rules is at round-off and the measured step residual ``r_s`` is small (see ``accept``), the
  pieces that hold more than their share of the estimated error (see ``unconverged``) go up
  to 4, 8, … up to N nodes (default 16). Fixed rules never cut at kinks. Kinks of
  switching values that cannot reach ``g`` — a ReLU at a position the model's output slices
  away — are not cut at (see ``live_switches``).
"""

from __future__ import annotations

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
    error = estimate(q, q_prev)
    ok &= (error <= tolerance(g_scale + q.abs(), dtype)).all(dim=-1)
    if budget is None:
        return ok
    return ok | ((residual.norm(dim=-1) <= budget) & (error.norm(dim=-1) <= budget))


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
    for fn in (torch.max, torch.min, Tensor.max, Tensor.min):
        table[fn] = lambda args, kwargs: [_diff(args[0], args[1]) if len(args) > 1 and isinstance(args[1], Tensor)
                                          else None]
    return table


def _recorded(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 1 and value.shape[0] == batch


class SwitchRecorder(TorchFunctionMode):
    """Records, during one batched forward, the switching values of piecewise-linear operations.

    ReLU (and leaky, 6, hard-tanh, threshold), abs, clamp/clip and the element-wise
    maximum/minimum of two tensors are seen whatever way they are called (module, functional
    or method). Values whose first axis is not the batch axis are ignored. With ``live`` (from
    ``live_switches``) only the columns that can change the output are kept.
    """

    def __init__(self, batch: int, live: LiveSwitches | None = None) -> None:
        super().__init__()
        self.batch = batch
        self.live = live
        self.table = _switch_table()
        self.parts: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        extract = self.table.get(func)
        if extract is not None:
            for value in extract(args, kwargs):
                if _recorded(value, self.batch):
                    self.parts.append(value.detach().reshape(self.batch, -1).clone())
        return func(*args, **kwargs)

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
    Selection operations on values that depend on the parameters make the probe inconclusive.
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.table = _switch_table()
        self.probes: list[tuple[Tensor, list[Tensor]]] = []   # (probe, recorded values)
        self.selects = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        name = getattr(func, "__name__", "")
        extract = self.table.get(func)
        if name in _SELECTIONS and any(t.requires_grad for t in tensors):
            self.selects = True
        floating = [t for t in tensors if t.is_floating_point()]
        if extract is None or not floating:
            return func(*args, **kwargs)
        extracted = extract(args, kwargs)
        values = [v for v in extracted if _recorded(v, self.batch)]
        if len(values) < len(extracted) and any(t.requires_grad for t in tensors):
            self.selects = True  # a reduction (max over an axis) or a value not on the batch axis
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
    secant of the bracket (regula falsi). Appends to ``history``; returns the new ``t``.
    """
    history.append((t, value))
    lo_t, lo_s = history[0]
    hi_t, hi_s = history[1]
    for ht, hs in history[2:]:
        left = torch.sign(hs) == torch.sign(lo_s)
        lo_t, lo_s = torch.where(left, ht, lo_t), torch.where(left, hs, lo_s)
        hi_t, hi_s = torch.where(left, hi_t, ht), torch.where(left, hi_s, hs)
    (ta, sa), (tb, sb), (tc, sc) = history[-3:]
    with torch.no_grad():
        iqi = (ta * sb * sc / ((sa - sb) * (sa - sc)) + tb * sa * sc / ((sb - sa) * (sb - sc))
               + tc * sa * sb / ((sc - sa) * (sc - sb)))
        secant = lo_t - lo_s * (hi_t - lo_t) / (hi_s - lo_s)
    inside = torch.isfinite(iqi) & (iqi > lo_t) & (iqi < hi_t)
    new = torch.where(inside, iqi, secant)
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
