"""Explained quantities ``g(output, labels) → (test, out)`` and the functional ``g(θ)``.

Built in (``QUANTITIES``): ``logits`` (every model output), ``true-logit`` (the output of
the true class), ``logprob`` (log-softmax of the true class), ``loss`` (the run's per-example
training loss; cross-entropy where none is given) and ``margin`` (true logit minus the largest
other). Any callable ``fn(output (batch, ...), labels (batch, ...)) → (batch,) or (batch, out)``
works too, in Python or, named by its import path ``package.module:function``, on the command
line (``imported_quantity``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from engine.errors import BadInputError
from engine.model.task import cross_entropy, load_object

QuantityFn = Callable[[Tensor, Tensor], Tensor]


def _logits(output: Tensor, labels: Tensor) -> Tensor:
    return output.reshape(output.shape[0], -1)


def _true_logit(output: Tensor, labels: Tensor) -> Tensor:
    return output.gather(1, labels[:, None])


def _logprob(output: Tensor, labels: Tensor) -> Tensor:
    return F.log_softmax(output, dim=-1).gather(1, labels[:, None])


def _loss(output: Tensor, labels: Tensor) -> Tensor:
    return cross_entropy(output, labels)[:, None]


def _margin(output: Tensor, labels: Tensor) -> Tensor:
    true = output.gather(1, labels[:, None])
    is_true = torch.arange(output.shape[1], device=output.device)[None, :] == labels[:, None]  # (vmap-able)
    other = output.masked_fill(is_true, float("-inf")).amax(dim=1, keepdim=True)
    return true - other


@dataclass(frozen=True)
class Quantity:
    """A named explained quantity; ``classes`` when it reads the class of each example (integer
    labels and ``(batch, classes)`` outputs)."""

    name: str
    fn: QuantityFn
    description: str
    classes: bool = False

    def __call__(self, output: Tensor, labels: Tensor) -> Tensor:
        """``(batch, ...), (batch, ...) → (batch, out)``."""
        if self.classes and labels.is_floating_point():
            raise BadInputError(f"quantity {self.name!r} reads the class of each example, but this run's targets are "
                                "floating-point numbers; explain 'logits', 'loss' or a function of (output, targets)")
        if self.classes and output.dim() != 2:
            raise BadInputError(
                f"quantity {self.name!r} needs model outputs of shape (batch, classes), "
                f"got {tuple(output.shape)}; explain 'logits' or pass a callable"
            )
        value = self.fn(output, labels)
        return value[:, None] if value.dim() == 1 else value


QUANTITIES: dict[str, Quantity] = {
    q.name: q
    for q in (
        Quantity("logits", _logits, "every model output"),
        Quantity("true-logit", _true_logit, "the output of the true class", classes=True),
        Quantity("logprob", _logprob, "log-softmax of the true class", classes=True),
        Quantity("loss", _loss, "per-example cross-entropy", classes=True),
        Quantity("margin", _margin, "true logit minus the largest other", classes=True),
    )
}


def get_quantity(quantity: str | QuantityFn | Quantity, loss: QuantityFn | None = None) -> Quantity:
    """A built-in name, a ``Quantity`` or a user callable → ``Quantity``; ``"loss"`` is the
    run's per-example training ``loss`` where one is given (the task's), else cross-entropy."""
    if isinstance(quantity, Quantity):
        return quantity
    if isinstance(quantity, str):
        if quantity not in QUANTITIES:
            raise BadInputError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)} "
                                "or pass a callable fn(output, labels)")
        if quantity == "loss" and loss is not None:
            return Quantity("loss", loss, "per-example training loss")
        return QUANTITIES[quantity]
    if callable(quantity):
        name = getattr(quantity, "__name__", type(quantity).__name__)
        return Quantity(f"custom:{name}", quantity, "user function of (output, labels)")
    raise BadInputError(f"quantity must be a name or a callable, got {type(quantity).__name__}")


def imported_quantity(path: str) -> Quantity:
    """The quantity ``fn(output, labels) → (batch,) or (batch, out)`` at import path ``package.module:fn``,
    named by its path (the user's own code: import it only where the user named it)."""
    fn = load_object(path, "quantity")
    if not callable(fn):
        raise BadInputError(f"quantity {path!r} is a {type(fn).__name__}, not a function of (output, labels)")
    return Quantity(path, fn, f"user function {path}")


GFn = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]


def make_g(model: nn.Module, quantity: str | QuantityFn | Quantity,
           buffers: Mapping[str, Tensor] | None = None) -> GFn:
    """``g(params, x, y) → (test, out)``: the quantity of ``model`` run with ``params``.

    Runs ``torch.func.functional_call`` with the given parameters and the module's own
    buffers (or ``buffers``); the module is never modified.
    """
    q = get_quantity(quantity)
    fixed = dict(model.named_buffers()) if buffers is None else dict(buffers)

    def g(params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        output = functional_call(model, ({**params, **fixed}), (x,))
        return q(output, y)

    return g


def output_count(model: nn.Module, quantity: str | QuantityFn | Quantity,
                 params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> int:
    """Number of outputs ``O`` of the quantity for this model (one forward on one example)."""
    with torch.no_grad():
        return int(make_g(model, quantity)(params, x[:1], y[:1]).shape[1])
