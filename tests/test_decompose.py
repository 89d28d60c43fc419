"""The decomposition engine against independent truths.

Closed forms (a model linear in its parameters; a deep linear network whose output is a
polynomial along each step), two algorithms that must agree (data view vs component view;
per-example gradients vs single-example autograd; the engine vs direct forward passes), and
the contract of every frame. Models and data here are importable by path, so the runs they
record are rebuilt by ``engine.tasks.get_task`` exactly like a user's own code.
"""

from __future__ import annotations

import importlib
import json
import math
import signal
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.cli import main
from engine.decompose import (
    IMPORTANCE_SCORES,
    ExplainConfig,
    ExplainInterrupted,
    compare_quadratures,
    element_influence,
    explain,
    explain_history,
    merge_tests,
    parse_test,
    stream,
)
from engine.decompose.evaluator import ACTIVATION_SHARE, EVALUATION_COPIES, SEARCH_SHARE, TIMING_ROUNDS, _Evaluator
from engine.decompose.reverse import gradient, jacobian
from engine.decompose.setup import (
    INJECTED_ROW_SHARE,
    _ActivationBytes,
    _direction_count,
    _directional_mode,
    _setup,
    _widened,
)
from engine.decompose.train_side import _TrainSide
from engine.errors import BadInputError, UnsupportedOptimizerError
from engine.model.groups import GroupMap, ParamLayout, aggregate
from engine.model.task import get_task
from engine.run.history import History
from engine.run.record import Recorder
from engine.run.updates import rule_for
from engine.store import RunDB

N_IN, N_OUT = 4, 3


# ------------------------------------------------------------------------------ models and data
class LinearNet(nn.Module):
    """Logits linear in the parameters: ``W x + b``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(N_IN, N_OUT)

    def forward(self, x):
        return self.fc(x)


class DeepLinear(nn.Module):
    """``W3 W2 W1 x``: along θ + tΔ each logit is a cubic polynomial in t."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(N_IN, 5, bias=False)
        self.l2 = nn.Linear(5, 5, bias=False)
        self.l3 = nn.Linear(5, N_OUT, bias=False)

    def forward(self, x):
        return self.l3(self.l2(self.l1(x)))


class ReluNet(nn.Module):
    """A ReLU MLP: piecewise smooth along the path, with kinks."""

    def __init__(self, seed: int = 0, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(N_IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, N_OUT)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


class ShallowRelu(nn.Module):
    """``head(relu(W x + b))``: along θ + tΔ a hidden unit's pre-activation is linear in t, so its
    kink lies at ``t = −(W x + b)_j / (ΔW x + Δb)_j``."""

    def __init__(self, seed: int = 0, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(N_IN, hidden)
        self.head = nn.Linear(hidden, N_OUT)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)))


