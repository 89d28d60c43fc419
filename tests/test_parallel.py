"""Explanations as tasks on Ray: split over test chunks and step segments, merged, equal to one
process; a killed worker is retried, a killed driver's finished shards are reused. A checkpoint
series: one task per interval, equal to one process, a killed worker retried, saved intervals reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from polars.testing import assert_frame_equal

from engine.cli import main
from engine.decompose import ExplainConfig, explain_history
from engine.errors import BadInputError
from engine.model.task import get_task
from engine.parallel import Parallel, explain_all
from engine.run.history import History
from engine.store import RunDB, write_run
from tests.helpers import record_tiny_run, write_inputs, write_series

ROOT = Path(__file__).resolve().parents[1]
FRAMES = ("components", "data", "importance", "completeness", "predictions", "step_stats", "units",
          "unit_components")
HALVES = {"name": "halves", "units": {"first rows": {"hidden.weight": "0:3"}, "last rows": {"hidden.weight": "3:"}}}
# components split over test chunks × step segments; the rest (and partitions) over test chunks only
CONFIGS = (ExplainConfig(test_size=8, dtype="float64", window=3, views=("components",)),
           ExplainConfig(test_size=8, dtype="float64", window=4, quantity="logprob",
                         views=("components", "importance", "data"), partitions=(HALVES,)))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return record_tiny_run(tmp_path_factory.mktemp("parallel") / "run",
                           lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), steps=12)


@pytest.fixture(scope="module")
def single(run) -> list:
    history = History.open(run)
    return [explain_history(history, get_task(history.model_spec), c, progress=False) for c in CONFIGS]


def assert_same(single, parallel) -> None:
    """Components, data and importance to 1e-12 relative; completeness rows identical but for the
    optimizer residual (to 1e-12 relative)."""
    for one, many in zip(single, parallel, strict=True):
        for name in FRAMES:
            a, b = getattr(one, name), getattr(many, name)
            assert (a is None) == (b is None), name
            if a is None:
                continue
            if name == "completeness":  # the optimizer residual φ̂·ρ sums in another order in other batches
                assert a.drop("optimizer_residual").equals(b.drop("optimizer_residual"))
                assert_frame_equal(a.select("optimizer_residual"), b.select("optimizer_residual"),
                                   rel_tol=1e-12, abs_tol=1e-20)
            else:
                assert_frame_equal(a, b, rel_tol=1e-12, abs_tol=1e-15)
        assert one.test_ids == many.test_ids
        assert one.max_rel_residual == pytest.approx(many.max_rel_residual, rel=1e-9, abs=1e-15)


def kill_first_worker(folder: Path, pattern: str, killed: list[int]) -> None:
    """SIGKILL the first worker process found computing a task (an ``.attempts`` marker whose task
    has not finished: ``finished(marker)`` false); its pid goes to ``killed``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for attempts in folder.glob(pattern):
            pids = [int(p.name) for p in attempts.iterdir()]
            if pids and not finished(attempts):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
        time.sleep(0.002)


def finished(attempts: Path) -> bool:
    """A unit's folder is complete; an interval's saved folder (``interval-00001-<hash>``) exists."""
    base = str(attempts).removesuffix(".attempts")
    return Path(base).exists() or any(attempts.parent.glob(f"{Path(base).name}-*"))


def test_workers_equal_one_process(ray_cluster, run, single, tmp_path):
    history = History.open(run)
    parallel, report = explain_all(history, get_task(history.model_spec), list(CONFIGS), Parallel(workers=2),
                                   tmp_path / "shards", progress=False)
    units = {r["unit"] for r in report["tasks"]}
    assert "pass0-chunk001-seg01" in units  # the components pass is split both ways
    assert "pass1-chunk003-seg00" in units and not any(u.startswith("pass1") and "seg01" in u for u in units)
    assert parallel[1].unit_components is not None and parallel[1].unit_components.height
    assert report["reused"] == report["retries"] == 0
    assert_same(single, parallel)


def test_a_killed_worker_is_retried(ray_cluster, run, single, tmp_path):
    """The first task's worker process is killed (SIGKILL, by its pid) while it computes."""
    shards = tmp_path / "shards"
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_worker, args=(shards, "*/*.attempts", killed))
    killer.start()
    history = History.open(run)
    parallel, report = explain_all(history, get_task(history.model_spec), list(CONFIGS), Parallel(workers=2),
                                   shards, progress=False)
    killer.join()
    assert killed, "no worker was running a task"
    assert report["retries"] >= 1
    assert killed[0] not in {r["worker_pid"] for r in report["tasks"]}
    assert_same(single, parallel)


