"""The shipped sample runs: each one's full recipe, and the pipeline that builds it from scratch.

``python -m engine sample digits`` trains the task, checks the record by replay,
decomposes it, measures prediction-level exactness for several quadratures, runs the
pruning study and publishes ``sample_runs/digits.duckdb``. Everything is seeded, so the
same command reproduces the same numbers; the recipe is stored in the database's metadata
(key ``recipe``) so a test can check that a shipped file matches its command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from engine.analysis.prune import PruneConfig, run_prune
from engine.decompose import ExplainConfig
from engine.errors import BadInputError
from engine.parallel import Parallel, explain_all, remove_shards
from engine.run.history import History
from engine.run.verify import verify
from engine.store import write_run
from engine.tasks import get_task, train_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRecipe:
    """How one sample run is produced; every field is stored with the run."""

    name: str
    task: str
    train: dict[str, Any] = field(default_factory=dict)           # task config overrides
    components: dict[str, Any] = field(default_factory=dict)      # ExplainConfig of the main pass
    data: dict[str, Any] = field(default_factory=dict)            # ExplainConfig of the data-view pass
    exactness: tuple[str, ...] = ("adaptive", "midpoint:100", "midpoint:10")
    exactness_tests: int = 100
    prune: dict[str, Any] = field(default_factory=dict)           # PruneConfig overrides

    def to_json(self) -> dict[str, Any]:
        """The recipe as it reads back from the database's JSON metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


SAMPLES: dict[str, SampleRecipe] = {
    recipe.name: recipe
    for recipe in (
        SampleRecipe(
            name="digits",
            task="digits-cnn",
            train={"steps": 120},
            components={"test_size": 50, "quantity": "logprob", "views": ("components", "importance"),
                        "window": 5, "dtype": "float64"},
            data={"test_size": 10, "quantity": "logprob", "views": ("data",), "window": 20, "dtype": "float64"},
            exactness_tests=30,
        ),
        SampleRecipe(
            name="grokking",
            task="modular-addition",
            components={"test_size": 200, "quantity": "logprob", "views": ("components", "importance"),
                        "window": 20, "rtol": 1e-5},
            data={"test_size": 20, "quantity": "logprob", "views": ("data",), "window": 200, "rtol": 1e-5},
            exactness_tests=10,
        ),
    )
}


def build_sample(sample: str | SampleRecipe, out_dir: Path = Path("sample_runs"), work_dir: Path = Path("runs"),
                 progress: bool = True, parallel: Parallel | None = None) -> dict[str, Any]:
    """Train, verify, explain, measure exactness and prune one sample run; publish its database.

    With ``parallel`` the explain passes (main, data view, one per exactness rule) run together
    as tasks on Ray (``engine.parallel``).
    """
    if isinstance(sample, str) and sample not in SAMPLES:
        raise BadInputError(f"unknown sample run {sample!r}; choose one of {', '.join(SAMPLES)}")
    recipe = SAMPLES[sample] if isinstance(sample, str) else sample
    name = recipe.name
    run_dir = work_dir / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train_task(recipe.task, run_dir, dict(recipe.train), progress=progress)
    replay = verify(run_dir, progress=progress)
    history = History.open(run_dir)
    task = get_task(history.model_spec)

    configs = [ExplainConfig(**recipe.components), ExplainConfig(**recipe.data)] + [
        ExplainConfig(test_size=recipe.exactness_tests, quantity="logits", quadrature=q, views=())
        for q in recipe.exactness]
    shards = work_dir / f"{name}.shards"
    (main, data, *rest), _ = explain_all(history, task, configs, parallel, shards, progress)
    checks = [e.exactness() for e in rest]
    bundle = main.to_bundle(history, task, exactness=pl.concat(checks))
    meta = {**bundle.meta, "recipe": recipe.to_json(), "replay_max_rel_error": replay.max_rel_error,
            "views": sorted({*bundle.meta["views"], "data"}), "data_window": recipe.data["window"],
            "data_tests": len(data.test_ids)}
    bundle = dataclasses.replace(bundle, meta=meta, data=data.data)
    target = write_run(out_dir / f"{name}.duckdb", bundle)
    remove_shards(shards)
    _, pruning = run_prune(target, PruneConfig(**recipe.prune), progress=progress)
    return {
        "sample": name,
        "database": str(target),
        "run": str(run_dir),
        "replay_max_rel_error": replay.max_rel_error,
        "max_rel_residual": max(main.max_rel_residual, data.max_rel_residual),
        "exactness": pl.concat(checks).to_dicts(),
        "pruning_rows": pruning.height,
    }
