"""Progress measures of modular addition against independent computations with NumPy's FFT."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.analysis.progress import (
    KEY_FRACTION,
    frequency_norms,
    key_frequencies,
    progress_measures,
    sum_directions,
)
from engine.cli import main
from engine.errors import BadInputError
from engine.model.task import get_task
from engine.run.history import History
from engine.store import RunDB
from engine.tasks import ModularAdditionConfig, train_task
from tests.helpers import record_tiny_run

SMALL = ModularAdditionConfig(p=7, train_frac=0.5, d_model=8, n_heads=2, d_mlp=12, steps=5, lr=1e-2)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> History:
    return History.open(train_task("modular-addition", tmp_path_factory.mktemp("progress") / "run", asdict(SMALL),
                                   progress=False))


def test_frequency_norms_match_the_fft():
    p, d = 11, 6
    embedding = torch.randn(p + 1, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spectrum = np.fft.fft(embedding[:p].numpy(), axis=0)  # (p, d)
    power = (np.abs(spectrum) ** 2).sum(1) / p
    want = np.concatenate([[power[0]], 2 * power[1:p // 2 + 1]])  # a frequency holds ±f
    np.testing.assert_allclose(frequency_norms(embedding, p), want, rtol=1e-12)


def test_key_frequencies_are_those_near_the_largest():
    norms = np.array([50.0, 0.1, 8.0, 0.5, 0.79, 0.81, 2.0])
    assert key_frequencies(norms) == (2, 5, 6)  # ≥ 0.1 × 8; the constant (frequency 0) is never key
    assert KEY_FRACTION == 0.1 and key_frequencies(np.zeros(4)) == ()


def test_sum_directions_are_orthonormal_waves_of_a_plus_b():
    p, keys = 9, (1, 4)
    directions = sum_directions(p, keys).numpy()
    np.testing.assert_allclose(directions @ directions.T, np.eye(4), atol=1e-12)
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    wave = np.cos(2 * np.pi * 4 * (a + b) / p).reshape(-1)
    np.testing.assert_allclose(directions[2], wave / np.linalg.norm(wave), atol=1e-12)


def test_restricted_and_excluded_loss_match_a_2d_fft(run):
    result = progress_measures(run)
    task = get_task(run.model_spec)
    p = SMALL.p
    model = task.build_model().eval()
    final = run.num_steps - 1
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    inputs = torch.tensor(np.stack([a.reshape(-1), b.reshape(-1), np.full(p * p, p)], 1))
    with torch.no_grad():
        logits = functional_call(model, run.params(final), (inputs,)).double().numpy().reshape(p, p, p)
    spectrum = np.fft.fft2(logits, axes=(0, 1))  # (freq a, freq b, class)
    keep = np.zeros((p, p), dtype=bool)
    keep[0, 0] = True  # the constant
    for k in result.key_frequencies:  # cos and sin of k(a + b) live at (k, k) and (−k, −k)
        keep[k, k] = keep[-k, -k] = True
    restricted = np.real(np.fft.ifft2(np.where(keep[:, :, None], spectrum, 0), axes=(0, 1)))
    keys_only = keep.copy()
    keys_only[0, 0] = False
    excluded = logits - np.real(np.fft.ifft2(np.where(keys_only[:, :, None], spectrum, 0), axes=(0, 1)))
    labels = torch.tensor((a + b) % p).reshape(-1)
    cells = {split: (d.inputs[:, 0] * p + d.inputs[:, 1]) for split, d in
             (("train", task.dataset("train")), ("val", task.dataset("val")))}

    def loss(table: np.ndarray, split: str) -> float:
        flat = torch.tensor(table.reshape(p * p, p))
        return float(F.cross_entropy(flat[cells[split]], labels[cells[split]]))

    got = dict(result.measures.filter(pl.col("step") == final).select("measure", "value").iter_rows())
    assert got["restricted loss"] == pytest.approx(loss(restricted, "val"), rel=1e-9)
    assert got["excluded loss"] == pytest.approx(loss(excluded, "train"), rel=1e-9)
    assert result.measures["step"].unique().sort().to_list() == list(range(SMALL.steps))
    norms = result.norms
    assert norms["frequency"].to_list() == list(range(p // 2 + 1)) and norms["tensor"].unique().to_list() == [
        "embed.weight"]
    assert tuple(norms.filter(pl.col("key"))["frequency"]) == result.key_frequencies


def test_progress_cli_adds_the_measures_to_a_run_database(run, tmp_path, capsys):
    db = tmp_path / "run.duckdb"
    assert main(["explain", str(run.path), "--out", str(db), "--test", "val:2", "--quantity", "logprob",
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["progress", str(run.path), "--db", str(db), "--every", "2", "--json"]) == 0
    with RunDB.open(db) as stored:
        assert stored.progress()["step"].unique().sort().to_list() == [0, 2, 4]
        assert stored.frequency_norms().height == SMALL.p // 2 + 1
    capsys.readouterr()
    assert main(["progress", str(run.path), "--db", str(db), "--every", "0"]) == 2
    assert "every must be a positive number of steps" in capsys.readouterr().err


def test_progress_measures_need_modular_addition(tmp_path):
    other = record_tiny_run(tmp_path / "tiny", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=3)
    with pytest.raises(BadInputError, match="names no token embedding"):
        progress_measures(other)
