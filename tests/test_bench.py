"""The benchmark scripts still run against the engine they measure.

Benchmarks run on demand, so an engine change that breaks one goes unseen until someone
needs its figures. Every script must import; the decomposition benchmark's two workers (the
whole-run measurement and the unit cost it divides by) run on two steps of a small run.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(script: str) -> ModuleType:
    name = f"bench_script_{script}"
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up while the script runs)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize("script", sorted(path.stem for path in BENCH.glob("*.py")))
def test_every_benchmark_script_imports_and_has_a_main(script):
    assert callable(load(script).main)


def test_the_decomposition_benchmark_workers_run_on_a_small_run(tmp_path):
    bench = load("bench_decompose")
    run = bench.train(tmp_path / "run", steps=3)
    explained = bench.run_worker("explain", {"run": str(run), "quadrature": "adaptive", "views": "components",
                                             "tests": 2, "steps": [0, 2]})
    assert explained["steps"] == 2 and explained["evaluations"] > 0
    assert explained["max_rel"] < 1e-4
    assert all(math.isfinite(explained[key]) and explained[key] > 0 for key in ("wall", "cpu", "peak_mb"))
    unit = bench.run_worker("unit", {"run": str(run), "tests": 2})
    assert unit["unit"] > 0 and unit["chunk"] == 2 and unit["parameters"] > 0
