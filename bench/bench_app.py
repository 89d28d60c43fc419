"""Benchmark the dashboard server side: first page render and time per interaction.

Usage::

    .venv/bin/python bench/bench_app.py                 # 10^7 component rows + ≈10^7 data rows
    .venv/bin/python bench/bench_app.py --scale 0.1     # a tenth of the tests and training examples
    .venv/bin/python bench/bench_app.py --db RUN.duckdb # reuse a written run database

Writes a synthetic run (``tests.fixtures_store.synthetic_bundle``; at scale 1 the shape of
``bench/bench_store.py``: components 500 windows × 10 tensors × 2000 tests = 10^7 rows,
data 100 windows × 1001 training ids × 100 tests ≈ 10^7 rows; partitions of 4 heads, 257
neurons and 57 Fourier frequencies over 500 windows, summed in three parts, as a grokking
run stores them; progress measures over every step) and a small second run for the
Compare page, then drives ``app/main.py`` with streamlit's ``AppTest`` — the same script
run a browser interaction triggers, without the websocket — and times:

- the cold start of a fresh Python process up to the first rendered page (imports included);
- the first render of every page in a warm process with empty caches;
- a scripted sequence of interactions (every slice control of every page, page switches),
  each a script rerun whose queries are mostly cache misses.

Targets: first render ≤ 3 s, interaction p95 ≤ 300 ms. Results go to ``bench/results/app.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from app import state  # noqa: E402
from engine.store import RunDB, add_progress, write_run  # noqa: E402
from tests.fixtures_store import default_tensors, synthetic_bundle, synthetic_progress  # noqa: E402

MAIN = str(ROOT / "app" / "main.py")
FIRST_RENDER_S = 3.0
INTERACTION_P95_MS = 300.0
PAGES = ("overview", "components", "data", "reconstruction", "pruning", "compare")
TENSORS = [t[0] for t in default_tensors(10)]
PARTITIONS = (  # (name, kind, scope tensors, units): the partitions of a grokking run
    ("heads", "groups", tuple(TENSORS[4:8]), 4),
    ("neurons", "groups", tuple(TENSORS[0:4]), 257),
    ("embed-fourier", "basis", (TENSORS[8],), 57),
)
UNIT_TESTS = 20  # per-test unit values generated (only their sums within parts are stored)

COLD_START = """
import sys, time
start = time.perf_counter()
from streamlit.testing.v1 import AppTest
loaded = time.perf_counter()
at = AppTest.from_file(sys.argv[1], default_timeout=120).run()
assert not at.exception, [e.value for e in at.exception]
print(loaded - start, time.perf_counter() - loaded)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def build_runs(directory: Path, scale: float, classes: int) -> tuple[Path, dict[str, int], float]:
    """Write the large run and a small second run; return the large path, row counts, seconds."""
    bundle = synthetic_bundle(
        windows=500, window=8, tensors=10, n_test=max(10, round(2000 * scale)), n_train=max(10, round(1000 * scale)),
        outputs=1, classes=classes, data_window=40, data_tests=max(5, round(100 * scale)), seed=1, marker="bench",
        tensor_size=4096, task="synthetic-grokking", partitions=PARTITIONS, unit_tests=UNIT_TESTS,
    )  # fmt: skip
    rows = {name: getattr(bundle, name).height for name in ("components", "data", "completeness")}
    start = time.perf_counter()
    path = write_run(directory / "bench-large.duckdb", bundle)
    add_progress(path, *synthetic_progress(bundle.steps.height, p=113, keys=(14, 35, 41, 42, 52)))
    seconds = time.perf_counter() - start
    del bundle
    small = synthetic_bundle(windows=500, window=8, tensors=10, n_test=50, n_train=40, classes=classes,
                             data_window=40, seed=2, marker="small", task="synthetic-grokking")  # fmt: skip
    write_run(directory / "bench-small.duckdb", small)
    return path, rows, seconds


def timed(at: AppTest, action: Callable[[AppTest], object]) -> float:
    """Milliseconds of one interaction: the widget change or page switch plus the script rerun."""
    start = time.perf_counter()
    action(at)
    at.run()
    elapsed = (time.perf_counter() - start) * 1000
    if at.exception or at.error:
        raise RuntimeError(f"the app failed: {[e.value for e in at.exception]} {[e.value for e in at.error]}")
    return elapsed


