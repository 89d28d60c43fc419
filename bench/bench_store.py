"""Benchmark the run database: load throughput, file size and dashboard query latency.

Usage::

    .venv/bin/python bench/bench_store.py                       # 10^7 component + 10^7 data rows
    .venv/bin/python bench/bench_store.py --scale 0.1 --repeat 10

Synthesizes a run (``tests.fixtures_store.synthetic_bundle``) with, at scale 1,
components 500 windows × 10 tensors × 2000 tests (10^7 rows), data 100 windows ×
(1000 training examples + regularizer) × 100 tests (≈10^7 rows) and completeness
4000 steps × 2000 tests (8·10^6 rows); writes it with ``write_run``; then times every
read query the dashboard issues (``--repeat`` runs after two warm-ups) and writes a
markdown table to ``bench/results/store.md``. DuckDB uses ``--threads`` threads (2).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import polars as pl  # noqa: E402

from engine.store import RunDB, TestSelector, info, write_run  # noqa: E402
from tests.fixtures_store import synthetic_bundle  # noqa: E402

TARGET_P95_MS = 150.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def time_call(fn: Callable[[], object], repeat: int) -> list[float]:
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def queries(db: RunDB, path: Path, steps: int, label: int) -> list[tuple[str, str, Callable[[], object]]]:
    """(query, parameters, call) for every read the dashboard issues."""
    all_, correct, incorrect = TestSelector("all"), TestSelector("correct"), TestSelector("incorrect")
    klass, example = TestSelector("class", label), TestSelector("example", 42)
    middle = (steps // 4, steps // 2)
    out: list[tuple[str, str, Callable[[], object]]] = [
        ("RunDB.open", "schema check, meta, row counts", lambda: RunDB.open(path).close()),
        ("meta + steps + groups", "", lambda: (db.meta(), db.steps(), db.groups())),
        ("examples", "split=test", lambda: db.examples("test")),
    ]
    for level in ("tensor", "module", "layer"):
        for measure in ("signed", "absolute", "share"):
            out.append(
                (
                    "component_matrix",
                    f"{level}, {measure}, stored windows, all tests",
                    lambda lv=level, m=measure: db.component_matrix(lv, None, None, all_, m),
                )
            )
    for name, sel in (("correct", correct), (f"class {label}", klass), ("example 42", example)):
        for measure in ("signed", "share"):
            out.append(
                (
                    "component_matrix",
                    f"layer, {measure}, window {steps // 50}, {name}",
                    lambda s=sel, m=measure: db.component_matrix("layer", steps // 50, None, s, m),
                )
            )
    out.append(
        (
            "component_matrix",
            f"module, absolute, steps {middle}, example 42",
            lambda: db.component_matrix("module", steps // 50, middle, example, "absolute"),
        )
    )
    for level in ("tensor", "layer"):
        for name, sel in (("all", all_), ("incorrect", incorrect), ("example 42", example)):
            out.append(
                ("component_totals", f"{level}, {name}", lambda lv=level, s=sel: db.component_totals(lv, None, s))
            )
    out.append(
        (
            "component_totals",
            f"module, steps {middle}, class {label}",
            lambda: db.component_totals("module", middle, klass),
        )
    )
    for name, sel in (("all", all_), (f"class {label}", klass), ("example 42", example)):
        out.append(("top_train_examples", f"{name}, k=10", lambda s=sel: db.top_train_examples(s, None, 10)))
    out.append(
        ("top_train_examples", f"correct, steps {middle}, k=25", lambda: db.top_train_examples(correct, middle, 25))
    )
    for name, sel in (("all", all_), ("correct", correct), ("example 42", example)):
        out.append(("train_example_over_time", f"train 123, {name}", lambda s=sel: db.train_example_over_time(123, s)))
    out.append(("train_example_over_time", "regularizer, all", lambda: db.train_example_over_time(-1, all_)))
    for name, sel in (("all", all_), (f"class {label}", klass), ("example 42", example)):
        out.append(("data_distribution", name, lambda s=sel: db.data_distribution(s, None)))
    out.append(("data_distribution", f"incorrect, steps {middle}", lambda: db.data_distribution(incorrect, middle)))
    for name, sel in (("all", all_), ("correct", correct), ("example 42", example)):
        out.append(("completeness", f"all steps, {name}", lambda s=sel: db.completeness(None, s)))
    out.append(("completeness", f"steps {middle}, class {label}", lambda: db.completeness(middle, klass)))
    out.append(("info", "CLI summary (not a dashboard query)", lambda: info(path)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of tests/train examples")
    parser.add_argument("--classes", type=int, default=113, help="labels of the synthetic task (113 = grokking)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the database (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.md")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the time of every write stage")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("engine.store").setLevel(logging.DEBUG)

    load_before = os.getloadavg()[0]
    n_test = max(10, round(2000 * args.scale))
    n_train = max(10, round(1000 * args.scale))
    data_tests = max(5, round(100 * args.scale))
    t0 = time.perf_counter()
    bundle = synthetic_bundle(
        windows=500,
        window=8,
        tensors=10,
        n_test=n_test,
        n_train=n_train,
        outputs=1,
        classes=args.classes,
        data_window=40,
        data_tests=data_tests,
        seed=1,
        marker="bench",
        tensor_size=4096,
    )
    synth_s = time.perf_counter() - t0
    rows = {name: getattr(bundle, name).height for name in ("components", "data", "completeness", "importance")}
    total_rows = sum(rows.values())

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.duckdb"
        t0 = time.perf_counter()
        write_run(path, bundle, threads=args.threads)
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        del bundle
        with RunDB.open(path, threads=args.threads) as db:
            label = int(db.examples("test")["label"][0])
            results = []
            for name, params, fn in queries(db, path, 4000, label):
                times = time_call(fn, args.repeat)
                results.append((name, params, statistics.median(times), percentile(times, 0.95)))
                print(
                    f"{name:24s} {params:48s} median {results[-1][2]:8.1f} ms  p95 {results[-1][3]:8.1f} ms", flush=True
                )

    load_after = os.getloadavg()[0]
    dashboard = [r for r in results if r[0] != "info"]
    worst = max(r[3] for r in dashboard)
    lines = [
        "# Run database benchmark (`bench/bench_store.py`)",
        "",
        f"DuckDB {duckdb.__version__}, polars {pl.__version__}, Python {platform.python_version()}, "
        f"{args.threads} DuckDB threads, {args.repeat} timed runs per query after 2 warm-ups; "
        f"{os.cpu_count()} CPU cores, 1-minute load average {load_before:.1f} before and {load_after:.1f} after "
        "(other jobs share the machine).",
        "",
        f"Synthetic run: {rows['components']:,} component rows (500 windows × 10 tensors × {n_test} tests), "
        f"{rows['data']:,} data rows (100 windows × {n_train + 1} train × {data_tests} tests), "
        f"{rows['completeness']:,} completeness rows (4000 steps × {n_test} tests), "
        f"{rows['importance']:,} importance rows; {args.classes} classes.",
        "",
        "| load | value |",
        "|---|---|",
        f"| synthesize bundle (numpy/polars) | {synth_s:.1f} s |",
        f"| write_run (sort, summaries, checkpoint, publish) | {write_s:.1f} s |",
        f"| load throughput | {total_rows / write_s / 1e6:.2f} M rows/s ({total_rows:,} rows) |",
        f"| file size | {size / 2**20:.0f} MiB ({size / 2**20 / (total_rows / 1e6):.1f} MiB per 10^6 rows) |",
        "",
        f"| query | parameters | median ms | p95 ms | p95 < {TARGET_P95_MS:.0f} ms |",
        "|---|---|---|---|---|",
    ]
    for name, params, median, p95 in results:
        ok = "—" if name == "info" else ("yes" if p95 < TARGET_P95_MS else "**no**")
        lines.append(f"| {name} | {params} | {median:.1f} | {p95:.1f} | {ok} |")
    lines += ["", f"Worst dashboard-query p95: {worst:.1f} ms (target {TARGET_P95_MS:.0f} ms)."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