class HiddenKink(nn.Module):
    """Two logits from ``relu(w2 w1 x)``: one SGD step with lr 2 from w1 = 1, w2 = 0.5 on the
    point x = 1 of class 1 moves the pre-activation along ``(1 − 0.73t)(0.5 − 1.46t)``,
    positive at both ends of the step but negative for 0.17 < t < 0.68."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(1.0))
        self.w2 = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(F.relu(self.w2 * self.w1 * x))


class SaturatingKink(nn.Module):
    """Two logits ``±(v · tanh(3 relu(w x)) + b)``: one SGD step with lr 1.5 on the point x = 1
    of class 1 takes w from 0.5 to about −0.9. Before the kink the integrand is smooth but not
    polynomial; after it, constant. ``forward_ad=False`` hides tanh from forward-mode AD."""

    def __init__(self, forward_ad: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.v = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.tanh = torch.tanh if forward_ad else _Tanh.apply

    def forward(self, x):
        s = self.v * self.tanh(3 * F.relu(self.w * x)) + self.b
        return torch.cat([s, -s], dim=-1)


def one_point() -> dict:
    x, y = torch.ones(1, 1), torch.tensor([1])
    return {"train": (x, y), "val": (x, y)}


def data(n_train: int = 20, n_val: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, N_IN, generator=g)
    y = torch.randint(0, N_OUT, (n_train + n_val,), generator=g)
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def spec(model: str) -> dict:
    return {"model": f"tests.test_decompose:{model}", "model_kwargs": {}, "data": "tests.test_decompose:data",
            "data_kwargs": {}, "loss": "cross_entropy"}


def record(out, model: str, make_optimizer, steps: int = 8, batch: int = 6, dtype=torch.float64, seed: int = 1):
    """Train with a plain torch.optim loop under the Recorder; return the opened history."""
    task = get_task(spec(model))
    net = task.build_model().to(dtype)
    x, y = data()["train"]
    x = x.to(dtype)
    optimizer = make_optimizer(net)
    g = torch.Generator().manual_seed(seed)
    with Recorder(net, optimizer, out, model_spec=spec(model), train_data=data()["train"], dtype=dtype) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:batch]
            optimizer.zero_grad()
            F.cross_entropy(net(x[ids]), y[ids]).backward()
            rec.batch(ids)
            optimizer.step()
    return History.open(out)


def final_change(history: History, dtype=torch.float64) -> torch.Tensor:
    """g(θ_N) − g(θ_0) of the val logits by plain forward passes (the independent truth)."""
    task = get_task(history.model_spec)
    net = task.build_model().to(dtype)
    x = task.dataset("val").inputs.to(dtype)
    out = []
    for step in (0, history.num_steps):
        net.load_state_dict({k: v.to(dtype) for k, v in history.params(step).items()})
        with torch.no_grad():
            out.append(net(x))
    return out[1] - out[0]


def totals(frame: pl.DataFrame, value: str = "value") -> np.ndarray:
    """Σ over everything but (test, output), as a (test, output) array."""
    grouped = frame.group_by("test", "output").agg(pl.col(value).sum()).sort("test", "output")
    tests = grouped["test"].n_unique()
    return grouped[value].to_numpy().reshape(tests, -1)


F64 = dict(dtype="float64", test_size=None)


# ------------------------------------------------------------------------------ closed forms
def test_linear_model_influence_is_exactly_the_gradient_times_the_update(tmp_path):
    history = record(tmp_path / "run", "LinearNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.5))
    x = get_task(history.model_spec).dataset("val").inputs.double()
    for quadrature in ("midpoint:1", "gauss:1", "adaptive"):
        e = explain(history.path, ExplainConfig(quadrature=quadrature, **F64), progress=False, trust_run=True)
        comp = e.components
        for step in range(history.num_steps):
            delta = {k: v.double() for k, v in history.update(step).items()}
            weight = (x @ delta["fc.weight"].T).numpy()           # (test, out): ΔW x
            bias = np.broadcast_to(delta["fc.bias"].numpy(), weight.shape)
            for tensor, expected in (("fc.weight", weight), ("fc.bias", bias)):
                got = comp.filter(pl.col("step_lo") == step, pl.col("tensor") == tensor).sort("test", "output")
                np.testing.assert_allclose(got["value"].to_numpy().reshape(weight.shape), expected,
                                           rtol=1e-12, atol=1e-14)
        assert e.max_rel_residual < 1e-12


def test_gauss_is_exact_on_a_polynomial_path_and_midpoint_error_falls_as_n_squared(tmp_path):
    # logits of a 3-layer linear network are cubic in t; the integrand is quadratic
    history = record(tmp_path / "run", "DeepLinear", lambda m: torch.optim.SGD(m.parameters(), lr=0.5), steps=4)
    truth = final_change(history).numpy()
    errors = {}
    for quadrature in ("gauss:1", "gauss:2", "midpoint:4", "midpoint:8", "adaptive"):
        e = explain(history.path, ExplainConfig(quadrature=quadrature, views=(), **F64), progress=False, trust_run=True)
        recon = totals(e.completeness, "reconstructed")
        errors[quadrature] = np.abs(recon - truth).max()
    scale = np.abs(truth).max()
    assert errors["gauss:2"] < 1e-13 * scale < errors["gauss:1"] / 1e6
    assert errors["adaptive"] < 1e-13 * scale
    assert errors["midpoint:4"] / errors["midpoint:8"] == pytest.approx(4.0, rel=0.05)


def test_adaptive_cuts_relu_kinks_and_beats_midpoint_100(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.5), steps=6)
    adaptive = explain(history.path, ExplainConfig(views=(), **F64), progress=False, trust_run=True)
    published = explain(history.path, ExplainConfig(quadrature="midpoint:100", views=(), **F64),
                        progress=False, trust_run=True)
    plain = explain(history.path, ExplainConfig(quadrature="gauss:16", views=(), **F64), progress=False, trust_run=True)
    assert published.max_abs_residual > 1e-8          # the kinks cost the fixed rules accuracy
    assert plain.max_abs_residual > 1e-8
    assert adaptive.max_abs_residual < 1e-13
    assert adaptive.gradient_evaluations < published.gradient_evaluations / 5
    truth = final_change(history).numpy()
    np.testing.assert_allclose(totals(adaptive.completeness, "reconstructed"), truth, atol=1e-13)


def test_kinks_are_placed_to_float64_precision_when_computing_in_float32(tmp_path, monkeypatch):
    history = record(tmp_path / "run", "ShallowRelu", lambda m: torch.optim.SGD(m.parameters(), lr=1.0), steps=8,
                     dtype=torch.float32)
    found = []
    kinks = stream._Pass._kinks

    def spy(self, ev, c, thetas, deltas, bufs, bi, xi, *rest):
        points, counts = kinks(self, ev, c, thetas, deltas, bufs, bi, xi, *rest)
        found.append((thetas.double(), deltas.double(), c.x.double(), bi, xi, points, counts))
        return points, counts

    monkeypatch.setattr(stream._Pass, "_kinks", spy)
    e = explain(history.path, ExplainConfig(dtype="float32", test_size=None, views=()), progress=False,
                trust_run=True)
    assert e.max_rel_residual < 1e-5
    hidden, checked = 16, 0
    for thetas, deltas, x, bi, xi, points, counts in found:
        for u in range(len(bi)):
            theta, delta, xu = thetas[bi[u]], deltas[bi[u]], x[xi[u]]
            z0 = theta[:hidden * N_IN].view(hidden, N_IN) @ xu + theta[hidden * N_IN:hidden * (N_IN + 1)]
            dz = delta[:hidden * N_IN].view(hidden, N_IN) @ xu + delta[hidden * N_IN:hidden * (N_IN + 1)]
            exact = (-z0 / dz)[(-z0 / dz > 1e-4) & (-z0 / dz < 1 - 1e-4)].sort().values  # clear of the ends
            got = points[u, :counts[u]]
            got = got[(got > 1e-4) & (got < 1 - 1e-4)]
            assert len(got) == len(exact)
            np.testing.assert_allclose(got.numpy(), exact.numpy(), rtol=0, atol=1e-12)
            checked += len(exact)
    assert checked >= 10


def test_the_round_off_check_evaluates_a_units_rules_in_float64(tmp_path):
    """Units whose float32 rules agree while their residual does not keep their rule where the same
    rules, evaluated in float64, meet float32's tolerance. Along a DeepLinear step the logits are
    cubic in t, so two Gauss nodes are exact: against the exact change every unit passes; against
    a change off by 1e-3 none does."""
    history = record(tmp_path / "run", "DeepLinear", lambda m: torch.optim.SGD(m.parameters(), lr=0.5), steps=2,
                     dtype=torch.float32)
    s = _setup(history, get_task(history.model_spec), ExplainConfig(dtype="float32", test_size=None, views=()))
    p = stream._Pass(s, slice(0, len(s.test_ids)), np.ones(s.hi - s.lo, dtype=bool), None)
    c = p.chunks[0]
    flat = [s.layout.flatten(history.params(step), dtype=torch.float32, device=s.device) for step in range(3)]
    thetas, deltas = torch.stack(flat[:2]), torch.stack(flat[1:]) - torch.stack(flat[:2])
    bufs = torch.stack([s.flat_buffers(history.buffers(step)) for step in range(2)])
    g = p.evaluator.forward(torch.stack(flat), torch.cat([bufs, bufs[-1:]]), c.x, c.y, False)[0]  # float64
    true, scale = g[1:] - g[:-1], g[1:].abs() + g[:-1].abs()                                     # (2, n, O)
    units = torch.ones(2, len(c.y), dtype=torch.bool).nonzero()
    pieces = (torch.zeros(len(units), 1, dtype=torch.float64), torch.ones(len(units), 1, dtype=torch.float64),
              torch.ones(len(units), 1, dtype=torch.int64), torch.ones(len(units), 1, dtype=torch.bool))
    assert p._round_off(c, p.evaluator, thetas, deltas, bufs, units, *pieces, true, scale).all()
    assert not p._round_off(c, p.evaluator, thetas, deltas, bufs, units, *pieces, true + 1e-3, scale).any()
    assert p.float64_evaluator is not None and p.float64_evaluator.s.dtype == torch.float64


# ------------------------------------------------------------------------------ two algorithms agree
@pytest.mark.parametrize("engine", ["jvp", "vjp"])
@pytest.mark.parametrize("batch", [6, 20])  # mini-batches of 6, and the full batch of 20
def test_data_view_for_sgd_momentum_matches_a_closed_form_per_example(tmp_path, engine, batch):
    lr, mu, wd = 0.2, 0.7, 0.05
    history = record(tmp_path / "run", "LinearNet",
                     lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=mu, nesterov=True, weight_decay=wd),
                     steps=5, batch=batch)
    e = explain(history.path, ExplainConfig(views=("components", "data"), engine=engine, **F64),
                progress=False, trust_run=True)
    assert e.engine == engine
    task = get_task(history.model_spec)
    (xt, yt), xv = data()["train"], task.dataset("val").inputs.double()
    xt = xt.double()
    n_train = len(yt)
    buf = torch.zeros(n_train, N_OUT, N_IN + 1, dtype=torch.float64)  # per-example momentum of [W | b]
    for step in range(history.num_steps):
        params = history.params(step)
        ids, weights = history.batch(step)
        z = xt @ params["fc.weight"].double().T + params["fc.bias"].double()
        residual = z.softmax(-1) - F.one_hot(yt, N_OUT).double()                 # ∂ℓ/∂z per example
        grad = torch.cat([residual[:, :, None] * xt[:, None, :], residual[:, :, None]], dim=2)  # (train, O, I+1)
        d = torch.zeros_like(buf)
        d.index_add_(0, ids, grad[ids] * weights[:, None, None])
        buf = d.clone() if step == 0 else mu * buf + d
        psi = -lr * (d + mu * buf)                                                # nesterov
        # logits linear in [W | b]: φ(x)[j] · ψ = Σ_i ψ[j, i] x_i + ψ[j, bias]
        gamma = torch.einsum("kji,ti->ktj", psi[:, :, :N_IN], xv) + psi[:, None, :, N_IN]
        got = e.data.filter(pl.col("step_lo") == step, pl.col("train") >= 0)
        expected = {(k, t, j): float(gamma[k, t, j]) for k in got["train"].unique().to_list()
                    for t in range(len(xv)) for j in range(N_OUT)}
        values = {(r["train"], r["test"], r["output"]): r["value"] for r in got.iter_rows(named=True)}
        assert values.keys() == expected.keys()
        for key, value in values.items():
            assert value == pytest.approx(expected[key], abs=1e-13)
        assert set(got["train"].to_list()) == set(torch.nonzero(buf.abs().sum((1, 2))).squeeze(1).tolist())


@pytest.mark.parametrize(("optimizer", "engine"), [("adamw", "vjp"), ("adam-l2", "vjp"), ("sgd-wd", "vjp"),
                                                  ("adamw", "jvp"), ("sgd-wd", "jvp")])
def test_data_view_summed_over_train_and_regularizer_equals_the_component_view(tmp_path, optimizer, engine):
    make = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.3),
        "adam-l2": lambda m: torch.optim.Adam(m.parameters(), lr=0.02, weight_decay=0.1),
        "sgd-wd": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.05),
    }[optimizer]
    history = record(tmp_path / "run", "ReluNet", make)
    views = ("components", "data", "importance") if engine == "vjp" else ("components", "data")
    e = explain(history.path, ExplainConfig(views=views, window=3, engine=engine, **F64),
                progress=False, trust_run=True)
    assert e.engine == engine
    data_total = totals(e.data)
    components = totals(e.components)
    opt = totals(e.completeness, "optimizer_residual")
    assert np.abs(opt).max() < 1e-12
    np.testing.assert_allclose(data_total + opt, components, atol=1e-12)
    # the regularizer row is the decay part of the components
    reg = totals(e.data.filter(pl.col("train") == -1))
    np.testing.assert_allclose(reg, totals(e.components, "decay"), atol=1e-13)
    assert np.abs(reg).max() > 1e-6


def test_vectorised_calls_are_sized_by_what_one_example_allocates(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    task = get_task(history.model_spec)
    tight = _setup(history, task, ExplainConfig(device="cpu", memory_mb=1, **F64))
    # per example, ReluNet's forward writes its three linear layers' outputs and two ReLUs'
    # (16 + 16 + 16 + 16 + 3 float64 values); views of the weights and inputs are not counted
    assert tight.example_bytes == (4 * 16 + 3) * 8
    assert _Evaluator(tight).call_evaluations == 2**20 // ACTIVATION_SHARE // (EVALUATION_COPIES * 536)
    roomy = _setup(history, task, ExplainConfig(device="cpu", **F64))
    assert _Evaluator(roomy).call_evaluations == roomy.config.max_batch
    # in float32 the same values take half the bytes; its float64 twin (units float32 cannot resolve) twice that
    single = _setup(history, task, ExplainConfig(device="cpu", dtype="float32", test_size=None))
    assert single.example_bytes == (4 * 16 + 3) * 4
    assert _widened(single).example_bytes == (4 * 16 + 3) * 8


def test_the_rules_search_runs_in_calls_of_its_own_smaller_share(tmp_path, monkeypatch):
    """The search's vectorised calls (switching values, one direction per unit) hold at most
    ``search_evaluations`` evaluations; the final directions may fill ``call_evaluations``."""
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    search, final = [], []
    made = _Evaluator.__init__

    def counting(self, *args, **kwargs):
        made(self, *args, **kwargs)
        switches, jvp_units = self._switches, self._jvp_units

        def counted_switches(thetas, deltas, bufs, t, x, y):
            search.append((self, t.numel()))
            return switches(thetas, deltas, bufs, t, x, y)

        def counted_units(thetas, deltas, bufs, t, directions, x, y):
            (search if directions.shape[1] == 1 else final).append((self, t.numel() * directions.shape[1]))
            return jvp_units(thetas, deltas, bufs, t, directions, x, y)
        self._switches, self._jvp_units = counted_switches, counted_units
    monkeypatch.setattr(_Evaluator, "__init__", counting)
    e = explain(history.path, ExplainConfig(max_batch=64, engine="jvp", **F64), progress=False, trust_run=True)
    assert e.max_rel_residual < 1e-10
    assert all(ev.search_evaluations == 64 // SEARCH_SHARE for ev, _ in search)
    assert max(size for _, size in search) <= 64 // SEARCH_SHARE
    assert sum(size for _, size in search) > 64  # split: the budget was binding
    assert max(size for _, size in final) > 64 // SEARCH_SHARE


def test_a_forward_that_cannot_be_counted_leaves_calls_to_max_batch_and_says_so(tmp_path, monkeypatch):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))

    def refuse(self, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} refuses to run under a function mode")
    monkeypatch.setattr(_ActivationBytes, "__torch_function__", refuse)
    s = _setup(history, get_task(history.model_spec), ExplainConfig(device="cpu", memory_mb=1, **F64))
    assert s.example_bytes == 0
    assert _Evaluator(s).call_evaluations == s.config.max_batch
    assert any(note.startswith("activation probe failed (NotImplementedError") for note in s.notes)


def test_reverse_mode_is_timed_only_where_the_output_count_leaves_it_a_chance(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.01))
    s = _setup(history, get_task(history.model_spec), ExplainConfig(device="cpu", **F64))
    directions = _direction_count(s)  # Δ and its decay share on 6 tensors, and the residual
    assert (directions, s.outputs, _directional_mode(s)) == (13, 3, None)  # both timed on each pass
    for outputs, mode in ((int(directions / INJECTED_ROW_SHARE), None),
                          (int(directions / INJECTED_ROW_SHARE) + 1, "forward")):
        s.outputs, s.notes = outputs, []
        assert _directional_mode(s) == mode
        assert any("reverse mode not timed" in note for note in s.notes) == (mode == "forward")


@pytest.mark.parametrize("engine", ["jvp", "vjp"])
def test_no_run_imports_the_compiler_stack(tmp_path, engine):
    # torch.func's backward passes import torch._dynamo on first use (a second of start-up, ~70 MiB):
    # a run in either mode — quadrature search, directions or Jacobians, batch and per-example
    # gradients, set-up probes, reverse mode timed against forward mode — has none; nor sympy, which
    # autograd's check of a tensor of grad_outputs imports (0.3 s, ~35 MiB)
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.01))
    code = ("import sys; from engine.decompose import ExplainConfig, explain; "
            f"r = explain({str(history.path)!r}, ExplainConfig(device='cpu', engine={engine!r}, test_size=None, "
            "views=('components', 'data')), "
            "progress=False, trust_run=True); print(r.summary()['engine'], 'torch._dynamo' in sys.modules, "
            "'sympy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"{engine} False False"


@pytest.mark.parametrize("compiler_loaded", [False, True])
def test_reverse_jacobians_equal_jacrev_under_vmap(monkeypatch, compiler_loaded):
    # the engine's reverse mode builds jacrev's Jacobian (and grad's gradient) without its compiled-autograd guard while
    # the compiler stack is unloaded, and is jacrev itself once it is loaded
    if not compiler_loaded:
        monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    else:
        importlib.import_module("torch._dynamo")
    gen = torch.Generator().manual_seed(0)
    w, v, x = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((5, 3), (4, 5, 3), (6, 3)))

    def f(alpha: Tensor, xi: Tensor) -> Tensor:
        hidden = torch.relu((w + torch.einsum("k,kij->ij", alpha, v)) @ xi)
        return torch.log_softmax(hidden * hidden.sum(), dim=0)

    alpha = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ours = torch.func.vmap(lambda a, xi: jacobian(lambda aa: f(aa, xi), a))(alpha, x)
    truth = torch.stack([torch.autograd.functional.jacobian(partial(f, xi=xi), a)
                         for a, xi in zip(alpha, x, strict=True)])
    assert ours.shape == (6, 5, 4)
    torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-12)
    grads = torch.func.vmap(gradient(lambda a, xi: f(a, xi)[0]))(alpha, x)
    torch.testing.assert_close(grads, truth[:, 0], rtol=1e-12, atol=1e-12)
    assert ("torch._dynamo" in sys.modules) == compiler_loaded


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_a_caller_without_gradients_still_gets_the_explanation(tmp_path, context):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.01))
    config = ExplainConfig(device="cpu", test_size=4, views=("components", "data"), dtype="float64")
    with context():
        inside = explain(history.path, config, progress=False, trust_run=True)
    outside = explain(history.path, config, progress=False, trust_run=True)
    assert inside.summary()["max_rel_residual"] < 1e-9
    assert inside.components.equals(outside.components)


def test_per_example_gradients_equal_single_example_autograd(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    task = get_task(history.model_spec)
    s = _setup(history, task, ExplainConfig(views=("data",), device="cpu", **F64))  # against CPU autograd
    side = _TrainSide(s, rule_for(history), per_example=True, residual=True)
    ids = torch.tensor([3, 7, 3, 11])
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    theta = s.flat(history.params(2))
    unique, got = side._one_step_examples(theta, ids, weights)
    net = task.build_model().double()
    net.load_state_dict({k: v.double() for k, v in history.params(2).items()})
    x, y = data()["train"]
    for row, k in enumerate(unique.tolist()):
        total = weights[ids == k].sum()
        loss = F.cross_entropy(net(x[k:k + 1].double()), y[k:k + 1]) * total
        grads = torch.autograd.grad(loss, list(net.parameters()))
        np.testing.assert_allclose(got[row].numpy(), torch.cat([g.reshape(-1) for g in grads]).numpy(),
                                   rtol=1e-12, atol=1e-15)


def test_importance_is_the_absolute_element_influence_and_elements_sum_to_components(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02))
    config = ExplainConfig(views=("components", "importance"), **F64)
    e = explain(history.path, config, progress=False, trust_run=True)
    tests, elements = element_influence(history.path, config, trust_run=True)
    assert tests == e.test_ids
    for tensor, signed in elements.items():
        imp = e.importance.filter(pl.col("tensor") == tensor).sort("index")["importance"].to_numpy()
        np.testing.assert_allclose(imp, signed.abs().sum(dim=(0, 1)).reshape(-1).numpy(), rtol=1e-12)
        per_output = signed.flatten(2).sum(-1).numpy()  # (test, out)
        comp = totals(e.components.filter(pl.col("tensor") == tensor))
        np.testing.assert_allclose(per_output, comp, atol=1e-13)
    final = ParamLayout.from_params(history.params(history.num_steps)).flatten(history.params(history.num_steps))
    np.testing.assert_allclose(e.importance["magnitude"].to_numpy(), final.abs().numpy())


# ------------------------------------------------------------------------------ view contracts
def test_windows_granularity_and_frames_follow_the_contract(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), steps=7)
    single = explain(history.path, ExplainConfig(**F64), progress=False, trust_run=True)
    windowed = explain(history.path, ExplainConfig(window=3, **F64), progress=False, trust_run=True)
    assert windowed.components.select("step_lo", "step_hi").unique().sort("step_lo").rows() == [
        (0, 3), (3, 6), (6, 7)]
    summed = single.components.with_columns((pl.col("step_lo") // 3 * 3).alias("w")).group_by(
        "w", "tensor", "test", "output").agg(pl.col("value").sum()).sort("w", "tensor", "test", "output")
    np.testing.assert_allclose(summed["value"].to_numpy(),
                               windowed.components.sort("step_lo", "tensor", "test", "output")["value"].to_numpy(),
                               atol=1e-14)
    layer = explain(history.path, ExplainConfig(granularity="layer", **F64), progress=False, trust_run=True)
    groups = GroupMap.build(ParamLayout(tuple(history.param_names),
                                        tuple(history.param_shapes[n] for n in history.param_names)),
                            layer_of=get_task(history.model_spec).layer_of)
    expected = aggregate(single.components, groups, "layer")
    assert layer.components["layer"].unique().sort().to_list() == ["body.0", "body.2", "head"]
    np.testing.assert_allclose(layer.components.sort("step_lo", "layer", "test", "output")["value"].to_numpy(),
                               expected.sort("step_lo", "layer", "test", "output")["value"].to_numpy(), atol=1e-14)
    c = single.completeness
    assert c.columns == ["step", "test", "output", "true_change", "reconstructed", "quadrature_residual",
                         "optimizer_residual", "nodes"]
    assert c.height == history.num_steps * len(single.test_ids) * N_OUT
    np.testing.assert_allclose((c["true_change"] - c["reconstructed"]).to_numpy(),
                               c["quadrature_residual"].to_numpy(), atol=1e-15)
    assert single.predictions.columns == ["test", "output", "initial", "true_final", "reconstructed_final"]
    np.testing.assert_allclose(single.predictions["true_final"] - single.predictions["initial"],
                               final_change(history).reshape(-1).numpy(), atol=1e-12)
    summary = single.summary()
    assert summary["gradient_evaluations"] > 0 and summary["partial"] is False


def test_subsampling_reports_skipped_steps_as_residual(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.3), steps=10)
    e = explain(history.path, ExplainConfig(subsample=0.3, **F64), progress=False, trust_run=True)
    kept = e.step_stats.filter(pl.col("kept"))["step"].to_list()
    assert len(kept) == 3
    changes = e.step_stats["loss_change"].abs().to_numpy()
    assert sorted(np.argsort(-changes)[:3].tolist()) == sorted(kept)
    skipped = e.completeness.filter(~pl.col("step").is_in(kept))
    assert (skipped["reconstructed"] == 0).all() and (skipped["nodes"] == 0).all()
    np.testing.assert_array_equal(skipped["quadrature_residual"].to_numpy(), skipped["true_change"].to_numpy())
    assert set(e.components["step_lo"].unique().to_list()) <= set(range(10))
    assert e.max_abs_residual > 1e-3  # the skipped steps show, nothing is hidden
    computed = e.completeness.filter(pl.col("step").is_in(kept))
    assert computed["quadrature_residual"].abs().max() < 1e-12


def test_step_range_carries_optimizer_state_from_step_zero(tmp_path):
    history = record(tmp_path / "run", "ReluNet",
                     lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), steps=8)
    e = explain(history.path, ExplainConfig(steps=(3, 7), views=("components", "data"), **F64),
                progress=False, trust_run=True)
    assert e.completeness["step"].unique().sort().to_list() == [3, 4, 5, 6]
    assert np.abs(totals(e.completeness, "optimizer_residual")).max() < 1e-12
    np.testing.assert_allclose(totals(e.data) + totals(e.completeness, "optimizer_residual"), totals(e.components),
                               atol=1e-12)


# ------------------------------------------------------------------------------ edges
def test_unsupported_optimizer_gives_components_without_decay_split(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01))
    e = explain(history.path, ExplainConfig(**F64), progress=False, trust_run=True)
    assert e.max_rel_residual < 1e-10
    assert e.completeness["optimizer_residual"].null_count() == e.completeness.height
    assert (e.components["decay"] == 0).all() and not e.decay_split
    with pytest.raises(UnsupportedOptimizerError, match="RMSprop"):
        explain(history.path, ExplainConfig(views=("data",), **F64), progress=False, trust_run=True)


def test_without_the_decay_split_components_are_the_same_at_fewer_evaluations(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02))
    split = explain(history.path, ExplainConfig(**F64), progress=False, trust_run=True)
    plain = explain(history.path, ExplainConfig(**F64, decay_split=False), progress=False, trust_run=True)
    assert split.decay_split and not plain.decay_split
    assert (plain.components["decay"] == 0).all() and (split.components["decay"] != 0).any()
    # the choice of evaluation and its counted costs: 6 tensors × (1 + split) + ρ directions, 3 outputs
    assert ("evaluation: vjp (the cheaper); cost per node and test example: 13 forward-mode directions ≈ 6.5 "
            "Jacobian rows (jvp) against 3 rows, one per output (vjp)") in split.notes
    assert ("evaluation: jvp (as asked); cost per node and test example: 7 forward-mode directions ≈ 3.5 "
            "Jacobian rows (jvp) against 3 rows, one per output (vjp)") in explain(
        history.path, ExplainConfig(**F64, decay_split=False, engine="jvp"), progress=False, trust_run=True).notes
    np.testing.assert_allclose(plain.components["value"].to_numpy(), split.components["value"].to_numpy(),
                               rtol=1e-12, atol=1e-14)
    assert plain.completeness["optimizer_residual"].null_count() == plain.completeness.height
    assert plain.gradient_evaluations < split.gradient_evaluations


@pytest.mark.parametrize("views", [("components",), ("components", "data")])
@pytest.mark.parametrize("mode", ["reverse", None])  # reverse throughout; both timed on a sample, then the faster
def test_reverse_mode_with_injected_directions_equals_forward_mode(tmp_path, monkeypatch, views, mode):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02))
    config = ExplainConfig(**F64, engine="jvp", views=views)
    forward = explain(history.path, config, progress=False, trust_run=True)

    def setup_with_mode(*args):
        s = _setup(*args)
        s.directional = mode
        return s

    monkeypatch.setattr("engine.decompose.api._setup", setup_with_mode)
    monkeypatch.setattr("engine.decompose.evaluator.SAMPLE_UNITS", 5)  # the other units by the mode kept
    other = explain(history.path, config, progress=False, trust_run=True)
    measured = [n for n in other.notes if "at the final nodes" in n]
    if mode == "reverse":
        assert other.engine == "jvp+vjp" and not measured
    else:
        assert len(measured) == 1 and "measured the faster on 5 (step, node, test example) units" in measured[0]
        assert other.engine == ("jvp+vjp" if measured[0].startswith("evaluation: reverse")
                                else "jvp")
    for view in views:
        np.testing.assert_allclose(getattr(other, view)["value"].to_numpy(), getattr(forward, view)["value"].to_numpy(),
                                   rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(other.completeness["reconstructed"].to_numpy(),
                               forward.completeness["reconstructed"].to_numpy(),
                               rtol=0, atol=1e-13)
    assert other.max_rel_residual < 1e-10


def test_the_evaluation_mode_is_chosen_on_each_modes_least_time_over_alternating_rounds(tmp_path):
    """One slow round (the machine busy while forward mode is timed) does not decide: forward mode
    measures 5 then 1, reverse mode 2 and 2, and forward mode is kept, at its least time."""
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    s = _setup(history, get_task(history.model_spec), ExplainConfig(device="cpu", **F64))
    ev = _Evaluator(s, None)
    clock = iter([0.0, 5.0, 5.0, 7.0, 7.0, 8.0, 8.0, 10.0])  # (start, end) of forward, reverse, forward, reverse
    ev._clock = lambda: next(clock)
    theta = s.layout.flatten(history.params(0), dtype=torch.float64)
    delta = s.layout.flatten(history.params(1), dtype=torch.float64) - theta
    directions = torch.stack([delta, torch.randn_like(delta)])[None]  # (1 step, 2 directions, D)
    rows = [torch.arange(2)] * len(s.layout.names)
    units = 6
    values = ev.directional(theta[None], delta[None], s.flat_buffers(history.buffers(0))[None],
                            torch.zeros(units, dtype=torch.int64), torch.linspace(0.1, 0.9, units, dtype=torch.float64),
                            directions, rows, s.test_x[:units], s.test_y[:units])
    assert TIMING_ROUNDS == 2
    assert ev.mode == "forward"
    assert ev.measured["forward"] == pytest.approx(1.0 / units) and ev.measured["reverse"] == pytest.approx(2.0 / units)
    forward = ev.units(theta[None], delta[None], s.flat_buffers(history.buffers(0))[None],
                       torch.zeros(units, dtype=torch.int64), torch.linspace(0.1, 0.9, units, dtype=torch.float64),
                       directions, s.test_x[:units], s.test_y[:units])
    torch.testing.assert_close(values, forward, rtol=1e-12, atol=1e-14)


def test_multihead_attention_fast_path_is_avoided(tmp_path):
    history = record(tmp_path / "run", "AttentionNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02), steps=4)
    e = explain(history.path, ExplainConfig(**F64), progress=False, trust_run=True)
    assert e.max_rel_residual < 1e-10
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


def test_model_without_forward_mode_falls_back_to_reverse_mode(tmp_path):
    history = record(tmp_path / "run", "NoForwardNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02), steps=4)
    e = explain(history.path, ExplainConfig(**F64), progress=False, trust_run=True)
    assert e.engine == "vjp"
    assert any("reverse mode" in note for note in e.notes)
    assert e.max_rel_residual < 1e-10
    with pytest.raises(BadInputError, match="forward-mode"):
        explain(history.path, ExplainConfig(engine="jvp", **F64), progress=False, trust_run=True)


def test_cli_takes_the_evaluation_and_the_memory_budget(tmp_path, capsys):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02), steps=4)
    base = ["explain", str(history.path), "--test", "val:all", "--dtype", "float64", "--trust-run", "--json"]
    tables = {}
    for name, flags in (("auto", []), ("jvp", ["--engine", "jvp", "--memory-mb", "1", "--block", "1"])):
        out = tmp_path / f"{name}.duckdb"
        assert main([*base, "--out", str(out), *flags]) == 0
        capsys.readouterr()
        with RunDB.open(out) as db:
            tables[name] = db.component_totals(level="tensor")
        assert main(["info", str(out), "--json"]) == 0
        notes = json.loads(capsys.readouterr().out)["notes"]
        assert any(note.startswith(f"evaluation: {'vjp (the cheaper)' if name == 'auto' else 'jvp (as asked)'}")
                   for note in notes), notes
        blocks = "1 steps per vectorised call (as asked" if name == "jvp" else "4 steps per vectorised call (from"
        assert any(note.startswith(f"evaluation: blocks of {blocks}") for note in notes), notes
    auto, jvp = (tables[name].sort("group") for name in ("auto", "jvp"))
    assert auto["group"].to_list() == jvp["group"].to_list()
    np.testing.assert_allclose(auto["value"].to_numpy(), jvp["value"].to_numpy(), rtol=1e-10, atol=1e-14)
    assert main([*base, "--out", str(tmp_path / "no.duckdb"), "--engine", "jvp", "--views", "importance"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the importance view needs full Jacobians") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "no.duckdb"), "--memory-mb", "0"])
    assert "--memory-mb" in capsys.readouterr().err and not (tmp_path / "no.duckdb").exists()
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "no.duckdb"), "--block", "0"])
    assert "--block" in capsys.readouterr().err and not (tmp_path / "no.duckdb").exists()

class AttentionNet(nn.Module):
    """nn.MultiheadAttention, whose eval fast path has no derivative rules."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(1, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, N_OUT)

    def forward(self, x):
        h = self.inp(x[:, :, None])  # (batch, N_IN, 8)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out((h + a).mean(1))