def interactions(test_id: int, label: int, train_id: int) -> list[tuple[str, str, Callable[[AppTest], object]]]:
    """(page, interaction, action): every slice control of every page, and page switches."""

    def page(name: str) -> Callable[[AppTest], object]:
        return lambda at: at.switch_page(f"views/{name}.py")

    def seg(key: str, value: str) -> Callable[[AppTest], object]:
        return lambda at: at.segmented_control(key=f"url:{key}").set_value(value)

    def select(key: str, value) -> Callable[[AppTest], object]:
        return lambda at: at.selectbox(key=f"url:{key}").select(value)

    def number(key: str, value: int) -> Callable[[AppTest], object]:
        return lambda at: at.number_input(key=f"url:{key}").set_value(value)

    def slider(key: str, value) -> Callable[[AppTest], object]:
        return lambda at: at.slider(key=f"url:{key}").set_value(value)

    def toggle(key: str, value: bool) -> Callable[[AppTest], object]:
        return lambda at: at.toggle(key=f"url:{key}").set_value(value)

    return [
        ("overview", "log step axis on", toggle("logx", True)),
        ("overview", "presentation mode on", toggle("present", True)),
        ("overview", "presentation mode off", toggle("present", False)),
        ("components", "open page", page("components")),
        ("components", "level module", seg("level", "module")),
        ("components", "level tensor", seg("level", "tensor")),
        ("components", "measure absolute", seg("measure", "absolute")),
        ("components", "measure share", seg("measure", "share")),
        ("components", "window 8 (stored)", lambda at: at.select_slider(key="url:window").set_value(8)),
        ("components", "window 400", lambda at: at.select_slider(key="url:window").set_value(400)),
        ("components", "level layer", seg("level", "layer")),
        ("components", "measure signed", seg("measure", "signed")),
        ("components", "steps 1000-3000", slider("steps", (1000, 3000))),
        ("components", "tests: correct", select("subset", "correct")),
        ("components", "tests: incorrect", select("subset", "incorrect")),
        ("components", "tests: one class", select("subset", "class")),
        ("components", f"class {label}", select("class", label)),
        ("components", "tests: one example", select("subset", "example")),
        ("components", f"example {test_id}", number("example", test_id)),
        ("components", "running sum on", toggle("cumulative", True)),
        ("components", "tests: all", select("subset", "all")),
        ("components", "open neurons", select("open", "neurons")),
        ("components", "units shown 20", number("top", 20)),
        ("components", "measure share (units)", seg("measure", "share")),
        ("components", "window 80 (units)", lambda at: at.select_slider(key="url:window").set_value(80)),
        ("components", "open embed-fourier", select("open", "embed-fourier")),
        ("components", "steps 0-4000 (units)", slider("steps", (0, 4000))),
        ("components", "open heads", select("open", "heads")),
        ("data", "open page", page("data")),
        ("data", "examples per side 25", number("k", 25)),
        ("data", "steps 0-2000", lambda at: at.select_slider(key="url:steps").set_value((0, 2000))),
        ("data", "tests: all", select("subset", "all")),
        ("data", f"training example {train_id}", number("train", train_id)),
        ("data", "tests: one class", select("subset", "class")),
        ("reconstruction", "open page", page("reconstruction")),
        ("reconstruction", "steps 500-1500", slider("steps", (500, 1500))),
        ("reconstruction", "tests: correct", select("subset", "correct")),
        ("reconstruction", "tests: one example", select("subset", "example")),
        ("pruning", "open page", page("pruning")),
        ("compare", "open page", page("compare")),
        ("compare", "level module", seg("level", "module")),
        ("compare", "log step axis off", toggle("logx", False)),
        ("overview", "open page", page("overview")),
        ("overview", "run: small", select("run", "bench-small")),
        ("overview", "run: large", select("run", "bench-large")),
    ]


def clear_caches() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()


def first_renders() -> dict[str, float]:
    """Seconds to render each page in a fresh session with empty caches (warm interpreter)."""
    out = {}
    for name in PAGES:
        clear_caches()
        at = AppTest.from_file(MAIN, default_timeout=120)
        at.switch_page(f"views/{name}.py")
        start = time.perf_counter()
        at.run()
        out[name] = time.perf_counter() - start
        if at.exception or at.error:
            raise RuntimeError(f"{name}: {[e.value for e in at.exception]} {[e.value for e in at.error]}")
    return out


