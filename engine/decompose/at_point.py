"""A model evaluated at ``θ + tΔ`` with its parameters left at ``θ`` (``AtPoint``).

The adaptive quadrature evaluates every (step, node, test example) unit at its own point
``θ + t_u Δ``. Handing the model one weight tensor per unit costs a weight-sized copy per
unit, and under forward mode one per unit and direction: the tangent takes on the
primal's batch axes. ``AtPoint`` keeps the parameters at ``θ`` (one tensor for all units)
and adds ``t_u Δ`` where they are used. The operations that are linear in a parameter —
linear, embedding, convolution, layer norm — are split into ``op(x, W) + t·op(x, ΔW)``, so
units fold into the rows of one matrix product; any other use of a parameter gets the
point ``W + tΔW`` itself, which is always right, only slower.

With ``Injected`` directions the mode also stands each parameter for
``W + tΔW + Σ_k α_k V_k``, for reverse mode along directions: ``∂g/∂α_k`` at ``α = 0`` is
``∇g(θ + tΔ)·V_k``. In a linear op the directions enter as ``Σ_k α_k op(x, V_k)`` with ``x``
detached (its dependence on ``α`` is multiplied by ``α = 0``), so the backward pass contracts
each layer's output gradient with ``op(x, V_k)`` instead of forming the weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# op → (position, name) of its weight and of its bias argument: op(x, W, b, …) is linear in
# (W, b) jointly, so op(x, W + tΔW, b + tΔb, …) = op(x, W, b, …) + t·op(x, ΔW, Δb, …)
_LINEAR_IN_WEIGHT: dict[Any, tuple[tuple[int, str], tuple[int, str] | None]] = {
    F.linear: ((1, "weight"), (2, "bias")),
    F.conv1d: ((1, "weight"), (2, "bias")),
    F.conv2d: ((1, "weight"), (2, "bias")),
    F.conv3d: ((1, "weight"), (2, "bias")),
    F.layer_norm: ((2, "weight"), (3, "bias")),
    F.embedding: ((1, "weight"), None),
}


@dataclass(frozen=True)
class Injected:
    """Directions entering a model's parameters: ``alpha (K,)`` and, per parameter (parallel to
    ``AtPoint``'s ``params``), the rows ``k`` of the directions that touch it and their values
    ``(J, *shape)``. ``point``: evaluate linear ops at the point ``W + tΔW`` itself (one weight
    copy per vectorised unit; fewer operations) rather than as ``op(x, W) + t·op(x, ΔW)``."""

    alpha: Tensor
    rows: list[Tensor]
    values: list[Tensor]
    point: bool = False


def argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """The argument of a torch function call passed at ``position`` or as ``name``."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _replaced(args: tuple, kwargs: dict, position: int, name: str, value: Tensor) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1:]), kwargs


def _bias_like(func, values: Tensor, out: Tensor) -> Tensor:
    """Bias rows ``(J, *bias_shape)`` as the op adds them to its output ``out``: ``(J, *out.shape)``."""
    if func in (F.conv1d, F.conv2d, F.conv3d):  # per channel, the spatial axes after it
        spatial = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[func]
        values = values.reshape(*values.shape, *([1] * spatial))
    return values.reshape(values.shape[0], *([1] * (out.dim() - values.dim() + 1)), *values.shape[1:]).expand(
        values.shape[0], *out.shape)


