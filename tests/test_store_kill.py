"""Atomic publish under SIGKILL: a writer killed at any moment leaves the previous complete
run database (or the new complete one) at the target, never a broken file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.store import RunDB, list_runs, write_run
from tests.fixtures_store import synthetic_bundle

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"windows": 40, "window": 4, "tensors": 10, "n_test": 150, "n_train": 60, "data_window": 16, "data_tests": 40}

WRITER = f"""
import sys
sys.path.insert(0, sys.argv[3])
from engine.store import write_run
from tests.fixtures_store import synthetic_bundle
bundle = synthetic_bundle(seed=int(sys.argv[2]), marker="run" + sys.argv[2], **{SHAPE})
print("ready", flush=True)
write_run(sys.argv[1], bundle, threads=1)
print("done", flush=True)
"""


def expected_counts(seed: int) -> dict[str, int]:
    bundle = synthetic_bundle(seed=seed, marker=f"run{seed}", **SHAPE)
    return {"components": bundle.components.height, "data": bundle.data.height,
            "completeness": bundle.completeness.height}


def temp_files(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-")]


@pytest.mark.slow
def test_killed_writer_leaves_old_or_new_complete_file(tmp_path):
    target = tmp_path / "run.duckdb"
    start = time.perf_counter()
    write_run(target, synthetic_bundle(seed=0, marker="run0", **SHAPE), threads=1)
    duration = time.perf_counter() - start
    counts = expected_counts(0)  # every seed has the same shape
    current = "run0"
    rng = random.Random(7)
    interrupted = 0
    for seed in range(1, 8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(seed), str(ROOT)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.3) * duration)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        interrupted += any(f".tmp-{proc.pid}-" in p.name for p in temp_files(tmp_path, target.name))
        with RunDB.open(target) as db:
            marker = db.meta()["marker"]
            assert marker in (current, f"run{seed}")
            views = db.views()
            assert {k: views[k] for k in counts} == counts
            assert db.component_totals("layer")["value"].sum() == pytest.approx(
                db.completeness()["reconstructed"].sum())
        current = marker
        assert list_runs(tmp_path) == [target]  # leftovers are never listed as runs
    assert interrupted >= 2, "the kills should interrupt some writes"
    write_run(target, synthetic_bundle(seed=99, marker="final", **SHAPE), threads=1)
    assert temp_files(tmp_path, target.name) == []  # dead writers' files are cleaned up
    with RunDB.open(target) as db:
        assert db.meta()["marker"] == "final"
