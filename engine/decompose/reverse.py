"""Reverse-mode derivatives that leave PyTorch's compiler stack unloaded.

``torch.func``'s reverse transforms (``vjp``, ``jacrev``, ``grad``) run each backward pass inside
``torch._dynamo.compiled_autograd._disable()``, a guard against compiled autograd, and so import
``torch._dynamo`` on first use: about a second and ~70 MiB resident, as much as the whole test
side of a small run. The engine never enables compiled autograd, so while nothing else in the
process has loaded the compiler stack, ``jacobian`` and ``gradient`` build the same derivatives
from the same functorch levels without the guard: one forward pass recorded at a new grad level,
then backward passes (for a Jacobian one per output row, vectorised by ``vmap``). Once the
compiler stack is loaded (the user's own ``torch.compile``, say) they are ``torch.func``'s with
its guard. Both compose with ``vmap``; the internals they use are those of the pinned torch release.
A Jacobian's backward passes call autograd's engine as ``torch.autograd.grad`` does, without the
check of the cotangents' shape that imports sympy (0.3 s and ~35 MiB resident).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor
from torch._functorch.eager_transforms import _create_differentiable, _wrap_all_tensors, grad_increment_nesting
from torch.autograd.graph import _engine_run_backward
from torch.func import grad, jacrev, vmap


def _compiler_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def _recorded(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``f(x)`` with its graph recorded at a new grad level, and the differentiable ``x`` it was taken at."""
    with grad_increment_nesting() as level, torch.enable_grad():
        x = _create_differentiable(_wrap_all_tensors(x, level), level)
        return f(x), x


def _backward(out: Tensor, x: Tensor, row: Tensor) -> Tensor:
    """``torch.autograd.grad(out, x, row, retain_graph=True)[0]`` by the engine call it makes, without
    its check of ``row``'s shape (``row`` is built to ``out``'s), which imports sympy on first use."""
    return _engine_run_backward((out,), (row,), True, False, (x,), False, accumulate_grad=False)[0]


def jacobian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``∂f/∂x`` of shape ``(*f(x).shape, *x.shape)``, equal to ``torch.func.jacrev(f)(x)``."""
    if _compiler_loaded():
        return jacrev(f)(x)
    out, x = _recorded(f, x)
    rows = torch.eye(out.numel(), dtype=out.dtype, device=out.device).reshape(-1, *out.shape)
    jac = vmap(lambda row: _backward(out, x, row))(rows)
    return jac.reshape(*out.shape, *x.shape)


def gradient(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``∇f`` in the first argument of a scalar ``f``, equal to ``torch.func.grad(f)``."""
    def at(x: Tensor, *args: object) -> Tensor:
        if _compiler_loaded():
            return grad(f)(x, *args)
        out, x = _recorded(lambda p: f(p, *args), x)
        return torch.autograd.grad(out, x)[0]
    return at
