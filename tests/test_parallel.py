"""Explanations as tasks on Ray: split over test chunks and step segments, merged, equal to one
process; a killed worker is retried, a killed driver's finished shards are reused."""

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
from tests.helpers import record_tiny_run

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

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for attempts in shards.glob("*/*.attempts"):
                pids = [int(p.name) for p in attempts.iterdir()]
                if pids and not Path(str(attempts).removesuffix(".attempts")).exists():
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_first_worker)
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
