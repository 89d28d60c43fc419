"""The shipped sample runs: each one's full recipe, and the pipeline that builds it from scratch.

``python -m engine sample digits`` trains the task, checks the record by replay,
decomposes it, measures prediction-level exactness for several quadratures, runs the
pruning study (every method the importance view ranks by, 10 %–99.9 % sparsity, global and
per-tensor scope; for modular addition also the progress measures) and publishes
``sample_runs/digits.duckdb``. ``python -m engine sample tiny-lm`` trains the tiny language
model, which saves ``checkpoint-<step>`` folders instead of a recording, and explains that
checkpoint series on its held-out text. Everything is seeded, so the same command reproduces
the same numbers; the recipe is stored in the database's metadata (key ``recipe``) so a test
can check that a shipped file matches its command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from engine.analysis.progress import progress_measures
from engine.analysis.prune import SCOPES, PruneConfig, run_prune
from engine.decompose import ExplainConfig
from engine.decompose.checkpoints import checkpoint_config, explain_checkpoints, work_folder
from engine.errors import BadInputError
from engine.parallel import Parallel, explain_all, explain_intervals, remove_shards
from engine.run.history import History
from engine.run.record import check_run_target
from engine.run.series import SeriesSource, open_series
from engine.run.verify import verify
from engine.store import add_progress, check_target, write_run
from engine.tasks import tiny_lm, train_task

log = logging.getLogger(__name__)

# sparsities of the samples' pruning curves: from light pruning, where a good ranking keeps the model
# intact, to 99.9 %, where every ranking has destroyed it
PRUNE_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class SampleRecipe:
    """How one sample run is produced; every field is stored with the run."""

    name: str
    task: str
    train: dict[str, Any] = field(default_factory=dict)           # task config overrides
    components: dict[str, Any] = field(default_factory=dict)      # ExplainConfig of the main pass
    data: dict[str, Any] = field(default_factory=dict)            # ExplainConfig of the data-view pass
    data_test_window: int | None = None                           # per-test data rows merged to this many steps
    exactness: tuple[str, ...] = ("adaptive", "midpoint:100", "midpoint:10")
    exactness_tests: int = 100
    prune: dict[str, Any] = field(default_factory=dict)           # PruneConfig overrides but the scope …
    prune_scopes: tuple[str, ...] = SCOPES                         # … which takes each of these in turn
    progress: bool = False                                        # modular addition's progress measures

    def to_json(self) -> dict[str, Any]:
        """The recipe as it reads back from the database's JSON metadata. The optional steps
        (``OPTIONAL_FIELDS``) appear only when a recipe uses them, so the recipe of a sample
        that does not reads back as it was written before they existed."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in OPTIONAL_FIELDS or v != OPTIONAL_FIELDS[k]}
        return json.loads(json.dumps(fields))


@dataclass(frozen=True)
class SeriesRecipe:
    """A sample explained from saved checkpoints: the tiny language model's training (``train``,
    ``TinyLMConfig`` overrides) and the ``explain-checkpoints`` settings of its held-out text."""

    name: str
    train: dict[str, Any] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)   # quantity, dtype, rtol, quadrature

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


OPTIONAL_FIELDS = {"data_test_window": None, "progress": False}  # field → the value that leaves it out

SAMPLES: dict[str, SampleRecipe | SeriesRecipe] = {
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
            prune={"sparsities": PRUNE_SPARSITIES},
        ),
        SampleRecipe(
            name="grokking",
            task="modular-addition",
            components={"test_size": 200, "quantity": "logprob", "views": ("components", "importance"),
                        "window": 20, "rtol": 1e-5, "partitions": ("all",)},
            data={"test_size": 20, "quantity": "logprob", "views": ("data",), "window": 20, "rtol": 1e-5},
            data_test_window=200,
            exactness_tests=10,
            prune={"sparsities": PRUNE_SPARSITIES},
            progress=True,
        ),
        SeriesRecipe(
            name="tiny-lm",
            explain={"quantity": "loss", "dtype": "float32", "rtol": 1e-5},
        ),
    )
}


