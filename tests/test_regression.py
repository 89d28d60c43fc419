"""Any loss, any quantity: MSE regression and losses named by import path, end to end.

A plain regression loop (MSE, SGD with momentum and weight decay) is recorded, replayed,
explained and shown: its components and its data view (every training example plus the
weight-decay pseudo-example) add up to the change of the outputs computed by independent
forward passes of the recorded parameters. Losses and explained quantities given as import
paths run the user's own functions; the functions here are importable by path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import streamlit as st
import torch
import torch.nn.functional as F
from streamlit.testing.v1 import AppTest
from torch import nn

from app import state
from engine.cli import main
from engine.decompose import ExplainConfig, explain
from engine.errors import BadInputError
from engine.model.outputs import get_quantity, imported_quantity
from engine.model.task import Dataset, get_task
from engine.run.history import History
from engine.run.record import Recorder
from engine.store import RunDB, TestSelector

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
N_IN = 5


# ------------------------------------------------------------------------------ the user's code
class Regressor(nn.Module):
    """A tanh MLP with ``outputs`` real outputs."""

    def __init__(self, outputs: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(N_IN, 8)
        self.out = nn.Linear(8, outputs)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def targets(n_train: int = 24, n_val: int = 6, outputs: int = 1, seed: int = 0) -> dict:
    """Inputs and float targets ``sin(x·w)`` (``(n,)`` for one output, ``(n, outputs)`` for more)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, N_IN, generator=g)
    y = torch.sin(x @ torch.randn(N_IN, outputs, generator=g))
    y = y[:, 0] if outputs == 1 else y
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def classes(n_train: int = 24, n_val: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, N_IN, generator=g)
    y = torch.randint(0, 3, (n_train + n_val,), generator=g)
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def smoothed_cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A per-example loss of integer class ids, named by import path."""
    return F.cross_entropy(output, labels, reduction="none", label_smoothing=0.1)


def huber(output: torch.Tensor, target: torch.Tensor, delta: float = 0.5) -> torch.Tensor:
    """A per-example loss of float targets, named by import path (written out: ``F.huber_loss``
    has no batching rule for nested ``vmap`` in torch 2.13)."""
    error = (output - target.reshape(output.shape)).abs()
    return torch.where(error < delta, 0.5 * error**2, delta * (error - 0.5 * delta)).mean(1)


def batch_mean(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Not a per-example loss: one number for the batch."""
    return F.mse_loss(output, target.reshape(output.shape))


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An explained quantity: the squared error of the first output."""
    return (output[:, 0] - target.reshape(output.shape[0], -1)[:, 0]) ** 2


def spec(loss: str = "mse", data: str = "targets", outputs: int = 1) -> dict:
    return {"model": "tests.test_regression:Regressor", "model_kwargs": {"outputs": outputs},
            "data": f"tests.test_regression:{data}", "data_kwargs": {"outputs": outputs} if data == "targets" else {},
            "loss": loss}


# the batch loss each loop minimises, written as a user would (independent of the engine's losses)
BATCH_LOSSES = {
    "mse": lambda out, y: F.mse_loss(out, y.reshape(out.shape)),
    "tests.test_regression:huber": lambda out, y: huber(out, y).mean(),
    "tests.test_regression:smoothed_cross_entropy": lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),
}


def record(out: Path, model_spec: dict, dtype=torch.float32, steps: int = 8) -> History:
    """A plain loop: the user's own loss on the batch, SGD with momentum and weight decay."""
    task = get_task(model_spec)
    net = task.build_model().to(dtype)
    train = task.dataset("train")
    x, y = train.inputs.to(dtype), (train.labels.to(dtype) if train.regression else train.labels)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    with Recorder(net, optimizer, out, model_spec=model_spec, train_data=(train.inputs, train.labels),
                  dtype=dtype) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:8]
            optimizer.zero_grad()
            loss = BATCH_LOSSES[model_spec["loss"]](net(x[ids]), y[ids])
            loss.backward()
            rec.batch(ids)
            optimizer.step()
            rec.log(train_loss=loss.item())
    return History.open(out)


