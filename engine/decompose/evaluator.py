"""The test side of the decomposition: derivatives of ``g`` along the steps of a block.

``_Evaluator`` evaluates, at points ``θ_s + tΔ_s`` with the step's buffers ``b_s`` (the flat
vector of the buffers that change, ``(B, Db)`` per block), the quantity ``g`` itself,
forward-mode directional derivatives, reverse-mode ``φ̂`` Jacobians and the switching values of
ReLU-like operations (for the adaptive rule's kink search), vectorised over steps, quadrature
nodes, directions and test examples within the ``max_batch`` and ``memory_mb`` budgets.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch
from torch import Tensor
from torch.func import jvp, vmap

from engine.decompose.at_point import Injected
from engine.decompose.quadrature import SwitchRecorder
from engine.decompose.reverse import jacobian
from engine.decompose.scalar_ops import ScalarOps
from engine.decompose.setup import _Setup

ROW_FRACTION = 0.25  # row width ÷ mean units per step: padding ~1/8 of the evaluations instead of ~1/4
SAMPLE_UNITS = 64  # units the two evaluations of directions are timed on, once per pass …
TIMING_ROUNDS = 2  # … in alternating rounds, each mode's least time kept: one round follows the machine's load
ACTIVATION_SHARE = 4  # the activations of one vectorised call may take 1/ACTIVATION_SHARE of memory_mb …
EVALUATION_COPIES = 2  # … each evaluation holding a forward's allocations twice: primal and (co)tangent
SEARCH_SHARE = 8  # calls of the rule's search (one direction, or switching values) take 1/SEARCH_SHARE of that


def _pack(step: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group units into rows of one step each, ``ROW_FRACTION`` of the mean units per step wide.

    Returns ``row_step (R,)`` (the step of each row), ``slot (R, W)`` (unit index per position)
    and ``valid (R, W)``; a step spans several rows, so one busy step does not pad every other
    step to its width, and the padding of each step's last row stays a small share.
    """
    count = torch.bincount(step, minlength=steps)
    width = max(1, math.ceil(len(step) / max(1, int((count > 0).sum())) * ROW_FRACTION))
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

    Directional derivatives come by forward mode (one tangent per direction) or by reverse mode
    with the directions injected (one cotangent per output; ``units_injected``). ``mode`` says
    which for units with rules of their own, ``shared_mode`` for units under a rule a chunk
    shares (whose forward mode is vectorised over its nodes and test examples, ``shared``);
    ``None``: time both on the first units and keep the faster (``directional``,
    ``shared_directional``), the measured costs per unit in ``measured`` and ``measured_shared``.
    """

    def __init__(self, setup: _Setup, mode: str | None = "forward") -> None:
        self.s = setup
        self.evaluations = 0
        self.mode = mode
        self.shared_mode = mode
        self.measured: dict[str, float] = {}
        self.measured_shared: dict[str, float] = {}
        # evaluations (one example's forward each: a direction, an output's backward pass, a point)
        # in one vectorised call: max_batch, or fewer where their activations would exceed their share
        config = setup.config
        self.call_evaluations = max(1, min(config.max_batch, config.memory_mb * 2**20 // ACTIVATION_SHARE
                                           // max(1, EVALUATION_COPIES * setup.example_bytes)))
        # the search's calls hold every unit's activations for one cheap evaluation: split finer, they
        # cost no more time per unit, and they set the peak of a pass less (``SEARCH_SHARE``)
        self.search_evaluations = max(1, self.call_evaluations // SEARCH_SHARE)

        def along_batch(theta: Tensor, delta: Tensor, bufs: Tensor, t: Tensor, v: Tensor, x: Tensor,
                        y: Tensor) -> Tensor:
            def g(p: Tensor) -> Tensor:
                with ScalarOps():
                    return setup.g_batch(p, bufs, x, y)
            return jvp(g, (theta + t * delta,), (v,))[1]

        def along_one(theta: Tensor, delta: Tensor, bufs: Tensor, t: Tensor, v: Tensor, x: Tensor,
                      y: Tensor) -> Tensor:
            # d/dε g(θ + εv + tΔ) = ∇g(θ + tΔ)·v, the parameters kept at θ (engine.decompose.at_point). Δ and t
            # enter with zero tangents: every term of AtPoint's op(x, W) + t·op(x, ΔW) then has one,
            # and none is combined with a tangent-free operand (see engine.decompose.scalar_ops)
            def g(p: Tensor, d: Tensor, tt: Tensor) -> Tensor:
                with ScalarOps():
                    return setup.g_one_at(p, d, tt, bufs, x, y)
            return jvp(g, (theta, delta, t), (v, torch.zeros_like(delta), torch.zeros_like(t)))[1]

        def phi_one(theta: Tensor, delta: Tensor, bufs: Tensor, t: Tensor, w: Tensor, x: Tensor,
                    y: Tensor) -> Tensor:
            # ∇_θ Σ_m w_m g(x; θ + t_m Δ) = Σ_m w_m ∇g(x; θ + t_m Δ) = φ̂: one (O, D) Jacobian for all nodes
            def weighted(th: Tensor) -> Tensor:
                values = vmap(lambda tm: setup.g_one(th + tm * delta, bufs, x, y))(t)  # (M, O)
                return (w[:, None] * values).sum(0)
            return jacobian(weighted, theta)

        def switches_one(theta: Tensor, delta: Tensor, bufs: Tensor, t: Tensor, x: Tensor, y: Tensor) -> Tensor:
            with SwitchRecorder(1, setup.live_switches) as recorder:  # those of the quantity too, as in ``forward``
                setup.g_one_at(theta, delta, t, bufs, x, y)
            values = recorder.values()
            return values[0] if values is not None else theta.new_zeros(0)

        def forward(theta: Tensor, bufs: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            with SwitchRecorder(x.shape[0], setup.live_switches) as recorder:
                g = setup.g_batch(theta, bufs, x, y)
            values = recorder.values()
            return g, values if values is not None else g.new_zeros(x.shape[0], 0)

        def injected_one(theta: Tensor, delta: Tensor, bufs: Tensor, t: Tensor, values: list[Tensor], x: Tensor,
                         y: Tensor, rows: list[Tensor], k: int, point: bool) -> Tensor:
            # ∂/∂α_k g(θ + tΔ + Σ_k α_k v_k) at α = 0, by reverse mode over the outputs: (O, K);
            # ``values``: per tensor, the rows of the directions that touch it (``rows``)
            def g(alpha: Tensor) -> Tensor:
                return setup.g_one_at(theta, delta, t, bufs, x, y, Injected(alpha, rows, values, point))
            return jacobian(g, theta.new_zeros(k))

        self._injected_one = injected_one

        step_dims = (0, 0, 0, 0, 0, None, None)
        # steps (B, D), (B, D), buffers (B, Db); nodes (B, M); directions (B, K, D); batch → (B, M, K, n, O)
        self._jvp_shared = vmap(vmap(vmap(along_batch, in_dims=(None, None, None, None, 0, None, None)),
                                     in_dims=(None, None, None, 0, None, None, None)), in_dims=step_dims)
        # steps; directions (B, K, D); unit nodes (B, U), inputs (B, U, ...) → (B, K, U, O). Units
        # innermost, their parameters unbatched (at θ_b): each direction's weight tangent then meets
        # all units in one matrix product instead of being copied once per unit
        self._jvp_units = vmap(vmap(vmap(along_one, in_dims=(None, None, None, 0, None, 0, 0)),
                                    in_dims=(None, None, None, None, 0, None, None)), in_dims=(0,) * 7)
        # steps; shared nodes (M,) and weights (M,); batch → φ̂ (B, n, O, D)
        self._phi_shared = vmap(vmap(phi_one, in_dims=(None, None, None, None, None, 0, 0)),
                                in_dims=(0, 0, 0, None, None, None, None))
        self._phi_rows = vmap(phi_one)  # rows with own nodes (R, M), weights, one input each → (R, O, D)
        self._switches = vmap(vmap(switches_one, in_dims=(None, None, None, 0, 0, 0)))  # → (B, U, S)
        self._forward = vmap(forward, in_dims=(0, 0, None, None))      # steps → (B, n, O), (B, n, S)
        self._g = vmap(setup.g_batch, in_dims=(0, 0, None, None))      # steps → (B, n, O)

    def _batch(self, evaluations: int, vectors: int, search: bool = False) -> int:
        """Items per vectorised call when each costs ``evaluations`` of the ``call_evaluations`` budget
        (``search_evaluations`` for the rule's search) and holds ``vectors`` parameter-sized vectors
        (points or tangents) of ``memory_mb``."""
        config, s = self.s.config, self.s
        memory = config.memory_mb * 2**20 // (vectors * s.layout.total * s.dtype.itemsize)
        budget = self.search_evaluations if search else self.call_evaluations
        return max(1, min(budget // evaluations, memory))

    def forward(self, thetas: Tensor, bufs: Tensor, x: Tensor, y: Tensor,
                switches: bool) -> tuple[Tensor, Tensor | None]:
        """``g`` at each point ``(θ_b, b_b)`` ``(B, n, O)`` in float64 and, if asked, the switching values
        ``(B, n, S)`` in the compute dtype.

        These values are the truth every step's reconstruction is checked against, so they are
        evaluated in float64 whatever the compute dtype: the recorded parameters convert
        exactly, and a float32 ``g`` of magnitude 10 carries round-off of order 1e-6 — more than
        the float32 reconstruction's own error of the change over one step.
        """
        budget = max(1, self.call_evaluations * self.s.dtype.itemsize // 8 // x.shape[0])  # float64 evaluations
        thetas, bufs = thetas.to(torch.float64), bufs.to(torch.float64)
        x, y = (v.to(torch.float64) if v.is_floating_point() else v for v in (x, y))
        outs, sws = [], []
        for a in range(0, len(thetas), budget):
            if switches:
                g, sw = self._forward(thetas[a:a + budget], bufs[a:a + budget], x, y)
                outs.append(g)
                sws.append(sw.to(self.s.dtype))
            else:
                outs.append(self._g(thetas[a:a + budget], bufs[a:a + budget], x, y))
        return torch.cat(outs), torch.cat(sws) if switches else None

    def shared(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, t: Tensor, w: Tensor, directions: Tensor,
               x: Tensor, y: Tensor) -> Tensor:
        """Weighted sums ``Σ_m w[m, r] ∇g(t_m)·v_k`` of directional derivatives at shared nodes
        ``t (M,)`` under the rules ``w (M, R)``: ``(R, B, K, n, O)``.

        Steps are batched while ``call_evaluations`` allows; a step whose nodes alone exceed it is
        split over its nodes, and each call's nodes are summed into the rules at once (a fixed
        rule of 100 nodes would otherwise hold the activations, and the values, of all of them)."""
        s = self.s
        b_count, k, n = directions.shape[0], directions.shape[1], x.shape[0]
        per_node = k * n
        nodes_per_call = max(1, min(len(t), self.call_evaluations // per_node))
        steps = self._batch(nodes_per_call * per_node, nodes_per_call * (k + 1))
        nodes = t.to(s.dtype).expand(b_count, -1)
        w = w.to(s.dtype)
        out = torch.zeros(w.shape[1], b_count, k, n, s.outputs, dtype=s.dtype, device=s.device)
        for a in range(0, b_count, steps):
            for m in range(0, len(t), nodes_per_call):
                values = self._jvp_shared(thetas[a:a + steps], deltas[a:a + steps], bufs[a:a + steps],
                                          nodes[a:a + steps, m:m + nodes_per_call], directions[a:a + steps], x, y)
                out[:, a:a + steps] += torch.einsum("bmkno,mr->rbkno", values, w[m:m + nodes_per_call])
        self.evaluations += b_count * len(t) * per_node
        return out

    def units(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, step: Tensor, t: Tensor, directions: Tensor,
              x: Tensor, y: Tensor, search: bool = False) -> Tensor:
        """Directional derivatives per unit (step ``step[u]``, node ``t[u]``, input ``x[u]``): ``(U, K, O)``;
        ``search``: in the smaller calls of the rule's search."""
        s = self.s
        k = directions.shape[1]
        out = torch.zeros(len(t), k, s.outputs, dtype=s.dtype, device=s.device)
        if not len(t):
            return out
        row_step, slot, valid = _pack(step, len(thetas))
        rows = self._batch(slot.shape[1] * k, slot.shape[1] * (k + 1), search)
        for a in range(0, len(row_step), rows):
            b, sl, ok = row_step[a:a + rows], slot[a:a + rows], valid[a:a + rows]
            value = self._jvp_units(thetas[b], deltas[b], bufs[b], t[sl].to(s.dtype), directions[b], x[sl], y[sl])
            out[sl[ok]] = value.transpose(1, 2)[ok]  # value: (rows, K, W, O)
        self.evaluations += len(t) * k
        return out

    def units_injected(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, step: Tensor, t: Tensor,
                       directions: Tensor, rows: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``units``' values by reverse mode, the directions injected into the parameters they touch
        (``rows``: per tensor, the direction rows nonzero on it): ``(U, K, O)``.

        Each unit's linear ops are evaluated at its own point ``W + tΔW`` where a row of units'
        copies of the parameters fits a quarter of ``memory_mb``, else as ``op(x, W) + t·op(x, ΔW)``."""
        s = self.s
        k = directions.shape[1]
        out = torch.zeros(len(t), k, s.outputs, dtype=s.dtype, device=s.device)
        if not len(t):
            return out
        row_step, slot, valid = _pack(step, len(thetas))
        width = slot.shape[1]
        point = width * s.layout.total * s.dtype.itemsize <= s.config.memory_mb * 2**20 // 4
        # per tensor, only the direction rows that touch it: a call copies those for each of its rows
        pieces = torch.split(directions, list(s.layout.sizes), dim=2)
        values = [piece[:, r].reshape(len(piece), len(r), *shape)
                  for piece, r, shape in zip(pieces, rows, s.layout.shapes, strict=True)]
        touched = sum(v[0].numel() for v in values) / s.layout.total  # parameter-sized vectors per row
        # a unit holds a cotangent per output in the backward pass and, from the forward pass, the
        # product of every injected direction (its α's gradient needs it): outputs + K evaluations
        rows_per_call = self._batch(width * (s.outputs + k), (width if point else 1) + max(1, math.ceil(touched)))
        one = partial(self._injected_one, rows=rows, k=k, point=point)
        fn = vmap(vmap(one, in_dims=(None, None, None, 0, None, 0, 0)), in_dims=(0,) * 7)  # → (R, W, O, K)
        for a in range(0, len(row_step), rows_per_call):
            b, sl, ok = row_step[a:a + rows_per_call], slot[a:a + rows_per_call], valid[a:a + rows_per_call]
            value = fn(thetas[b], deltas[b], bufs[b], t[sl].to(s.dtype), [v[b] for v in values], x[sl], y[sl])
            out[sl[ok]] = value.transpose(2, 3)[ok]
        self.evaluations += len(t) * s.outputs
        return out

    def directional(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, step: Tensor, t: Tensor,
                    directions: Tensor, rows: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``(U, K, O)`` directional derivatives of units by ``mode``; undecided, both evaluations are
        timed on the first ``SAMPLE_UNITS`` units (after one unit each, which pays their first-call
        costs) in ``TIMING_ROUNDS`` alternating rounds and the faster is kept."""
        if self.mode == "forward":
            return self.units(thetas, deltas, bufs, step, t, directions, x, y)
        if self.mode == "reverse":
            return self.units_injected(thetas, deltas, bufs, step, t, directions, rows, x, y)
        if not len(t):
            return self.units(thetas, deltas, bufs, step, t, directions, x, y)

        def run(mode: str, n: int) -> Tensor:
            if mode == "forward":
                return self.units(thetas, deltas, bufs, step[:n], t[:n], directions, x[:n], y[:n])
            return self.units_injected(thetas, deltas, bufs, step[:n], t[:n], directions, rows, x[:n], y[:n])

        head = min(len(t), SAMPLE_UNITS)
        for mode in ("forward", "reverse"):
            run(mode, 1)
        times: dict[str, list[float]] = {"forward": [], "reverse": []}
        for _ in range(TIMING_ROUNDS):
            for mode in times:
                start = self._clock()
                value = run(mode, head)
                times[mode].append((self._clock() - start) / head)
                if mode == "forward":
                    first = value
        self.measured = {mode: min(seconds) for mode, seconds in times.items()}
        self.mode = min(self.measured, key=self.measured.get)
        self.measured.update(units=head, directions=directions.shape[1])
        rest = slice(head, len(t))
        return torch.cat([first, self.directional(thetas, deltas, bufs, step[rest], t[rest], directions, rows,
                                                  x[rest], y[rest])])

    def shared_directional(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, t: Tensor, w: Tensor, shared: Tensor,
                           directions: Tensor, rows: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``Σ_m w_m φ̂(t_m)·v_k`` of the units ``shared (B, n)`` under the rule ``t, w (M,)``:
        ``(B, n, K, O)``, by ``shared_mode``; undecided, both are timed on the first step (reverse
        mode on about ``SAMPLE_UNITS`` of its units) in ``TIMING_ROUNDS`` alternating rounds and the
        faster is kept."""
        if self.shared_mode is None and bool(shared[0].any()):
            sample = shared[:1] & (torch.cumsum(shared[:1], 1) <= max(1, SAMPLE_UNITS // len(t)))  # ≈ SAMPLE_UNITS
            once = shared[:1] & (torch.cumsum(shared[:1], 1) <= 1)
            self._shared_by("reverse", thetas[:1], deltas[:1], bufs[:1], t[:1], w[:1], once, directions[:1], rows,
                            x, y)  # its first-call costs
            forward, reverse = [], []
            for _ in range(TIMING_ROUNDS):
                start = self._clock()
                first = self._shared_by("forward", thetas[:1], deltas[:1], bufs[:1], t, w, shared[:1],
                                        directions[:1], rows, x, y)
                forward.append((self._clock() - start) / (int(shared[0].sum()) * len(t)))
                start = self._clock()
                self._shared_by("reverse", thetas[:1], deltas[:1], bufs[:1], t, w, sample, directions[:1], rows, x, y)
                reverse.append((self._clock() - start) / (int(sample.sum()) * len(t)))
            forward, reverse = min(forward), min(reverse)
            self.measured_shared = {"forward": forward, "reverse": reverse, "units": int(sample.sum()) * len(t),
                                    "directions": directions.shape[1]}
            self.shared_mode = "forward" if forward <= reverse else "reverse"
            rest = self.shared_directional(thetas[1:], deltas[1:], bufs[1:], t, w, shared[1:], directions[1:], rows,
                                           x, y)
            return torch.cat([first, rest])
        return self._shared_by(self.shared_mode, thetas, deltas, bufs, t, w, shared, directions, rows, x, y)

    def _shared_by(self, mode: str, thetas: Tensor, deltas: Tensor, bufs: Tensor, t: Tensor, w: Tensor,
                   shared: Tensor, directions: Tensor, rows: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        s = self.s
        if mode == "forward":
            values = self.shared(thetas, deltas, bufs, t, w[:, None], directions, x, y)[0]  # (B, K, n, O)
            return values.permute(0, 2, 1, 3) * shared.to(s.dtype)[:, :, None, None]
        b, ex = shared.nonzero(as_tuple=True)
        m = len(t)
        values = self.units_injected(thetas, deltas, bufs, b.repeat_interleave(m), t.to(s.dtype).repeat(len(b)),
                                     directions, rows, x[ex].repeat_interleave(m, 0), y[ex].repeat_interleave(m, 0))
        values = (values * w.to(s.dtype).repeat(len(b))[:, None, None]).unflatten(0, (len(b), m)).sum(1)
        out = values.new_zeros(*shared.shape, *values.shape[1:])
        out[b, ex] = values
        return out

    def _clock(self) -> float:
        """The time once the device's queued work is done (CUDA runs asynchronously)."""
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)
        return time.perf_counter()

    def phi_shared(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, t: Tensor, w: Tensor, x: Tensor,
                   y: Tensor) -> Tensor:
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
                out[a:a + steps] += self._phi_shared(thetas[a:a + steps], deltas[a:a + steps], bufs[a:a + steps],
                                                     tt[m:m + m_chunk], ww[m:m + m_chunk], x, y)
        self.evaluations += b_count * len(t) * n * s.outputs
        return out

    def phi_rows(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, step: Tensor, t: Tensor, w: Tensor,
                 count: Tensor, x: Tensor, y: Tensor) -> Tensor:
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
                    out[r] += self._phi_rows(thetas[b], deltas[b], bufs[b], t[r, k:min(k + m_chunk, m)].to(s.dtype),
                                             w[r, k:min(k + m_chunk, m)].to(s.dtype), x[r], y[r])
            self.evaluations += len(rows) * m * s.outputs
        return out

    def switches(self, thetas: Tensor, deltas: Tensor, bufs: Tensor, step: Tensor, t: Tensor, x: Tensor,
                 y: Tensor) -> Tensor:
        """Switching values per unit at its own point: ``(U, S)`` (points in the compute dtype)."""
        s = self.s
        thetas, deltas, bufs = thetas.to(s.dtype), deltas.to(s.dtype), bufs.to(s.dtype)
        x, y = (v.to(s.dtype) if v.is_floating_point() else v for v in (x, y))
        row_step, slot, valid = _pack(step, len(thetas))
        rows = self._batch(slot.shape[1], slot.shape[1], search=True)
        out = None
        for a in range(0, len(row_step), rows):
            b, sl, ok = row_step[a:a + rows], slot[a:a + rows], valid[a:a + rows]
            value = self._switches(thetas[b], deltas[b], bufs[b], t[sl].to(s.dtype), x[sl], y[sl])
            if out is None:
                out = value.new_zeros(len(t), value.shape[-1])
            out[sl[ok]] = value[ok]
        return out

