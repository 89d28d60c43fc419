"""Importing runs saved in the published explaind package's checkpoint format.

The published package is not needed: ``write_explaind_run`` trains a small model with a
plain ``torch.optim`` optimizer and saves the three files with the structure that
package's wrappers save (lists of state dicts, per-step optimizer moments keyed by the
wrapper model's state-dict names, batches with their example indices).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.decompose import ExplainConfig, explain
from engine.errors import BadInputError, CorruptRunError, RunNotFoundError
from engine.importers.explaind import (
    DATA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    ExplaindOptimizer,
    _load_list,
    add_arguments,
    cmd_import_explaind,
    csv_dataset,
    import_explaind,
)
from engine.run.history import History
from tests.helpers import foreign_payloads

MODEL = "tests.test_import_explaind:TokenNet"
DATA = "tests.test_import_explaind:token_data"
ADAM = {"lr": 0.01, "weight_decay": 0.5, "betas": (0.9, 0.98)}


class TokenNet(nn.Module):
    """Tokens → log-probabilities, like the package's modular-addition classifier.

    ``unused`` never receives a gradient, and the buffer ``scale`` sits between parameters
    in the state dict (it shifts the names the optimizer wrapper gives the moments). The
    embedding starts small (std 0.25): the replay allows one unit in the last place of the
    parameters, and AdamW's float32 decay factor alone can round by most of one on O(1) values.
    """

    def __init__(self, n_token: int = 9, d: int = 6, n_out: int = 5) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.linspace(-1.0, 1.0, 4))
        self.register_buffer("scale", torch.tensor(0.5))
        self.emb = nn.Embedding(n_token, d)
        nn.init.normal_(self.emb.weight, std=0.25)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.emb(tokens).mean(1) / self.scale))  # (batch, d)
        return self.out(h).log_softmax(-1)  # (batch, n_out)


class SlicedNet(nn.Module):
    """Like the package's classifier: a ReLU MLP at every position, the output read at the last."""

    def __init__(self, n_token: int = 9, d: int = 6, n_out: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_token, d)
        self.mix = nn.Linear(d, d)
        self.up = nn.Linear(d, 12)
        self.down = nn.Linear(12, d)
        self.out = nn.Linear(d, n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)                                    # (batch, 4, d)
        x = x + torch.tanh(self.mix(x.mean(1, keepdim=True)))   # positions mixed
        x = x + self.down(F.relu(self.up(x)))                   # kinks at every position
        return self.out(x[:, -1]).log_softmax(-1)               # (batch, n_out)


def token_data(n_train: int = 48, n_val: int = 12, n_token: int = 9, n_out: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, n_token, (n_train + n_val, 4), generator=g)
    y = x.sum(1) % n_out
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


@dataclass(frozen=True)
class Pickled:
    """Stands for a foreign class pickled into a checkpoint file."""

    value: int