class _Softplus(torch.autograd.Function):
    """Softplus with a backward rule only: forward-mode AD is not available."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _Tanh(torch.autograd.Function):
    """Tanh with a backward rule only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class NoForwardNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(N_IN, 8)
        self.l2 = nn.Linear(8, N_OUT)

    def forward(self, x):
        return self.l2(_Softplus.apply(self.l1(x)))


def test_interrupt_returns_a_marked_partial_explanation(tmp_path, monkeypatch):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=6)
    original = History.iter_steps

    def interrupted(self, start=0, stop=None):
        for record_ in original(self, start, stop):
            if record_.step == 3:
                signal.raise_signal(signal.SIGINT)
            yield record_

    monkeypatch.setattr(History, "iter_steps", interrupted)
    with pytest.raises(ExplainInterrupted) as info:
        explain(history.path, ExplainConfig(block=1, **F64), progress=False, trust_run=True)
    partial = info.value.partial
    assert partial.partial and partial.summary()["partial"]
    steps = partial.completeness["step"].unique().sort().to_list()
    assert steps == list(range(len(steps))) and 1 <= len(steps) < 6
    assert partial.components["step_hi"].max() == len(steps)


def test_config_is_validated_at_construction():
    for bad in (dict(views=("pixels",)), dict(window=0), dict(quadrature="simpson"), dict(dtype="float16"),
                dict(device="tpu"), dict(subsample=0.0), dict(steps=(4, 2)), dict(test_ids=(1, 1)),
                dict(quantity="probability"), dict(granularity="block"), dict(engine="fd"), dict(test_size=0),
                dict(rtol=0.0), dict(rtol=1.5), dict(rtol=True), dict(rtol=1e-5, quadrature="midpoint:10"),
                dict(views=("data",), decay_split=False)):
        with pytest.raises(BadInputError):
            ExplainConfig(**bad)
    assert ExplainConfig(views="components,data").views == ("components", "data")
    assert parse_test("val:16") == {"test_split": "val", "test_size": 16, "test_ids": None}
    assert parse_test("train:ids=3,5")["test_ids"] == (3, 5)
    assert parse_test("val")["test_size"] is None
    with pytest.raises(BadInputError):
        parse_test("test:3")