def build_sample(sample: str | SampleRecipe, out_dir: Path = Path("sample_runs"), work_dir: Path = Path("runs"),
                 progress: bool = True, parallel: Parallel | None = None) -> dict[str, Any]:
    """Train, verify, explain, measure exactness and prune one sample run; publish its database.

    With ``parallel`` the explain passes (main, data view, one per exactness rule) run together
    as tasks on Ray (``engine.parallel``). Both outputs are checked before any work: the database
    must be publishable (``engine.store.check_target``) and ``work_dir/NAME`` new, empty or a
    run directory, which is replaced.
    """
    if isinstance(sample, str) and sample not in SAMPLES:
        raise BadInputError(f"unknown sample run {sample!r}; choose one of {', '.join(SAMPLES)}")
    recipe = SAMPLES[sample] if isinstance(sample, str) else sample
    if isinstance(recipe, SeriesRecipe):
        return build_series_sample(recipe, out_dir, work_dir, progress, parallel)
    name = recipe.name
    run_dir = work_dir / name
    target = check_target(out_dir / f"{name}.duckdb", protect=(run_dir,))
    check_run_target(run_dir, overwrite=True)   # replaces only a run directory, before any work
    train_task(recipe.task, run_dir, dict(recipe.train), progress=progress, overwrite=True)
    replay = verify(run_dir, progress=progress)
    history = History.open(run_dir)
    task = history.task()

    configs = [ExplainConfig(**recipe.components), ExplainConfig(**recipe.data)] + [
        ExplainConfig(test_size=recipe.exactness_tests, quantity="logits", quadrature=q, views=())
        for q in recipe.exactness]
    shards = work_dir / f"{name}.shards"
    (main, data, *rest), _ = explain_all(history, task, configs, parallel, shards, progress)
    checks = [e.exactness() for e in rest]
    bundle = main.to_bundle(history, task, exactness=pl.concat(checks))
    meta = {**bundle.meta, "recipe": recipe.to_json(), "replay_max_rel_error": replay.max_rel_error,
            "views": sorted({*bundle.meta["views"], "data"}), "data_window": recipe.data["window"],
            "data_test_window": recipe.data_test_window, "data_tests": len(data.test_ids)}
    bundle = dataclasses.replace(bundle, meta=meta, data=data.data, data_test_window=recipe.data_test_window)
    target = write_run(target, bundle)
    remove_shards(shards)
    pruning = pl.concat([run_prune(target, PruneConfig(**recipe.prune, scope=scope), progress=progress)[1]
                         for scope in recipe.prune_scopes])
    if recipe.progress:
        measures = progress_measures(history, progress=progress)
        add_progress(target, measures.measures, measures.norms)
    return {
        "sample": name,
        "database": str(target),
        "run": str(run_dir),
        "replay_max_rel_error": replay.max_rel_error,
        "max_rel_residual": max(main.max_rel_residual, data.max_rel_residual),
        "exactness": pl.concat(checks).to_dicts(),
        "pruning_rows": pruning.height,
    }


def build_series_sample(recipe: SeriesRecipe, out_dir: Path, work_dir: Path, progress: bool = True,
                        parallel: Parallel | None = None) -> dict[str, Any]:
    """Train the tiny language model (saving checkpoints), explain its held-out text over them, publish.

    With ``parallel`` the intervals are explained first as tasks on Ray, one per interval, each
    saved where the explanation then reads it back (a task whose worker dies is retried)."""
    target = check_target(out_dir / f"{recipe.name}.duckdb", protect=(work_dir / recipe.name,))
    run_dir = tiny_lm.train(tiny_lm.TinyLMConfig(**recipe.train), work_dir / recipe.name, progress=progress)
    source = SeriesSource((str(run_dir),), str(run_dir / tiny_lm.HELDOUT))
    opened = open_series(source)
    config = checkpoint_config(opened, **recipe.explain)
    if parallel is not None:
        explain_intervals(source, recipe.explain, work_folder(target, opened, config), parallel, progress)
    explanation = explain_checkpoints(opened, config, target, progress=progress, meta={"recipe": recipe.to_json()})
    summary = explanation.summary()
    return {"sample": recipe.name, "database": str(target), "run": str(run_dir),
            "max_rel_residual": summary["max_rel_residual"],
            "max_rel_residual_interval": summary["max_rel_residual_interval"], "seconds": summary["seconds"]}
