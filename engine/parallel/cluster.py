"""Explanations as tasks on Ray: a local instance (``--workers N``) or a cluster (``--ray-address``).

``explain_all`` is the entry point of a recorded run: without a ``Parallel`` it explains each configuration in
this process (no Ray needed); with one, it plans the units of every configuration
(``engine.parallel.work``), submits them all at once, shows one progress bar over them, and
merges each configuration's shards into one ``Explanation``. The shards live in a folder keyed
by a hash of the run and the arguments; a rerun of the same command after a crash (of the
driver, or of the whole machine) computes only the units without a finished folder. Ray retries
a unit whose worker process dies (``MAX_RETRIES`` times). The caller removes the shard folder
once the merged result is published. ``explain_intervals`` runs the intervals of a checkpoint
series the same way, one task per interval.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from engine.decompose import ExplainConfig, Explanation, explain_history
from engine.errors import BadInputError
from engine.model.task import Task
from engine.parallel.work import (
    IntervalUnit,
    WorkUnit,
    content_key,
    interval_report,
    merge_units,
    plan_units,
    read_shards,
    run_interval,
    run_unit,
)
from engine.run.history import History
from engine.run.series import SeriesSource, open_series

MAX_RETRIES = 3  # attempts after the first when a worker process dies
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Parallel:
    """Where explanations run: ``workers`` local Ray worker slots, or the cluster at ``address``;
    each task reserves ``gpus_per_task`` GPUs (0: CPU tasks of one core)."""

    workers: int | None = None
    address: str | None = None
    gpus_per_task: float = 0.0

    def __post_init__(self) -> None:
        if (self.workers is None) == (self.address is None):
            raise BadInputError("give either --workers N (a local Ray instance) or --ray-address ADDR, not both")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise BadInputError(f"--workers must be a positive integer, got {self.workers!r}")
        if not 0.0 <= float(self.gpus_per_task) <= 64:
            raise BadInputError(f"--gpus-per-task must be between 0 and 64, got {self.gpus_per_task!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--ray-address`` and ``--gpus-per-task`` on a command."""
    group = parser.add_argument_group("parallel (Ray; pip install '.[ray]')")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run the explanation as tasks on a local Ray instance of N worker slots")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run the tasks on the Ray cluster at ADDR (host:port)")
    group.add_argument("--gpus-per-task", type=float, default=0.0, metavar="G",
                       help="GPUs each task reserves (default 0)")


def from_arguments(args: argparse.Namespace) -> Parallel | None:
    """The ``Parallel`` the command line asks for, or None (this process alone)."""
    if args.workers is None and args.ray_address is None:
        if args.gpus_per_task:
            raise BadInputError("--gpus-per-task needs --workers or --ray-address")
        return None
    return Parallel(args.workers, args.ray_address, args.gpus_per_task)