def test_adaptive_finds_a_kink_the_end_points_of_the_step_hide(tmp_path):
    spec = {"model": "tests.test_decompose:HiddenKink", "model_kwargs": {}, "data": "tests.test_decompose:one_point",
            "data_kwargs": {}, "loss": "cross_entropy"}
    task = get_task(spec)
    net = task.build_model().double()
    x, y = one_point()["train"]
    optimizer = torch.optim.SGD(net.parameters(), lr=2.0)
    with Recorder(net, optimizer, tmp_path / "run", model_spec=spec, train_data=one_point()["train"],
                  dtype=torch.float64) as rec:
        optimizer.zero_grad()
        F.cross_entropy(net(x.double()), y).backward()
        rec.batch(torch.tensor([0]))
        optimizer.step()
    history = History.open(tmp_path / "run")
    z = [float(p["w1"] * p["w2"]) for p in (history.params(0), history.params(1))]
    assert min(z) > 0  # no sign change between the end points
    e = explain(history.path, ExplainConfig(test_size=None, dtype="float64"), progress=False, trust_run=True)
    np.testing.assert_allclose(totals(e.completeness, "reconstructed"), final_change(history).numpy(),
                               rtol=0, atol=1e-13)
    assert e.max_rel_residual < 1e-12


def test_a_unit_whose_rules_agree_but_miss_its_residual_is_searched_for_hidden_kinks_at_once(tmp_path, monkeypatch):
    """Rules that agree while the residual does not (and not from round-off: float64 here) are both
    off, as at a kink the ends of the step hide: the unit's pieces are searched for one at the
    level they agreed, not after every piece climbed to the top rule. Here every unconverged unit's
    rules are taken to agree; the search finds no kink, and the units climb on to the exact result."""
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    events = []
    evaluate, hidden = stream._Pass._evaluate_pieces, stream._Pass._hidden_kinks

    def evaluated(self, ev, x, y, thetas, deltas, bufs, units, start, width, rule, *args, **kwargs):
        events.append(len(rule))
        return evaluate(self, ev, x, y, thetas, deltas, bufs, units, start, width, rule, *args, **kwargs)

    def searched(self, *args, **kwargs):
        events.append("search")
        return hidden(self, *args, **kwargs)
    monkeypatch.setattr(stream, "agreed", lambda q, q_prev, g_scale, dtype: torch.ones(q.shape[:-1], dtype=torch.bool))
    monkeypatch.setattr(stream._Pass, "_evaluate_pieces", evaluated)
    monkeypatch.setattr(stream._Pass, "_hidden_kinks", searched)
    e = explain(history.path, ExplainConfig(engine="jvp", **F64), progress=False, trust_run=True)
    assert "search" in events and 16 not in events[:events.index("search")]
    assert e.max_rel_residual < 1e-12


