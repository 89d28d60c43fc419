"""Checkpoint series (MATH.md §7): each interval reconstructs the change of the loss recomputed
from its two checkpoints independently; consecutive checkpoints of a recording give the
recording's own components; a killed run resumes; bad input is refused by name, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.cli import main
from engine.decompose import ExplainConfig, explain_history
from engine.decompose.checkpoints import (
    checkpoint_config,
    explain_checkpoints,
    explain_interval,
    explain_series,
    work_folder,
)
from engine.errors import CorruptRunError
from engine.model.lm import LM_QUANTITIES, NextTokenLogProbs
from engine.model.task import get_task
from engine.run.checkpoints import _read_file
from engine.run.history import History
from engine.run.series import SeriesSource, open_series
from engine.store import RunDB, info
from tests.helpers import (
    VOCAB,
    foreign_payloads,
    record_tiny_run,
    tiny_data,
    tiny_gpt2,
    tiny_spec,
    write_inputs,
    write_series,
)

transformers = pytest.importorskip("transformers")


SEQUENCES = [[1, 5, 2, 7, 3, 3], [4, 4, 9], [12, 0, 6, 1, 8, 2, 11, 5]]


def hf_losses(folder: Path, sequences) -> np.ndarray:
    """Each sequence's mean next-token loss from the logits of the checkpoint loaded by transformers
    itself, in float64, one sequence at a time (transformers' own ``.loss`` is computed in float32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).double().eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]
    return np.array([float(F.cross_entropy(z[:-1], torch.tensor(s[1:]))) for z, s in zip(logits, sequences,
                                                                                          strict=True)])


def run_cli(*args: str) -> int:
    return main(["explain-checkpoints", *map(str, args), "--json"])


# ---------------------------------------------------------------------------------- the model side
def test_padded_sequences_give_each_sequence_its_own_quantities():
    """Right padding changes nothing before the end of a sequence: the batched quantities equal
    those of each sequence alone; token losses sum to the sequence loss, the last one is the
    negative next-token log-probability."""
    model = NextTokenLogProbs(tiny_gpt2()).eval()
    width = max(map(len, SEQUENCES))
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in SEQUENCES])
    lengths = torch.tensor([len(s) for s in SEQUENCES])
    with torch.no_grad():
        logp = model(tokens)
        for i, s in enumerate(SEQUENCES):
            alone = model(torch.tensor([s]))
            one = torch.tensor([len(s)])
            for name, q in LM_QUANTITIES.items():
                batched = q(logp, lengths)[i, :q(alone, one).shape[1]]
                torch.testing.assert_close(batched, q(alone, one)[0], rtol=1e-6, atol=1e-6, msg=name)
    token = LM_QUANTITIES["token-loss"](logp, lengths)
    torch.testing.assert_close(token.sum(1) / (lengths - 1), LM_QUANTITIES["loss"](logp, lengths)[:, 0])
    last = token.gather(1, (lengths - 2)[:, None])
    torch.testing.assert_close(-last, LM_QUANTITIES["next-logprob"](logp, lengths))
    assert (token[1, 2:] == 0).all()


def test_wrapped_model_keeps_the_checkpoint_names():
    lm = tiny_gpt2()
    wrapped = NextTokenLogProbs(lm)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in lm.named_parameters()]
    wrapped.eval()
    assert not lm.training


# ---------------------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def tiny_lm_run(tmp_path_factory) -> Path:
    """The tiny language model's training, small: checkpoints at steps 0, 10 and 20, three held-out lines."""
    from engine.tasks.tiny_lm import TinyLMConfig, train

    config = TinyLMConfig(n_layer=2, n_embd=16, n_head=2, block=10, steps=20, save_every=10, batch_size=8,
                          warmup=2, train_blocks=64, heldout_blocks=3)
    return train(config, tmp_path_factory.mktemp("tiny-lm") / "run", progress=False)


@pytest.mark.parametrize(("dtype", "rtol", "bound"), [("float32", 1e-5, 1e-5), ("float32", 1e-7, 1e-7),
                                                     ("float64", None, 1e-10)])
