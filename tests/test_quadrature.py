"""Quadrature rules, their error laws, kink detection and the adaptive acceptance test."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.decompose.quadrature import (
    QuadratureSpec,
    SwitchRecorder,
    accept,
    agreed,
    breakpoints,
    composite,
    crossings,
    gauss,
    live_switches,
    live_tensors,
    lowered,
    midpoint,
    panels,
    parse_quadrature,
    refine_zero,
    unconverged,
)
from engine.errors import BadInputError


def integrate(rule, f) -> float:
    return sum(w * f(t) for t, w in zip(rule.nodes, rule.weights, strict=True))


@pytest.mark.parametrize(("spec", "kind", "n"), [
    ("midpoint:100", "midpoint", 100), ("gauss:4", "gauss", 4), ("adaptive", "adaptive", 16),
    ("adaptive:32", "adaptive", 32), (" Gauss:2 ", "gauss", 2),
])
def test_parse_valid_specs(spec, kind, n):
    parsed = parse_quadrature(spec)
    assert (parsed.kind, parsed.n) == (kind, n)
    assert parse_quadrature(str(parsed)) == parsed


@pytest.mark.parametrize("spec", ["midpoint", "gauss:0", "gauss:-1", "simpson:3", "gauss:x", "adaptive:1",
                                  "midpoint:100000", "", 3])
def test_parse_rejects_bad_specs(spec):
    with pytest.raises(BadInputError):
        parse_quadrature(spec)


def test_adaptive_ladder_doubles_up_to_its_cap():
    assert [len(r) for r in QuadratureSpec("adaptive", 16).ladder()] == [1, 2, 4, 8, 16]
    assert [len(r) for r in QuadratureSpec("adaptive", 6).ladder()] == [1, 2, 4, 6]
    assert [len(r) for r in QuadratureSpec("gauss", 3).ladder()] == [3]


def test_midpoint_nodes_match_the_published_rule():
    rule = midpoint(100)
    assert rule.nodes[0] == pytest.approx(0.005) and rule.nodes[-1] == pytest.approx(0.995)
    assert sum(rule.weights) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_gauss_is_exact_up_to_degree_2n_minus_1_and_not_beyond(n):
    rule = gauss(n)
    assert all(0.0 < t < 1.0 for t in rule.nodes)
    for degree in range(2 * n):
        assert integrate(rule, lambda t, k=degree: t**k) == pytest.approx(1.0 / (degree + 1), abs=1e-13)
    # the first monomial it misses: error (n!)⁴ / ((2n+1) ((2n)!)²) exactly
    error = 1.0 / (2 * n + 1) - integrate(rule, lambda t: t ** (2 * n))
    expected = math.factorial(n) ** 4 / ((2 * n + 1) * math.factorial(2 * n) ** 2)
    assert error == pytest.approx(expected, rel=1e-4)


def test_midpoint_error_falls_as_n_to_the_minus_2():
    exact = math.e - 1.0
    errors = [abs(integrate(midpoint(n), math.exp) - exact) for n in (10, 20, 40, 80)]
    for coarse, fine in itertools.pairwise(errors):
        assert coarse / fine == pytest.approx(4.0, rel=0.01)
    # leading term: h² (f'(1) − f'(0)) / 24
    assert errors[0] == pytest.approx((math.e - 1.0) / 24 / 100, rel=0.01)


def test_gauss_error_matches_the_remainder_theorem_for_an_analytic_integrand():
    # E_n = (n!)⁴ / ((2n+1) ((2n)!)³) f^(2n)(ξ) on [0, 1]; for f = exp, 1 ≤ f^(2n) ≤ e
    exact = math.e - 1.0
    for n in (1, 2, 3, 4, 5):
        bound = math.factorial(n) ** 4 / ((2 * n + 1) * math.factorial(2 * n) ** 3)
        error = exact - integrate(gauss(n), math.exp)
        assert bound <= error <= math.e * bound
    assert abs(exact - integrate(gauss(6), math.exp)) < 1e-15 * 10


def test_switch_recorder_sees_every_call_style_and_ignores_non_batch_tensors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            h = self.act(self.lin(x))                      # module → 4 values
            h = h + F.relu(x.sum(1, keepdim=True) - 1.0)   # functional → 1
            h = h + torch.clamp(h, min=0.5, max=2.0)       # two kinks → 8
            h = h + h.abs()                                # method → 4
            h = torch.maximum(h, x[:, :1])                 # element-wise max → 4
            _ = self.lin.weight.relu()                     # not per example: ignored
            return h

    x = torch.randn(5, 3)
    with SwitchRecorder(5) as recorder:
        out = Net()(x)
    values = recorder.values()
    assert out.shape == (5, 4)
    assert values.shape == (5, 4 + 1 + 8 + 4 + 4)
    with SwitchRecorder(5) as recorder:
        torch.tanh(x)
    assert recorder.values() is None


def _tokens(head):
    """g(params) of a per-token ReLU layer on (batch, 4 tokens, 3) inputs, read out by ``head``."""
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def g(params):
        w1, w2 = params[:18].reshape(6, 3), params[18:].reshape(2, 6)
        return head(x @ w1.T) @ w2.T   # (5, 2)
    return g, torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def test_live_switches_keep_only_the_token_the_output_reads():
    g, params = _tokens(lambda h: F.relu(h)[:, -1])
    live = live_switches(g, params, 5)
    assert live.columns == 4 * 6 and live.index.tolist() == list(range(18, 24))  # the last token's units
    with SwitchRecorder(5, live) as recorder:
        g(params)
    with SwitchRecorder(5) as every:
        g(params)
    assert torch.equal(recorder.values(), every.values()[:, 18:])


def test_live_switches_see_through_switches_that_are_off_at_the_probe():
    # the outer ReLU is off for every example at these parameters: the inner units still matter
    g, params = _tokens(lambda h: F.relu(F.relu(h).sum(1) - 1e6))
    assert live_switches(g, params, 5) is None
    for in_place in (lambda h: h.relu_(), lambda h: (F.relu(h, inplace=True), h)[1]):  # read through the input
        g, params = _tokens(lambda h, f=in_place: f(h)[:, -1])
        assert live_switches(g, params, 5).index.tolist() == list(range(18, 24))


@pytest.mark.parametrize("head", [
    lambda h: F.relu(h).amax(1),                                   # max over tokens
    lambda h: F.max_pool1d(F.relu(h).transpose(1, 2), 4)[..., 0],  # max pooling
    lambda h: (F.relu(h) * (h > 0.5))[:, -1],                      # a mask from the activations
])
def test_live_switches_give_up_where_the_model_selects(head):
    g, params = _tokens(head)
    assert live_switches(g, params, 5) is None


def _named(x: torch.Tensor, head) -> tuple:
    """A two-layer net on named tensors: ``lora_b`` starts at zero (so ``lora_a``'s gradient is
    zero there) and ``spare`` is never used."""
    gen = torch.Generator().manual_seed(3)
    params = {"w1": torch.randn(6, 3, generator=gen, dtype=torch.float64),
              "lora_a": torch.randn(2, 3, generator=gen, dtype=torch.float64),
              "lora_b": torch.zeros(6, 2, dtype=torch.float64),
              "w2": torch.randn(2, 6, generator=gen, dtype=torch.float64),
              "spare": torch.randn(4, dtype=torch.float64, generator=gen)}

    def g(p):
        return head(x @ (p["w1"] + p["lora_b"] @ p["lora_a"]).T) @ p["w2"].T
    return g, params


def test_live_tensors_are_those_the_output_is_computed_from():
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g, params = _named(x, F.relu)
    assert live_tensors(g, params, 5) == {"w1", "lora_a", "lora_b", "w2"}  # lora_a: zero gradient, still used
    g, params = _named(x, lambda h: F.relu(h) * (h > 0.5))
    assert live_tensors(g, params, 5) is None  # a mask from the activations: other points may differ


def test_crossings_locate_the_zero_of_a_linear_switch_exactly():
    before = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    after = torch.tensor([[-3.0, -1.0, 1.0], [0.5, -1.5, 0.5]])
    t, unit, counts = crossings(before, after)
    assert counts.tolist() == [1, 1]
    assert t[0, 0].item() == pytest.approx(0.25) and unit[0, 0].item() == 0
    assert t[1, 0].item() == pytest.approx(0.25) and unit[1, 0].item() == 1
    points, counts = breakpoints(t, counts)
    assert points.tolist() == [[0.25], [0.25]]


def test_refine_zero_finds_a_curved_switch_zero_to_round_off():
    # s(t) = (t − 0.3)(t + 2) has its zero at 0.3; the linear guess from s(0), s(1) is off by 0.1
    s = lambda t: (t - 0.3) * (t + 2.0)  # noqa: E731
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    guess = s(t0) / (s(t0) - s(t1))
    assert abs(guess.item() - 0.3) > 0.05
    history = [(t0, s(t0)), (t1, s(t1))]
    for _ in range(4):
        guess = refine_zero(guess, s(guess), history)
    assert guess.item() == pytest.approx(0.3, abs=1e-12)


def test_composite_rule_integrates_a_kinked_integrand_exactly():
    kink = 0.37
    f = lambda t: torch.where(t < kink, 3 * t**2, -t**3 + 2.0)  # noqa: E731  piecewise cubic
    exact = kink**3 + (2.0 * (1 - kink) - (1 - kink**4) / 4)
    start, width, valid = panels(torch.tensor([[kink, 1.0]], dtype=torch.float64), torch.tensor([1]))
    assert valid.tolist() == [[True, True, False]]
    ladder = [gauss(1), gauss(2), gauss(4)]
    for level, nodes in (([1, 1, -1], 4), ([1, 2, -1], 6)):  # per piece: 2 + 2 nodes, or 2 + 4
        t, w, count = composite(start, width, torch.tensor([level]), ladder)
        assert count.tolist() == [nodes] and t.shape[1] == nodes
        assert float((w * f(t)).sum()) == pytest.approx(exact, abs=1e-14)
    t, w, count = composite(start, width, torch.tensor([[0, 2, -1]]), ladder)  # 1 node is wrong on 3t²
    assert count.tolist() == [5]
    assert abs(float((w * f(t)).sum()) - exact) > 1e-3
    plain = gauss(16)
    assert abs(integrate(plain, lambda u: float(f(torch.tensor(u)))) - exact) > 1e-4


def test_breakpoints_merge_duplicates_and_drop_ends():
    t = torch.tensor([[0.5, 0.5, 0.2, 1.0, 0.0]], dtype=torch.float64)
    points, counts = breakpoints(t, torch.tensor([5]))
    assert counts.tolist() == [2]
    assert points[0, :2].tolist() == [0.2, 0.5]


def test_accept_needs_two_rules_agreeing_and_a_small_residual():
    q_prev = torch.tensor([[1.0, 2.0]])
    close = q_prev + 1e-6
    scale = torch.tensor([[3.0, 3.0]])
    tiny = torch.zeros(1, 2)
    assert not accept(close, None, tiny, scale, torch.float32).item()
    assert accept(close, q_prev, tiny, scale, torch.float32).item()
    assert not accept(q_prev + 1e-2, q_prev, tiny, scale, torch.float32).item()
    assert not accept(close, q_prev, tiny + 1e-2, scale, torch.float32).item()
    assert not accept(close, q_prev, tiny, scale, torch.float64).item()


def test_accept_holds_the_residual_to_round_off_of_the_change_not_of_g():
    """A step that moves g from −10 to −18 in float32: the rules agree, but a residual of 1e-4 is
    a thousand round-offs of the change (8) and must be refused, even though it is within
    round-off of g's own magnitude times a few hundred."""
    q = torch.tensor([[-8.0]])
    scale = torch.tensor([[28.0]])
    assert not accept(q, q, torch.tensor([[1e-4]]), scale, torch.float32).item()
    assert accept(q, q, torch.tensor([[1e-5]]), scale, torch.float32).item()
    # a change too small to resolve against g itself is held only to round-off of g
    assert accept(torch.tensor([[1e-9]]), torch.tensor([[1e-9]]), torch.tensor([[2e-6]]), scale, torch.float32).item()