@pytest.mark.parametrize(("engine", "forward_ad"), [("jvp", True), ("vjp", True), ("vjp", False)])
def test_adaptive_refines_only_the_piece_that_needs_it(tmp_path, engine, forward_ad):
    """Forward-mode search (then Jacobians at the final nodes for vjp); without forward-mode AD,
    a reverse-mode search that keeps each unit's φ̂ as its pieces climb."""
    spec = {"model": "tests.test_decompose:SaturatingKink", "model_kwargs": {"forward_ad": forward_ad},
            "data": "tests.test_decompose:one_point", "data_kwargs": {}, "loss": "cross_entropy"}
    net = get_task(spec).build_model().double()
    x, y = one_point()["train"]
    optimizer = torch.optim.SGD(net.parameters(), lr=1.5)
    with Recorder(net, optimizer, tmp_path / "run", model_spec=spec, train_data=one_point()["train"],
                  dtype=torch.float64) as rec:
        optimizer.zero_grad()
        F.cross_entropy(net(x.double()), y).backward()
        rec.batch(torch.tensor([0]))
        optimizer.step()
    history = History.open(tmp_path / "run")
    assert float(history.params(0)["w"]) > 0 > float(history.params(1)["w"])  # one kink
    e = explain(history.path, ExplainConfig(test_size=None, dtype="float64", engine=engine,
                                            views=("components", "importance") if engine == "vjp" else ("components",)),
                progress=False, trust_run=True)
    assert e.engine == engine and any("reverse mode" in note for note in e.notes) is not forward_ad
    np.testing.assert_allclose(totals(e.completeness, "reconstructed"), final_change(history).numpy(),
                               rtol=0, atol=1e-14)
    np.testing.assert_allclose(totals(e.components), totals(e.completeness, "reconstructed"), rtol=0, atol=1e-14)
    # the smooth piece climbs alone (one rule for both pieces would give twice its nodes); the
    # constant piece goes down to one node, which integrates it exactly — except in a reverse-mode
    # search, whose units keep φ̂ of the rule they climbed with (two nodes)
    nodes = e.completeness["nodes"].unique().to_list()
    assert len(nodes) == 1 and nodes[0] > 6
    climbed = nodes[0] - (1 if forward_ad else 2)
    assert climbed & (climbed - 1) == 0, nodes  # a power of two: one Gauss rule


