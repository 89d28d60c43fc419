"""The training side of the decomposition: the optimizer replayed along the recorded steps.

``_TrainSide`` applies the optimizer split of ``engine.run.updates`` to the regularizer's gradient,
to the batch gradient and (data view) to every training example's gradient, carrying one
optimizer buffer for each. Per step this gives the weight-decay part ψ_s(reg), the split
residual ρ_s = Δ_s − Σ_k ψ_s(k) − ψ_s(reg) and ψ_s(k) per training example (MATH.md);
``_StepTerms`` holds them.

The gradients come from the training forward as ``setup.split`` chose (``engine.run.replay``):
the rows of the Jacobian of the replayed batched forward's per-example losses (models whose
forward couples examples or draws random numbers), or independent per-example gradients,
``vmap`` over steps and examples (every other model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from engine.decompose.reverse import gradient
from engine.decompose.setup import _Setup
from engine.run.history import StepRecord
from engine.run.replay import TrainingForward
from engine.run.updates import StepSplit, UpdateRule


@dataclass
class _StepTerms:
    """What the optimizer split gives for one step (flat ``(D,)`` vectors unless noted)."""

    psi_reg: Tensor | None = None          # ψ_s(reg)
    rho: Tensor | None = None              # Δ_s − Σ_k ψ_s(k) − ψ_s(reg)
    active: Tensor | None = None           # (A,) train ids with ψ_s(k) ≠ 0
    psi_rows: Callable[[int, int], Tensor] | None = None  # rows [a, b) of ψ_s(active): (b − a, D)
    psi_times: Callable[[int, int, Tensor], Tensor] | None = None  # (rows [a, b) of ψ_s(active)) · m.T for m (K, D)
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
        one = vmap(gradient(setup.train_loss_one), in_dims=(None, 0, 0))      # (D,), (b, ...) → (b, D)
        self._example_grads = vmap(one, in_dims=(0, 0, 0))                     # steps × examples

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
        if s.train_forward is not None:
            return [self._replayed(s.train_forward, r) for r in records]
        ids, weights = ids.to(s.device), weights.to(device=s.device, dtype=s.dtype)
        if not self.per_example:
            return [self._batch_gradient(thetas[b], ids[b, :sizes[b]], weights[b, :sizes[b]])
                    for b in range(len(records))]
        return [self._one_step_examples(thetas[b], ids[b, :sizes[b]], weights[b, :sizes[b]])
                for b in range(len(records))]

    def _batch_gradient(self, theta: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """One step's weighted batch gradient ``(D,)`` by plain autograd: a vectorised gradient over the
        block's steps is no faster at one batch per step."""
        theta = theta.detach().requires_grad_()
        with torch.enable_grad():
            loss = self.s.train_loss_weighted(theta, self.s.train_x[ids], self.s.train_y[ids], weights)
            return torch.autograd.grad(loss, theta)[0]

    def _replayed(self, forward: TrainingForward, record: StepRecord) -> Any:
        """One step's gradient from the replayed batched training forward: the weighted batch gradient
        ``(D,)`` or, for the data view, ``(unique ids (U,), summed rows of the Jacobian (U, D))``."""
        s = self.s
        ids = record.batch_ids.to(s.device)
        x, y = s.train_x[ids], s.train_y[ids]
        if not self.per_example:
            return s.flat(forward.batch_gradient(record, x, y, record.batch_weights))
        rows = forward.example_gradients(record, x, y, record.batch_weights, s.config.train_chunk)  # (B, D)
        unique, inverse = torch.unique(ids, return_inverse=True)
        d_ex = torch.zeros(len(unique), s.layout.total, dtype=s.dtype, device=s.device)
        return unique, d_ex.index_add_(0, inverse, rows.to(s.dtype))

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
            d_ex.mul_(scale)  # this step's own tensor, used once
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
            terms.psi_times = lambda a, b, m: d_ex[a:b] @ (out_direct * m).T
            return
        self.buf_ex.mul_(decay)
        if len(unique) == n_train:  # the full batch: unique is 0..n−1
            self.buf_ex.addcmul_(d_ex, inject.expand_as(d_ex))
        else:
            self.buf_ex.index_add_(0, unique, inject * d_ex)
        self.seen[unique] = True
        active = self.seen.nonzero().squeeze(1)
        position = torch.full((n_train,), -1, dtype=torch.int64, device=s.device)
        position[unique] = torch.arange(len(unique), device=s.device)
        buf_ex = self.buf_ex

        every = len(active) == n_train  # active is then 0..n−1: rows are slices, not copies

        def rows(a: int, b: int) -> Tensor:
            ids = active[a:b]
            psi = out_buffer * buf_ex[ids]
            where = position[ids]
            has = where >= 0
            psi[has] += out_direct * d_ex[where[has]]
            return psi

        def times(a: int, b: int, m: Tensor) -> Tensor:
            # the (K, D) factor takes the optimizer's output scales, so ψ itself is never built:
            # a data-view step then reads the (train, D) buffer once instead of writing it twice
            ids = active[a:b]
            out = (buf_ex[a:b] if every else buf_ex[ids]) @ (out_buffer * m).T
            where = position[ids]
            has = where >= 0
            out[has] += d_ex[where[has]] @ (out_direct * m).T
            return out

        terms.active = active
        terms.psi_rows = rows
        terms.psi_times = times
