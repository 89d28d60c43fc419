"""One streaming pass over the recorded steps for a set of test examples (``_Pass``).

Steps are queued into blocks; per block and chunk of test examples the pass finds the
quadrature rule of every (step, example) — fixed, or adaptive with cuts at the kinks of
ReLU-like operations and the switch points of selections (``engine.decompose.quadrature``) —
evaluates ``φ̂`` contracted with the directions the views need (``_Evaluator``, with ψ_s(reg),
ρ_s and ψ_s(k) from ``_TrainSide``) and adds the step to the chunk's accumulators: component and
data windows, the units of partitions finer than a tensor (reverse mode, from φ̂ itself),
per-element importance (signed ``Σ_s φ̂ ⊙ Δ`` and its weight-decay part ``Σ_s φ̂ ⊙ ψ_s(reg)``) and
the per-step completeness rows.

Buffers (MATH.md §6). Step s is integrated along ``(θ_s + tΔ_s, b_s)``; the buffers then move
from ``b_s`` to ``b_{s+1}`` one module at a time, in model order, and each move's change of
``g`` (two forwards) is that module's *buffer term*: a component row of its own, so the
components of a step add up to ``g(θ_{s+1}, b_{s+1}) − g(θ_s, b_s)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.decompose.evaluator import _Evaluator
from engine.decompose.quadrature import (
    Rule,
    above_tolerance,
    accept,
    agreed,
    breakpoints,
    composite,
    crossings,
    estimate,
    lowered,
    panels,
    refine_zero,
    unconverged,
)
from engine.decompose.setup import _group_count, _math_attention, _release_memory, _Setup, _widened
from engine.decompose.train_side import _StepTerms, _TrainSide
from engine.run.history import StepRecord
from engine.run.updates import UpdateRule

KINK_ITERATIONS = 16  # most root-search steps refining each kink position (in float64) …
KINK_TOLERANCE = 1e-13  # … stopping once no position moves more than this
VALUES_SHARE = 64  # the directional derivatives of a chunk of units may take 1/VALUES_SHARE of memory_mb
HIDDEN_GRID = 16  # panels of a piece searched for kinks the known ones hide, where the rules fail …
HIDDEN_ROUNDS = 8  # … at most this many times, each in the pieces that still fail
REGULARIZER = -1  # train id of the weight-decay pseudo-example in the data view


@dataclass
class _Window:
    lo: int
    hi: int
    value: np.ndarray | None = None      # (G, n, O)
    decay: np.ndarray | None = None      # (G, n, O)
    data: np.ndarray | None = None       # (1 + A, n, O) over `train`
    train: np.ndarray | None = None      # (1 + A,) train ids, the regularizer (−1) first
    fine_value: np.ndarray | None = None  # (U, n, O) units of the partitions
    fine_decay: np.ndarray | None = None  # (U, n, O)


@dataclass
class _Chunk:
    """One slice of the pass's test examples and its accumulators."""

    x: Tensor
    y: Tensor
    g_prev: Tensor | None = None                 # (n, O) g(θ_s, b_s) of the next step to process
    switch_prev: Tensor | None = None            # (n, S) switching values at (θ_s, b_s) (adaptive rule)
    g_first: Tensor | None = None                # (n, O) g(θ_lo, b_lo)
    value: Tensor | None = None                  # (R, n, O) window accumulators per component row, float64
    decay: Tensor | None = None
    data: Tensor | None = None                   # (train, n, O) float64
    data_reg: Tensor | None = None               # (n, O)
    importance: Tensor | None = None             # (n, O, D) float64 signed Σ_s φ̂ ⊙ Δ
    importance_decay: Tensor | None = None       # (n, O, D) float64 signed Σ_s φ̂ ⊙ ψ_s(reg) (decay split)
    fine_value: Tensor | None = None             # (U, n, O) float64 window accumulators of the units
    fine_decay: Tensor | None = None
    rows: dict[str, list[Tensor]] = field(default_factory=dict)  # completeness per step
    windows: list[_Window] = field(default_factory=list)
    window_lo: int = 0                           # first step of the open window
    window_active: Tensor | None = None          # train ids with ψ ≠ 0 in the open window (data view)
    budget: Tensor | None = None                 # (n,) error budget of each (step, example) unit (rtol)


@dataclass
class _Ends:
    """What the forwards at the ends of a block's steps give: ``path`` ``(B, n, O)``, the change of
    ``g`` along each step with the buffers held at ``b_s``, and ``moved`` ``(B, M, n, O)``, the
    buffer term of each module whose buffers change (None when none do)."""

    path: Tensor
    moved: Tensor | None