def write_explaind_run(
    directory: Path,
    kind: str = "adamw",
    steps: int = 10,
    batch_size: int = 12,
    lr: float = 0.01,
    weight_decay: float = 0.5,
    betas: tuple[float, float] = (0.9, 0.98),
    momentum: float = 0.9,
    dampening: float = 0.0,
    track: bool | None = None,
    schedule: bool = False,
    prefix: str = "model.",
    dtype: torch.dtype = torch.float32,
    model_class: type[nn.Module] = TokenNet,
) -> Path:
    """Train ``model_class`` and save it in the explaind 0.1 file layout; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    track = (kind == "sgd") if track is None else track
    torch.manual_seed(3)
    model = model_class().to(dtype)
    x, y = token_data()["train"]
    x = x.int()  # the package's ClassificationDataset stores tokens as int32
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum,
                              dampening=dampening)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if schedule else None
    keys = [prefix + k for k in model.state_dict()]

    def state() -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def opt_entry() -> dict:
        saved = opt.state_dict()
        entry = {}
        if kind == "adamw":
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = {keys[i]: s[key].clone() for i, s in saved["state"].items()}
        if track:
            entry["lr"] = saved["param_groups"][0]["lr"]
            entry["weight_decay"] = saved["param_groups"][0]["weight_decay"]
        return entry

    params = [state()]
    if kind == "adamw":
        zeros = {prefix + k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        moments = [{"exp_avg_sq": zeros, "exp_avg": dict(zeros)}]
    else:
        moments = [opt_entry()]
    batches: list[dict] = []
    g = torch.Generator().manual_seed(5)
    order: list[torch.Tensor] = []
    for _ in range(steps):
        if not order:
            order = list(torch.randperm(len(y), generator=g).split(batch_size))
        ids = order.pop(0)
        batches.append({"X": x[ids].clone(), "y": y[ids].clone(), "indices": ids.clone()})
        opt.zero_grad()
        F.nll_loss(model(x[ids]), y[ids]).backward()
        opt.step()
        params.append(state())
        moments.append(opt_entry())
        if sched is not None:
            sched.step()
    torch.save(params, directory / MODEL_FILE)
    torch.save(moments, directory / OPTIMIZER_FILE)
    torch.save(batches, directory / DATA_FILE)
    return directory


def run_import(src: Path, out: Path, optimizer: ExplaindOptimizer | None = None, **kwargs) -> Path:
    kwargs.setdefault("dataset", DATA)
    return import_explaind(src, kwargs.pop("model", MODEL), kwargs.pop("model_kwargs", None), out=out,
                           optimizer=optimizer, progress=False, **kwargs)


def replay(run: Path) -> dict:
    return History.open(run).manifest["import"]["replay"]


# ------------------------------------------------------------------------------ exact imports
def test_adamw_import_reproduces_every_update(tmp_path):
    src = write_explaind_run(tmp_path / "src")
    run = run_import(src, tmp_path / "run", ExplaindOptimizer(**ADAM))
    assert replay(run)["max_rel_error"] <= 1e-6
    history = History.open(run)
    assert history.manifest["optimizer"]["data_axis_reason"] is None
    assert history.num_steps == 10 and history.optimizer_family == "adam"
    saved = torch.load(src / MODEL_FILE)
    moments = torch.load(src / OPTIMIZER_FILE)
    batches = torch.load(src / DATA_FILE)
    for step in (0, 4, 9):
        record = history.record(step)
        for name in history.param_names:
            assert torch.equal(record.params[name], saved[step][name])
        assert torch.equal(record.batch_ids, batches[step]["indices"])
        assert torch.allclose(record.batch_weights, torch.full((12,), 1 / 12, dtype=torch.float64))
        assert record.active["unused"] is False and record.active["emb.weight"] is True
        # the wrapper labels emb.weight's moments with the state-dict key before it ("model.scale")
        assert torch.equal(record.second_moment["emb.weight"], moments[step + 1]["exp_avg_sq"]["model.scale"])
        assert record.adam_step["emb.weight"] == step + 1 and record.adam_step["unused"] == 0
    assert torch.equal(history.params(10)["out.bias"], saved[10]["out.bias"])
    assert history.manifest["import"]["hparam_sources"]["lr"] == "given"


def test_adamw_tracked_schedule_uses_recorded_learning_rates(tmp_path):
    """In float64 the replay is exact to round-off, so a learning rate off by one step would show."""
    src = write_explaind_run(tmp_path / "src", track=True, schedule=True, dtype=torch.float64)
    run = run_import(src, tmp_path / "run", ExplaindOptimizer(betas=(0.9, 0.98)))
    assert History.open(run).manifest["dtype"] == "float64"
    assert replay(run)["max_rel_error_raw"] <= 1e-10
    lrs = History.open(run).hparams_table().sort("step")["lr"].to_list()
    assert lrs == pytest.approx([0.01] * 3 + [0.005] * 3 + [0.0025] * 3 + [0.00125])
    assert History.open(run).manifest["import"]["hparam_sources"]["lr"] == "recorded"


def test_unprefixed_moment_keys_are_accepted(tmp_path):
    src = write_explaind_run(tmp_path / "src", prefix="", steps=4)
    run = run_import(src, tmp_path / "run", ExplaindOptimizer(**ADAM))
    assert replay(run)["max_rel_error"] <= 1e-6


@pytest.mark.parametrize(("momentum", "dampening", "given"), [(0.9, 0.0, False), (0.5, 0.2, True)])
def test_sgd_momentum_import_reproduces_every_update(tmp_path, momentum, dampening, given):
    src = write_explaind_run(tmp_path / "src", kind="sgd", lr=0.05, weight_decay=1e-3, momentum=momentum,
                             dampening=dampening)
    cfg = ExplaindOptimizer(momentum=momentum, dampening=dampening) if given else None
    run = run_import(src, tmp_path / "run", cfg)
    history = History.open(run)
    assert replay(run)["max_rel_error"] <= 1e-6
    assert history.optimizer_family == "sgd"
    assert history.manifest["optimizer"]["data_axis_reason"] is None
    assert history.record(0).hparams[0].momentum == momentum
    assert history.record(3).active["unused"] is False


def test_kinks_at_positions_the_output_drops_are_not_cut(tmp_path, monkeypatch):
    """SlicedNet's ReLUs at the first three positions never reach the output: the adaptive rule
    skips their kinks, with fewer nodes and the same exact decomposition."""
    src = write_explaind_run(tmp_path / "src", kind="sgd", lr=0.5, weight_decay=1e-3, steps=6,
                             model_class=SlicedNet)
    run = run_import(src, tmp_path / "run", model="tests.test_import_explaind:SlicedNet")
    config = ExplainConfig(test_split="val", quantity="logits", views=("components",), dtype="float64")
    probed = explain(run, config, progress=False, trust_run=True)
    monkeypatch.setattr("engine.decompose.setup.live_switches", lambda *args, **kwargs: None)
    every = explain(run, config, progress=False, trust_run=True)
    for result in (probed, every):
        assert result.max_rel_residual <= 1e-12
    assert probed.summary()["mean_nodes"] < every.summary()["mean_nodes"]
    columns = ["step_lo", "tensor", "test", "output"]
    a, b = (r.components.sort(columns)["value"].to_numpy() for r in (probed, every))
    assert len(a) == len(b) and np.abs(a - b).max() <= 1e-12 * np.abs(a).max()


def test_tensors_the_output_does_not_use_are_not_evaluated(tmp_path, monkeypatch):
    """TokenNet's ``unused`` tensor cannot change the output: its directions are skipped, its
    components are exactly 0 and every other component is the same."""
    src = write_explaind_run(tmp_path / "src", kind="sgd", lr=0.5, weight_decay=1e-3, steps=4)
    run = run_import(src, tmp_path / "run")
    config = ExplainConfig(test_split="val", quantity="logits", views=("components",), dtype="float64", engine="jvp")
    skipped = explain(run, config, progress=False, trust_run=True)
    monkeypatch.setattr("engine.decompose.setup.live_tensors", lambda *args, **kwargs: None)
    every = explain(run, config, progress=False, trust_run=True)
    assert "the output does not depend on unused: components exactly 0, not evaluated" in skipped.notes
    assert skipped.summary()["gradient_evaluations"] < every.summary()["gradient_evaluations"]
    columns = ["step_lo", "tensor", "test", "output"]
    a, b = (r.components.sort(columns) for r in (skipped, every))
    assert a.filter(pl.col("tensor") == "unused")["value"].abs().max() == 0.0
    assert a.height == b.height and np.abs(a["value"].to_numpy() - b["value"].to_numpy()).max() <= 1e-12
    assert skipped.max_rel_residual <= 1e-12


def test_a_failing_parameter_probe_evaluates_every_tensor(tmp_path, monkeypatch):
    src = write_explaind_run(tmp_path / "src", kind="sgd", lr=0.5, weight_decay=1e-3, steps=3)
    run = run_import(src, tmp_path / "run")

    def fail(*args, **kwargs):
        raise ValueError("a ReLU came out negative")
    monkeypatch.setattr("engine.decompose.setup.live_tensors", fail)
    config = ExplainConfig(test_split="val", views=("components",), dtype="float64", engine="jvp")
    result = explain(run, config, progress=False, trust_run=True)
    assert "parameter probe failed (ValueError: a ReLU came out negative): every tensor is evaluated" in result.notes
    assert not any(note.startswith("the output does not depend on") for note in result.notes)
    assert result.max_rel_residual <= 1e-12


def test_a_failing_kink_probe_keeps_every_kink(tmp_path, monkeypatch):
    """The probe runs the model's own code on a smoothed network; if that fails, every kink is
    cut at as before and the note says why."""
    src = write_explaind_run(tmp_path / "src", kind="sgd", lr=0.5, weight_decay=1e-3, steps=3,
                             model_class=SlicedNet)
    run = run_import(src, tmp_path / "run", model="tests.test_import_explaind:SlicedNet")

    def fail(*args, **kwargs):
        raise ValueError("a ReLU came out negative")
    monkeypatch.setattr("engine.decompose.setup.live_switches", fail)
    result = explain(run, ExplainConfig(test_split="val", views=("components",), dtype="float64"),
                     progress=False, trust_run=True)
    assert "kink probe failed (ValueError: a ReLU came out negative): every kink is cut at" in result.notes
    assert result.max_rel_residual <= 1e-12


def test_sgd_wrong_momentum_withdraws_the_data_view(tmp_path):
    src = write_explaind_run(tmp_path / "src", kind="sgd", lr=0.05, weight_decay=1e-3, steps=6)
    run = run_import(src, tmp_path / "run", ExplaindOptimizer(momentum=0.5))
    assert replay(run)["max_rel_error"] > 1e-2
    reason = History.open(run).data_axis_reason
    assert reason is not None and "replay error" in reason and "momentum" in reason


def test_csv_dataset_beside_the_checkpoints_is_the_default(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=5)
    (src / "dataset").mkdir()
    for split, (x, y) in token_data().items():
        frame = pl.DataFrame({f"t{i}": x[:, i].numpy() for i in range(x.shape[1])}).with_columns(
            pl.Series("target", y.numpy()))
        frame.write_csv(src / "dataset" / f"{split}.csv")
    loaded = csv_dataset(str(src / "dataset"))
    assert torch.equal(loaded["train"][0], token_data()["train"][0])
    assert torch.equal(loaded["val"][1], token_data()["val"][1])
    run = run_import(src, tmp_path / "run", ExplaindOptimizer(**ADAM), dataset=None)
    assert replay(run)["max_rel_error"] <= 1e-6
    assert History.open(run).model_spec["data"] == "engine.importers.explaind:csv_dataset"


def test_cli_handler(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=4)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(src), "--model", MODEL, "--model-kwargs", '{"d": 6}', "--dataset", DATA,
                              "--out", str(tmp_path / "run"), "--lr", "0.01", "--weight-decay", "0.5",
                              "--betas", "0.9,0.98", "--json"])
    result = cmd_import_explaind(args)
    assert result["steps"] == 4 and result["optimizer"] == "AdamW"
    assert result["replay"]["max_rel_error"] <= 1e-6 and result["data_axis"] == "available"
    bad = parser.parse_args([str(src), "--model", MODEL, "--model-kwargs", "[1]", "--out", str(tmp_path / "r2")])
    with pytest.raises(BadInputError, match="--model-kwargs must be a JSON object"):
        cmd_import_explaind(bad)


# ------------------------------------------------------------------------------ wrong settings
def test_adamw_wrong_learning_rate_names_the_implied_values(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=3)
    with pytest.raises(BadInputError, match=r"optimizer_checkpoint\.pt.*lr ≈ 0\.01 and weight_decay ≈ 0\.5"):
        run_import(src, tmp_path / "run", ExplaindOptimizer(lr=0.001, weight_decay=0.5, betas=(0.9, 0.98)))
    assert not (tmp_path / "run").exists()


def test_adamw_wrong_betas_are_reported(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=3)
    with pytest.raises(BadInputError, match=r"imply \(1−β1\)²/\(1−β2\) = 0\.5.*--betas"):
        run_import(src, tmp_path / "run", ExplaindOptimizer(lr=0.01, weight_decay=0.5))


def test_given_value_contradicting_a_tracked_one(tmp_path):
    src = write_explaind_run(tmp_path / "src", kind="sgd", steps=3)
    with pytest.raises(BadInputError, match=r"records lr=0\.01 for step 0, but lr=0\.2"):
        run_import(src, tmp_path / "run", ExplaindOptimizer(lr=0.2))


def test_requested_kind_must_match_the_file(tmp_path):
    src = write_explaind_run(tmp_path / "src", kind="sgd", steps=3)
    with pytest.raises(BadInputError, match=r"holds no moments .* kind 'adamw' was requested"):
        run_import(src, tmp_path / "run", ExplaindOptimizer(kind="adamw"))


# ------------------------------------------------------------------------------ damaged input
def test_missing_directory_and_file(tmp_path):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        run_import(tmp_path / "nowhere", tmp_path / "run")
    src = write_explaind_run(tmp_path / "src", steps=2)
    (src / OPTIMIZER_FILE).unlink()
    with pytest.raises(CorruptRunError, match=r"optimizer_checkpoint\.pt is missing"):
        run_import(src, tmp_path / "run")


def test_truncated_file(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=3)
    data = (src / MODEL_FILE).read_bytes()
    (src / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptRunError, match=r"model_checkpoint\.pt cannot be read.*truncated"):
        run_import(src, tmp_path / "run")


def test_lengths_differ(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=4)
    torch.save(torch.load(src / DATA_FILE)[:-1], src / DATA_FILE)
    with pytest.raises(CorruptRunError, match=r"disagree on the number of steps.*5 state dicts.*3 batches"):
        run_import(src, tmp_path / "run")


def test_shapes_that_do_not_match_the_model(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=2)
    with pytest.raises(BadInputError, match=r"model_checkpoint\.pt: parameter 'emb\.weight' has shape \(9, 6\)"):
        run_import(src, tmp_path / "run", model_kwargs={"d": 7})


def test_batch_indices_out_of_range(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=3)
    batches = torch.load(src / DATA_FILE)
    batches[1]["indices"] = batches[1]["indices"] + 100
    torch.save(batches, src / DATA_FILE)
    with pytest.raises(BadInputError, match=r"data_checkpoint\.pt: batch 1 has example indices .* outside"):
        run_import(src, tmp_path / "run")


def test_batches_from_another_dataset(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=2)
    with pytest.raises(BadInputError, match=r"data_checkpoint\.pt: the inputs or labels of batch 0 differ"):
        run_import(src, tmp_path / "run", data_kwargs={"seed": 1})


def test_non_finite_parameters(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=3)
    params = torch.load(src / MODEL_FILE)
    params[2]["out.bias"][0] = float("nan")
    torch.save(params, src / MODEL_FILE)
    with pytest.raises(CorruptRunError, match=r"'out\.bias' contains NaN or Inf in state dict 2"):
        run_import(src, tmp_path / "run")


def test_pickled_classes_and_foreign_content_are_refused(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=2)
    torch.save([Pickled(1), Pickled(2), Pickled(3)], src / OPTIMIZER_FILE)
    refused = r"(?s)optimizer_checkpoint\.pt holds pickled Python objects.*Pickled.*weights_only=True"
    with pytest.raises(CorruptRunError, match=refused):
        run_import(src, tmp_path / "run")
    torch.save({"not": "a list"}, src / OPTIMIZER_FILE)
    with pytest.raises(CorruptRunError, match=r"optimizer_checkpoint\.pt holds a dict"):
        run_import(src, tmp_path / "run")


def test_dataset_option_must_name_something(tmp_path):
    src = write_explaind_run(tmp_path / "src", steps=2)
    with pytest.raises(BadInputError, match=r"dataset/train\.csv does not exist"):
        run_import(src, tmp_path / "run", dataset=None)
    with pytest.raises(BadInputError, match="neither an import path"):
        run_import(src, tmp_path / "run", dataset=str(tmp_path / "nothing-here"))


@pytest.mark.filterwarnings("error")
def test_any_foreign_or_truncated_bytes_are_named_not_raised(tmp_path):
    file = tmp_path / MODEL_FILE
    for payload in foreign_payloads(seed=0):
        file.write_bytes(payload)
        with pytest.raises(CorruptRunError, match=r"model_checkpoint\.pt .*(truncated or foreign|holds a)"):
            _load_list(file, "model state dicts")
