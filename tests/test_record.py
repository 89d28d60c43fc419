"""Recorder and History: round trip, chunking, crash safety, flat memory, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.errors import (
    BadInputError,
    CorruptRunError,
    IncompleteRunError,
    RunNotFoundError,
    SchemaVersionError,
)
from engine.run.history import History
from engine.run.record import Recorder
from tests.helpers import TinyMLP, record_tiny_run, tiny_data, tiny_spec

REPO = Path(__file__).resolve().parents[1]


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def test_round_trip_matches_live_parameters(tmp_path):
    """Parameters read back equal those seen live, across chunk boundaries."""
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = tiny_data()["train"]
    seen = []
    with Recorder(model, opt, tmp_path / "r", model_spec=tiny_spec(), train_data=(x, y), chunk_steps=3) as rec:
        for step in range(8):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(y)))
            opt.step()
            rec.log(train_loss=float(step))
    seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
    h = History.open(tmp_path / "r")
    assert h.num_steps == 8 and h.complete
    assert len(h.manifest["chunks"]) == 3
    for s in range(9):
        for n, t in h.params(s).items():
            assert torch.equal(t, seen[s][n]), (s, n)
    records = list(h.iter_steps())
    assert [r.step for r in records] == list(range(8))
    for r in records:
        for n in h.param_names:
            assert torch.equal(r.update[n], seen[r.step + 1][n] - seen[r.step][n])
        assert r.adam_step[n] == r.step + 1
        assert r.batch_weights.sum().item() == pytest.approx(1.0)
    assert h.metrics()["train_loss"].to_list() == [float(s) for s in range(8)]


def test_hyperparameters_schedule_and_clip_scale(tmp_path):
    def sgd(model):
        return torch.optim.SGD(
            [{"params": model.hidden.parameters(), "lr": 0.1},
             {"params": model.out.parameters(), "lr": 0.05, "weight_decay": 0.01}],
            momentum=0.9, nesterov=True,
        )

    run = record_tiny_run(tmp_path / "r", sgd, steps=6, clip=0.05,
                          scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5))
    h = History.open(run)
    lrs = [r.hparams[0].lr for r in h.iter_steps()]
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    r = h.record(0)
    assert r.hparams[1].weight_decay == 0.01 and r.hparams[0].nesterov
    assert h.param_group == {"hidden.weight": 0, "hidden.bias": 0, "out.weight": 1, "out.bias": 1}
    assert all(0 < rec.clip_scale < 1 for rec in h.iter_steps())  # the clip bites at 0.05


def test_non_uniform_clipping_refuses_data_axis(tmp_path):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = tiny_data()["train"]
    with Recorder(model, opt, tmp_path / "r", model_spec=tiny_spec(), train_data=(x, y)) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        rec.batch(torch.arange(len(y)))
        opt.step()
    h = History.open(tmp_path / "r")
    assert "clip_grad_value_" in h.data_axis_reason


def test_other_optimizer_recorded_with_reason(tmp_path):
    run = record_tiny_run(tmp_path / "r", lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2), steps=3)
    h = History.open(run)
    assert h.optimizer_family == "other"
    assert "RMSprop" in h.data_axis_reason
    assert h.num_steps == 3


def test_exception_marks_incomplete_and_keeps_chunks(tmp_path):
    model = TinyMLP()
    opt = adamw(model)
    x, y = tiny_data()["train"]
    with pytest.raises(RuntimeError, match="boom"), \
            Recorder(model, opt, tmp_path / "r", model_spec=tiny_spec(), train_data=(x, y), chunk_steps=4) as rec:
        for step in range(10):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(y)))
            opt.step()
            if step == 6:
                raise RuntimeError("boom")
    with pytest.raises(IncompleteRunError, match="did not finish"):
        History.open(tmp_path / "r")
    h = History.open(tmp_path / "r", allow_incomplete=True)
    assert h.num_steps == 7
    assert torch.equal(h.params(7)["out.weight"], model.out.weight.detach())


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    sys.path.insert(0, {repo!r})
    from engine.run.record import Recorder
    from tests.helpers import TinyMLP, tiny_data, tiny_spec
    model = TinyMLP(); opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = tiny_data()["train"]
    rec = Recorder(model, opt, sys.argv[1], model_spec=tiny_spec(), train_data=(x, y), chunk_steps=5)
    step = 0
    while True:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward()
        rec.batch(torch.arange(len(y))); opt.step(); step += 1
        if step == 23:
            print("ready", flush=True)
""")


