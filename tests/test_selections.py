"""Selections (max pooling, amax, max/min along a dimension, topk, sort, comparisons): their
switch points along a step, and the adaptive rule that cuts there.

Independent truths: the pooling windows reproduce PyTorch's own max pooling; a margin's sign is
membership among the r largest by sorting; a switch of linear elements sits where the lines
cross; and plain loops of small max-pooling CNNs, recorded with the Recorder, are reconstructed
to round-off against forward passes of the recorded parameters.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.cli import main
from engine.decompose import ExplainConfig, explain
from engine.decompose.quadrature import (
    SwitchRecorder,
    crossings,
    margins,
    pooling_windows,
    refine_zero,
    selections,
)
from engine.model.task import get_task
from engine.run.history import History
from engine.run.record import Recorder
from engine.store import info, write_run


# ------------------------------------------------------------------------------ models and data
class PoolCNN(nn.Module):
    """conv 3×3 → ReLU or tanh → 2×2 max pooling → linear: ``(batch, 1, 8, 8)`` → 3 logits."""

    def __init__(self, act: str = "relu", channels: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels * 16, 3)
        self.act = act

    def forward(self, x):
        h = self.conv(x)
        h = F.relu(h) if self.act == "relu" else torch.tanh(h)
        return self.fc(self.pool(h).flatten(1))


class CumMaxNet(nn.Module):
    """A running maximum over the hidden units (``torch.cummax``): a selection whose switch
    points are not located."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(64, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.cummax(self.hidden(x.flatten(1)), dim=1).values)


