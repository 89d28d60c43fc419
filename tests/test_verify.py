"""Replay check: every supported optimizer configuration, recorded from a hand-written loop
with unmodified torch.optim, is reproduced by the MATH.md formulas in engine.run.updates."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli import main
from engine.errors import CorruptRunError, UnsupportedOptimizerError
from engine.run.history import History
from engine.run.verify import verify
from tests.helpers import record_tiny_run


def two_groups(cls, **common):
    def make(model):
        return cls([{"params": model.hidden.parameters()},
                    {"params": model.out.parameters(), "lr": common.pop("lr2", 0.02)}], **common)
    return make


CONFIGS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd-wd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.05),
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "sgd-dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8, dampening=0.3,
                                               weight_decay=0.01),
    "sgd-nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                              weight_decay=0.01),
    "sgd-maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5, maximize=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adam-l2": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5, betas=(0.9, 0.98)),
    "adamw-amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam-maximize": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, maximize=True),
    "adamw-groups": two_groups(torch.optim.AdamW, lr=1e-2, weight_decay=0.3),
    "sgd-groups": two_groups(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_replay_matches_torch_optim(tmp_path, name):
    run = record_tiny_run(tmp_path / name, CONFIGS[name], steps=15, chunk_steps=4)
    report = verify(run, progress=False, trust_run=True)
    assert report.steps == 15
    assert report.max_rel_error <= 1e-6, report
    assert report.max_rel_error_raw <= 1e-4, report


@pytest.mark.parametrize("variant", ["schedule", "clip", "weighted", "float64"])
def test_replay_schedules_clipping_weights_precision(tmp_path, variant):
    kwargs = {
        "schedule": {"scheduler": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=15)},
        "clip": {"clip": 0.05},
        "weighted": {"weighted": True},
        "float64": {"dtype": torch.float64},
    }[variant]
    run = record_tiny_run(tmp_path / variant, CONFIGS["adamw"], steps=15, **kwargs)
    report = verify(run, progress=False, trust_run=True)
    assert report.max_rel_error <= 1e-6, report
    if variant == "float64":
        assert report.max_rel_error_raw <= 1e-10, report


def test_replay_detects_a_wrong_record(tmp_path):
    """A tampered learning rate is caught: the check is not a tautology."""
    import polars as pl

    run = record_tiny_run(tmp_path / "r", CONFIGS["sgd-momentum"], steps=6)
    path = run / "chunks" / "chunk-00000000.hparams.parquet"
    frame = pl.read_parquet(path)
    frame.with_columns(pl.when(pl.col("step") == 3).then(pl.col("lr") * 1.01).otherwise(pl.col("lr"))
                       .alias("lr")).write_parquet(path)
    report = verify(run, progress=False, trust_run=True)
    assert report.worst_step == 3
    assert report.max_rel_error > 1e-3


def test_other_optimizer_refused_with_reason(tmp_path):
    run = record_tiny_run(tmp_path / "r", lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1), steps=3)
    with pytest.raises(UnsupportedOptimizerError, match="Adagrad"):
        verify(run, progress=False, trust_run=True)


def test_model_spec_mismatch(tmp_path):
    run = record_tiny_run(tmp_path / "r", CONFIGS["adam"], steps=3)
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["model_kwargs"] = {"hidden": 7}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptRunError, match="shape"):
        verify(run, progress=False, trust_run=True)
    manifest["model"]["model_kwargs"] = {}
    manifest["model"]["data_kwargs"] = {"seed": 3}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptRunError, match="fingerprint"):
        verify(run, progress=False, trust_run=True)


def test_cli_verify_json(tmp_path, capsys):
    run = record_tiny_run(tmp_path / "r", CONFIGS["adamw"], steps=5)
    assert main(["verify", str(run), "--trust-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 5 and out["max_rel_error"] <= 1e-6
    assert main(["verify", str(tmp_path / "missing"), "--json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert History.open(run).num_steps == 5


def test_verify_cross_checks_the_final_parameters_against_the_last_chunk(tmp_path):
    """A finite but different θ_N in final.safetensors passes every per-file check; only the
    cross-check sees that the two records of the final parameters disagree."""
    from safetensors.torch import load_file, save_file

    run = record_tiny_run(tmp_path / "r", CONFIGS["sgd"], steps=4)
    final = run / "final.safetensors"
    tensors = load_file(str(final))
    tensors["out.bias"] = tensors["out.bias"] + 1e-3
    save_file(tensors, str(final))
    History.open(run).params(4)   # readable: the per-file checks pass
    with pytest.raises(CorruptRunError, match=r"final\.safetensors: tensor 'out\.bias' differs from the parameters"):
        verify(run, progress=False, trust_run=True)


def _record_fidelity(out, name: str, data: str, dtype=torch.float32, steps: int = 8):
    import torch.nn.functional as F

    from engine.model.task import get_task
    from engine.run.record import Recorder
    from tests.fidelity_models import spec

    task = get_task(spec(name, data))
    model = task.build_model().to(dtype)
    x, y = task.dataset("train").inputs, task.dataset("train").labels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    with Recorder(model, opt, out, model_spec=spec(name, data), train_data=(x, y), dtype=dtype) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:8]
            opt.zero_grad()
            F.cross_entropy(model(x[ids].to(dtype)), y[ids]).backward()
            rec.batch(ids)
            opt.step()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "data"), [("BatchNormCNN", "images"), ("DropoutMLP", "vectors")])
def test_replay_of_batchnorm_and_dropout_runs(tmp_path, name, data, dtype):
    """The training forward is replayed with its batch statistics and its dropout masks."""
    run = _record_fidelity(tmp_path / "r", name, data, dtype)
    report = verify(run, progress=False, trust_run=True)
    assert report.max_rel_error <= 1e-6, report
    if dtype == torch.float64:
        assert report.max_rel_error_raw <= 1e-10, report
    assert "replayed with the recorded buffers and random state" in report.notes[0]


def test_replay_without_the_random_state_says_so(tmp_path):
    """A dropout run recorded without its random state (schema 1) cannot be replayed: it is named."""
    run = _record_fidelity(tmp_path / "r", "DropoutMLP", "vectors")
    from safetensors.torch import load_file, save_file

    manifest = json.loads((run / "manifest.json").read_text())
    manifest["schema_version"] = 1
    del manifest["training_forward"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    chunk = run / "chunks" / "chunk-00000000.safetensors"
    save_file({k: v for k, v in load_file(str(chunk)).items() if k not in ("random", "rng_cpu")}, str(chunk))
    report = verify(run, progress=False, trust_run=True)
    assert report.max_rel_error > 1e-3
    assert any("records no random state" in note for note in report.notes)


VERIFY_SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from engine.run.verify import verify
print(json.dumps(verify(sys.argv[1], progress=False, trust_run=True).to_json()))
"""


def test_the_figure_does_not_depend_on_the_thread_count(tmp_path):
    """verify in fresh processes with 1 and 8 threads gives the same figures to the last bit. (Unpinned,
    8 threads round this run's float32 gradients differently, and Adam amplifies the difference.)"""
    import subprocess
    import sys

    import torch.nn.functional as F

    from engine.run.record import Recorder
    from tests.helpers import TinyMLP, tiny_data

    spec = {"model": "tests.helpers:TinyMLP", "model_kwargs": {"n_in": 48, "hidden": 64, "n_out": 50},
            "data": "tests.helpers:tiny_data", "data_kwargs": {"n_train": 512, "n_in": 48, "n_out": 50}}
    model = TinyMLP(48, 64, 50)
    x, y = tiny_data(512, 8, 48, 50)["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with Recorder(model, opt, tmp_path / "r", model_spec=spec, train_data=(x, y)) as rec:
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(y)))
            opt.step()
    figures = [json.loads(subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(tmp_path / "r"), threads],
                                         capture_output=True, text=True, check=True).stdout)
               for threads in ("1", "8")]
    assert figures[0] == figures[1]