@contextlib.contextmanager
def ray_session(parallel: Parallel) -> Iterator[Any]:
    """Ray, connected: a local instance started (and stopped) here, or the given cluster. A Ray
    already initialised in this process (a test's shared cluster) is used as it is."""
    try:
        import ray
    except ImportError as exc:
        raise BadInputError("--workers and --ray-address need Ray: pip install 'explaind-studio[ray]'") from exc
    if ray.is_initialized():
        yield ray
        return
    if parallel.address is not None:
        try:
            ray.init(address=parallel.address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BadInputError(f"cannot connect to the Ray cluster at {parallel.address}: {exc}") from exc
    else:
        path = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), os.getcwd()]))
        ray.init(num_cpus=parallel.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield ray
    finally:
        ray.shutdown()


def explain_all(history: History, task: Task, configs: list[ExplainConfig], parallel: Parallel | None,
                shards: Path, progress: bool = True,
                allow_incomplete: bool = False) -> tuple[list[Explanation], dict[str, Any] | None]:
    """Each configuration explained, in this process or as tasks on Ray (see the module docstring);
    with Ray also a report: worker slots, start-up and merge seconds, and each task's timing and retries."""
    if parallel is None:
        return [explain_history(history, task, c, progress) for c in configs], None
    ids = [c.test_ids_in(len(task.dataset(c.test_split))) for c in configs]  # bad ids fail before Ray starts
    started = time.perf_counter()
    with ray_session(parallel) as ray:
        slots = _slots(ray, parallel)
        startup = time.perf_counter() - started
        folder = shards / content_key(history, configs, slots)
        units = [u for i, (c, t) in enumerate(zip(configs, ids, strict=True))
                 for u in plan_units(history, c, t, slots, folder, i, allow_incomplete)]
        reports = _run_units(ray, units, parallel, progress)
    merging = time.perf_counter()
    parts = [read_shards(u) for u in units]
    explanations = [merge_units([u for u in units if u.pass_index == i],
                                [p for u, p in zip(units, parts, strict=True) if u.pass_index == i], c, t)
                    for i, (c, t) in enumerate(zip(configs, ids, strict=True))]
    report = {"slots": slots, "tasks": reports, "startup_seconds": startup,
              "merge_seconds": time.perf_counter() - merging, "seconds": time.perf_counter() - started,
              "reused": sum(r["reused"] for r in reports), "retries": sum(r["retries"] for r in reports)}
    return explanations, report


def _run_units(ray: Any, units: list[WorkUnit], parallel: Parallel, progress: bool) -> list[dict[str, Any]]:
    """Submit every unit not finished before; one progress bar over all of them."""
    remote = _remote(ray, run_unit, parallel)
    reports: dict[str, dict[str, Any]] = {}
    pending = {}
    for unit in sorted(units, key=lambda u: "data" not in u.config.views):  # the longest (data view) first
        if unit.done():
            reports[unit.folder] = run_unit(unit)  # reads nothing but the folder: reuse is instant
        else:
            pending[remote.remote(unit)] = (unit.folder, Path(unit.folder).name,
                                            (unit.config.steps[1] - unit.config.steps[0]) * len(unit.config.test_ids))
    reports.update(_gather(ray, pending, len(units), progress))
    return [reports[u.folder] for u in units]


def explain_intervals(source: SeriesSource, options: dict[str, Any], work: Path, parallel: Parallel,
                      progress: bool = True) -> dict[str, Any]:
    """Every interval of a checkpoint series as one task, saved in ``work`` (the ``work_folder`` of
    the run database) for ``explain_checkpoints`` to read back; intervals saved there before (a
    killed run) are not computed again. Returns the report: worker slots, start-up seconds, each
    task's timing and retries."""
    from engine.decompose.checkpoints import checkpoint_config, interval_folder

    opened = open_series(source)
    config = checkpoint_config(opened, **options)
    series, tests = opened.series, len(config.test_ids_in(len(opened.task.dataset("val"))))
    units = [IntervalUnit(source, tuple(sorted(options.items())), str(work), k, tests,
                          (series.steps[k], series.steps[k + 1])) for k in range(series.num_steps)]
    started = time.perf_counter()
    with ray_session(parallel) as ray:
        slots = _slots(ray, parallel)
        startup = time.perf_counter() - started
        remote = _remote(ray, run_interval, parallel)
        reports = {u.name: interval_report(u, 0.0, reused=True) for u in units
                   if interval_folder(opened, config, work, u.k).is_dir()}
        pending = {remote.remote(u): (u.name, u.name, (u.steps[1] - u.steps[0]) * u.tests)
                   for u in units if u.name not in reports}
        reports.update(_gather(ray, pending, len(units), progress, desc="intervals", rate="step·inputs/s"))
    tasks = [reports[u.name] for u in units]
    return {"slots": slots, "tasks": tasks, "startup_seconds": startup, "seconds": time.perf_counter() - started,
            "reused": sum(r["reused"] for r in tasks), "retries": sum(r["retries"] for r in tasks)}


def _slots(ray: Any, parallel: Parallel) -> int:
    """Tasks the cluster runs at once; an error if it cannot run one."""
    resources = ray.cluster_resources()
    kind = "GPU" if parallel.gpus_per_task else "CPU"
    if resources.get(kind, 0) < (parallel.gpus_per_task or 1):
        raise BadInputError(f"the Ray cluster has {resources.get(kind, 0):g} {kind}s; a task needs "
                            f"{parallel.gpus_per_task or 1:g} (--gpus-per-task)")
    return max(1, int(resources[kind] / (parallel.gpus_per_task or 1)))


def _remote(ray: Any, function: Any, parallel: Parallel) -> Any:
    """``function`` as a Ray task of one core (or ``gpus_per_task`` GPUs), retried when its worker dies."""
    return ray.remote(function).options(num_cpus=0 if parallel.gpus_per_task else 1,
                                        num_gpus=parallel.gpus_per_task, max_retries=MAX_RETRIES,
                                        retry_exceptions=False)


def _gather(ray: Any, pending: dict[Any, tuple[str, str, int]], total: int, progress: bool,
            desc: str = "explain", rate: str = "step·tests/s") -> dict[str, dict[str, Any]]:
    """The reports of the submitted tasks (``ref → (key, name, work)``), one progress bar over all
    ``total`` tasks (those not submitted count as done), its throughput in ``rate`` units of work."""
    reports: dict[str, dict[str, Any]] = {}
    started, done = time.perf_counter(), 0
    with tqdm(total=total, initial=total - len(pending), desc=desc, unit="task", disable=not progress,
              dynamic_ncols=True) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key, name, work = pending.pop(ready[0])
            try:
                reports[key] = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise BadInputError(f"task {name} failed: {_cause(exc)}") from exc
            done += work
            bar.set_postfix_str(f"{done / (time.perf_counter() - started):.1f} {rate}")
            bar.update(1)
    return reports


def _cause(exc: BaseException) -> str:
    """The worker's own error line, not Ray's wrapper around it."""
    cause = getattr(exc, "cause", None)
    return str(cause).splitlines()[0] if cause is not None else str(exc).splitlines()[-1]


def remove_shards(shards: Path) -> None:
    """Drop the shard folder once its results are published."""
    shutil.rmtree(shards, ignore_errors=True)