def test_quantities_and_exactness_table(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02), steps=5)
    for quantity in ("loss", "logprob", "true-logit", lambda out, y: out.logsumexp(-1)):
        e = explain(history.path, ExplainConfig(quantity=quantity, **F64), progress=False, trust_run=True)
        assert e.outputs == 1 and e.predictions is None
        assert e.max_rel_residual < 1e-9
    table = compare_quadratures(history.path, ("midpoint:10", "adaptive"), ExplainConfig(**F64), trust_run=True)
    assert table["quadrature"].to_list() == ["midpoint:10", "adaptive"]
    assert table.filter(pl.col("quadrature") == "adaptive")["kl"].item() < 1e-15
    assert (table["agreement"] == 1.0).all()


def test_max_rel_residual_is_the_worst_test_example_over_all_its_outputs(tmp_path):
    from engine.store import info, write_run

    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
                     dtype=torch.float32)
    task = get_task(history.model_spec)
    e = explain_history(history, task, ExplainConfig(quadrature="midpoint:2"), progress=False)  # a visible residual
    true = totals(e.completeness, "true_change")
    resid = true - totals(e.completeness, "reconstructed")
    per_test = np.linalg.norm(resid, axis=1) / np.linalg.norm(true, axis=1)
    per_output = np.abs(resid) / np.abs(true)
    assert e.outputs > 1 and per_test.max() > 1e-6
    assert e.max_rel_residual == pytest.approx(per_test.max(), rel=1e-6)
    assert e.max_rel_residual_output == pytest.approx(per_output.max(), rel=1e-6)
    summary = info(write_run(tmp_path / "run.duckdb", e.to_bundle(history, task)))
    assert summary["max_rel_residual"] == pytest.approx(per_test.max(), rel=1e-6)
    assert summary["max_rel_residual_output"] == pytest.approx(per_output.max(), rel=1e-6)