def test_each_interval_reconstructs_the_loss_change_recomputed_from_its_checkpoints(tiny_lm_run, dtype, rtol,
                                                                                     bound):
    """The tiny-lm checkpoints explained on their held-out text (tokenized by their own tokenizer):
    per interval and input, the components add up to the change of the loss that transformers
    computes from each checkpoint alone. (At rtol 1e-7 the float32 sum of the components misses
    the budget for some inputs, which are then explained in float64.)"""
    from engine.tasks.tiny_lm import HELDOUT

    opened = open_series(SeriesSource((str(tiny_lm_run),), str(tiny_lm_run / HELDOUT)))
    config = checkpoint_config(opened, dtype=dtype, rtol=rtol, device="cpu")
    explanation = explain_series(opened, config, progress=False)
    sums = explanation.components.group_by("step_lo", "test").agg(pl.col("value").sum()).sort("step_lo", "test")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm_run / "checkpoint-0")
    sequences = [tokenizer(line)["input_ids"] for line in (tiny_lm_run / HELDOUT).read_text().splitlines()]
    losses = [hf_losses(tiny_lm_run / f"checkpoint-{s}", sequences) for s in (0, 10, 20)]
    for k, step in enumerate((0, 10)):
        change = losses[k + 1] - losses[k]                                         # (sequence,)
        reconstructed = sums.filter(pl.col("step_lo") == step)["value"].to_numpy()
        assert np.all(np.abs(reconstructed - change) <= bound * np.abs(change)), (step, reconstructed - change)
    assert explanation.summary()["max_rel_residual_interval"] <= bound


def test_consecutive_checkpoints_of_a_recording_give_its_components(tmp_path):
    """Checkpoints one step apart span the same straight segments as the recording: the same
    component values as ``explain`` of the recording over those steps."""
    run = record_tiny_run(tmp_path / "rec", lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1))
    history = History.open(run)
    files = []
    for step in (4, 5, 6, 7):
        path = tmp_path / f"step-{step}.safetensors"
        save_file({n: t.contiguous() for n, t in history.params(step).items()}, str(path))
        files.append(str(path))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec()))
    opened = open_series(SeriesSource(tuple(files), "val:6", str(spec)))
    common = {"quantity": "logprob", "quadrature": "adaptive:64", "dtype": "float64", "device": "cpu"}
    series = explain_series(opened, checkpoint_config(opened, **common), progress=False).components
    recorded = explain_history(history, get_task(history.model_spec),
                               ExplainConfig(**common, test_size=6, steps=(4, 7)), progress=False).components
    joined = series.join(recorded, on=["step_lo", "step_hi", "tensor", "test", "output"], suffix="_recorded")
    assert joined.height == recorded.height == series.height == 3 * 4 * 6
    np.testing.assert_allclose(joined["value"], joined["value_recorded"], rtol=1e-6, atol=1e-12)
    assert series["decay"].abs().max() == 0.0


# ---------------------------------------------------------------------------------- the run database
def test_the_run_database_describes_the_series(tmp_path):
    source = write_series(tmp_path / "run")
    inputs = write_inputs(tmp_path / "in.jsonl", [{"input_ids": s} for s in SEQUENCES])
    out = tmp_path / "series.duckdb"
    assert run_cli(source, "--inputs", inputs, "--out", out, "--quantity", "token-loss", "--device", "cpu") == 0
    summary = info(out)
    assert summary["kind"] == "checkpoints" and summary["checkpoints"] == [0, 10, 30]
    assert summary["views"]["data"] == 0 and summary["views"]["components"] > 0
    with RunDB.open(out) as db:
        meta = db.meta()
        steps = db.steps()
        examples = db.examples("test")
        windows = db.windows("components")
        layers = db.component_totals("layer")
    assert meta["data_axis_reason"] and meta["quantity"] == "token-loss" and meta["outputs"] == 7
    assert windows.to_dicts() == [{"step_lo": 0, "step_hi": 10}, {"step_lo": 10, "step_hi": 30}]
    at = {r["step"]: r for r in steps.to_dicts()}
    expected = [hf_losses(source / f"checkpoint-{s}", SEQUENCES).mean() for s in (0, 10, 30)]
    np.testing.assert_allclose([at[s]["val_loss"] for s in (0, 10, 30)], expected, rtol=1e-5)
    assert examples["label"].to_list() == [s[-1] for s in SEQUENCES]
    assert layers["group"].to_list() == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.ln_f"]
    assert not list(tmp_path.glob(".series.duckdb.intervals-*"))  # the saved intervals are gone


