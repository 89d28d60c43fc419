"""Benchmark of ``explain`` in one process vs as tasks on a local Ray instance; writes
``bench/results/parallel.md``.

Usage::

    .venv/bin/python bench/bench_parallel.py              # 2 rounds, A/B alternated
    .venv/bin/python bench/bench_parallel.py --rounds 1

Workload: the modular-addition transformer of ``bench_decompose`` (p = 23, d_model 32, 4 heads,
MLP 48: about 8 800 parameters; 101 full-batch training examples, AdamW), trained for
``--steps`` steps; ``explain`` of the components view for ``--tests`` validation examples and all
23 logits, float32. Each measurement is a fresh ``python -m engine explain`` process (the
command a user types): wall time from start to exit. The single-process run uses torch's
default threads; ``--workers 2`` starts a local Ray instance of 2 one-thread worker slots and
reports its start-up, the tasks' own seconds and the merge of the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "parallel.md"
TRAIN = {"p": 23, "d_model": 32, "n_heads": 4, "d_mlp": 48, "train_frac": 0.19, "lr": 1e-3, "weight_decay": 1.0}


def engine(*args: str) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine", *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TRAIN, "steps": args.steps}.items()]
        engine("train", "modular-addition", "--out", str(run), *flags)
        explain = ["explain", str(run), "--test", f"val:{args.tests}", "--views", "components"]
        for round_ in range(args.rounds):
            for label, extra in (("one process", []), ("--workers 2", ["--workers", "2"])):
                seconds, result = engine(*explain, "--out", str(Path(tmp) / f"r{round_}.duckdb"), *extra)
                parallel = result.get("parallel")
                rows.append({"round": round_, "mode": label, "wall": seconds, "explain": result["seconds"],
                             "startup": parallel["startup_seconds"] if parallel else None,
                             "merge": parallel["merge_seconds"] if parallel else None,
                             "tasks": len(parallel["tasks"]) if parallel else None,
                             "task_seconds": sum(t["seconds"] for t in parallel["tasks"]) if parallel else None,
                             "max_rel_residual": result["max_rel_residual"]})
                print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    write(rows, args, load_before, load_after)


def write(rows: list[dict], args: argparse.Namespace, load_before: float, load_after: float) -> None:
    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    single = [r["wall"] for r in rows if r["mode"] == "one process"]
    workers = [r["wall"] for r in rows if r["mode"] == "--workers 2"]
    lines = [
        "# explain: one process vs tasks on a local Ray instance",
        "",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (1-minute load average {load_before:.1f} "
        f"before, {load_after:.1f} after). Workload: modular addition (p = 23, d_model 32, 4 heads, MLP 48), "
        f"{args.steps} full-batch AdamW steps, components view of {args.tests} validation examples, all 23 "
        "logits, float32. Fresh `python -m engine explain ... --json` per row; A/B alternated. Produced by "
        f"`python bench/bench_parallel.py --steps {args.steps} --tests {args.tests} --rounds {args.rounds}`.",
        "",
        "*wall*: the command from start to exit. *explain*: the explanation's own seconds (one process: the "
        "pass over the steps; workers: the sum over tasks). *Ray start-up*: `ray.init` of a local instance. "
        "*task seconds*: the tasks' wall time inside their workers, summed. *merge*: reading the shards and "
        "merging them.",
        "",
        "| round | mode | wall s | explain s | Ray start-up s | tasks | task seconds | merge s | max_rel_residual |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        merge = "—" if r["merge"] is None else f"{r['merge']:.2f}"
        lines.append(f"| {r['round']} | {r['mode']} | {cell(r['wall'])} | {cell(r['explain'])} | "
                     f"{cell(r['startup'])} | {r['tasks'] or '—'} | {cell(r['task_seconds'])} | "
                     f"{merge} | {r['max_rel_residual']:.1e} |")
    lines += ["", "Wall-time ratio one process ÷ `--workers 2`, per round: "
              + ", ".join(f"{a / b:.2f}" for a, b in zip(single, workers, strict=True)), ""]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