class AtPoint(TorchFunctionMode):
    """Within the mode, each tensor of ``params`` stands for ``param + t · step[param]``.

    ``params`` and ``steps`` are parallel sequences of tensors (the model's parameters as
    handed to ``functional_call``, and their steps Δ); ``t`` is a scalar tensor.
    """

    def __init__(self, params: list[Tensor], steps: list[Tensor], t: Tensor, injected: Injected | None = None) -> None:
        super().__init__()
        self.steps = {id(p): d for p, d in zip(params, steps, strict=True)}
        self.t = t
        self.injected = injected
        self.directions = {} if injected is None else {
            id(p): (rows, values) for p, rows, values in zip(params, injected.rows, injected.values, strict=True)}

    def _step(self, value: Any) -> Tensor | None:
        return self.steps.get(id(value)) if isinstance(value, Tensor) else None

    def _point(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._point(v) for v in value)
        step = self._step(value)
        if step is None:
            return value
        point = value + self.t * step
        rows, values = self.directions.get(id(value), (None, None))
        if rows is None or not len(rows):
            return point
        return point + torch.tensordot(self.injected.alpha[rows], values, dims=1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        split = self._split(func, args, kwargs)
        if split is not None:
            return split
        return func(*self._point(args), **{k: self._point(v) for k, v in kwargs.items()})

    def _split(self, func, args: tuple, kwargs: dict) -> Tensor | None:
        """``op(x, W, b) + t·op(x, ΔW, Δb)`` for an op linear in its parameters, else None."""
        where = _LINEAR_IN_WEIGHT.get(func)
        if where is None or (func is F.embedding and argument(args, kwargs, 3, "max_norm") is not None):
            return None  # (max_norm renormalises the embedding in place)
        weight = argument(args, kwargs, *where[0])
        bias = None if where[1] is None else argument(args, kwargs, *where[1])
        if self._step(weight) is None or (bias is not None and self._step(bias) is None):
            return None
        if any(self._step(v) is not None for v in (*args, *kwargs.values()) if v is not weight and v is not bias):
            return None  # a parameter among the other arguments
        if self.injected is not None and self.injected.point:
            out = func(*self._point_of(args, weight, bias), **self._point_of(kwargs, weight, bias))
        else:
            step_args, step_kwargs = _replaced(args, kwargs, *where[0], self._step(weight))
            if bias is not None:
                step_args, step_kwargs = _replaced(step_args, step_kwargs, *where[1], self._step(bias))
            out = func(*args, **kwargs) + self.t * func(*step_args, **step_kwargs)
        return out if self.injected is None else out + self._injection(func, where, args, kwargs, weight, bias, out)

    def _point_of(self, values: Any, weight: Tensor, bias: Tensor | None) -> Any:
        """``args`` or ``kwargs`` with the weight and bias at ``W + tΔW`` (no directions: those are
        injected at the output)."""
        def at(v: Any) -> Any:
            return v + self.t * self._step(v) if v is weight or (bias is not None and v is bias) else v
        if isinstance(values, dict):
            return {k: at(v) for k, v in values.items()}
        return tuple(at(v) for v in values)

    def _injection(self, func, where: tuple, args: tuple, kwargs: dict, weight: Tensor, bias: Tensor | None,
                   out: Tensor) -> Tensor:
        """``Σ_k α_k op(x, V_k^W, V_k^b)``: the weight rows through the op with ``x`` detached, the
        bias rows broadcast as the op adds its bias."""
        alpha = self.injected.alpha
        parts, rows = [], []
        detached = tuple(a.detach() if isinstance(a, Tensor) and a is not weight and a is not bias else a
                         for a in args)
        w_rows, w_values = self.directions[id(weight)]
        if len(w_rows):
            no_bias_args, no_bias_kwargs = detached, dict(kwargs)
            if bias is not None:
                no_bias_args, no_bias_kwargs = _replaced(detached, no_bias_kwargs, *where[1], None)
            if func is F.linear:  # all rows in one product
                x = argument(no_bias_args, no_bias_kwargs, 0, "input")
                parts.append(F.linear(x, w_values.flatten(0, 1)).unflatten(-1, w_values.shape[:2]).movedim(-2, 0))
            else:
                def through(v: Tensor) -> Tensor:
                    op_args, op_kwargs = _replaced(no_bias_args, no_bias_kwargs, *where[0], v)
                    return func(*op_args, **op_kwargs)
                parts.append(torch.stack([through(v) for v in w_values.unbind(0)]))
            rows.append(w_rows)
        if bias is not None:
            b_rows, b_values = self.directions[id(bias)]
            if len(b_rows):
                parts.append(_bias_like(func, b_values, out))
                rows.append(b_rows)
        if not parts:
            return out.new_zeros(())
        return torch.tensordot(alpha[torch.cat(rows)], torch.cat(parts), dims=1)