def true_change(history: History) -> np.ndarray:
    """g(θ_N) − g(θ_0) of the val outputs by float64 forward passes of freshly built models."""
    task = get_task(history.model_spec)
    x = task.dataset("val").inputs.double()
    out = []
    for step in (0, history.num_steps):
        net = task.build_model().double()
        net.load_state_dict({k: v.double() for k, v in history.params(step).items()})
        with torch.no_grad():
            out.append(net(x).numpy())
    return out[1] - out[0]


def worst_relative(frame: pl.DataFrame, truth: np.ndarray) -> float:
    """max over test examples of ‖Σ values − true change‖ / ‖true change‖ (norms over outputs)."""
    summed = frame.group_by("test", "output").agg(pl.col("value").sum()).sort("test", "output")
    recon = summed["value"].to_numpy().reshape(truth.shape)
    return float((np.linalg.norm(recon - truth, axis=1) / np.linalg.norm(truth, axis=1)).max())


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_mse_regression_components_and_data_add_up_to_the_true_change(tmp_path, capsys, dtype, bound):
    history = record(tmp_path / "run", spec(outputs=2), dtype=dtype)
    figures = []
    for _ in range(2):  # the replay: no traceback, the same figure twice
        assert main(["verify", str(history.path), "--trust-run", "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out)["max_rel_error"])
    assert figures[0] == figures[1] < 1e-5
    name = str(dtype).removeprefix("torch.")
    e = explain(history.path, ExplainConfig(dtype=name, test_size=None, views=("components", "data")), progress=False,
                trust_run=True)
    truth = true_change(history)
    assert worst_relative(e.components, truth) <= bound
    assert worst_relative(e.data, truth) <= bound          # every training example and the weight decay
    assert (-1 in e.data["train"].to_list()) and e.regression and e.exactness() is None


def test_loss_quantity_is_the_runs_own_loss(tmp_path):
    history = record(tmp_path / "run", spec(loss="tests.test_regression:huber", outputs=2), dtype=torch.float64,
                     steps=4)
    e = explain(history.path, ExplainConfig(dtype="float64", test_size=None, quantity="loss", views=()),
                progress=False, trust_run=True)
    task = get_task(history.model_spec)
    val = task.dataset("val")
    losses = []
    for step in (0, history.num_steps):
        net = task.build_model().double()
        net.load_state_dict({k: v.double() for k, v in history.params(step).items()})
        with torch.no_grad():
            losses.append(huber(net(val.inputs.double()), val.labels.double()).numpy())
    change = e.completeness.group_by("test").agg(pl.col("true_change").sum()).sort("test")["true_change"]
    np.testing.assert_allclose(change.to_numpy(), losses[1] - losses[0], rtol=1e-12, atol=1e-15)
    assert e.max_rel_residual < 1e-10


def test_a_loss_of_integer_targets_by_import_path_records_and_replays(tmp_path):
    model_spec = {**spec(loss="tests.test_regression:smoothed_cross_entropy", data="classes"),
                  "model_kwargs": {"outputs": 3}}
    history = record(tmp_path / "run", model_spec, dtype=torch.float64, steps=4)
    assert main(["verify", str(history.path), "--trust-run", "--json"]) == 0
    e = explain(history.path, ExplainConfig(dtype="float64", test_size=None, views=("components", "data")),
                progress=False, trust_run=True)
    assert worst_relative(e.data, true_change(history)) <= 1e-10
    assert not e.regression and e.exactness() is not None


def test_explain_cli_takes_a_quantity_by_import_path_and_writes_a_regression_database(tmp_path, capsys):
    history = record(tmp_path / "run", spec(), steps=4)
    out = tmp_path / "reg.duckdb"
    path = "tests.test_regression:squared_error"
    assert main(["explain", str(history.path), "--out", str(out), "--test", "val:all", "--views",
                 "components,data", "--quantity", path, "--dtype", "float64", "--trust-run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantity"] == path and summary["max_rel_residual"] < 1e-10
    task = get_task(history.model_spec)
    val = task.dataset("val")
    values = []
    for step in (0, history.num_steps):  # the quantity of the recorded parameters, directly
        net = task.build_model().double()
        net.load_state_dict({k: v.double() for k, v in history.params(step).items()})
        with torch.no_grad():
            values.append(squared_error(net(val.inputs.double()), val.labels.double()).numpy())
    db = RunDB.open(out)
    try:
        assert db.meta()["quantity"] == path and db.meta()["targets"] == "float"
        test = db.examples("test")
        assert test["label"].null_count() == test.height == 6 and test["correct"].null_count() == 6
        assert all("→ target" in t and "final output" in t for t in test["text"].to_list())
        assert db.exactness().height == 0
        stored = [db.completeness(tests=TestSelector("example", i))["true_change"].sum() for i in range(6)]
    finally:
        db.close()
    np.testing.assert_allclose(stored, values[1] - values[0], rtol=1e-12, atol=1e-15)
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantity"] == path


@pytest.mark.parametrize(("argv", "message"), [
    (["--quantity", "tests.test_regression:nothing"], "no attribute 'nothing'"),
    (["--quantity", "true-logit"], "reads the class of each example"),
    (["--exactness", "midpoint:10"], "--exactness compares predicted classes"),
])
def test_explain_cli_refuses_what_a_regression_run_cannot_give(tmp_path, capsys, argv, message):
    history = record(tmp_path / "run", spec(), steps=2)
    out = tmp_path / "reg.duckdb"
    assert main(["explain", str(history.path), "--out", str(out), "--trust-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"loss": "hinge"}, "loss 'hinge' is not supported"),
    ({"loss": "tests.test_regression:missing"}, "no attribute 'missing'"),
    ({"loss": "cross_entropy"}, "cross_entropy needs integer class ids"),
    ({"loss": "mse", "data": "tests.test_regression:classes", "data_kwargs": {}}, "mse needs floating-point"),
])
def test_bad_losses_are_named(changes, message):
    with pytest.raises(BadInputError, match=message):
        get_task({**spec(), **changes}).dataset("train")


def test_a_loss_that_is_not_per_example_is_refused_with_its_shape():
    task = get_task(spec(loss="tests.test_regression:batch_mean"))
    with pytest.raises(BadInputError, match=r"returned \(\) for a batch of 4; it must return one loss per example"):
        task.per_example_loss(torch.zeros(4, 1), torch.zeros(4))


def test_float_targets_are_rendered_and_class_quantities_refused():
    data = Dataset(inputs=torch.tensor([[0.5, 1.0]]), labels=torch.tensor([0.25]), kind="generic")
    assert data.regression and data.render(0) == "[0.5, 1] → target 0.25"
    with pytest.raises(BadInputError, match="reads the class of each example"):
        get_quantity("margin")(torch.zeros(1, 3), torch.zeros(1))
    assert get_quantity("loss", loss=huber).fn is huber
    assert imported_quantity("tests.test_regression:squared_error").name == "tests.test_regression:squared_error"


# ------------------------------------------------------------------------------ dashboard
def test_dashboard_shows_a_regression_run_without_classes(tmp_path, monkeypatch):
    history = record(tmp_path / "run", spec(), steps=4)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert main(["explain", str(history.path), "--out", str(runs / "reg.duckdb"), "--test", "val:all",
                 "--views", "components,data", "--trust-run", "--json"]) == 0
    monkeypatch.setenv(state.ENV_RUNS, str(runs))
    try:
        for page in ("overview", "components", "data", "reconstruction"):
            at = AppTest.from_file(MAIN, default_timeout=60)
            at.query_params = {"subset": "example", "example": "2"}
            at = at.switch_page(f"views/{page}.py").run()
            assert not at.exception and not at.error, page
            if page != "overview":
                assert at.selectbox(key="url:subset").options == ["all test examples", "one example"]
                captions = " ".join(c.value for c in at.caption) + " ".join(m.value for m in at.markdown)
                assert "test #2" in captions and "label" not in captions
        assert any("floating-point" in i.value for i in at.info)  # the reconstruction page: no exactness table
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()