@pytest.mark.slow  # a second driver process: its imports take seconds
def test_rerun_after_a_killed_driver_reuses_finished_shards(ray_cluster, run, single, tmp_path, capsys):
    out = tmp_path / "resumed.duckdb"
    shards = tmp_path / "resumed.duckdb.shards"
    args = [str(run), "--out", str(out), "--test", "val:8", "--dtype", "float64", "--window", "3", "--json",
            "--trust-run"]
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "engine", "explain", *args, "--ray-address", address],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(shards.glob("*/*/manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = len(list(shards.glob("*/*/manifest.json")))
    assert finished >= 1 and not out.exists()

    assert main(["explain", *args, "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)["parallel"]
    assert report["reused"] >= finished
    assert not shards.exists()  # removed once the database is published
    history = History.open(run)
    alone = write_run(tmp_path / "alone.duckdb", single[0].to_bundle(history, get_task(history.model_spec)))
    with RunDB.open(out) as db, RunDB.open(alone) as reference:
        assert_frame_equal(db.completeness(), reference.completeness(), rel_tol=1e-12, abs_tol=1e-20)
        assert_frame_equal(db.component_totals("tensor"), reference.component_totals("tensor"), rel_tol=1e-12)


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--workers", "2", "--ray-address", "localhost:1"], "not both"),
    (["--gpus-per-task", "1"], "--gpus-per-task needs --workers"),
])
def test_bad_parallel_flags_are_one_error_line(run, tmp_path, capsys, flags, message):
    out = tmp_path / "x.duckdb"
    assert main(["explain", str(run), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_more_gpus_per_task_than_the_cluster_has_is_an_error(ray_cluster, run, tmp_path):
    history = History.open(run)
    with pytest.raises(BadInputError, match="has 0 GPUs; a task needs 1"):
        explain_all(history, get_task(history.model_spec), list(CONFIGS), Parallel(workers=2, gpus_per_task=1),
                    tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards").exists()


# ---------------------------------------------------------------------------------- checkpoint series
def test_a_series_on_workers_equals_one_process(ray_cluster, tmp_path, capsys):
    """One task per interval; the first interval's worker is killed mid-task and retried; the run
    database equals one process's; a rerun of the intervals reuses every saved one."""
    source = write_series(tmp_path / "ckpts", steps=(0, 10, 20, 30))
    inputs = write_inputs(tmp_path / "in.jsonl", [[1, 5, 2, 7, 3, 3], [4, 4, 9], [12, 0, 6, 1, 8, 2, 11, 5]])
    args = [str(source), "--inputs", str(inputs), "--dtype", "float64", "--device", "cpu", "--json"]
    assert main(["explain-checkpoints", *args, "--out", str(tmp_path / "one.duckdb")]) == 0
    capsys.readouterr()

    out = tmp_path / "many.duckdb"
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_worker, args=(tmp_path, ".many.duckdb.intervals-*/*.attempts",
                                                              killed))
    killer.start()
    assert main(["explain-checkpoints", *args, "--out", str(out), "--workers", "2"]) == 0
    killer.join()
    summary = json.loads(capsys.readouterr().out)
    report = summary["parallel"]
    assert [t["unit"] for t in report["tasks"]] == ["interval-00000", "interval-00001", "interval-00002"]
    assert killed and report["retries"] >= 1 and killed[0] not in {t["worker_pid"] for t in report["tasks"]}
    assert summary["resumed_intervals"] == 3  # the database is made of the tasks' saved intervals
    assert not list(tmp_path.glob(".many.duckdb.intervals-*"))
    with RunDB.open(tmp_path / "one.duckdb") as one, RunDB.open(out) as many:
        assert_frame_equal(many.completeness(), one.completeness(), rel_tol=1e-12, abs_tol=1e-20)
        assert_frame_equal(many.component_totals("tensor"), one.component_totals("tensor"), rel_tol=1e-12)
        assert many.meta()["max_rel_residual"] == pytest.approx(one.meta()["max_rel_residual"], rel=1e-9, abs=1e-15)

    from engine.decompose.checkpoints import checkpoint_config, work_folder
    from engine.parallel import explain_intervals
    from engine.run.series import SeriesSource, open_series

    series = SeriesSource((str(source),), str(inputs))
    options = {"dtype": "float64", "device": "cpu"}
    opened = open_series(series)
    work = work_folder(out, opened, checkpoint_config(opened, **options))
    first = explain_intervals(series, options, work, Parallel(workers=2), progress=False)
    again = explain_intervals(series, options, work, Parallel(workers=2), progress=False)
    assert (first["reused"], again["reused"]) == (0, 3)
