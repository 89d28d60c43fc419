"""Shipped sample runs: they match the recipe of their regeneration command, carry every
view, reconstruct exactly, and the pipeline that builds them is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from engine.parallel import Parallel
from engine.samples import SAMPLES, SampleRecipe, build_sample
from engine.store import RunDB, info

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_runs"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_shipped_sample_matches_its_recipe(name):
    path = SAMPLE_DIR / f"{name}.duckdb"
    assert path.exists(), f"{path} is missing: run `python -m engine sample {name}`"
    with RunDB.open(path) as db:
        assert db.meta()["recipe"] == SAMPLES[name].to_json()
        exactness = {row["quadrature"]: row for row in db.exactness().to_dicts()}
    summary = info(path)
    for view in ("components", "data", "importance", "completeness", "exactness", "pruning"):
        assert summary["views"][view] > 0, (name, view)
    assert summary["max_rel_residual"] <= 1e-5
    # the default quadrature reconstructs the final predictions exactly
    assert exactness["adaptive"]["agreement"] == 1.0
    assert exactness["adaptive"]["kl"] < 1e-9


def test_samples_stay_small():
    total = sum(p.stat().st_size for p in SAMPLE_DIR.glob("*.duckdb"))
    assert total < 40 * 2**20


TINY = SampleRecipe(
    name="tiny",
    task="modular-addition",
    train={"p": 11, "train_frac": 0.5, "d_model": 16, "n_heads": 2, "d_mlp": 32, "steps": 12, "lr": 1e-2},
    components={"test_size": 6, "quantity": "logprob", "views": ("components", "importance"), "window": 4},
    data={"test_size": 3, "quantity": "logprob", "views": ("data",), "window": 6},
    exactness=("gauss:2", "midpoint:10"),
    exactness_tests=6,
    prune={"sparsities": (0.5, 0.9), "seeds": 2},
)


@pytest.mark.slow
def test_sample_pipeline_is_deterministic_in_one_or_several_processes(tmp_path, ray_cluster):
    """The same command gives the same numbers; Ray workers (the passes split by test examples)
    agree with one process to float32 round-off, batches of other sizes summing differently."""
    results = [build_sample(TINY, tmp_path / f"out{i}", tmp_path / f"work{i}", progress=False, parallel=parallel)
               for i, parallel in enumerate((None, None, Parallel(workers=2)))]
    assert results[0]["exactness"] == results[1]["exactness"]
    for alone, parallel in zip(results[0]["exactness"], results[2]["exactness"], strict=True):
        assert alone["quadrature"] == parallel["quadrature"] and alone["agreement"] == parallel["agreement"]
        assert parallel["kl"] == pytest.approx(alone["kl"], rel=1e-4)
        assert parallel["max_rel_residual"] == pytest.approx(alone["max_rel_residual"], rel=1e-4)
        # step segments after the first replay the optimizer from step 0 (batch gradients)
        assert parallel["gradient_evaluations"] >= alone["gradient_evaluations"]
    frames = []
    for i in range(3):
        with RunDB.open(tmp_path / f"out{i}" / "tiny.duckdb") as db:
            frames.append((db.component_totals("tensor"), db.completeness(), db.pruning(), db.steps()))
    for first, second, parallel in zip(*frames, strict=True):
        assert first.equals(second)
        assert_frame_equal(first, parallel, rel_tol=1e-5, abs_tol=2e-6)
