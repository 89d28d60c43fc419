"""Shipped sample runs: they match the recipe of their regeneration command, carry every
view, reconstruct exactly, and the pipeline that builds them is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from engine.analysis.prune import METHODS, SCOPES, PruneConfig
from engine.decompose import ExplainConfig
from engine.parallel import Parallel
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
        worst_step = int(db.completeness().sort("abs_residual")["step"][-1])
    summary = info(path)
    for view in ("components", "data", "importance", "completeness", "exactness", "pruning"):
        assert summary["views"][view] > 0, (name, view)
    recipe = SAMPLES[name]
    if recipe.components.get("partitions"):
        assert summary["views"]["unit_summary"] > 0, name
    if recipe.progress:
        assert summary["views"]["progress"] > 0, name
    # within the 1e-5 budget, or the steps that miss it are named, the worst among them
    if summary["max_rel_residual"] > 1e-5:
        named = [note for note in summary["notes"] if "stays above its error budget" in note]
        assert any(f"steps {worst_step}," in note or f" {worst_step}," in note or f" {worst_step} (" in note
                   for note in named), (name, worst_step, named)
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
    assert total < 60 * 2**20  # the budget of every shipped run together


TINY = SampleRecipe(
    name="tiny",
    task="modular-addition",
    train={"p": 11, "train_frac": 0.5, "d_model": 16, "n_heads": 2, "d_mlp": 32, "steps": 12, "lr": 1e-2},
    components={"test_size": 6, "quantity": "logprob", "views": ("components", "importance"), "window": 4,
                "partitions": ("heads", "embed-fourier")},
    data={"test_size": 3, "quantity": "logprob", "views": ("data",), "window": 2},
    data_test_window=6,
    progress=True,
    exactness=("gauss:2", "midpoint:10"),
    exactness_tests=6,
    prune={"sparsities": (0.1, 0.9), "seeds": 2},
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
            frames.append((db.component_totals("tensor"), db.completeness(), db.pruning(), db.steps(),
                           db.unit_totals("heads"), db.progress()))
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
def test_checkpoint_sample_pipeline_is_the_same_in_one_process_or_on_ray_workers(tmp_path, ray_cluster):
    """Intervals explained as Ray tasks (each a unit of its own) give the same numbers as one process,
    to float32 round-off (a worker of one thread sums in another order)."""
    pytest.importorskip("transformers")
    modes = {"one": None, "ray": Parallel(workers=2)}
    results = [build_sample(TINY_LM, tmp_path / f"out-{mode}", tmp_path / f"work-{mode}", progress=False,
                            parallel=parallel) for mode, parallel in modes.items()]
    assert all(r["max_rel_residual_interval"] <= 1e-5 for r in results)
    frames = []
    for mode in modes:
        with RunDB.open(tmp_path / f"out-{mode}" / "tiny-lm-test.duckdb") as db:
            frames.append((db.component_totals("tensor"), db.completeness(), db.steps().drop("train_loss")))
            assert db.meta()["recipe"] == TINY_LM.to_json()
    for one, two in zip(*frames, strict=True):
        assert_frame_equal(one, two, rel_tol=1e-5, abs_tol=1e-9)
