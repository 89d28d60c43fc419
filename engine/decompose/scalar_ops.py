"""Tensor–number arithmetic through the ``.Scalar`` overloads (``ScalarOps``), for forward mode.

``x * 2.0`` wraps the number in a tensor and calls ``aten::mul.Tensor``. Under forward-mode
AD that operand has no tangent, so PyTorch stands in a zero tensor for it, and the shape of
a product with a zero tensor is worked out by a Python reference kernel: about 0.3 ms per
operation, and about a second the first time, while ``torch._dynamo`` is imported. A
model's ``emb * math.sqrt(d)`` or ``scores / math.sqrt(d)`` is evaluated that way once per
layer and vectorised call. The ``.Scalar`` overloads (``aten::mul.Scalar`` and the like)
compute the same values with a tangent rule that needs no zero tensor.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _table() -> dict:
    """Python-level call → the ``aten`` overload taking ``(tensor, number)``."""
    table = {}
    for fns, op in (
        ((Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul, Tensor.multiply, torch.multiply), aten.mul.Scalar),
        ((Tensor.__truediv__, Tensor.div, torch.div, Tensor.divide, torch.divide, Tensor.true_divide,
          torch.true_divide), aten.div.Scalar),
        ((Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add), aten.add.Scalar),
        ((Tensor.__sub__, Tensor.sub, torch.sub, Tensor.subtract, torch.subtract), aten.sub.Scalar),
        ((Tensor.__rsub__,), aten.rsub.Scalar),
        ((Tensor.__imul__, Tensor.mul_), aten.mul_.Scalar),
        ((Tensor.__itruediv__, Tensor.div_), aten.div_.Scalar),
        ((Tensor.__iadd__, Tensor.add_), aten.add_.Scalar),
        ((Tensor.__isub__, Tensor.sub_), aten.sub_.Scalar),
    ):
        for fn in fns:
            table[fn] = op
    return table


_TABLE = _table()
_COMMUTES = frozenset({torch.mul, torch.multiply, torch.add})  # may be called as f(2.0, x)


class ScalarOps(TorchFunctionMode):
    """Within the mode, a floating-point tensor combined with a real number by ``*``, ``/``,
    ``+`` or ``-`` (operator, method, function or in place) goes through the ``.Scalar``
    overload; everything else runs as called."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _TABLE.get(func)
        if op is not None and len(args) == 2 and not kwargs:
            tensor, number = args
            if func in _COMMUTES and isinstance(number, Tensor):
                tensor, number = number, tensor
            if (isinstance(tensor, Tensor) and tensor.is_floating_point() and isinstance(number, Real)
                    and not isinstance(number, bool)):
                return op(tensor, number)
        return func(*args, **kwargs)