def test_passes_over_disjoint_test_examples_merge_into_the_whole(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02,
                                                                          weight_decay=0.1), steps=4)
    config = ExplainConfig(views=("components", "importance"), test_size=None, dtype="float64")
    whole = explain(history.path, config, progress=False, trust_run=True)
    halves = [explain(history.path, replace(config, test_ids=ids),
                      progress=False, trust_run=True) for ids in ((0, 1, 2), (3, 4, 5))]
    merged = merge_tests(halves)
    assert merged.test_ids == whole.test_ids
    np.testing.assert_allclose(totals(merged.components), totals(whole.components), rtol=1e-12)
    for column in (*IMPORTANCE_SCORES, "magnitude"):  # sums over tests; the magnitude once
        assert whole.importance[column].abs().max() > 0, column
        expected = whole.importance[column].to_numpy()
        np.testing.assert_allclose(merged.importance[column].to_numpy(), expected, rtol=1e-12,
                                   atol=1e-12 * np.abs(expected).max(), err_msg=column)
    assert merged.max_rel_residual == max(h.max_rel_residual for h in halves)
    with pytest.raises(BadInputError, match="disjoint"):
        merge_tests([halves[0], halves[0]])
    other = explain(history.path, replace(config, test_ids=(3,), quantity="loss"), progress=False, trust_run=True)
    with pytest.raises(BadInputError, match="must agree"):
        merge_tests([halves[0], other])
    with pytest.raises(BadInputError, match=r"test id 6 is outside the val split \(0..5\)"):
        explain(history.path, replace(config, test_ids=(1, 6)), progress=False, trust_run=True)


def test_bundle_round_trips_through_the_store(tmp_path):
    from engine.store import RunDB, write_run

    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02,
                                                                               weight_decay=0.1), dtype=torch.float32)
    task = get_task(history.model_spec)
    e = explain_history(history, task, ExplainConfig(views=("components", "data", "importance"), window=2),
                        progress=False)
    bundle = e.to_bundle(history, task)
    assert bundle.meta["max_rel_residual"] == e.max_rel_residual
    assert bundle.steps.height == history.num_steps
    assert set(bundle.examples["split"].unique()) == {"train", "test"}
    path = write_run(tmp_path / "run.duckdb", bundle)
    with RunDB.open(path) as db:
        views = db.views()
        assert views["components"] == e.components.height
        assert views["completeness"] == e.completeness.height
        assert views["importance"] == e.importance.height
        assert db.meta()["quadrature"] == "adaptive"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02), steps=6)
    config = ExplainConfig(views=("components", "data", "importance"), **F64)
    cpu = explain(history.path, replace_device(config, "cpu"), progress=False, trust_run=True)
    gpu = explain(history.path, replace_device(config, "cuda"), progress=False, trust_run=True)
    assert gpu.device.startswith("cuda")
    assert gpu.max_abs_residual < 1e-12
    for name in ("components", "data", "importance"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        value = "importance" if name == "importance" else "value"
        np.testing.assert_allclose(a[value].to_numpy(), b[value].to_numpy(), atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_meets_the_rtol_budget_with_float64_units(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
                     dtype=torch.float32)
    for views in (("components",), ("components", "importance")):
        e = explain(history.path, ExplainConfig(test_size=None, views=views, rtol=1e-9, device="cuda"),
                    progress=False, trust_run=True)
        assert e.device.startswith("cuda") and e.escalated > 0
        assert relative_residuals(e).max() <= 1e-9


def replace_device(config: ExplainConfig, device: str) -> ExplainConfig:
    return replace(config, device=device)


def test_float32_default_reaches_round_off(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
                     dtype=torch.float32)
    e = explain(history.path, ExplainConfig(), progress=False, trust_run=True)
    truth = final_change(history, torch.float32).numpy()
    recon = totals(e.completeness, "reconstructed")
    assert np.abs(recon - truth).max() <= 1e-5 * np.abs(truth).max()
    assert math.isfinite(e.max_rel_residual) and e.seconds > 0


def test_float32_explanations_check_against_the_float64_truth(tmp_path):
    """The true change of a float32 run is g of its recorded parameters evaluated in float64:
    it is the float64 forward pass to round-off of float64, far below float32's."""
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
                     dtype=torch.float32)
    e = explain(history.path, ExplainConfig(test_size=None), progress=False, trust_run=True)
    truth = final_change(history, torch.float64).numpy()
    true_total = totals(e.completeness, "true_change")
    assert np.abs(true_total - truth).max() <= 1e-12 * np.abs(truth).max()
    finals = e.predictions.sort("test", "output")
    assert np.allclose(finals["true_final"].to_numpy() - finals["initial"].to_numpy(), truth.ravel(), atol=1e-12)


def relative_residuals(e) -> np.ndarray:
    """Per test example ‖Σ_s r_s‖ / ‖Σ_s true change‖ (norms over outputs), from the completeness rows."""
    true, recon = totals(e.completeness, "true_change"), totals(e.completeness, "reconstructed")
    return np.linalg.norm(true - recon, axis=1) / np.linalg.norm(true, axis=1)


@pytest.mark.parametrize("views", [("components",), ("components", "importance")])  # forward and reverse mode
def test_rtol_budget_holds_in_float32_by_recomputing_units_in_float64(tmp_path, views):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
                     dtype=torch.float32)
    rtol = 1e-9  # far below float32 round-off: only float64 recomputation can meet it
    plain = explain(history.path, ExplainConfig(test_size=None, views=views), progress=False, trust_run=True)
    budgeted = explain(history.path, ExplainConfig(test_size=None, views=views, rtol=rtol),
                       progress=False, trust_run=True)
    assert plain.escalated == 0 and relative_residuals(plain).max() > rtol
    assert 0 < budgeted.escalated <= budgeted.completeness.filter(pl.col("output") == 0).height
    assert relative_residuals(budgeted).max() <= rtol
    assert budgeted.summary()["escalated"] == budgeted.escalated
    # the components still add up to the reconstruction, and the float64 units to the truth
    recon = totals(budgeted.completeness, "reconstructed")
    np.testing.assert_allclose(totals(budgeted.components), recon, rtol=1e-12, atol=1e-12)
    if "importance" in views:  # per element, float64 units included
        _, influence = element_influence(history, ExplainConfig(test_size=None, rtol=rtol), trust_run=True)
        elements = sum(v.flatten(2).sum(-1) for v in influence.values()).numpy()
        np.testing.assert_allclose(elements, recon, rtol=1e-9, atol=1e-9)


