"""A model evaluated at ``θ + tΔ`` with its parameters left at ``θ`` (``AtPoint``).

The adaptive quadrature evaluates every (step, node, test example) unit at its own point
``θ + t_u Δ``. Handing the model one weight tensor per unit costs a weight-sized copy per
unit, and under forward mode one per unit and direction: the tangent takes on the
primal's batch axes. ``AtPoint`` keeps the parameters at ``θ`` (one tensor for all units)
and adds ``t_u Δ`` where they are used. The operations that are linear in a parameter —
linear, embedding, convolution, layer norm — are split into ``op(x, W) + t·op(x, ΔW)``, so
units fold into the rows of one matrix product; any other use of a parameter gets the
point ``W + tΔW`` itself, which is always right, only slower.
"""

from __future__ import annotations

from typing import Any

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


def argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """The argument of a torch function call passed at ``position`` or as ``name``."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _replaced(args: tuple, kwargs: dict, position: int, name: str, value: Tensor) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1:]), kwargs


class AtPoint(TorchFunctionMode):
    """Within the mode, each tensor of ``params`` stands for ``param + t · step[param]``.

    ``params`` and ``steps`` are parallel sequences of tensors (the model's parameters as
    handed to ``functional_call``, and their steps Δ); ``t`` is a scalar tensor.
    """

    def __init__(self, params: list[Tensor], steps: list[Tensor], t: Tensor) -> None:
        super().__init__()
        self.steps = {id(p): d for p, d in zip(params, steps, strict=True)}
        self.t = t

    def _step(self, value: Any) -> Tensor | None:
        return self.steps.get(id(value)) if isinstance(value, Tensor) else None

    def _point(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._point(v) for v in value)
        step = self._step(value)
        return value if step is None else value + self.t * step

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
        step_args, step_kwargs = _replaced(args, kwargs, *where[0], self._step(weight))
        if bias is not None:
            step_args, step_kwargs = _replaced(step_args, step_kwargs, *where[1], self._step(bias))
        return func(*args, **kwargs) + self.t * func(*step_args, **step_kwargs)