def test_agreed_is_the_error_estimate_test_of_accept_alone():
    """Rules 1e-6 apart estimate an error of (1e-6)²/|q| ≈ 1e-12: agreed in float32 (and accepted
    only with a small residual); 1e-2 apart they are not, nor at float64's round-off."""
    q_prev = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    q = q_prev + torch.tensor([[1e-6, 1e-6], [1e-6, 1e-2]])  # the second unit: one output apart
    scale = torch.full((2, 2), 3.0)
    assert agreed(q, q_prev, scale, torch.float32).tolist() == [True, False]
    assert agreed(q, q_prev, scale, torch.float64).tolist() == [False, False]
    off = torch.full((2, 2), 1e-2)  # a residual far above round-off: agreed, yet not accepted
    assert accept(q, q_prev, off, scale, torch.float32).tolist() == [False, False]


@pytest.mark.parametrize("first", [0, 1])
def test_lowered_keeps_as_many_pieces_down_as_the_residual_test_allows_smallest_error_first(first):
    """Two pieces are within their share of the estimate's tolerance (16 round-offs of ``g_scale``);
    the residual test allows one round-off of it. Both down, the unit fails that test; the piece
    with the smaller error alone passes it, and goes down, wherever it sits among the pieces."""
    errors = [1e-17, 1e-15]  # candidates: within 16·eps·(1 + 1e-3) / 3 ≈ 1.2e-15 each …
    errors = (errors if first == 0 else errors[::-1]) + [1e-12]  # … the third piece is not
    hi = torch.tensor([3e-4, 3e-4, 4e-4], dtype=torch.float64)[None, :, None]  # (U, P, O)
    lo = hi - torch.tensor(errors, dtype=torch.float64)[None, :, None]
    q, scale = hi.sum(1), torch.ones(1, 1, dtype=torch.float64)
    residual = torch.zeros_like(q)
    down = lowered(hi, lo, q, residual, scale, torch.ones(1, 3, dtype=torch.bool), torch.float64)
    expected = [True, False, False] if first == 0 else [False, True, False]
    assert down[0].tolist() == expected
    # with room in the residual test for both, both go down (and never the third)
    down = lowered(hi, lo, q, residual, 10 * scale, torch.ones(1, 3, dtype=torch.bool), torch.float64)
    assert down[0].tolist() == [True, True, False]


def test_unconverged_refines_only_pieces_over_their_share_of_the_tolerance():
    q, scale = torch.tensor([[2.0]]), torch.tensor([[4.0]])
    share = 16 * torch.finfo(torch.float32).eps * 6.0 / 3  # tolerance(scale + |q|) over 3 pieces
    valid = torch.tensor([[True, True, True, False]])
    error = torch.tensor([[[0.5 * share], [3.0 * share], [0.9 * share], [0.0]]])
    assert unconverged(error, q, scale, valid, torch.float32).tolist() == [[False, True, False, False]]
    # each piece within its share: the unit failed on r_s or on the pieces together, so all go up
    below = torch.tensor([[[0.9 * share], [0.9 * share], [0.9 * share], [9.0]]])
    assert unconverged(below, q, scale, valid, torch.float32).tolist() == [[True, True, True, False]]
    # with an error budget, a piece within its share of the budget is left as it is
    budget = torch.tensor([3 * 3.0 * share])
    assert unconverged(error, q, scale, valid, torch.float32, budget).tolist() == [[True, True, True, False]]
    assert unconverged(error * 2, q, scale, valid, torch.float32, budget).tolist() == [[False, True, False, False]]
