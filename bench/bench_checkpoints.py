"""Benchmark of explain-checkpoints on CPU; writes ``bench/results/checkpoints.md``.

Usage::

    .venv/bin/python bench/bench_checkpoints.py            # every size (about half an hour on 1 CPU thread)
    .venv/bin/python bench/bench_checkpoints.py --quick    # the two smallest sizes

Workload: the tiny-lm sample's GPT-2 and grammar at several sizes, trained 40 AdamW steps
(``engine.tasks.tiny_lm``, checkpoints every 20); one interval is explained, checkpoint 20 to
checkpoint 40, on held-out blocks: the mean next-token loss of each sequence, float32 with
``rtol`` 1e-5 (the sample's setting) and float64.

Per configuration: CPU and wall seconds of the interval (``explain_interval``, its set-up and
probes included; a one-input interval is explained first so that imports are not counted),
seconds per input token, gradient evaluations and mean quadrature nodes per input, the floor
ratio — CPU seconds ÷ (gradient evaluations × one input's share of a batched VJP of the loss
over all inputs) — and the working memory (peak resident set minus the resident set before
the interval). Every configuration runs in a fresh process with one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "checkpoints.md"
SIZES = ((2, 32, 4), (4, 64, 4), (4, 128, 4), (6, 256, 8))  # (layers, width, heads)
LENGTHS = (16, 32, 64)  # sequence lengths at the second size
INPUTS = 8


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------------------ workers
def _opened(args: dict, inputs: int):
    from engine.run.series import SeriesSource, open_series

    run = Path(args["run"])
    return open_series(SeriesSource((str(run / "checkpoint-20"), str(run / "checkpoint-40")),
                                    str(run / "heldout.txt"), max_inputs=inputs))


def worker_interval(args: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from engine.decompose.checkpoints import checkpoint_config, explain_interval

    settings = {"dtype": args["dtype"], "rtol": args["rtol"], "device": "cpu"}
    warm = _opened(args, 1)
    explain_interval(warm.series, warm.task, checkpoint_config(warm, **settings), 0)
    opened = _opened(args, args["inputs"])
    config = checkpoint_config(opened, **settings)
    opened.series.params(0), opened.series.params(1)  # reading the checkpoints is not the interval's work
    before = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    result = explain_interval(opened.series, opened.task, config, 0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = int(opened.task.dataset("val").labels.sum() - len(opened.task.dataset("val").labels))
    return {"wall": wall, "cpu": cpu, "working_mb": peak - before, "tokens": tokens,
            "parameters": opened.series.num_parameters(), "evaluations": result.numbers["gradient_evaluations"],
            "nodes": float(result.completeness["nodes"].mean()), "escalated": result.numbers["escalated"],
            "max_rel": result.numbers["max_rel_residual"], "engine": result.numbers["engine"]}


def worker_unit(args: dict) -> dict:
    """Seconds of one input's share of a batched VJP of the loss over all inputs."""
    from dataclasses import replace

    import torch
    from torch.func import vjp

    torch.set_num_threads(1)
    from engine.decompose.checkpoints import checkpoint_config
    from engine.decompose.setup import _math_attention, _setup

    opened = _opened(args, args["inputs"])
    config = checkpoint_config(opened, dtype=args["dtype"], device="cpu")
    s = _setup(opened.series, opened.task, replace(config, steps=(0, 1)))
    theta = s.flat(opened.series.params(0))
    times = []
    with _math_attention():
        for _ in range(15):
            start = time.process_time()
            out, pull = vjp(lambda p: s.g_batch(p, s.test_x, s.test_y), theta)
            pull(torch.ones_like(out))
            times.append(time.process_time() - start)
    times.sort()
    return {"unit": times[len(times) // 2] / len(s.test_y)}


def run_worker(role: str, args: dict) -> dict:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--role", role, "--args", json.dumps(args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {role} {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(folder: Path, layers: int, width: int, heads: int, length: int) -> Path:
    import torch

    from engine.tasks.tiny_lm import TinyLMConfig
    from engine.tasks.tiny_lm import train as train_lm

    torch.set_num_threads(1)
    config = TinyLMConfig(n_layer=layers, n_embd=width, n_head=heads, block=length, steps=40, save_every=20,
                          heldout_blocks=INPUTS)
    return train_lm(config, folder / f"l{layers}-w{width}-n{length}", progress=False)


# ------------------------------------------------------------------------------ report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two smallest sizes only")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps({"interval": worker_interval, "unit": worker_unit}[args.role](json.loads(args.args))))
        return
    import torch

    sizes = SIZES[:2] if args.quick else SIZES
    cases = [(*size, 32) for size in sizes] + [(*SIZES[1], n) for n in LENGTHS if n != 32]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers, width, heads, length in cases:
            run = train(Path(tmp), layers, width, heads, length)
            for dtype, rtol in (("float32", 1e-5), ("float64", None)):
                common = {"run": str(run), "inputs": INPUTS, "dtype": dtype, "rtol": rtol}
                row = {"layers": layers, "width": width, "length": length, "dtype": dtype,
                       **run_worker("interval", common), **run_worker("unit", common)}
                row["floor"] = row["cpu"] / (row["evaluations"] * row["unit"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        "# explain-checkpoints on CPU",
        "",
        f"Generated by `python bench/bench_checkpoints.py{' --quick' if args.quick else ''}`: 1 thread, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, on a 2-core machine shared with "
        "other jobs (CPU seconds are the measure; wall seconds include waiting for a core).",
        "",
        f"Workload: the tiny-lm GPT-2 and grammar, trained 40 AdamW steps; one interval (checkpoint 20 → 40) "
        f"explained on {INPUTS} held-out blocks, the mean next-token loss of each (one output per input), "
        "adaptive quadrature up to 256 nodes. Unit: one input's share of a batched VJP of the loss over all "
        "inputs; floor ratio = CPU s ÷ (gradient evaluations × unit).",
        "",
        "| layers × width | parameters | tokens/input | dtype | engine | CPU s | wall s | CPU ms/token | gradient "
        "evals | nodes/input | unit ms | floor ratio | working MB | max rel. residual |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} × {r['width']} | {r['parameters']:,} | {r['length']} | {r['dtype']} | {r['engine']} "
            f"| {r['cpu']:.1f} | {r['wall']:.1f} | {1e3 * r['cpu'] / r['tokens']:.1f} | {r['evaluations']:,} "
            f"| {r['nodes']:.0f} | {1e3 * r['unit']:.2f} | {r['floor']:.2f} | {r['working_mb']:.0f} "
            f"| {r['max_rel']:.1e} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
