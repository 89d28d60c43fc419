"""Optimizer update rules as linear maps from per-example gradients to Δθ (MATH.md §3).

Each recorded step becomes a :class:`StepSplit`: the gradient scale (clipping, maximize),
the coupled weight-decay gradient, how a carried buffer (SGD momentum, Adam's first moment)
decays and takes in new gradient, and how the buffer and the fresh gradient map to the
update. The non-linear part of Adam (its second moment) is read from the record, so the
map is exact given the record.

The same split serves two callers:

* the replay check (``engine.run.verify``) applies it to the batch gradient and compares the
  result with the recorded update;
* the data view (``engine.decompose.train_side``) applies it to every example's gradient separately,
  carrying one buffer per training example, which yields ψ_s(k) and ψ_s(reg).

``advance`` works on tensors with or without a leading example axis.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.errors import UnsupportedOptimizerError
from engine.run.history import GroupHParams, History, Params, StepRecord

Coefficient = torch.Tensor | float


@dataclass(frozen=True)
class StepSplit:
    """Step s as a linear map of its per-example gradients; dicts are keyed by tensor name.

    For a training example k with weighted gradient ``w_k ∇ℓ_k`` (and for the regularizer
    pseudo-example, whose gradient is ``reg_grad``):

        d_k     = grad_scale ⊙ w_k ∇ℓ_k
        buf_k  <- buffer_decay · buf_k + buffer_inject · d_k
        ψ_s(k)  = out_buffer ⊙ buf_k + out_direct ⊙ d_k
        ψ_s(reg) additionally holds ``decoupled`` (−α λ θ_s for decoupled weight decay).

    ``reg_grad`` and ``decoupled`` omit tensors they do not touch.
    """

    grad_scale: dict[str, float]
    reg_grad: Params
    buffer_decay: dict[str, float]
    buffer_inject: dict[str, float]
    out_buffer: dict[str, Coefficient]
    out_direct: dict[str, Coefficient]
    decoupled: Params


def advance(split: StepSplit, buffer: Params | None, d: Params) -> tuple[Params, Params]:
    """One step of the carried buffer for already-scaled gradient terms ``d``; returns (ψ, new buffer).

    ``d`` and ``buffer`` may carry a leading example axis; coefficients broadcast over it.
    """
    new_buffer: Params = {}
    psi: Params = {}
    for name, term in d.items():
        carried = split.buffer_decay[name] * buffer[name] if buffer is not None and name in buffer else 0.0
        new_buffer[name] = carried + split.buffer_inject[name] * term
        psi[name] = split.out_buffer[name] * new_buffer[name] + split.out_direct[name] * term
    return psi, new_buffer


def scale_gradient(split: StepSplit, grads: Params) -> Params:
    """d = grad_scale ⊙ (weighted per-example or batch) gradient."""
    return {n: split.grad_scale[n] * g for n, g in grads.items()}


def replay(split: StepSplit, buffer: Params | None, batch_grad: Params) -> tuple[Params, Params]:
    """Δ̂_s from the batch gradient Σ_k w_k ∇ℓ_k (MATH.md §3); returns (Δ̂, new buffer).

    By linearity this equals Σ_k ψ_s(k) + ψ_s(reg): the data terms and the regularizer share
    one buffer here.
    """
    d = scale_gradient(split, batch_grad)
    for name, reg in split.reg_grad.items():
        d[name] = d[name] + reg
    delta, new_buffer = advance(split, buffer, d)
    for name, value in split.decoupled.items():
        delta[name] = delta[name] + value
    return delta, new_buffer


class UpdateRule(ABC):
    """Turns recorded steps into StepSplits. Stateful: call ``split`` in step order from step 0."""

    family: str

    def __init__(self, param_group: dict[str, int]) -> None:
        self.param_group = param_group

    def split(self, record: StepRecord) -> StepSplit:
        """The linear map of ``record.step``; must be called for steps 0, 1, 2, … in order."""
        parts = self._empty()
        for name, theta in record.params.items():
            if not record.active[name]:
                self._inactive(parts, name)
                continue
            hp = self._hp(record, name)
            parts["grad_scale"][name] = record.clip_scale * (-1.0 if hp.maximize else 1.0)
            self._fill(parts, record, name, theta, hp)
        return StepSplit(**parts)

    @abstractmethod
    def _fill(self, parts: dict[str, dict], record: StepRecord, name: str, theta: torch.Tensor,
              hp: GroupHParams) -> None:
        """Set the decay, buffer and output coefficients of one stepped tensor."""

    def _hp(self, record: StepRecord, name: str) -> GroupHParams:
        return record.hparams[self.param_group[name]]

    @staticmethod
    def _inactive(split: dict[str, dict], name: str) -> None:
        """A tensor without a gradient is skipped by torch.optim: no update, buffer kept as is."""
        split["grad_scale"][name] = 0.0
        split["buffer_decay"][name] = 1.0
        split["buffer_inject"][name] = 0.0
        split["out_buffer"][name] = 0.0
        split["out_direct"][name] = 0.0

    @staticmethod
    def _empty() -> dict[str, dict]:
        return {k: {} for k in ("grad_scale", "reg_grad", "buffer_decay", "buffer_inject",
                                "out_buffer", "out_direct", "decoupled")}


class SGDRule(UpdateRule):
    """torch.optim.SGD: coupled weight decay, momentum, dampening, nesterov, maximize."""

    family = "sgd"

    def __init__(self, param_group: dict[str, int]) -> None:
        super().__init__(param_group)
        self.started: set[str] = set()

    def _fill(self, parts: dict[str, dict], record: StepRecord, name: str, theta: torch.Tensor,
              hp: GroupHParams) -> None:
        lr, mu = hp.lr, hp.momentum or 0.0
        if hp.weight_decay:
            parts["reg_grad"][name] = hp.weight_decay * theta.double()
        if mu == 0.0:
            decay, inject, out_buf, out_dir = 0.0, 0.0, 0.0, -lr
        else:
            first = name not in self.started
            decay, inject = (0.0, 1.0) if first else (mu, 1.0 - (hp.dampening or 0.0))
            out_buf, out_dir = (-lr * mu, -lr) if hp.nesterov else (-lr, 0.0)
            self.started.add(name)
        parts["buffer_decay"][name] = decay
        parts["buffer_inject"][name] = inject
        parts["out_buffer"][name] = out_buf
        parts["out_direct"][name] = out_dir


class AdamRule(UpdateRule):
    """torch.optim.Adam / AdamW: coupled or decoupled decay, amsgrad, maximize; v read from the record."""

    family = "adam"

    def split(self, record: StepRecord) -> StepSplit:
        if record.second_moment is None or record.adam_step is None:
            raise UnsupportedOptimizerError(f"step {record.step}: the record lacks Adam's second moment")
        return super().split(record)

    def _fill(self, parts: dict[str, dict], record: StepRecord, name: str, theta: torch.Tensor,
              hp: GroupHParams) -> None:
        beta1, beta2, t = hp.beta1, hp.beta2, record.adam_step[name]
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        precond = bc1 * (record.second_moment[name].double().sqrt() / math.sqrt(bc2) + hp.eps)  # P_s
        if hp.weight_decay and hp.decoupled:
            parts["decoupled"][name] = -hp.lr * hp.weight_decay * theta.double()
        elif hp.weight_decay:
            parts["reg_grad"][name] = hp.weight_decay * theta.double()
        parts["buffer_decay"][name] = beta1
        parts["buffer_inject"][name] = 1.0 - beta1
        parts["out_buffer"][name] = -hp.lr / precond
        parts["out_direct"][name] = 0.0


def rule_for(history: History) -> UpdateRule:
    """The update rule of a recorded run, or UnsupportedOptimizerError saying why there is none."""
    family = history.optimizer_family
    if family == "sgd":
        return SGDRule(history.param_group)
    if family == "adam":
        return AdamRule(history.param_group)
    raise UnsupportedOptimizerError(
        history.data_axis_reason or f"optimizer {history.manifest['optimizer']['class']} has no update rule"
    )


def initial_buffer(history: History, rule: UpdateRule) -> Params | None:
    """The optimizer's carried buffer when recording started (None for a fresh optimizer)."""
    state = history.initial_state()
    key = "exp_avg" if rule.family == "adam" else "momentum_buffer"
    buffer = {n: state[f"{key}/{n}"].double() for n in history.param_names if f"{key}/{n}" in state}
    if isinstance(rule, SGDRule):
        rule.started.update(buffer)
    return buffer or None
