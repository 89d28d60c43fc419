"""The shipped sample runs: each one's full recipe, and the pipeline that builds it from scratch.

``python -m engine sample digits`` trains the task, checks the record by replay,
decomposes it, measures prediction-level exactness for several quadratures, runs the
``python -m engine sample digits`` trains the task, checks the record by replay,
decomposes it, measures prediction-level exactness for several quadratures, runs the
pruning study (every method the importance view ranks by, 10 %–99.9 % sparsity, global and
per-tensor scope) and publishes ``sample_runs/digits.duckdb``. ``python -m engine sample
tiny-lm`` trains the tiny language model, which saves ``checkpoint-<step>`` folders instead
of a recording, and explains that checkpoint series on its held-out text. Everything is
seeded, so the same command reproduces the same numbers; the recipe is stored in the
database's metadata (key ``recipe``) so a test can check that a shipped file matches its command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import torch

from engine.analysis.prune import SCOPES, PruneConfig, run_prune
from engine.decompose import ExplainConfig, Explanation, explain_history, merge_tests
from engine.decompose.checkpoints import checkpoint_config, explain_checkpoints, saved_interval, work_folder
from engine.errors import BadInputError
from engine.run.history import History
from engine.run.record import check_run_target
from engine.run.series import SeriesSource, open_series
from engine.run.verify import verify
from engine.store import check_target, write_run
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
    exactness: tuple[str, ...] = ("adaptive", "midpoint:100", "midpoint:10")
    exactness_tests: int = 100
    prune: dict[str, Any] = field(default_factory=dict)           # PruneConfig overrides but the scope …
    prune_scopes: tuple[str, ...] = SCOPES                         # … which takes each of these in turn

    def to_json(self) -> dict[str, Any]:
        """The recipe as it reads back from the database's JSON metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class SeriesRecipe:
    """A sample explained from saved checkpoints: the tiny language model's training (``train``,
    ``TinyLMConfig`` overrides) and the ``explain-checkpoints`` settings of its held-out text."""

    name: str
    train: dict[str, Any] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)   # quantity, dtype, rtol, quadrature

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


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
                        "window": 20, "rtol": 1e-5},
            data={"test_size": 20, "quantity": "logprob", "views": ("data",), "window": 200, "rtol": 1e-5},
            exactness_tests=10,
            prune={"sparsities": PRUNE_SPARSITIES},
        ),
        SeriesRecipe(
            name="tiny-lm",
            explain={"quantity": "loss", "dtype": "float32", "rtol": 1e-5},
        ),
    )
}


def _explain_pass(run_dir: Path, config: ExplainConfig, threads: int | None, progress: bool) -> Explanation:
    if threads is not None:
        torch.set_num_threads(threads)
    history = History.open(run_dir)
    return explain_history(history, history.task(), config, progress=progress)


def _explain_all(run_dir: Path, configs: list[ExplainConfig], jobs: int, progress: bool) -> list[Explanation]:
    """Every pass of a sample, one after the other.

    With ``jobs > 1`` the passes run in that many processes of one thread each (only the
    first shows a progress bar), the first pass split into ``jobs + 1`` disjoint sets of test
    examples (merged again) so that the processes stay busy until the end. Passes with the
    data view start first: their per-example gradients of every step make them the longest.
    """
    if jobs == 1:
        return [_explain_pass(run_dir, c, None, progress) for c in configs]
    task = History.open(run_dir).task()
    ids = list(configs[0].test_ids_in(len(task.dataset(configs[0].test_split))))
    parts = [replace(configs[0], test_ids=tuple(part)) for part in _split(ids, jobs + 1)]
    work = parts + configs[1:]
    order = sorted(range(len(work)), key=lambda i: "data" not in work[i].views)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {i: pool.submit(_explain_pass, run_dir, work[i], 1, progress and rank == 0)
                   for rank, i in enumerate(order)}
        results = [futures[i].result() for i in range(len(work))]
    return [merge_tests(results[:len(parts)]), *results[len(parts):]]


