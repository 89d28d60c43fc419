"""``AtPoint``: a model evaluated at ``θ + tΔ`` while its parameters stay at ``θ``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from engine.decompose.at_point import AtPoint, Injected
from engine.model.groups import ParamLayout


class Mixed(nn.Module):
    """Every way a parameter reaches the output: the ops AtPoint splits (linear, conv, layer
    norm, embedding — positional and keyword) and the ones that get the point (a parameter
    added, multiplied or contracted directly, an embedding with max_norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.capped = nn.Embedding(7, 4, max_norm=1.0)
        self.pos = nn.Parameter(torch.randn(3, 4))
        self.conv = nn.Conv1d(4, 4, kernel_size=1)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Parameter(torch.randn(4, 4))
        self.scale = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos + 0.1 * F.embedding(tokens, self.capped.weight)  # (batch, 3, 4)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = F.layer_norm(x, (4,), weight=self.norm.weight, bias=self.norm.bias)
        x = x + torch.einsum("bsd,de->bse", x, self.mix).softmax(1)
        x = F.relu(x) * self.scale
        return F.linear(x[:, -1], weight=self.out.weight, bias=self.out.bias)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Mixed().double().eval()


def flat_and_layout(model):
    params = dict(model.named_parameters())
    layout = ParamLayout(tuple(params), tuple(p.shape for p in params.values()))
    return layout.flatten(params, dtype=torch.float64, device="cpu"), layout


def at(model, layout, flat, delta, t, tokens):
    params = layout.unflatten(flat)
    with AtPoint(list(params.values()), list(layout.unflatten(delta).values()), t):
        return functional_call(model, params, (tokens,))


def plain(model, layout, point, tokens):
    return functional_call(model, layout.unflatten(point), (tokens,))


def test_values_and_derivatives_are_those_at_the_point(model):
    theta, layout = flat_and_layout(model)
    delta = torch.randn(theta.shape, dtype=torch.float64) * 0.1
    v = torch.randn(theta.shape, dtype=torch.float64)
    tokens = torch.randint(0, 7, (6, 3))
    t = torch.tensor(0.37, dtype=torch.float64)
    expected = plain(model, layout, theta + t * delta, tokens)
    assert torch.allclose(at(model, layout, theta, delta, t, tokens), expected, rtol=0, atol=1e-12)
    d_expected = jvp(lambda p: plain(model, layout, p, tokens), (theta + t * delta,), (v,))[1]
    d_at = jvp(lambda p: at(model, layout, p, delta, t, tokens), (theta,), (v,))[1]
    assert torch.allclose(d_at, d_expected, rtol=0, atol=1e-12)
    assert not torch.allclose(at(model, layout, theta, delta, torch.tensor(0.0, dtype=torch.float64), tokens),
                              expected)  # t is used


def test_vectorised_over_units_and_directions(model):
    """As the evaluator uses it: directions outside, units (own t, own input) inside."""
    theta, layout = flat_and_layout(model)
    delta = torch.randn(theta.shape, dtype=torch.float64) * 0.1
    directions = torch.randn(3, *theta.shape, dtype=torch.float64)
    ts = torch.rand(5, dtype=torch.float64)
    tokens = torch.randint(0, 7, (5, 3))

    def along(v, t, x):
        return jvp(lambda p: at(model, layout, p, delta, t, x[None])[0], (theta,), (v,))[1]

    got = vmap(vmap(along, in_dims=(None, 0, 0)), in_dims=(0, None, None))(directions, ts, tokens)  # (K, U, O)
    for k in range(3):
        for u in range(5):
            want = jvp(lambda p, u=u: plain(model, layout, p, tokens[u:u + 1])[0], (theta + ts[u] * delta,),
                       (directions[k],))[1]
            assert torch.allclose(got[k, u], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("point", [False, True])
def test_injected_directions_give_the_derivatives_along_them(model, point):
    """Reverse mode over α in ``W + tΔW + Σ_k α_k V_k``, vectorised over units, equals forward mode
    along each ``V_k`` at the point ``θ + tΔ`` — for directions on one tensor (weights and biases
    apart, as per-tensor components have them) and a direction on every tensor."""
    theta, layout = flat_and_layout(model)
    torch.manual_seed(1)
    delta = torch.randn(theta.shape, dtype=torch.float64) * 0.1
    names = list(layout.names)
    on_one = [layout.flatten({m: torch.randn(layout.shapes[i], dtype=torch.float64) if m == n
                              else torch.zeros(layout.shapes[i], dtype=torch.float64)
                              for i, m in enumerate(names)}, dtype=torch.float64) for n in names]
    directions = torch.stack([*on_one, torch.randn(theta.shape, dtype=torch.float64)])  # (K, D)
    k = len(directions)
    rows = [torch.tensor([i, k - 1]) for i in range(len(names))]
    ts = torch.rand(4, dtype=torch.float64)
    tokens = torch.randint(0, 7, (4, 3))

    def injected(t, x):
        params = layout.unflatten(theta)
        pieces = layout.unflatten(directions)
        values = [pieces[n][r] for n, r in zip(names, rows, strict=True)]

        def g(alpha):
            with AtPoint(list(params.values()), list(layout.unflatten(delta).values()), t,
                         Injected(alpha, rows, values, point)):
                return functional_call(model, params, (x[None],))[0]
        value = g(torch.zeros(k, dtype=torch.float64))
        return value, jacrev(g)(torch.zeros(k, dtype=torch.float64))  # (O,), (O, K)

    values, got = vmap(injected)(ts, tokens)
    for u in range(4):
        here = theta + ts[u] * delta
        assert torch.allclose(values[u], plain(model, layout, here, tokens[u:u + 1])[0], rtol=0, atol=1e-12)
        for j in range(k):
            want = jvp(lambda p, u=u: plain(model, layout, p, tokens[u:u + 1])[0], (here,), (directions[j],))[1]
            assert torch.allclose(got[u, :, j], want, rtol=0, atol=1e-12), (u, j)


def test_only_the_listed_tensors_move(model):
    theta, layout = flat_and_layout(model)
    params = layout.unflatten(theta)
    steps = layout.unflatten(torch.ones_like(theta))
    kept = [n for n in params if n != "out.bias"]
    with AtPoint([params[n] for n in kept], [steps[n] for n in kept], torch.tensor(2.0, dtype=torch.float64)):
        bias = params["out.bias"] + 0.0
        weight = params["out.weight"] + 0.0
    assert torch.equal(bias, params["out.bias"])
    assert torch.equal(weight, params["out.weight"] + 2.0)