def test_a_killed_run_resumes_from_its_last_finished_interval(tmp_path, monkeypatch):
    source = write_series(tmp_path / "run", steps=(0, 1, 2, 3))
    inputs = write_inputs(tmp_path / "in.jsonl", SEQUENCES)
    out = tmp_path / "series.duckdb"
    opened = open_series(SeriesSource((str(source),), str(inputs)))
    config = checkpoint_config(opened, device="cpu", dtype="float64")
    computed = []

    def dies_at_interval_2(series, task, config, k):
        if k == 2:
            raise KeyboardInterrupt  # the process is killed: nothing after the saved intervals survives
        computed.append(k)
        return explain_interval(series, task, config, k)

    monkeypatch.setattr("engine.decompose.checkpoints.explain_interval", dies_at_interval_2)
    with pytest.raises(KeyboardInterrupt):
        explain_checkpoints(opened, config, out, progress=False)
    assert not out.exists() and computed == [0, 1]
    assert len(list(work_folder(out, opened, config).iterdir())) == 2
    monkeypatch.undo()

    changed = checkpoint_config(opened, device="cpu", dtype="float32")  # other arguments: nothing reused
    assert work_folder(out, opened, changed) != work_folder(out, opened, config)
    resumed = explain_checkpoints(open_series(SeriesSource((str(source),), str(inputs))), config, out, progress=False)
    assert resumed.resumed == 2
    fresh = explain_series(opened, config, progress=False)
    assert resumed.components.equals(fresh.components)
    assert resumed.completeness.equals(fresh.completeness)


# ---------------------------------------------------------------------------------- refusals
def expect_refusal(tmp_path: Path, capsys, args, message: str) -> None:
    out = tmp_path / "refused.duckdb"
    capsys.readouterr()
    assert run_cli(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".refused.duckdb*"))


def test_checkpoints_of_different_architectures_are_refused(tmp_path, capsys):
    source = write_series(tmp_path / "run")
    tiny_gpt2(n_embd=12).save_pretrained(source / "checkpoint-40")
    inputs = write_inputs(tmp_path / "in.jsonl", SEQUENCES)
    expect_refusal(tmp_path, capsys, [source, "--inputs", inputs], "checkpoint-40 is of a different architecture")
    files = []
    for name, model in (("a-0.safetensors", tiny_gpt2()), ("b-5.safetensors", tiny_gpt2(n_embd=12))):
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(tmp_path / name))
        files.append(tmp_path / name)
    config = json.dumps(tiny_gpt2().config.to_dict())
    expect_refusal(tmp_path, capsys, [*files, "--model", config, "--inputs", inputs],
                   "b-5.safetensors: tensor 'transformer.wte.weight' has shape (13, 12), the model's is (13, 8)")


def test_a_missing_tensor_is_named(tmp_path, capsys):
    source = write_series(tmp_path / "run")
    weights = source / "checkpoint-10" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["transformer.h.0.mlp.c_fc.bias"]
    save_file(tensors, str(weights))
    inputs = write_inputs(tmp_path / "in.jsonl", SEQUENCES)
    expect_refusal(tmp_path, capsys, [source, "--inputs", inputs], "lacks tensor 'transformer.h.0.mlp.c_fc.bias'")