def cold_start(runs: Path) -> tuple[float, float]:
    """A new Python process: seconds to import streamlit (a server does this before any
    session), then seconds of the first script run (the app's imports, opening the run,
    queries, figures) — what the first visitor of a freshly started server waits for."""
    env = {**os.environ, state.ENV_RUNS: str(runs)}
    result = subprocess.run([sys.executable, "-c", COLD_START, MAIN], env=env, capture_output=True, text=True,
                            check=True, cwd=ROOT)  # fmt: skip
    streamlit_s, first_s = result.stdout.strip().splitlines()[-1].split()
    return float(streamlit_s), float(first_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of tests/train examples")
    parser.add_argument("--classes", type=int, default=113)
    parser.add_argument("--rounds", type=int, default=3, help="times the interaction sequence is replayed")
    parser.add_argument("--db", type=Path, default=None, help="benchmark an existing run database instead")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the databases (default: temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "app.md")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        runs = Path(tmp)
        if args.db is None:
            print("writing the benchmark runs…", flush=True)
            large, rows, write_s = build_runs(runs, args.scale, args.classes)
            built = f"written in {write_s:.0f} s"
        else:
            large = runs / "bench-large.duckdb"
            large.symlink_to(args.db.resolve())
            write_run(
                runs / "bench-small.duckdb",
                synthetic_bundle(windows=500, window=8, tensors=10, n_test=50, n_train=40, data_window=40, seed=2),
            )
            rows, built = {}, f"reused {args.db}"
        with RunDB.open(large) as db:
            views = db.views()
            test = db.examples("test")
            label = int(test["label"][0])
            test_id = int(test["example"][test.height // 2])
            train_id = int(db.top_train_examples(k=1)["train"][0])
        rows = rows or {name: views[name] for name in ("components", "data", "completeness")}
        os.environ[state.ENV_RUNS] = str(runs)

        print("cold start…", flush=True)
        streamlit_s, cold_s = cold_start(runs)
        print(f"  import streamlit {streamlit_s:.2f} s, first page {cold_s:.2f} s", flush=True)
        print("first render of every page…", flush=True)
        firsts = first_renders()
        print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in firsts.items()), flush=True)

        clear_caches()
        results: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            at = AppTest.from_file(MAIN, default_timeout=120)
            at.query_params = {"run": "bench-large"}
            at.run()
            for page_name, what, action in interactions(test_id, label, train_id):
                ms = timed(at, action)
                results.setdefault((page_name, what), []).append(ms)
                print(f"  round {round_ + 1} {page_name:15s} {what:28s} {ms:8.1f} ms", flush=True)

    load_after = os.getloadavg()[0]
    first_round = [times[0] for times in results.values()]
    every = [ms for times in results.values() for ms in times]
    p95_first, p95_all = percentile(first_round, 0.95), percentile(every, 0.95)
    worst_first = max(cold_s, *firsts.values())
    lines = [
        "# Dashboard benchmark (`bench/bench_app.py`)",
        "",
        f"Python {platform.python_version()}, streamlit {st.__version__}, {os.cpu_count()} CPU cores, shared: "
        f"1-minute load average {load_before:.1f} before and {load_after:.1f} after the run. "
        "Server-side time measured with `streamlit.testing.v1.AppTest`: one interaction = "
        "the widget change or page switch plus the full script rerun (main.py, the page, its queries and "
        "figures), without websocket and browser drawing.",
        "",
        f"Run: {rows['components']:,} component rows, {rows['data']:,} data rows, "
        f"{rows['completeness']:,} completeness rows ({built}); a small second run for Compare.",
        "",
        "| first render | seconds | ≤ 3 s |",
        "|---|---|---|",
        f"| new server process: first page (Overview), app imports included | {cold_s:.2f} | "
        f"{'yes' if cold_s <= FIRST_RENDER_S else '**no**'} |",
        f"| (before it, once per server process: import streamlit) | {streamlit_s:.2f} | — |",
    ]  # fmt: skip
    for name, seconds in firsts.items():
        ok = "yes" if seconds <= FIRST_RENDER_S else "**no**"
        lines.append(f"| {name}: new session, empty caches, warm process | {seconds:.2f} | {ok} |")
    lines += [
        "",
        f"Interactions: {len(first_round)} per round, {args.rounds} rounds. Round 1 starts with empty caches, so "
        "every new slice queries the database; later rounds replay the same slices (cache hits).",
        "",
        "| page | interaction | round 1 ms | later rounds median ms |",
        "|---|---|---|---|",
    ]
    for (page_name, what), times in results.items():
        later = f"{statistics.median(times[1:]):.1f}" if len(times) > 1 else "—"
        lines.append(f"| {page_name} | {what} | {times[0]:.1f} | {later} |")
    lines += [
        "",
        f"- interaction p95, round 1 (cache misses): **{p95_first:.0f} ms** "
        f"({'meets' if p95_first <= INTERACTION_P95_MS else 'misses'} the {INTERACTION_P95_MS:.0f} ms target)",
        f"- interaction p95, all rounds: {p95_all:.0f} ms; median {statistics.median(every):.0f} ms",
        f"- slowest first render (new server process or empty caches): {worst_first:.2f} s "
        f"({'meets' if worst_first <= FIRST_RENDER_S else 'misses'} the {FIRST_RENDER_S:.0f} s target)",
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