def test_killed_recording_leaves_readable_incomplete_run(tmp_path):
    """SIGKILL mid-training: every flushed chunk stays readable, the run reads as incomplete."""
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(repo=str(REPO)), str(run)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(IncompleteRunError):
        History.open(run)
    h = History.open(run, allow_incomplete=True)
    assert h.num_steps >= 20 and h.num_steps % 5 == 0
    assert len(list(h.iter_steps())) == h.num_steps


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, torch.nn.functional as F
    sys.path.insert(0, {repo!r})
    from engine.run.record import Recorder
    from tests.helpers import TinyMLP, tiny_data, tiny_spec
    model = TinyMLP(hidden=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = tiny_data()["train"]
    with Recorder(model, opt, sys.argv[1], model_spec=tiny_spec(hidden=512), train_data=(x, y),
                  chunk_steps=16) as rec:
        for step in range(int(sys.argv[2])):
            opt.zero_grad(); F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(y))); opt.step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_recording_memory_is_flat_in_steps(tmp_path):
    """Peak RSS of recording 400 steps is within a small margin of recording 50 steps."""
    peaks = []
    for steps in (50, 400):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(repo=str(REPO)),
                              str(tmp_path / f"r{steps}"), str(steps)],
                             capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip()))
    step_bytes = (4 * 512 + 512 + 512 * 3 + 3) * 4 * 2  # θ and v per step, float32
    growth_kib = peaks[1] - peaks[0]
    assert growth_kib * 1024 < 50 * step_bytes, (peaks, step_bytes)


def _record_ok(tmp_path) -> Path:
    return record_tiny_run(tmp_path / "ok", adamw, steps=6, chunk_steps=3)


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        History.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptRunError, match=r"no manifest\.json"):
        History.open(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(CorruptRunError, match="not an ExPLAIND Studio run"):
        History.open(tmp_path / "foreign")


def test_truncated_manifest_and_chunk(tmp_path):
    run = _record_ok(tmp_path)
    manifest = run / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(CorruptRunError, match="not valid JSON"):
        History.open(run)
    manifest.write_text(text)
    chunk = run / "chunks" / "chunk-00000003.safetensors"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:100])
    with pytest.raises(CorruptRunError, match=r"chunk-00000003\.safetensors is not valid safetensors"):
        History.open(run)  # every file's layout is checked on open, not when its steps are first read
    chunk.write_bytes(good)
    (run / "chunks" / "chunk-00000000.batches.parquet").unlink()
    with pytest.raises(CorruptRunError, match=r"batches\.parquet is missing"):
        History.open(run)


