"""Shipped sample runs: they match the recipe of their regeneration command, carry every
view, reconstruct exactly, and the pipeline that builds them is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from engine.analysis.prune import METHODS, SCOPES, PruneConfig
from engine.decompose import ExplainConfig
from engine.samples import SAMPLES, SampleRecipe, SeriesRecipe, build_sample
from engine.store import RunDB, info

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_runs"
RECORDED = sorted(name for name, recipe in SAMPLES.items() if isinstance(recipe, SampleRecipe))
SERIES = sorted(name for name, recipe in SAMPLES.items() if isinstance(recipe, SeriesRecipe))


@pytest.mark.parametrize("name", RECORDED)
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


@pytest.mark.parametrize("name", RECORDED)
def test_recipe_prunes_by_every_method_from_light_to_extreme_sparsity_in_both_scopes(name):
    recipe = SAMPLES[name]
    config = PruneConfig(**recipe.prune)
    assert config.methods is None  # every method the importance view holds scores for …
    explain = ExplainConfig(**recipe.components)
    assert "importance" in explain.views and explain.decay_split  # … which are all of them (see below)
    assert min(config.sparsities) == 0.1 and max(config.sparsities) == 0.999
    assert {0.1, 0.3, 0.5, 0.7, 0.9, 0.99} <= set(config.sparsities)
    assert tuple(recipe.prune_scopes) == SCOPES


@pytest.mark.parametrize("name", SERIES)
def test_shipped_checkpoint_sample_matches_its_recipe(name):
    """A sample explained from checkpoints: every interval and input reconstructed within the
    recipe's budget, one window per interval, no data axis."""
    path = SAMPLE_DIR / f"{name}.duckdb"
    assert path.exists(), f"{path} is missing: run `python -m engine sample {name}`"
    with RunDB.open(path) as db:
        meta = db.meta()
        windows = db.windows("components")
    assert meta["recipe"] == SAMPLES[name].to_json()
    summary = info(path)
    assert summary["kind"] == "checkpoints"
    assert summary["views"]["components"] > 0 and summary["views"]["data"] == 0
    assert summary["max_rel_residual_interval"] <= (SAMPLES[name].explain.get("rtol") or 1e-10)
    assert windows["step_lo"].to_list() == summary["checkpoints"][:-1]
    assert windows["step_hi"].to_list() == summary["checkpoints"][1:]


def test_samples_stay_small():
    total = sum(p.stat().st_size for p in SAMPLE_DIR.glob("*.duckdb"))
    assert total < 60 * 2**20


TINY = SampleRecipe(
    name="tiny",
    task="modular-addition",
    train={"p": 11, "train_frac": 0.5, "d_model": 16, "n_heads": 2, "d_mlp": 32, "steps": 12, "lr": 1e-2},
    components={"test_size": 6, "quantity": "logprob", "views": ("components", "importance"), "window": 4},
    data={"test_size": 3, "quantity": "logprob", "views": ("data",), "window": 6},
    exactness=("gauss:2", "midpoint:10"),
    exactness_tests=6,
    prune={"sparsities": (0.1, 0.9), "seeds": 2},
)


@pytest.mark.slow
def test_sample_pipeline_is_deterministic_in_one_or_several_processes(tmp_path):
    """The same command gives the same numbers; several processes (the main pass split by test
    examples) agree with one to float32 round-off, batches of other sizes summing differently."""
    results = [build_sample(TINY, tmp_path / f"out{i}", tmp_path / f"work{i}", progress=False, jobs=jobs)
               for i, jobs in enumerate((1, 1, 2))]
    assert results[0]["exactness"] == results[1]["exactness"] == results[2]["exactness"]
    frames = []
    for i in range(3):
        with RunDB.open(tmp_path / f"out{i}" / "tiny.duckdb") as db:
            frames.append((db.component_totals("tensor"), db.completeness(), db.pruning(), db.steps()))
    for first, second, parallel in zip(*frames, strict=True):
        assert first.equals(second)
        assert_frame_equal(first, parallel, rel_tol=1e-5, abs_tol=2e-6)
    pruning = frames[0][2]  # every method, both scopes, the dense reference at sparsity 0
    assert sorted(pruning.select("method", "scope", "sparsity").unique().rows()) == sorted(
        [("dense", scope, 0.0) for scope in SCOPES]
        + [(method, scope, s) for method in METHODS for scope in SCOPES for s in (0.1, 0.9)])


TINY_LM = SeriesRecipe(
    name="tiny-lm-test",
    train={"n_layer": 1, "n_embd": 16, "n_head": 2, "block": 8, "steps": 20, "save_every": 10, "batch_size": 8,
           "warmup": 2, "train_blocks": 32, "heldout_blocks": 3},
    explain={"quantity": "loss", "dtype": "float32", "rtol": 1e-5},
)


@pytest.mark.slow
def test_checkpoint_sample_pipeline_is_the_same_in_one_or_several_processes(tmp_path):
    """Intervals explained in separate processes (each a unit of its own) give the same numbers, to
    float32 round-off (a process of one thread sums in another order)."""
    pytest.importorskip("transformers")
    results = [build_sample(TINY_LM, tmp_path / f"out{jobs}", tmp_path / f"work{jobs}", progress=False, jobs=jobs)
               for jobs in (1, 2)]
    assert all(r["max_rel_residual_interval"] <= 1e-5 for r in results)
    frames = []
    for jobs in (1, 2):
        with RunDB.open(tmp_path / f"out{jobs}" / "tiny-lm-test.duckdb") as db:
            frames.append((db.component_totals("tensor"), db.completeness(), db.steps().drop("train_loss")))
            assert db.meta()["recipe"] == TINY_LM.to_json()
    for one, two in zip(*frames, strict=True):
        assert_frame_equal(one, two, rel_tol=1e-5, abs_tol=1e-9)