def test_unordered_steps_are_refused(tmp_path, capsys):
    source = write_series(tmp_path / "run")
    inputs = write_inputs(tmp_path / "in.jsonl", SEQUENCES)
    expect_refusal(tmp_path, capsys, [source / "checkpoint-10", source / "checkpoint-0", "--inputs", inputs],
                   "checkpoint-10 (step 10) is listed before checkpoint-0 (step 0)")
    expect_refusal(tmp_path, capsys, [source / "checkpoint-0", source / "checkpoint-10", "--steps", "5,5",
                                      "--inputs", inputs], "not in training order")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
    from engine.tasks.tiny_lm import UNKNOWN, tokenizer

    source = write_series(tmp_path / "run")
    words = [UNKNOWN, *(f"w{i}" for i in range(VOCAB + 4))]
    tokenizer(words).save_pretrained(tmp_path / "tok")
    text = tmp_path / "in.txt"
    text.write_text("w1 w2 w3\n")
    expect_refusal(tmp_path, capsys, [source, "--inputs", text, "--tokenizer", tmp_path / "tok"],
                   f"has {VOCAB + 5} tokens, more than the model's vocabulary of {VOCAB}")


def test_an_empty_inputs_file_is_refused(tmp_path, capsys):
    source = write_series(tmp_path / "run")
    empty = tmp_path / "in.jsonl"
    empty.write_text("\n")
    expect_refusal(tmp_path, capsys, [source, "--inputs", empty], "holds no sequences")
    outside = write_inputs(tmp_path / "ids.jsonl", [[1, 2, VOCAB]])
    expect_refusal(tmp_path, capsys, [source, "--inputs", outside], f"token id {VOCAB} outside the model's vocabulary")


def test_differing_buffers_are_refused(tmp_path, capsys):
    """Buffers are held fixed along the path: a series whose buffers change is not explained."""
    model = torch.nn.BatchNorm1d(3)
    files = []
    for step in (0, 1):
        with torch.no_grad():
            model.running_mean.add_(step)
        path = tmp_path / f"bn-{step}.pt"
        torch.save(model.state_dict(), path)
        files.append(path)
    spec = {"model": "torch.nn:BatchNorm1d", "model_kwargs": {"num_features": 3},
            "data": "tests.helpers:tiny_data", "data_kwargs": {"n_in": 3}}
    expect_refusal(tmp_path, capsys, [*files, "--model", json.dumps(spec), "--inputs", "val:4"],
                   "buffer 'running_mean' differs between bn-0.pt and bn-1.pt")


def test_buffers_the_checkpoints_share_are_held_along_the_path(tmp_path):
    """BatchNorm statistics saved in the checkpoints (not the fresh model's) are used; a float32
    explanation evaluates the true change in float64 with them."""
    model = torch.nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        model.running_mean.add_(0.5)
        model.running_var.mul_(2.0)
    files = []
    for step in (0, 1):
        with torch.no_grad():
            model.weight.add_(0.3 * step)
        files.append(str(tmp_path / f"bn-{step}.pt"))
        torch.save(model.state_dict(), files[-1])
    spec = {"model": "torch.nn:BatchNorm1d", "model_kwargs": {"num_features": 3},
            "data": "tests.helpers:tiny_data", "data_kwargs": {"n_in": 3}}
    opened = open_series(SeriesSource(tuple(files), "val:4", json.dumps(spec)))
    explanation = explain_series(opened, checkpoint_config(opened, quantity="logits", device="cpu"), progress=False)
    predictions = explanation.to_bundle().predictions.sort("test", "output")
    x = tiny_data(n_in=3)["val"][0][:4]
    with torch.no_grad():
        truth = model(x)                                                      # (test, class) at checkpoint 1
    np.testing.assert_allclose(predictions["true_final"].to_numpy().reshape(4, 3), truth.numpy(), rtol=1e-6)
    np.testing.assert_allclose(predictions["reconstructed_final"], predictions["true_final"], rtol=1e-6)


@pytest.mark.filterwarnings("error")
def test_any_foreign_or_truncated_state_dict_is_named_not_raised(tmp_path):
    file = tmp_path / "step_0.pt"
    for payload in foreign_payloads(seed=1):
        file.write_bytes(payload)
        with pytest.raises(CorruptRunError, match=r"step_0\.pt (cannot be read|does not hold)"):
            _read_file(file)