def test_rtol_escalates_when_the_base_rule_is_already_the_top_rule(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
                     dtype=torch.float32)
    plain = explain(history.path, ExplainConfig(test_size=None, quadrature="adaptive:2"),
                    progress=False, trust_run=True)
    budgeted = explain(history.path, ExplainConfig(test_size=None, quadrature="adaptive:2", rtol=1e-9),
                       progress=False, trust_run=True)
    assert relative_residuals(plain).max() > 1e-9
    assert budgeted.escalated > 0 and relative_residuals(budgeted).max() <= 1e-9


def test_rtol_in_float64_stops_early_within_the_budget(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.Adam(m.parameters(), lr=0.02))
    exact = explain(history.path, ExplainConfig(**F64), progress=False, trust_run=True)
    budgeted = explain(history.path, ExplainConfig(**F64, rtol=1e-4), progress=False, trust_run=True)
    assert budgeted.escalated == 0
    assert relative_residuals(budgeted).max() <= 1e-4
    assert budgeted.gradient_evaluations < exact.gradient_evaluations


def test_group_map_labels_overrides_sizes_and_masks():
    layout = ParamLayout(("body.0.weight", "body.0.bias", "body.2.weight", "head.weight"),
                         ((4, 3), (4,), (2, 4), (3, 2)))
    groups = GroupMap.build(layout, modules={"head.weight": "decoder"}, layers={"body.2.weight": "late"})
    assert groups.modules == ("body.0", "body.0", "body.2", "decoder")
    assert groups.layers == ("body", "body", "late", "head")
    assert groups.labels("module") == ["body.0", "body.2", "decoder"]
    assert groups.sizes("layer") == {"body": 16, "late": 8, "head": 6}
    assert layout.total == 30 and layout.offsets == (0, 12, 16, 24)
    index = groups.element_index("module")
    assert index.tolist() == [0] * 16 + [1] * 8 + [2] * 6
    assert torch.equal(groups.masks("layer", torch.float64).sum(1), torch.tensor([16.0, 8.0, 6.0],
                                                                                 dtype=torch.float64))
    flat = torch.arange(30.0)
    assert torch.equal(layout.flatten(layout.unflatten(flat)), flat)
    batched = layout.unflatten(torch.zeros(5, 30))
    assert batched["body.2.weight"].shape == (5, 2, 4)
    assert groups.frame()["position"].to_list() == [0, 1, 2, 3]
    for bad in (dict(modules={"nope": "x"}), dict(layers={"head": "x"})):
        with pytest.raises(BadInputError):
            GroupMap.build(layout, **bad)
    with pytest.raises(BadInputError):
        groups.labels("block")


def test_test_chunks_passes_and_blocks_do_not_change_the_numbers(tmp_path):
    history = record(tmp_path / "run", "ReluNet", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02,
                                                                               weight_decay=0.2), steps=7)
    views = ("components", "data", "importance")
    whole = explain(history.path, ExplainConfig(views=views, window=2, **F64), progress=False, trust_run=True)
    for layout in (dict(test_chunk=2, block=3), dict(test_chunk=4, block=1, engine="vjp"), dict(memory_mb=1)):
        split = explain(history.path, ExplainConfig(views=views, window=2, **layout, **F64),
                        progress=False, trust_run=True)
        for name, keys in (("components", ["step_lo", "tensor", "test", "output"]),
                           ("data", ["step_lo", "train", "test", "output"]),
                           ("completeness", ["step", "test", "output"]), ("importance", ["tensor", "index"])):
            a, b = getattr(whole, name).sort(keys), getattr(split, name).sort(keys)
            assert a.select(keys).equals(b.select(keys)), (name, layout)
            value = {"completeness": "reconstructed", "importance": "importance"}.get(name, "value")
            np.testing.assert_allclose(a[value].to_numpy(), b[value].to_numpy(), atol=1e-13, err_msg=name)
    components_only = explain(history.path, ExplainConfig(test_chunk=2, engine="vjp", **F64),
                              progress=False, trust_run=True)
    np.testing.assert_allclose(totals(components_only.components), totals(whole.components), atol=1e-13)
    fixed = dict(quadrature="midpoint:12", engine="jvp", **F64)  # shared nodes; 1 node per call at max_batch 8
    nodes_together, node_by_node = (explain(history.path, ExplainConfig(max_batch=batch, **fixed), progress=False,
                                            trust_run=True).components for batch in (16384, 8))
    keys = ["step_lo", "tensor", "test", "output"]
    np.testing.assert_allclose(nodes_together.sort(keys)["value"].to_numpy(),
                               node_by_node.sort(keys)["value"].to_numpy(), atol=1e-13)
    forward = explain(history.path, ExplainConfig(views=("components", "data"), window=2, engine="jvp", test_chunk=4,
                                                  block=2, **F64), progress=False, trust_run=True)
    keys = ["step_lo", "train", "test", "output"]
    assert forward.data.sort(keys).select(keys).equals(whole.data.sort(keys).select(keys))
    np.testing.assert_allclose(forward.data.sort(keys)["value"].to_numpy(), whole.data.sort(keys)["value"].to_numpy(),
                               atol=1e-13)