@dataclass
class _Block:
    """Consecutive explained steps processed together."""

    records: list[StepRecord]
    thetas: Tensor      # (B, D) θ_b
    nexts: Tensor       # (B, D) θ_{b+1}
    bufs: Tensor        # (B, Db) b_b, the changing buffers along step b's path
    bufs_next: Tensor   # (B, Db) b_{b+1}
    compute: list[bool]
    gradients: list[Any]

    @property
    def deltas(self) -> Tensor:
        return self.nexts - self.thetas

    @cached_property
    def wide(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(θ_b, Δ_b, b_b)`` in float64, for units recomputed in float64."""
        thetas = self.thetas.double()
        return thetas, self.nexts.double() - thetas, self.bufs.double()


@dataclass
class _Rules:
    """Final per-(step, example) quadrature rule of a chunk in a block.

    ``shared[b, x]`` marks units integrated by the shared base rule (nodes ``base_t`` with
    weights ``base_w``); the others use their own nodes ``t, w (B, n, M)`` (valid where
    ``w`` was set, ``count`` nodes); in reverse mode ``phi`` holds every unit's φ̂. Units
    recomputed in float64 (``rtol``) have ``wide[b, x] ≥ 0``, their φ̂ in row ``wide[b, x]``
    of ``phi_wide``.
    """

    base_t: Tensor              # (M0,)
    base_w: Tensor              # (M0,)
    shared: Tensor              # (B, n) bool
    t: Tensor                   # (B, n, M)
    w: Tensor                   # (B, n, M)
    count: Tensor               # (B, n) int64
    phi: Tensor | None = None   # (B, n, O, D) reverse mode
    wide: Tensor | None = None  # (B, n) int64, −1 where the compute dtype sufficed
    phi_wide: Tensor | None = None  # (E, O, D) float64, reverse mode
    above: Tensor | None = None  # (B, n) bool: the adaptive rule's top rule did not meet its tolerance
    off: Tensor | None = None    # (B, n) bool: its rules agree and meet the tolerance in float64 only


class _Pass:
    """Streams the steps once for one set of test examples and accumulates every view."""

    def __init__(self, setup: _Setup, tests: slice, kept: np.ndarray, rule: UpdateRule | None) -> None:
        self.s = setup
        self.kept = kept
        self.views = set(setup.config.views)
        self.evaluator = _Evaluator(setup, setup.directional)
        self.quad = setup.config.quadrature_spec
        self.rtol = setup.config.rtol
        self.wide = _Evaluator(_widened(setup)) if self.rtol is not None and setup.dtype != torch.float64 else None
        self.float64_evaluator: _Evaluator | None = None  # kink positions, round-off checks (``_float64``)
        self.escalated = 0
        self.above: dict[int, int] = {}  # step → (step, example) units whose top rule missed its tolerance …
        self.off: dict[int, int] = {}  # … and those whose rules met it in float64 only
        self.search_reverse = setup.engine == "vjp" and not setup.forward_ad
        f64 = dict(dtype=torch.float64, device=setup.device)
        groups, o = _group_count(setup), setup.outputs
        # component rows: the parameter groups, then the buffer terms with labels of their own
        self.rows = setup.component_labels if "components" in self.views else ["all"]
        self.buffer_rows = (torch.tensor(setup.buffer_rows, dtype=torch.int64, device=setup.device)
                            if "components" in self.views and setup.buffer_rows else None)
        self.chunks: list[_Chunk] = []
        for a in range(tests.start, tests.stop, setup.test_chunk):
            sel = slice(a, min(a + setup.test_chunk, tests.stop))
            c = _Chunk(setup.test_x[sel], setup.test_y[sel], window_lo=setup.lo)
            n = c.y.shape[0]
            c.value = torch.zeros(len(self.rows), n, o, **f64)
            c.decay = torch.zeros(len(self.rows), n, o, **f64)
            if "data" in self.views:
                c.data = torch.zeros(setup.train_y.shape[0], n, o, **f64)
                c.data_reg = torch.zeros(n, o, **f64)
            if "importance" in self.views:
                c.importance = torch.zeros(n, o, setup.layout.total, **f64)
                if rule is not None:
                    c.importance_decay = torch.zeros(n, o, setup.layout.total, **f64)
            if setup.fine is not None:
                c.fine_value = torch.zeros(setup.fine.count, n, o, **f64)
                c.fine_decay = torch.zeros(setup.fine.count, n, o, **f64)
            self.chunks.append(c)
        if self.rtol is not None:
            self._budgets()
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
        self.dead_groups = None  # (G,) groups of tensors g is not computed from: directions there give 0
        if setup.live_tensors is not None:
            live = torch.cat([torch.full((size,), name in setup.live_tensors, dtype=torch.bool, device=setup.device)
                              for name, size in zip(setup.layout.names, setup.layout.sizes, strict=True)])
            dead = ~(self.mask.bool() & live[None]).any(1)
            self.dead_groups = dead if bool(dead.any()) else None
        self.stats: list[dict[str, float]] = []
        self.pending: list[tuple[StepRecord, Tensor, Tensor, Tensor, Tensor]] = []
        self.done = setup.lo

    @property
    def evaluations(self) -> int:
        return (self.evaluator.evaluations + (self.wide.evaluations if self.wide else 0)
                + (self.float64_evaluator.evaluations if self.float64_evaluator not in (None, self.wide) else 0)
                + (self.train.evaluations if self.train else 0))

    def _budgets(self) -> None:
        """Each chunk's error budget per unit: ``rtol · ‖g(θ_hi, b_hi) − g(θ_lo, b_lo)‖ / (hi − lo)``."""
        s = self.s
        ends = torch.stack([s.layout.flatten(s.history.params(step), dtype=torch.float64, device=s.device)
                            for step in (s.lo, s.hi)])
        bufs = torch.stack([s.flat_buffers(s.history.buffers(step)) for step in (s.lo, s.hi)])
        with _math_attention():
            for c in self.chunks:
                g = self.evaluator.forward(ends, bufs, c.x, c.y, False)[0]  # (2, n, O)
                c.budget = self.rtol * (g[1] - g[0]).norm(dim=-1) / (s.hi - s.lo)

    # -------------------------------------------------------------- streaming
    def step(self, record: StepRecord, theta: Tensor, theta_next: Tensor, bufs: Tensor, bufs_next: Tensor) -> int:
        """Queue one step (``θ_s``, ``θ_{s+1}``, ``b_s``, ``b_{s+1}``); returns how many steps this call completed."""
        self.pending.append((record, theta, theta_next, bufs, bufs_next))
        if len(self.pending) >= self.s.block or record.step + 1 == self.s.hi:
            return self.finish_block()
        return 0

    def finish_block(self) -> int:
        """Process the queued steps; returns their number."""
        items, self.pending = self.pending, []
        if not items:
            return 0
        s = self.s
        records = [item[0] for item in items]
        thetas, nexts, bufs, bufs_next = (torch.stack([item[k] for item in items]) for k in range(1, 5))
        gradients = self.train.gradients(thetas, records) if self.train else [None] * len(items)
        explained = [i for i, r in enumerate(records) if r.step >= s.lo]
        if len(explained) < len(records):  # steps before lo: training side only
            for i in range(len(records)):
                if i not in explained:
                    self.train.advance(records[i], nexts[i] - thetas[i], gradients[i])
            records = [records[i] for i in explained]
            thetas, nexts, bufs, bufs_next = (t[explained] for t in (thetas, nexts, bufs, bufs_next))
            gradients = [gradients[i] for i in explained]
        if records:
            block = _Block(records, thetas, nexts, bufs, bufs_next, [bool(self.kept[r.step - s.lo]) for r in records],
                           gradients)
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
                values, rules, ends = self._chunk_block(c, block, directions)
                for b in range(len(block.records)):
                    self._accumulate(c, b, block, values, rules, ends, terms[b])
                del values, rules
            return
        # data view (reverse mode): ψ_s(k) exists only while the per-example buffers are at step s,
        # so φ̂ of the block comes first and the buffers advance step by step (one chunk per pass)
        outs = [self._chunk_block(c, block, None) for c in self.chunks]
        for b in range(len(block.records)):
            terms = self._advance(block, b)
            for c, (values, rules, ends) in zip(self.chunks, outs, strict=True):
                self._accumulate(c, b, block, values, rules, ends, terms)

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
                                                                                          _Ends]:
        """Forward passes, rules and (forward mode) directional derivatives of a chunk for a block."""
        s, ev = self.s, self.evaluator
        adaptive = self.quad.adaptive
        if c.g_prev is None:
            g0, sw0 = ev.forward(block.thetas[:1], block.bufs[:1], c.x, c.y, adaptive)
            c.g_prev, c.g_first = g0[0], g0[0]
            c.switch_prev = sw0[0] if adaptive else None
        g_next, sw_next = ev.forward(block.nexts, block.bufs, c.x, c.y, adaptive)  # (B, n, O), (B, n, S) at b_s
        g_moved, sw_moved, moved = g_next, sw_next, None
        if s.buffer_groups:
            g_moved, sw_moved, moved = self._buffer_terms(c, block, g_next, adaptive)
        g_prev = torch.cat([c.g_prev[None], g_moved[:-1]])
        sw_prev = torch.cat([c.switch_prev[None], sw_moved[:-1]]) if adaptive else None
        c.g_prev = g_moved[-1]
        c.switch_prev = sw_moved[-1] if adaptive else None
        ends = _Ends(g_next - g_prev, moved)  # (B, n, O) float64: the path's change, buffers held at b_s
        computed = torch.tensor(block.compute, device=s.device)
        if not bool(computed.any()):
            return None, None, ends
        idx = computed.nonzero().squeeze(1)
        rules = self._rules(c, block, idx, ends.path[idx], g_prev[idx], g_next[idx],
                            sw_prev[idx] if adaptive else None, sw_next[idx] if adaptive else None)
        if directions is None:
            return None, rules, ends
        if len(idx) < len(directions):  # (a block's directions are the largest tensor of a pass: no copy of all)
            directions = directions[idx]
        return self._directional(c, block, idx, rules, directions), rules, ends

    def _buffer_terms(self, c: _Chunk, block: _Block, g_next: Tensor,
                      adaptive: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """The buffer terms ``(B, M, n, O)`` of the block's steps: the buffers move from ``b_s`` to
        ``b_{s+1}`` one module at a time (model order), at ``θ_{s+1}``, each move's change of ``g``
        its module's term. Also ``g`` (and the switching values) at ``(θ_{s+1}, b_{s+1})``."""
        s, ev = self.s, self.evaluator
        count = len(s.buffer_groups)
        points = block.bufs[:, None].repeat(1, count, 1)  # (B, M, Db)
        for m, group in enumerate(s.buffer_groups):
            points[:, m:, group.columns] = block.bufs_next[:, None, group.columns]
        g_moved = ev.forward(block.nexts.repeat_interleave(count, 0), points.flatten(0, 1), c.x, c.y, False)[0]
        g_moved = g_moved.unflatten(0, (len(block.records), count))  # (B, M, n, O)
        moved = torch.diff(torch.cat([g_next[:, None], g_moved], dim=1), dim=1)
        switches = ev.forward(block.nexts, block.bufs_next, c.x, c.y, True)[1] if adaptive else None
        return g_moved[:, -1], switches, moved

    def _rules(self, c: _Chunk, block: _Block, idx: Tensor, true: Tensor, g_prev: Tensor, g_next: Tensor,
               sw_prev: Tensor | None, sw_next: Tensor | None) -> _Rules:
        """Quadrature rule of every (computed step, example); see ``quadrature`` for the adaptive one.

        The search evaluates ``φ̂·Δ`` by forward mode when the model allows it; in reverse mode
        the Jacobians are then built at the final nodes only (``rules.phi``).
        """
        s, ev = self.s, self.evaluator
        b_count, n = len(idx), c.y.shape[0]
        thetas, deltas, bufs = block.thetas[idx], block.deltas[idx], block.bufs[idx]
        f64 = dict(dtype=torch.float64, device=s.device)
        if not self.quad.adaptive:
            base_t, base_w = self.quad.rule().tensors(torch.float64, s.device)
            rules = _Rules(base_t, base_w, torch.ones(b_count, n, dtype=torch.bool, device=s.device),
                           torch.zeros(b_count, n, 0, **f64), torch.zeros(b_count, n, 0, **f64),
                           torch.full((b_count, n), len(base_t), device=s.device))
            if s.engine == "vjp":
                rules.phi = ev.phi_shared(thetas, deltas, bufs, base_t, base_w, c.x, c.y)
            return rules

        grid = torch.ones(b_count, n, dtype=torch.bool, device=s.device).nonzero()
        points, counts = self._kinks(ev, c, thetas, deltas, bufs, grid[:, 0], grid[:, 1],
                                     sw_prev.reshape(b_count * n, -1), sw_next.reshape(b_count * n, -1))
        points, counts = points.reshape(b_count, n, -1), counts.reshape(b_count, n)  # (B, n, K), (B, n)
        scale = g_prev.abs() + g_next.abs()
        budget = None if c.budget is None else c.budget[None].expand(b_count, n)
        ladder = self.quad.ladder()
        base_t, base_w = ladder[1].tensors(torch.float64, s.device)
        width = (points.shape[2] + 1) * len(ladder[-1])
        rules = _Rules(base_t, base_w, torch.zeros(b_count, n, dtype=torch.bool, device=s.device),
                       torch.zeros(b_count, n, width, **f64), torch.zeros(b_count, n, width, **f64),
                       torch.zeros(b_count, n, dtype=torch.int64, device=s.device),
                       above=torch.zeros(b_count, n, dtype=torch.bool, device=s.device),
                       off=torch.zeros(b_count, n, dtype=torch.bool, device=s.device))

        # plain (kink-free) units: the two lowest rules at nodes shared by the chunk
        plain = counts == 0
        q1, q2 = self._first_level(c, thetas, deltas, bufs, ladder[0], ladder[1], rules)
        done, stuck = self._accept(q2, q1, true - q2, scale, budget, wide=False)  # (B, n)
        rules.shared = plain & done
        if budget is None and not self.search_reverse:  # one node, at the middle of the step, is enough
            units = b_count * n  # of one piece each
            one = rules.shared & lowered(q2.reshape(units, 1, -1), q1.reshape(units, 1, -1), q2.reshape(units, -1),
                                         (true - q2).reshape(units, -1), scale.reshape(units, -1),
                                         torch.ones(units, 1, dtype=torch.bool, device=s.device),
                                         s.dtype)[:, 0].reshape(b_count, n)
            if bool(one.any()):
                rules.shared &= ~one
                bi, xi = one.nonzero(as_tuple=True)
                middle = ladder[0].tensors(torch.float64, s.device)
                self._store_rule(rules, bi, xi, middle[0].expand(len(bi), 1), middle[1].expand(len(bi), 1),
                                 torch.ones_like(bi))
        escalate = [(plain & stuck).nonzero()]
        for units, first in (((plain & ~done & ~stuck).nonzero(), (q1, q2)), ((~plain).nonzero(), None)):
            bi, xi = units[:, 0], units[:, 1]
            escalate.append(self._climb(c, ev, thetas, deltas, bufs, units, points[bi, xi], counts[bi, xi], true,
                                        scale, budget, rules,
                                        None if first is None else (first[0][bi, xi], first[1][bi, xi])))
        escalate = torch.cat(escalate)
        if len(escalate):
            bi, xi = escalate[:, 0], escalate[:, 1]
            wide_thetas, wide_deltas, wide_bufs = block.wide[0][idx], block.wide[1][idx], block.wide[2][idx]
            rules.wide = torch.full((b_count, n), -1, dtype=torch.int64, device=s.device)
            rules.wide[bi, xi] = torch.arange(len(escalate), device=s.device)
            if self.search_reverse:
                rules.phi_wide = torch.zeros(len(escalate), s.outputs, s.layout.total, **f64)
            # again on the exact path θ_s + t(θ_{s+1} − θ_s), not the one through the compute dtype's Δ
            wide_points, wide_counts = self._kinks(self.wide, c, wide_thetas, wide_deltas, wide_bufs, bi, xi,
                                                   sw_prev[bi, xi], sw_next[bi, xi])
            self._climb(c, self.wide, wide_thetas, wide_deltas, wide_bufs, escalate, wide_points, wide_counts,
                        true, scale, budget, rules)
            self.escalated += len(escalate)
        rules.count[rules.shared] = len(ladder[1])
        if s.engine == "vjp" and not self.search_reverse:
            self._final_phi(c, block, idx, rules)
        for missed, flags in ((self.above, rules.above), (self.off, rules.off)):
            for b, units in enumerate(flags.sum(1).tolist()):
                if units:
                    step = block.records[int(idx[b])].step
                    missed[step] = missed.get(step, 0) + units
        return rules

    def _accept(self, q: Tensor, q_prev: Tensor | None, residual: Tensor, scale: Tensor, budget: Tensor | None,
                wide: bool) -> tuple[Tensor, Tensor]:
        """``(accepted, escalate)`` per unit: ``quadrature.accept`` at the compute dtype's round-off,
        or with ``rtol`` within the unit's budget (or at float64 round-off). In float32 under a
        budget, a unit at float32 round-off that still misses it is to be recomputed in float64."""
        s = self.s
        if self.rtol is None:
            ok = accept(q, q_prev, residual, scale, s.dtype)
            return ok, torch.zeros_like(ok)
        ok = accept(q, q_prev, residual, scale, torch.float64, budget)
        if wide or self.wide is None:
            return ok, torch.zeros_like(ok)
        return ok, ~ok & accept(q, q_prev, residual, scale, s.dtype)

    def _climb(self, c: _Chunk, ev: _Evaluator, thetas: Tensor, deltas: Tensor, bufs: Tensor, units: Tensor,
               points: Tensor, counts: Tensor, true: Tensor, scale: Tensor, budget: Tensor | None,
               rules: _Rules, first: tuple[Tensor, Tensor] | None = None, searched: int = 0) -> Tensor:
        """The adaptive rule of units ``(U, 2)`` (rows ``b, x``) cut at ``points (U, K)`` (``counts``
        valid), evaluated by ``ev``; each unit's final rule goes to ``rules``.

        Every piece starts with the two lowest rules of the ladder (``first``: their values
        ``(U, O)`` where already known, for single-piece units). While a unit is not accepted,
        its unconverged pieces (``quadrature.unconverged``) go up one rule. A unit whose rules
        agree to round-off (``quadrature.agreed``) while its residual does not, and whose rules meet
        the tolerance when evaluated in float64 (``_round_off``), keeps its rule: its residual is the
        compute dtype's round-off, which more nodes do not lower; ``rules.off`` marks it where that
        residual is above round-off. Where they miss it in float64 as well (or ``ev`` computes in
        float64), the rules are both off, as at a kink the ends of the step hide: every piece of the
        unit is searched for hidden kinks at once, and the unit climbs on where none is found. A
        unit that would need more than the top rule is recomputed in
        float64 where that is possible; otherwise its pieces at the top rule are searched for hidden
        kinks and it starts again on its new pieces, or keeps its rule when there are none (or it has
        been ``searched`` ``HIDDEN_ROUNDS`` times): then ``rules.above`` marks it where its residual
        is above round-off (or its budget). Returns the units to recompute in float64 ``(E, 2)``.
        """
        if not len(units):
            return units
        wide = ev is self.wide
        ladder = self.quad.ladder()
        top = len(ladder) - 1
        x = c.x.double() if wide and c.x.is_floating_point() else c.x
        start, width, valid = panels(points, counts)  # (U, P)
        level = torch.where(valid, 1, -1)
        lo, hi = (torch.zeros(*start.shape, self.s.outputs, dtype=torch.float64, device=start.device) for _ in range(2))
        phi = None  # reverse mode: φ̂ (U, O, D) of each unit's current rule
        if self.search_reverse:
            phi = (rules.phi[units[:, 0], units[:, 1]] if first is not None else
                   thetas.new_zeros(len(units), self.s.outputs, self.s.layout.total))

        def evaluate(row: Tensor, piece: Tensor, index: int, sign: float = 1.0) -> Tensor:
            return self._evaluate_pieces(ev, x, c.y, thetas, deltas, bufs, units[row], start[row, piece],
                                         width[row, piece], ladder[index],
                                         None if phi is None or index == 0 else (phi, row), sign)

        if first is None:
            row, piece = valid.nonzero(as_tuple=True)
            lo[row, piece], hi[row, piece] = evaluate(row, piece, 0), evaluate(row, piece, 1)
        else:  # a single piece, its φ̂ in ``rules.phi`` already
            lo[:, 0], hi[:, 0] = first[0], first[1]
        escalate = [units.new_zeros(0, 2)]
        dtype = self.s.dtype if self.rtol is None else torch.float64
        checked = torch.zeros(len(units), dtype=torch.bool, device=units.device)  # rules agreed once already
        while len(units):
            bi, xi = units[:, 0], units[:, 1]
            unit_budget = None if budget is None else budget[bi, xi]
            q = hi.sum(1)
            ok, stuck = self._accept(q, lo.sum(1), true[bi, xi] - q, scale[bi, xi], unit_budget, wide)
            refine = unconverged(estimate(hi, lo), q, scale[bi, xi], valid, dtype, unit_budget)
            beyond = ~ok & ~stuck & (refine & (level == top)).any(1)
            # rules that agree to round-off and a residual that does not, where the same rules evaluated in
            # float64 meet the tolerance: the residual is the compute dtype's round-off of ∇g, which more
            # nodes do not lower, and the unit keeps its rule (checked once per unit: elsewhere it climbs on)
            # (under rtol they climb on: past the top rule, they are recomputed in float64)
            # where they do not, the rules are both off: a kink the switching values at the ends do not reveal,
            # searched for in every piece at once (``early``) rather than after every piece climbed to the top
            rounded = torch.zeros_like(ok)
            early = torch.zeros_like(ok)
            if self.wide is None:
                rows = (~ok & ~stuck & ~beyond & ~checked & agreed(q, lo.sum(1), scale[bi, xi], dtype)).nonzero()[:, 0]
                checked[rows] = True
                if len(rows) and ev.s.dtype != torch.float64:
                    rounded[rows] = self._round_off(c, ev, thetas, deltas, bufs, units[rows], start[rows], width[rows],
                                                    level[rows], valid[rows], true, scale)
                early[rows] = ~rounded[rows]
            if self.wide is not None and not wide:  # float64 can do better
                stuck |= beyond
                beyond = torch.zeros_like(beyond)
            restart = torch.zeros_like(beyond)
            if searched < HIDDEN_ROUNDS and bool((beyond | early).any()):
                pieces = torch.where(early[:, None] & valid | refine & (level == top), width, 0.0)
                restart = self._restart(c, ev, thetas, deltas, bufs, units, points, counts, beyond | early,
                                        (start, pieces), true, scale, budget, rules, escalate, searched + 1)
            settle = (beyond & ~restart) | rounded
            keep = ok | settle
            residual_above = above_tolerance(q, true[bi, xi] - q, scale[bi, xi], dtype, unit_budget)
            for flags, kept in ((rules.above, beyond & ~restart), (rules.off, rounded)):
                flags[bi[kept], xi[kept]] = residual_above[kept]
            final = level
            if unit_budget is None and phi is None:  # pieces whose previous rule is already good enough
                down = lowered(hi, lo, q, true[bi, xi] - q, scale[bi, xi], valid, dtype) & ok[:, None]
                final = torch.where(down, level - 1, level)
            t, w, count = composite(start[keep], width[keep], final[keep], ladder)
            self._store_rule(rules, bi[keep], xi[keep], t, w, count, None if phi is None else phi[keep], wide)
            escalate.append(units[stuck])
            move = ~ok & ~stuck & ~beyond & ~rounded & ~restart  # (early units without a hidden kink climb on)
            units, points, counts, start, width, valid = (units[move], points[move], counts[move], start[move],
                                                          width[move], valid[move])
            refine, level, lo, hi = refine[move], level[move], lo[move], hi[move]
            checked = checked[move]
            level = torch.where(refine, level + 1, level)
            whole = (refine == valid).all(1)  # every piece moves up: the unit's φ̂ starts again
            if phi is not None:
                phi = phi[move]
                phi[whole] = 0
            for index in range(2, top + 1):
                row, piece = (refine & (level == index)).nonzero(as_tuple=True)
                if len(row):
                    lo[row, piece] = hi[row, piece]
                    hi[row, piece] = evaluate(row, piece, index)
                    part = ~whole[row]
                    if phi is not None and bool(part.any()):  # the piece's φ̂ by its previous rule leaves
                        evaluate(row[part], piece[part], index - 1, -1.0)
        return torch.cat(escalate)

    def _round_off(self, c: _Chunk, ev: _Evaluator, thetas: Tensor, deltas: Tensor, bufs: Tensor, units: Tensor,
                   start: Tensor, width: Tensor, level: Tensor, valid: Tensor, true: Tensor, scale: Tensor) -> Tensor:
        """Which of units ``(k, 2)`` pass ``accept``'s residual test at the compute dtype's round-off
        when their pieces (``start``, ``width``, ``valid`` ``(k, P)``), each by its current rule of the
        ladder (``level``), are evaluated in float64: those whose residual is the compute dtype's
        round-off of ``∇g``, not the rule's error."""
        ladder = self.quad.ladder()
        steps, step = torch.unique(units[:, 0], return_inverse=True)
        wide, x, thetas, deltas, bufs = self._float64(ev, c.x, thetas[steps], deltas[steps], bufs[steps])
        local = torch.stack([step, units[:, 1]], dim=1)
        q = torch.zeros(len(units), self.s.outputs, dtype=torch.float64, device=units.device)
        for index in torch.unique(level[valid]).tolist():
            row, piece = (valid & (level == index)).nonzero(as_tuple=True)
            q.index_add_(0, row, self._evaluate_pieces(wide, x, c.y, thetas, deltas, bufs, local[row],
                                                       start[row, piece], width[row, piece], ladder[index]))
        bi, xi = units[:, 0], units[:, 1]
        return accept(q, q, true[bi, xi] - q, scale[bi, xi], self.s.dtype)

    def _restart(self, c: _Chunk, ev: _Evaluator, thetas: Tensor, deltas: Tensor, bufs: Tensor, units: Tensor,
                 points: Tensor, counts: Tensor, beyond: Tensor, pieces: tuple[Tensor, Tensor], true: Tensor,
                 scale: Tensor, budget: Tensor | None, rules: _Rules, escalate: list[Tensor],
                 searched: int) -> Tensor:
        """Units marked ``beyond`` (past the top rule, or with rules that agree but are off) whose
        search in their ``pieces`` (``(start, width) (U, P)``, width 0 elsewhere) finds hidden
        kinks climb again on the new pieces, with ``searched`` searches behind them (their float64
        escalations go to ``escalate``); returns which of ``units`` did."""
        rows = beyond.nonzero().squeeze(1)
        bi, xi = units[rows, 0], units[rows, 1]
        more, more_counts = self._hidden_kinks(ev, c, thetas, deltas, bufs, bi, xi, points[rows], pieces[0][rows],
                                               pieces[1][rows])
        found = more_counts > counts[rows]
        restart = torch.zeros_like(beyond)
        restart[rows[found]] = True
        if bool(found.any()):
            escalate.append(self._climb(c, ev, thetas, deltas, bufs, units[rows[found]], more[found],
                                        more_counts[found], true, scale, budget, rules, searched=searched))
        return restart

    def _evaluate_pieces(self, ev: _Evaluator, x: Tensor, y: Tensor, thetas: Tensor, deltas: Tensor, bufs: Tensor,
                         units: Tensor, start: Tensor, width: Tensor, rule: Rule,
                         phi: tuple[Tensor, Tensor] | None = None, sign: float = 1.0) -> Tensor:
        """``φ̂·Δ`` over the pieces ``[start, start + width] (k,)`` of units ``(k, 2)`` by ``rule``,
        evaluated by ``ev``: ``(k, O)`` float64.

        In reverse mode the pieces' φ̂ come first; with ``phi = (target (U, O, D), row (k,))``
        each piece's φ̂, times ``sign``, is added to its unit's row of ``target``.
        """
        s = self.s
        tau, omega = rule.tensors(torch.float64, start.device)
        t = start[:, None] + width[:, None] * tau  # (k, M)
        w = width[:, None] * omega
        bi, xi = units[:, 0], units[:, 1]
        if self.search_reverse:  # a bounded number of pieces at a time
            q = torch.zeros(len(units), s.outputs, dtype=torch.float64, device=start.device)
            chunk = max(1, s.config.memory_mb * 2**20 // (s.outputs * s.layout.total * s.dtype.itemsize))
            for a in range(0, len(units), chunk):
                r = slice(a, a + chunk)
                rows = ev.phi_rows(thetas, deltas, bufs, bi[r], t[r], w[r], torch.full_like(bi[r], len(rule)), x[xi[r]],
                                   y[xi[r]])  # (k, O, D)
                q[r] = torch.einsum("pod,pd->po", rows, deltas[bi[r]].to(rows.dtype)).double()
                if phi is not None:
                    phi[0].index_add_(0, phi[1][r], rows, alpha=sign)
            return q
        m = len(rule)
        step, example = bi.repeat_interleave(m), xi.repeat_interleave(m)
        values = ev.units(thetas, deltas, bufs, step, t.reshape(-1), deltas[:, None], x[example], y[example],
                          search=True)[:, 0]
        return (values.double().reshape(len(units), m, s.outputs) * w[:, :, None]).sum(1)

    @staticmethod
    def _store_rule(rules: _Rules, bi: Tensor, xi: Tensor, t: Tensor, w: Tensor, count: Tensor,
                    phi: Tensor | None = None, wide: bool = False) -> None:
        """Units ``(bi, xi)`` keep nodes ``t, w (P, M)`` (``count`` valid) and, in reverse mode, φ̂
        (in ``phi_wide`` for units computed in float64)."""
        m = t.shape[1]
        if m > rules.t.shape[2]:  # hidden kinks added pieces: widen every unit's node table
            pad = (0, m - rules.t.shape[2])
            rules.t, rules.w = torch.nn.functional.pad(rules.t, pad), torch.nn.functional.pad(rules.w, pad)
        rules.t[bi, xi, :m] = t
        rules.w[bi, xi, :m] = w
        rules.count[bi, xi] = count
        if phi is not None and wide:
            rules.phi_wide[rules.wide[bi, xi]] = phi
        elif phi is not None:
            rules.phi[bi, xi] = phi

    def _final_phi(self, c: _Chunk, block: _Block, idx: Tensor, rules: _Rules) -> None:
        """φ̂ ``(B, n, O, D)`` of every unit under its final rule into ``rules.phi``, after a search in
        forward mode; that of units computed in float64 into ``rules.phi_wide``."""
        ev, s = self.evaluator, self.s
        thetas, deltas, bufs = block.thetas[idx], block.deltas[idx], block.bufs[idx]
        rules.phi = ev.phi_shared(thetas, deltas, bufs, rules.base_t, rules.base_w, c.x, c.y)
        wide = rules.wide >= 0 if rules.wide is not None else torch.zeros_like(rules.shared)
        own = (~rules.shared & ~wide).nonzero()
        if len(own):
            bi, xi = own[:, 0], own[:, 1]
            rules.phi[bi, xi] = ev.phi_rows(thetas, deltas, bufs, bi, rules.t[bi, xi], rules.w[bi, xi],
                                            rules.count[bi, xi], c.x[xi], c.y[xi])
        if bool(wide.any()):
            bi, xi = wide.nonzero(as_tuple=True)
            x = c.x.double() if c.x.is_floating_point() else c.x
            rules.phi_wide = torch.zeros(len(bi), s.outputs, s.layout.total, dtype=torch.float64, device=s.device)
            rules.phi_wide[rules.wide[bi, xi]] = self.wide.phi_rows(
                block.wide[0][idx], block.wide[1][idx], block.wide[2][idx], bi, rules.t[bi, xi], rules.w[bi, xi],
                rules.count[bi, xi], x[xi], c.y[xi])

    def _first_level(self, c: _Chunk, thetas: Tensor, deltas: Tensor, bufs: Tensor, low: Rule, base: Rule,
                     rules: _Rules) -> tuple[Tensor, Tensor]:
        """``φ̂·Δ`` by the two lowest rules at nodes shared by the chunk's examples: (B, n, O) each.
        When the search runs in reverse mode, φ̂ of the base rule goes to ``rules.phi``."""
        s, ev = self.s, self.evaluator
        lt, lw = low.tensors(torch.float64, s.device)
        bt, bw = base.tensors(torch.float64, s.device)
        if self.search_reverse:
            q1 = torch.einsum("bnod,bd->bno", ev.phi_shared(thetas, deltas, bufs, lt, lw, c.x, c.y), deltas)
            rules.phi = ev.phi_shared(thetas, deltas, bufs, bt, bw, c.x, c.y)
            return q1, torch.einsum("bnod,bd->bno", rules.phi, deltas)
        t = torch.cat([lt, bt])                                             # (M,)
        w = torch.zeros(len(t), 2, dtype=s.dtype, device=s.device)          # (M, 2)
        w[:len(lt), 0], w[len(lt):, 1] = lw.to(s.dtype), bw.to(s.dtype)
        q1, q2 = ev.shared(thetas, deltas, bufs, t, w, deltas[:, None], c.x, c.y)[:, :, 0]  # (B, n, O) each
        return q1, q2

    def _kinks(self, ev: _Evaluator, c: _Chunk, thetas: Tensor, deltas: Tensor, bufs: Tensor, bi: Tensor, xi: Tensor,
               sw_prev: Tensor, sw_next: Tensor) -> tuple[Tensor, Tensor]:
        """Kink positions ``(U, P)`` (padding 1.0) and counts ``(U,)`` of units ``(bi, xi)`` from their
        switching values ``(U, S)`` at both ends, each refined to its zero by ``ev``."""
        t, unit, counts = crossings(sw_prev, sw_next)
        if t.shape[1]:
            valid = torch.arange(t.shape[1], device=t.device)[None] < counts[:, None]
            row, column = valid.nonzero(as_tuple=True)
            u = unit[row, column]
            before, after = sw_prev[row, u].double(), sw_next[row, u].double()
            t = t.clone()
            t[row, column] = self._roots(ev, c, thetas, deltas, bufs, bi[row], xi[row], u,
                                         (torch.zeros_like(before), before), (torch.ones_like(after), after))
        return breakpoints(t, counts)

    def _roots(self, ev: _Evaluator, c: _Chunk, thetas: Tensor, deltas: Tensor, bufs: Tensor, step: Tensor,
               example: Tensor, switch: Tensor, lo: tuple[Tensor, Tensor], hi: tuple[Tensor, Tensor]) -> Tensor:
        """Zeros of switching values ``switch`` of (step, example) inside the sign brackets
        ``lo = (t, value)``, ``hi = (t, value)``: a safeguarded root search from the secant. A
        zero stops moving once a step moves it less than ``KINK_TOLERANCE``; only the others
        are evaluated again.

        The search evaluates in float64 whatever the compute dtype (``_float64``). In float32 a
        switching value near its zero is round-off, so the search could not settle and a kink
        placed only to float32's resolution leaves a sliver of the other branch in each piece
        beside it: their rules then converge more slowly, or not at all."""
        steps, step = torch.unique(step, return_inverse=True)
        ev, x, thetas, deltas, bufs = self._float64(ev, c.x, thetas[steps], deltas[steps], bufs[steps])
        guess = lo[0] - lo[1] * (hi[0] - lo[0]) / (hi[1] - lo[1])
        history = [lo, hi]
        value = torch.zeros_like(guess)
        active = torch.ones_like(guess, dtype=torch.bool)
        for _ in range(KINK_ITERATIONS):
            rows = active.nonzero().squeeze(1)
            value = value.clone()  # the history keeps the previous one
            at = example[rows]
            values = ev.switches(thetas, deltas, bufs, step[rows], guess[rows], x[at], c.y[at])  # (len(rows), S)
            value[rows] = values[torch.arange(len(rows), device=rows.device), switch[rows]].double()
            new = torch.where(active, refine_zero(guess, value, history), guess)
            active &= (new - guess).abs() > KINK_TOLERANCE
            guess = new
            if not bool(active.any()):
                break
        return guess

    def _float64(self, ev: _Evaluator, x: Tensor, thetas: Tensor, deltas: Tensor,
                 bufs: Tensor) -> tuple[_Evaluator, Tensor, Tensor, Tensor, Tensor]:
        """``ev`` and its arguments (test inputs, steps' ``θ``, ``Δ``, buffers) in float64: the
        float64 evaluator of the pass (made on first use) where ``ev`` computes in a narrower dtype.
        The path stays the one ``ev`` evaluates, ``θ + tΔ`` with its own ``θ`` and ``Δ``."""
        if ev.s.dtype == torch.float64:
            return ev, x, thetas, deltas, bufs
        if self.float64_evaluator is None:
            self.float64_evaluator = self.wide or _Evaluator(_widened(self.s))
        return (self.float64_evaluator, x.double() if x.is_floating_point() else x, thetas.double(), deltas.double(),
                bufs.double())

    def _hidden_kinks(self, ev: _Evaluator, c: _Chunk, thetas: Tensor, deltas: Tensor, bufs: Tensor, bi: Tensor,
                      xi: Tensor, points: Tensor, start: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
        """Kinks the known ones do not reveal — a switching value that crosses zero and back, or a
        switch whose window ends in a tie — inside the pieces ``[start, start + width] (P, Q)``
        of units ``(bi, xi)`` whose rule did not converge there (width 0: not searched): the
        switching values on a grid of ``HIDDEN_GRID`` panels of each piece, each sign change
        refined to its zero and merged with the known ``points (P, K)``. Returns points
        ``(P, K')`` and counts ``(P,)``."""
        f64 = dict(dtype=torch.float64, device=points.device)
        row, piece = (width > 0).nonzero(as_tuple=True)
        grid = start[row, piece][:, None] + width[row, piece][:, None] * torch.linspace(0.0, 1.0, HIDDEN_GRID + 1,
                                                                                        **f64)  # (N, G + 1)
        nodes = grid.shape[1]
        examples = xi[row].repeat_interleave(nodes)
        values = ev.switches(thetas, deltas, bufs, bi[row].repeat_interleave(nodes), grid.reshape(-1), c.x[examples],
                             c.y[examples]).double().reshape(len(row), nodes, -1)
        search, panel, switch = (values[:, :-1] * values[:, 1:] < 0).nonzero(as_tuple=True)
        merged, units = points, len(bi)
        if len(search):
            unit = row[search]
            roots = self._roots(ev, c, thetas, deltas, bufs, bi[unit], xi[unit], switch,
                                (grid[search, panel], values[search, panel, switch]),
                                (grid[search, panel + 1], values[search, panel + 1, switch]))
            order = torch.argsort(unit, stable=True)
            unit, roots = unit[order], roots[order]
            per_unit = torch.bincount(unit, minlength=units)
            rank = torch.arange(len(unit), device=unit.device) - (torch.cumsum(per_unit, 0) - per_unit)[unit]
            merged = torch.ones(units, points.shape[1] + int(per_unit.max()), **f64)
            merged[:, :points.shape[1]] = points
            merged[unit, points.shape[1] + rank] = roots
        return breakpoints(merged, torch.full((units,), merged.shape[1], device=points.device))

    def _live_rows(self, k: int) -> Tensor | None:
        """Indices of the ``k`` direction rows (``_directions``) not on a group of ``dead_groups``;
        None when every row can change g."""
        if self.dead_groups is None:
            return None
        groups = len(self.dead_groups)
        dead = torch.zeros(k, dtype=torch.bool, device=self.dead_groups.device)
        dead[:groups] = self.dead_groups
        if self.train is not None:
            dead[groups:2 * groups] = self.dead_groups
        return (~dead).nonzero().squeeze(1)

    def _directional(self, c: _Chunk, block: _Block, idx: Tensor, rules: _Rules, directions: Tensor) -> Tensor:
        """``φ̂·v_k`` of every computed (step, example) under its rule: ``(B, K, n, O)`` float64.

        Rows on tensors that g is not computed from are exactly 0 and are not evaluated."""
        s, ev = self.s, self.evaluator
        thetas, deltas, bufs = block.thetas[idx], block.deltas[idx], block.bufs[idx]
        b_count, k, n = directions.shape[0], directions.shape[1], c.y.shape[0]
        wide = rules.wide >= 0 if rules.wide is not None else torch.zeros_like(rules.shared)
        wide_directions = None
        if bool(wide.any()):
            wide_directions = directions.double()
            groups = self.mask.shape[0]  # the first rows are Δ on each group: exact in float64
            wide_directions[:, :groups] = self.mask.double()[None] * block.wide[1][idx][:, None]
        rows = self._live_rows(k)
        touch = self._touch(k)  # (K, T)
        if rows is not None:
            directions, touch = directions[:, rows], touch[rows]
            wide_directions = None if wide_directions is None else wide_directions[:, rows]
        per_tensor = [column.nonzero().squeeze(1) for column in touch.T]
        out = torch.zeros(b_count, n, directions.shape[1], s.outputs, dtype=torch.float64, device=s.device)
        if bool(rules.shared.any()):
            out += ev.shared_directional(thetas, deltas, bufs, rules.base_t, rules.base_w, rules.shared, directions,
                                         per_tensor, c.x, c.y).double()
        self._own_units(ev, c.x, c.y, thetas, deltas, bufs, directions, per_tensor, rules, ~rules.shared & ~wide, out)
        if wide_directions is not None:
            x = c.x.double() if c.x.is_floating_point() else c.x
            self._own_units(self.wide, x, c.y, block.wide[0][idx], block.wide[1][idx], block.wide[2][idx],
                            wide_directions, per_tensor, rules, wide, out)
        if rows is not None:
            every = out.new_zeros(b_count, n, k, s.outputs)
            every[:, :, rows] = out
            out = every
        return out.permute(0, 2, 1, 3)

    @staticmethod
    def _own_units(ev: _Evaluator, x: Tensor, y: Tensor, thetas: Tensor, deltas: Tensor, bufs: Tensor,
                   directions: Tensor, per_tensor: list[Tensor], rules: _Rules, units: Tensor, out: Tensor) -> None:
        """Adds ``φ̂·v_k`` of ``units (B, n)`` under their own rules to ``out (B, n, K, O)``: one evaluation
        per (unit, node), by the evaluator's mode (``_Evaluator.directional``), a chunk of
        (unit, node) pairs at a time whose values take at most 1/``VALUES_SHARE`` of ``memory_mb``."""
        own = units.nonzero()
        if not len(own):
            return
        bi, xi = own[:, 0], own[:, 1]
        count = rules.count[bi, xi]
        t, w = rules.t[bi, xi], rules.w[bi, xi]
        valid = torch.arange(t.shape[1], device=out.device)[None] < count[:, None]
        unit, node = valid.nonzero(as_tuple=True)
        flat = out.view(-1, *out.shape[2:])
        chunk = max(1, ev.s.config.memory_mb * 2**20 // VALUES_SHARE // (flat[0].numel() * flat.element_size()))
        for a in range(0, len(unit), chunk):
            u, m = unit[a:a + chunk], node[a:a + chunk]
            b, ex = bi[u], xi[u]
            values = ev.directional(thetas, deltas, bufs, b, t[u, m], directions, per_tensor, x[ex], y[ex])
            values.mul_(w[u, m].to(values.dtype)[:, None, None])  # (U, K, O)
            flat.index_add_(0, b * out.shape[1] + ex, values.double())

    def _touch(self, k: int) -> Tensor:
        """``(K, T)`` bool: which tensors each of the ``k`` direction rows (``_directions``) is nonzero on.
        The first rows hold one group each (Δ, then ψ_s(reg) where split); ρ_s and ψ_s(k) touch all."""
        s = self.s
        groups = self.mask.shape[0]
        touch = torch.ones(k, len(s.layout.names), dtype=torch.bool, device=s.device)
        on_group = self.tensor_to_group.bool().T  # (G, T)
        touch[:groups] = on_group
        if self.train is not None:
            touch[groups:2 * groups] = on_group
        return touch

    # -------------------------------------------------------------- accumulation
    def _accumulate(self, c: _Chunk, b: int, block: _Block, values: Tensor | None, rules: _Rules | None,
                    ends: _Ends, terms: _StepTerms) -> None:
        """Add step ``b`` of the block to chunk ``c``'s accumulators; close its window at a boundary."""
        s = self.s
        step = block.records[b].step
        moved = None if ends.moved is None else ends.moved[b]  # (M, n, O)
        if moved is not None and self.buffer_rows is not None:
            c.value.index_add_(0, self.buffer_rows, moved)
        self._accumulate_step(c, step, b, block, values, rules, ends.path[b], moved, terms)
        if (step + 1 - s.lo) % s.config.window == 0 or step + 1 == s.hi:
            self.flush(c, step + 1)

    def _accumulate_step(self, c: _Chunk, step: int, b: int, block: _Block, values: Tensor | None,
                         rules: _Rules | None, path: Tensor, moved: Tensor | None, terms: _StepTerms) -> None:
        """Step ``b``'s path values into the accumulators and its completeness row, in which the true
        change and the reconstruction both hold the (exact) buffer terms ``moved``."""
        s = self.s
        n_groups = self.mask.shape[0]
        buffer_term = torch.zeros_like(path) if moved is None else moved.sum(0)
        true_b = path + buffer_term
        n = c.y.shape[0]
        if not block.compute[b]:
            self._record(c, step, true_b, buffer_term, None, torch.zeros(n, dtype=torch.int64, device=s.device))
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
            prod, prod_decay, value, decay, opt = self._reverse_terms(phi, block.deltas[b], terms)
            fine = self._fine_terms(phi, block.deltas[b], terms)
            wide = (rules.wide[j] >= 0).nonzero().squeeze(1) if rules.wide is not None else []
            if len(wide):  # units computed in float64 replace their rows
                phi_wide = rules.phi_wide[rules.wide[j, wide]]
                prod_wide, prod_decay_wide, value[:, wide], decay_wide, opt_wide = self._reverse_terms(
                    phi_wide, block.wide[1][b], terms)
                if fine is not None:
                    fine[0][:, wide], fine[1][:, wide] = self._fine_terms(phi_wide, block.wide[1][b], terms)
                prod = prod.double()
                prod[wide] = prod_wide
                if prod_decay is not None:
                    prod_decay = prod_decay.double()
                    prod_decay[wide] = prod_decay_wide
                phi[wide] = phi_wide.to(phi.dtype)  # the data view stays in the compute dtype
                if decay is not None:
                    decay[:, wide] = decay_wide
                if opt is not None:
                    opt[wide] = opt_wide
            if c.importance is not None:
                c.importance += prod.double()
            if c.importance_decay is not None:
                c.importance_decay += prod_decay.double()
            if fine is not None:
                c.fine_value += fine[0]
                c.fine_decay += fine[1]
            if c.data is not None and terms.active is not None:
                self._data_step(c, phi, terms)
        recon = value.sum(0) + buffer_term
        c.value[:n_groups] += value
        if decay is not None:
            c.decay[:n_groups] += decay
            if c.data_reg is not None:
                c.data_reg += decay.sum(0)
        self._record(c, step, true_b, recon, opt, rules.count[j])

    def _reverse_terms(self, phi: Tensor, delta: Tensor, terms: _StepTerms) -> tuple[
            Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """From φ̂ ``(n, O, D)``: ``φ̂ ⊙ Δ`` and ``φ̂ ⊙ ψ_s(reg)`` (in φ̂'s dtype) and, in float64, the
        component values ``(G, n, O)``, the decay split ``(G, n, O)`` and ``φ̂·ρ_s (n, O)``; the decay
        terms are None without the decay split, ``φ̂·ρ_s`` where it is not measured."""
        prod = phi * delta.to(phi.dtype)
        value = self._group_sums(prod).double()
        prod_decay = decay = opt = None
        if self.train is not None:
            prod_decay = phi * terms.psi_reg.to(phi.dtype)
            decay = self._group_sums(prod_decay).double()
            if self.train.residual:
                opt = (phi @ terms.rho.to(phi.dtype)).double()
        return prod, prod_decay, value, decay, opt

    def _fine_terms(self, phi: Tensor, delta: Tensor, terms: _StepTerms) -> tuple[Tensor, Tensor] | None:
        """The units of the partitions from φ̂ ``(n, O, D)``: value ``(U, n, O)`` and its decay split
        (zeros without one), in float64; None when no partition was asked for."""
        fine = self.s.fine
        if fine is None:
            return None
        value = fine.sums(phi, delta)
        decay = fine.sums(phi, terms.psi_reg) if self.train is not None else torch.zeros_like(value)
        return value, decay

    def _group_sums(self, prod: Tensor) -> Tensor:
        """``(n, O, D) → (G, n, O)``: sums over each group's elements (tensor slices, then groups)."""
        per_tensor = torch.stack([part.sum(-1) for part in prod.split(self.s.layout.sizes, -1)], dim=-1)
        return (per_tensor @ self.tensor_to_group.to(prod.dtype)).permute(2, 0, 1)

    def _data_step(self, c: _Chunk, phi: Tensor, terms: _StepTerms) -> None:
        s = self.s
        rows = max(1, s.config.memory_mb * 2**20 // (4 * s.layout.total * s.dtype.itemsize))
        flat = phi.reshape(-1, phi.shape[-1])  # (n·O, D)
        for a in range(0, len(terms.active), rows):
            gamma = terms.psi_times(a, a + rows, flat)  # (A, n·O) = ψ_s(active) · φ̂
            c.data.index_add_(0, terms.active[a:a + rows], gamma.reshape(-1, *phi.shape[:2]).double())

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
        if c.fine_value is not None:
            window.fine_value, window.fine_decay = c.fine_value.cpu().numpy().copy(), c.fine_decay.cpu().numpy().copy()
            c.fine_value.zero_()
            c.fine_decay.zero_()
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