def test_newer_schema_refused(tmp_path):
    run = _record_ok(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        History.open(run)


def test_shape_mismatch_and_nan_detected(tmp_path):
    from safetensors.torch import load_file, save_file

    run = _record_ok(tmp_path)
    path = run / "chunks" / "chunk-00000000.safetensors"
    tensors = load_file(str(path))
    bad = dict(tensors)
    bad["theta/out.weight"] = torch.zeros(3, 2, 2)
    save_file(bad, str(path))
    with pytest.raises(CorruptRunError, match=r"'theta/out.weight' has shape \(3, 2, 2\)"):
        History.open(run).params(0)
    bad = dict(tensors)
    bad["theta/out.bias"] = tensors["theta/out.bias"].clone()
    bad["theta/out.bias"][1, 0] = float("nan")
    save_file(bad, str(path))
    with pytest.raises(CorruptRunError, match=r"NaN or Inf .* step 1"):
        History.open(run).params(0)


def test_batch_ids_outside_dataset(tmp_path):
    model = TinyMLP()
    opt = adamw(model)
    rec = Recorder(model, opt, tmp_path / "r", model_spec=tiny_spec(), train_data=tiny_data()["train"])
    with pytest.raises(BadInputError, match=r"outside the training set \(valid ids are 0..23\)"):
        rec.batch([0, 5, 24])
    with pytest.raises(BadInputError, match="2 weights for 3 ids"):
        rec.batch([0, 1, 2], weights=[0.5, 0.5])
    rec.close()


def test_batch_ids_outside_dataset_in_file(tmp_path):
    import polars as pl

    run = _record_ok(tmp_path)
    path = run / "chunks" / "chunk-00000000.batches.parquet"
    frame = pl.read_parquet(path).with_columns(pl.lit(99, dtype=pl.Int64).alias("example"))
    frame.write_parquet(path)
    with pytest.raises(CorruptRunError, match="outside the training set"):
        History.open(run).params(0)


def test_step_without_batch_and_existing_directory(tmp_path):
    run = _record_ok(tmp_path)
    model = TinyMLP()
    with pytest.raises(BadInputError, match="already exists"):
        Recorder(model, adamw(model), run, model_spec=tiny_spec(), train_data=tiny_data()["train"])
    opt = adamw(model)
    x, y = tiny_data()["train"]
    rec = Recorder(model, opt, tmp_path / "nobatch", model_spec=tiny_spec(), train_data=(x, y))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(BadInputError, match=r"without rec.batch\(ids\)"):
        opt.step()
    rec.close()


# ------------------------------------------------------------------ buffers, random state, the spec
def _fidelity_loop(out: Path, name: str, data: str, steps: int = 6, chunk_steps: int | None = None,
                   forwards: int = 1, permute: bool = False) -> tuple[list[dict], list[torch.Tensor]]:
    """Train a model of tests.fidelity_models; return the floating buffers after each step (and
    before the first) and the training forward's output of each step."""
    from engine.model.task import get_task
    from tests.fidelity_models import spec

    task = get_task(spec(name, data))
    model = task.build_model()
    x, y = task.dataset("train").inputs, task.dataset("train").labels
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    buffers = [{n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}]
    outputs = []
    with Recorder(model, opt, out, model_spec=spec(name, data), train_data=(x, y), chunk_steps=chunk_steps) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:8]
            opt.zero_grad()
            rows = ids.flip(0) if permute else ids
            for _ in range(forwards):
                output = model(x[rows])
                F.cross_entropy(output, y[rows]).div(forwards).backward()
            outputs.append(output.detach())
            rec.batch(ids)
            opt.step()
            buffers.append({n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()})
    return buffers, outputs


def test_buffers_are_recorded_at_every_step(tmp_path):
    """b_s read back equals the live buffers after step s − 1, across chunks; integers are not recorded."""
    live, _ = _fidelity_loop(tmp_path / "bn", "BatchNormCNN", "images", steps=7, chunk_steps=3)
    h = History.open(tmp_path / "bn")
    assert h.changing_buffers == ["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"]
    assert "bn1.num_batches_tracked" not in h.buffer_shapes
    for step in range(8):
        for name, value in h.buffers(step).items():
            assert torch.equal(value, live[step][name]), (step, name)
    for record in h.iter_steps():
        assert all(torch.equal(record.buffers[n], live[record.step][n]) for n in h.buffer_shapes)
        assert all(torch.equal(record.buffers_after[n], live[record.step + 1][n]) for n in h.buffer_shapes)
        assert record.rng is None  # BatchNorm draws no random numbers
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "bn" / "final.safetensors"))
    assert torch.equal(final["bn2.running_var"], live[-1]["bn2.running_var"])


