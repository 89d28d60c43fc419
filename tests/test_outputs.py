"""Explained quantities: values against direct computation, shapes, and the functional g."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import BadInputError
from engine.model.outputs import QUANTITIES, get_quantity, make_g, output_count
from engine.model.task import cross_entropy


@pytest.fixture
def logits_labels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 4, 2, 2, 1, 3])


def test_logits_is_every_output(logits_labels):
    out, y = logits_labels
    assert torch.equal(get_quantity("logits")(out, y), out)
    assert get_quantity("logits")(out.reshape(6, 5, 1), y).shape == (6, 5)


def test_true_logit_logprob_loss_margin_match_direct_formulas(logits_labels):
    out, y = logits_labels
    rows = torch.arange(6)
    assert torch.allclose(get_quantity("true-logit")(out, y)[:, 0], out[rows, y])
    log_p = out[rows, y] - torch.logsumexp(out, dim=1)
    assert torch.allclose(get_quantity("logprob")(out, y)[:, 0], log_p)
    assert torch.allclose(get_quantity("loss")(out, y)[:, 0], -log_p)
    others = torch.stack([torch.cat([out[i, :y[i]], out[i, y[i] + 1:]]).max() for i in range(6)])
    assert torch.allclose(get_quantity("margin")(out, y)[:, 0], out[rows, y] - others)


def test_every_builtin_returns_batch_by_outputs(logits_labels):
    out, y = logits_labels
    for name, quantity in QUANTITIES.items():
        value = quantity(out, y)
        assert value.shape == (6, 5 if name == "logits" else 1), name


def test_user_callable_is_wrapped_and_made_two_dimensional(logits_labels):
    out, y = logits_labels

    def entropy(output, labels):
        p = output.softmax(-1)
        return -(p * p.log()).sum(-1)

    quantity = get_quantity(entropy)
    assert quantity.name == "custom:entropy"
    value = quantity(out, y)
    assert value.shape == (6, 1)
    assert torch.allclose(value[:, 0], entropy(out, y))


@pytest.mark.parametrize("bad", ["probability", 3, None])
def test_unknown_quantities_are_refused(bad):
    with pytest.raises(BadInputError):
        get_quantity(bad)


def test_class_quantities_need_two_dimensional_outputs():
    with pytest.raises(BadInputError, match="batch, classes"):
        get_quantity("margin")(torch.randn(2, 3, 4), torch.tensor([0, 1]))


def test_make_g_runs_given_parameters_without_touching_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shifted = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    g = make_g(model, "loss")
    value = g(shifted, x, y)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reference.load_state_dict(shifted)
    assert torch.allclose(value[:, 0], F.cross_entropy(reference(x), y, reduction="none"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])
    assert output_count(model, "logits", shifted, x, y) == 2
    assert output_count(model, "margin", shifted, x, y) == 1


def test_make_g_is_differentiable_by_torch_func():
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    g = make_g(model, "true-logit")
    grads = torch.func.grad(lambda p: g(p, x, y).sum())(params)
    # Σ_x W[y_x] · x + b[y_x]: the weight gradient of row c is the sum of the inputs with label c
    for c in range(2):
        assert torch.allclose(grads["weight"][c], x[y == c].sum(0))
    assert torch.allclose(grads["bias"], torch.bincount(y, minlength=2).float())


def test_cross_entropy_is_torchs_value_and_gradient_ignored_labels_included():
    # the engine's cross-entropy avoids F.cross_entropy's decomposition under vmap (it imports sympy);
    # values and gradients are torch's, 0 at the ignore index -100; any other label out of range is refused
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100, 2, 1, -100])
    ours, theirs = cross_entropy(output, labels), F.cross_entropy(output, labels, reduction="none")
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-14)
    weights = torch.randn(6, generator=gen, dtype=torch.float64)
    ours_grad, = torch.autograd.grad((ours * weights).sum(), output)
    theirs_grad, = torch.autograd.grad((theirs * weights).sum(), output)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-14, atol=1e-14)
    per_example = torch.func.vmap(lambda o, y: cross_entropy(o[None], y[None])[0])(output.detach(), labels)
    torch.testing.assert_close(per_example, theirs.detach(), rtol=1e-14, atol=1e-14)
    for bad in (-5, 5):
        with pytest.raises((RuntimeError, IndexError)):
            cross_entropy(output, torch.tensor([0, bad, 1, 2, 3, 4]))