def _split(ids: list[int], count: int) -> list[list[int]]:
    size = -(-len(ids) // count)
    return [ids[a:a + size] for a in range(0, len(ids), size)]


def build_sample(sample: str | SampleRecipe, out_dir: Path = Path("sample_runs"), work_dir: Path = Path("runs"),
                 progress: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Train, verify, explain, measure exactness and prune one sample run; publish its database.

    ``jobs`` > 1 runs the explain passes (main, data view, one per exactness rule) in that
    many single-threaded processes. Both outputs are checked before any work: the database
    must be publishable (``engine.store.check_target``) and ``work_dir/NAME`` new, empty or a
    run directory, which is replaced.
    """
    if isinstance(sample, str) and sample not in SAMPLES:
        raise BadInputError(f"unknown sample run {sample!r}; choose one of {', '.join(SAMPLES)}")
    recipe = SAMPLES[sample] if isinstance(sample, str) else sample
    if isinstance(recipe, SeriesRecipe):
        return build_series_sample(recipe, out_dir, work_dir, progress, jobs)
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
    main, data, *rest = _explain_all(run_dir, configs, jobs, progress)
    checks = [e.exactness() for e in rest]
    bundle = main.to_bundle(history, task, exactness=pl.concat(checks))
    meta = {**bundle.meta, "recipe": recipe.to_json(), "replay_max_rel_error": replay.max_rel_error,
            "views": sorted({*bundle.meta["views"], "data"}), "data_window": recipe.data["window"],
            "data_tests": len(data.test_ids)}
    bundle = dataclasses.replace(bundle, meta=meta, data=data.data)
    target = write_run(target, bundle)
    pruning = pl.concat([run_prune(target, PruneConfig(**recipe.prune, scope=scope), progress=progress)[1]
                         for scope in recipe.prune_scopes])
    return {
        "sample": name,
        "database": str(target),
        "run": str(run_dir),
        "replay_max_rel_error": replay.max_rel_error,
        "max_rel_residual": max(main.max_rel_residual, data.max_rel_residual),
        "exactness": pl.concat(checks).to_dicts(),
        "pruning_rows": pruning.height,
    }


def _series_interval(source: SeriesSource, explain: dict[str, Any], work: Path, k: int) -> None:
    """Explain and save interval ``k`` in a process of one thread."""
    torch.set_num_threads(1)
    opened = open_series(source)
    saved_interval(opened, checkpoint_config(opened, **explain), work, k)


def build_series_sample(recipe: SeriesRecipe, out_dir: Path, work_dir: Path, progress: bool = True,
                        jobs: int = 1) -> dict[str, Any]:
    """Train the tiny language model (saving checkpoints), explain its held-out text over them, publish.

    With ``jobs > 1`` the intervals are explained in that many single-threaded processes first
    (each a unit of its own, saved where the explanation then reads them back)."""
    target = check_target(out_dir / f"{recipe.name}.duckdb", protect=(work_dir / recipe.name,))
    run_dir = tiny_lm.train(tiny_lm.TinyLMConfig(**recipe.train), work_dir / recipe.name, progress=progress)
    source = SeriesSource((str(run_dir),), str(run_dir / tiny_lm.HELDOUT))
    opened = open_series(source)
    config = checkpoint_config(opened, **recipe.explain)
    if jobs > 1:
        work = work_folder(target, opened, config)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_series_interval, *zip(*[(source, recipe.explain, work, k)
                                                   for k in range(opened.series.num_steps)], strict=True)))
    explanation = explain_checkpoints(opened, config, target, progress=progress, meta={"recipe": recipe.to_json()})
    summary = explanation.summary()
    return {"sample": recipe.name, "database": str(target), "run": str(run_dir),
            "max_rel_residual": summary["max_rel_residual"],
            "max_rel_residual_interval": summary["max_rel_residual_interval"], "seconds": summary["seconds"]}