def test_a_buffer_that_never_changes_is_stored_once(tmp_path):
    run = record_tiny_run(tmp_path / "r", adamw, steps=3)
    h = History.open(run)
    assert h.buffer_shapes == {} and h.changing_buffers == []
    assert h.training_forward["random"] is False and h.training_forward["irregular"] is None


def test_the_random_state_of_each_training_forward_is_recorded(tmp_path):
    """Restoring a step's recorded generator state reproduces that step's dropout masks exactly."""
    from engine.model.task import get_task

    _, outputs = _fidelity_loop(tmp_path / "drop", "DropoutMLP", "vectors")
    h = History.open(tmp_path / "drop")
    assert h.training_forward["random"] is True
    model = get_task(h.model_spec).build_model()
    x = get_task(h.model_spec).dataset("train").inputs
    for record in h.iter_steps():
        assert record.rng is not None
        model.load_state_dict(record.params, strict=False)
        torch.set_rng_state(record.rng.cpu.clone())
        with torch.no_grad():
            assert torch.equal(model(x[record.batch_ids]), outputs[record.step])


@pytest.mark.parametrize(("forwards", "permute", "reason"), [(2, False, "ran 2 forwards"),
                                                             (1, True, "row by row")])
def test_a_training_forward_the_replay_cannot_reproduce_is_named(tmp_path, forwards, permute, reason):
    _fidelity_loop(tmp_path / "r", "DropoutMLP", "vectors", steps=2, forwards=forwards, permute=permute)
    assert reason in History.open(tmp_path / "r").training_forward["irregular"]


class TinyMLPRelu(TinyMLP):
    """TinyMLP's parameters with another activation: a spec naming TinyMLP does not describe it."""

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


@pytest.mark.parametrize(("live", "spec", "message"), [
    (TinyMLP(hidden=7), tiny_spec(), r"'hidden.weight' has shape \(7, 4\) in the live model but \(6, 4\)"),
    (TinyMLP(), {**tiny_spec(), "data_kwargs": {"seed": 3}}, "training data rebuilt from the model spec"),
    (TinyMLPRelu(), tiny_spec(), "computes other outputs than the live model"),
    (TinyMLP(), {**tiny_spec(), "model": "tests.helpers:NoSuchModel"}, "cannot rebuild the model spec"),
    (TinyMLP(), tiny_spec(width=3), "cannot rebuild the model spec.*rejected model_kwargs"),
])
def test_a_spec_that_does_not_describe_the_live_model_is_refused_before_training(tmp_path, live, spec, message):
    with pytest.raises(BadInputError, match=message):
        Recorder(live, adamw(live), tmp_path / "r", model_spec=spec, train_data=tiny_data()["train"])
    assert not (tmp_path / "r").exists()


def test_a_second_recorder_on_the_same_optimizer_is_refused(tmp_path):
    model = TinyMLP()
    opt = adamw(model)
    first = Recorder(model, opt, tmp_path / "a", model_spec=tiny_spec(), train_data=tiny_data()["train"])
    with pytest.raises(BadInputError, match=r"already has a Recorder writing .*a \(at step 0\)"):
        Recorder(model, opt, tmp_path / "b", model_spec=tiny_spec(), train_data=tiny_data()["train"])
    first.close()
    Recorder(model, opt, tmp_path / "b", model_spec=tiny_spec(), train_data=tiny_data()["train"]).close()


def test_a_run_of_schema_version_1_still_opens(tmp_path):
    """Runs recorded before buffers and the training forward were kept read as runs without them."""
    run = _record_ok(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["schema_version"] = 1
    del manifest["buffers"], manifest["training_forward"]
    for chunk in manifest["chunks"]:
        del chunk["buffers"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    h = History.open(run)
    assert h.training_forward is None and h.buffer_shapes == {} and h.changing_buffers == []
    record = h.record(2)
    assert record.buffers == {} and record.rng is None