def images(n_train: int = 32, n_val: int = 6, seed: int = 0) -> dict:
    """Random 8×8 images with a blank border (equal activations under the convolution there)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n_train + n_val, 1, 8, 8)
    x[:, :, 2:6, 2:6] = torch.randn(n_train + n_val, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n_train + n_val,), generator=g)
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def spec(model: str, **kwargs) -> dict:
    return {"model": f"tests.test_selections:{model}", "model_kwargs": kwargs, "data": "tests.test_selections:images",
            "data_kwargs": {}, "loss": "cross_entropy"}


def record(out, model: str, steps: int = 6, lr: float = 0.2, dtype=torch.float32, **kwargs) -> History:
    """A plain SGD-momentum loop under the Recorder."""
    model_spec = spec(model, **kwargs)
    net = get_task(model_spec).build_model().to(dtype)
    x, y = images()["train"]
    x = x.to(dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with Recorder(net, optimizer, out, model_spec=model_spec, train_data=images()["train"], dtype=dtype) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:8]
            optimizer.zero_grad()
            F.cross_entropy(net(x[ids]), y[ids]).backward()
            rec.batch(ids)
            optimizer.step()
    return History.open(out)


def true_change(history: History) -> np.ndarray:
    """g(θ_N) − g(θ_0) of the val logits by float64 forward passes of freshly built models."""
    task = get_task(history.model_spec)
    x = task.dataset("val").inputs.double()
    out = []
    for step in (0, history.num_steps):
        net = task.build_model().double()
        net.load_state_dict({k: v.double() for k, v in history.params(step).items()})
        with torch.no_grad():
            out.append(net(x).numpy())
    return out[1] - out[0]


def worst_relative(components: pl.DataFrame, truth: np.ndarray) -> float:
    """max over test examples of ‖Σ components − true change‖ / ‖true change‖ (norms over logits)."""
    summed = components.group_by("test", "output").agg(pl.col("value").sum()).sort("test", "output")
    recon = summed["value"].to_numpy().reshape(truth.shape)
    return float((np.linalg.norm(recon - truth, axis=1) / np.linalg.norm(truth, axis=1)).max())


# ------------------------------------------------------------------------------ switching values
@pytest.mark.parametrize(("n", "kwargs"), [
    (1, dict(kernel_size=3, stride=2, padding=1)),
    (2, dict(kernel_size=2)),
    (2, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    (2, dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1))),
    (3, dict(kernel_size=2, stride=1, padding=1)),
])
def test_pooling_windows_reproduce_max_pooling(n, kwargs):
    x = torch.randn(2, 3, *(9,) * n, dtype=torch.float64)
    pool = getattr(F, f"max_pool{n}d")
    out = pool(x, **kwargs)
    windows = pooling_windows(n, False, (x,), kwargs, out)        # (batch, C, *O, K)
    assert torch.equal(windows.amax(-1), out)
    with SwitchRecorder(2) as recorder:
        pool(x, **kwargs)
    plain = recorder.values().reshape(*windows.shape, 2)[..., 0]
    # the maximum's margin is the one positive of a window; a lone element inside padding cannot switch
    choices = (windows.isfinite().sum(-1) > 1).long()
    assert torch.equal((plain > 0).sum(-1), choices) and bool(choices.any())


def test_adaptive_pooling_windows_reproduce_adaptive_max_pooling():
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    out = F.adaptive_max_pool2d(x, (3, 4), return_indices=True)
    assert torch.equal(pooling_windows(2, True, (x, (3, 4)), {"return_indices": True}, out).amax(-1), out[0])


def test_margins_are_positive_exactly_among_the_r_largest():
    window = torch.randn(5, 7, dtype=torch.float64)
    value = margins(window, (1, 3))                                # (5, 7, 6): plain, then grouped
    rank = window.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 for the largest
    for r in (1, 2, 3):
        assert torch.equal(value[..., r - 1] > 0, rank < r)
    assert torch.equal(value[..., 3:], torch.zeros_like(value[..., 3:]))  # no ties: no grouped values


def test_margins_see_a_switch_between_groups_of_equal_elements():
    # two pairs of elements computed alike: a switch from the b's to the a's at t = 0.4
    a, b = lambda t: 0.3 + t, lambda t: 0.5 + 0.5 * t

    def column(t: torch.Tensor) -> torch.Tensor:
        window = torch.stack([a(t), b(t), a(t), b(t)], dim=-1)
        return margins(window, (1, 1)).flatten(-2)                 # (..., 8)

    before, after = column(torch.tensor([0.0], dtype=torch.float64)), column(torch.tensor([1.0], dtype=torch.float64))
    plain = (before[:, ::2] * after[:, ::2] < 0).any()
    assert not plain                                               # 0 against the twin on one side
    t, unit, counts = crossings(before, after)
    assert counts.item() == 4                                      # each element's grouped value
    for u in unit[0].tolist():
        history = [(torch.zeros(1, dtype=torch.float64), before[:, u]), (torch.ones(1, dtype=torch.float64),
                                                                         after[:, u])]
        guess = t[0, :1].clone()
        for _ in range(8):
            guess = refine_zero(guess, column(guess)[:, u], history)
        assert guess.item() == pytest.approx(0.4, abs=1e-14)


def test_switch_recorder_records_each_selection_per_example():
    x = torch.randn(5, 6, dtype=torch.float64)
    cases = [
        (lambda: x.amax(1), 6 * 2),
        (lambda: torch.max(x, dim=1), 6 * 2),
        (lambda: x.topk(2, dim=1), 6 * 4),
        (lambda: x.sort(dim=1), 6 * 10),
        (lambda: x.kthvalue(3, dim=1), 6 * 4),
        (lambda: x.median(dim=1), 6 * 4),
        (lambda: x > 0.5, 6),
        (lambda: torch.maximum(x, x.flip(1)), 6),                 # a kink, as before
        (lambda: x.amax(0), 0),                                     # over the examples: not per example
        (lambda: torch.max(x), 0),
    ]
    for call, columns in cases:
        with SwitchRecorder(5) as recorder:
            call()
        values = recorder.values()
        assert (0 if values is None else values.shape[1]) == columns


def test_selection_probe_names_which_switch_points_are_located():
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    net = PoolCNN().double()
    names = [n for n, _ in net.named_parameters()]

    def g(params: torch.Tensor, cummax: bool) -> torch.Tensor:
        sizes = [p.numel() for p in net.parameters()]
        flat = dict(zip(names, [part.reshape(p.shape) for part, p in zip(params.split(sizes), net.parameters(),
                                                                           strict=True)], strict=True))
        out = torch.func.functional_call(net, flat, (x,))
        return torch.cummax(out, dim=1).values if cummax else out

    params = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert selections(lambda p: g(p, False), params, 4) == {"max_pool2d": True}
    assert selections(lambda p: g(p, True), params, 4) == {"max_pool2d": True, "cummax": False}


# ------------------------------------------------------------------------------ recorded loops
def quadrature_notes(e) -> list[str]:
    """The notes about the quadrature (those on the batch-gradient split and the evaluation are always there)."""
    return [n for n in e.notes if not n.startswith(("data split:", "evaluation:"))]


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_max_pooling_cnn_is_reconstructed_to_round_off(tmp_path, act):
    history = record(tmp_path / "run", "PoolCNN", act=act)
    truth = true_change(history)
    for dtype, bound in (("float32", 1e-5), ("float64", 1e-10)):
        e = explain(history.path, ExplainConfig(dtype=dtype, test_size=None), progress=False, trust_run=True)
        assert worst_relative(e.components, truth) <= bound
        assert quadrature_notes(e) == []
    fixed = explain(history.path, ExplainConfig(dtype="float64", test_size=None, quadrature="gauss:16"),
                    progress=False, trust_run=True)
    assert worst_relative(fixed.components, truth) > 1e-8         # uncut switches cost a fixed rule accuracy


def test_switches_between_equal_activations_and_hidden_ones_are_cut(tmp_path):
    # larger steps: windows of the blank border (equal activations) switch, and switches come and go
    # within one step
    history = record(tmp_path / "run", "PoolCNN", steps=10, lr=0.3)
    e = explain(history.path, ExplainConfig(dtype="float64", test_size=None), progress=False, trust_run=True)
    assert worst_relative(e.components, true_change(history)) <= 1e-10
    assert quadrature_notes(e) == []


def test_the_margin_quantity_is_cut_where_the_runner_up_class_changes(tmp_path):
    # margin = true logit − the largest other: an amax over the classes, in the explained quantity itself
    history = record(tmp_path / "run", "PoolCNN", act="tanh")
    config = ExplainConfig(dtype="float64", test_size=None, quantity="margin", views=())
    assert explain(history.path, config, progress=False, trust_run=True).max_rel_residual < 1e-10
    fixed = explain(history.path, replace(config, quadrature="gauss:16"), progress=False, trust_run=True)
    assert fixed.max_rel_residual > 1e-6


def test_verify_of_a_max_pooling_run_gives_the_same_figure_twice(tmp_path, capsys):
    history = record(tmp_path / "run", "PoolCNN", steps=4)
    figures = []
    for _ in range(2):
        assert main(["verify", str(history.path), "--trust-run", "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out)["max_rel_error"])
    assert figures[0] == figures[1] < 1e-5


def test_a_selection_whose_switches_are_not_located_is_named_with_its_steps(tmp_path):
    history = record(tmp_path / "run", "CumMaxNet", steps=4, lr=0.5)
    e = explain(history.path, ExplainConfig(dtype="float64", test_size=None, views=()), progress=False,
                trust_run=True)
    assert e.max_rel_residual > 1e-10
    (note,) = quadrature_notes(e)
    assert "cummax" in note and "not located" in note
    resid = e.completeness.group_by("step", "test").agg(pl.col("quadrature_residual").abs().max())
    worst = int(resid.sort("quadrature_residual")["step"][-1])
    assert f"steps {worst}" in note or f", {worst}" in note
    write_run(tmp_path / "cummax.duckdb", e.to_bundle(history, get_task(history.model_spec)))
    assert note in info(tmp_path / "cummax.duckdb")["notes"]        # what `engine info` shows
