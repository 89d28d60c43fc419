"""Cost of cutting at the switch points of max pooling; writes ``bench/results/selections.md``.

Usage::

    .venv/bin/python bench/bench_selections.py --before REV   # about 10 minutes on 1 CPU thread

Workload: a max-pooling CNN on scikit-learn's 8×8 digits (conv 3×3 → ReLU or tanh → 2×2 max
pooling, twice, then a linear layer; 2 762 parameters), trained with a plain SGD-momentum loop
under the Recorder for ``STEPS`` steps of 64 examples, then ``python -m engine explain RUN
--test val:16 --dtype D`` (all 10 logits, components view) for float32 and float64. The engine
of git revision ``REV`` (``before``) and of this working tree (``after``) run the same
recordings, alternating for ``ROUNDS`` rounds, each explain its own single-threaded process.
Reported per setting: wall time (median over rounds), Gauss nodes per (step, test example)
(mean and largest), gradient evaluations, the largest relative residual and the number of
notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "selections.md"
STEPS = 20
ROUNDS = 3
ACTIVATIONS = ("relu", "tanh")
DTYPES = ("float32", "float64")


class DigitsPoolCNN(nn.Module):
    """conv 1→8 → act → max pool 2 → conv 8→16 → act → max pool 2 → linear 64→10 on 8×8 digits."""

    def __init__(self, act: str = "relu", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)
        self.act = act

    def forward(self, x):
        act = F.relu if self.act == "relu" else torch.tanh
        h = F.max_pool2d(act(self.conv1(x)), 2)
        h = F.max_pool2d(act(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


def digits() -> dict:
    """512 training and 100 validation images of scikit-learn's digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return {"train": (x[:512], y[:512]), "val": (x[1500:1600], y[1500:1600])}


def spec(act: str) -> dict:
    return {"model": "bench.bench_selections:DigitsPoolCNN", "model_kwargs": {"act": act},
            "data": "bench.bench_selections:digits", "data_kwargs": {}, "loss": "cross_entropy"}


def record(out: Path, act: str) -> None:
    from engine.model.task import get_task
    from engine.run.record import Recorder

    model_spec = spec(act)
    net = get_task(model_spec).build_model()
    x, y = digits()["train"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with Recorder(net, optimizer, out, model_spec=model_spec, train_data=(x, y)) as rec:
        for _ in range(STEPS):
            ids = torch.randperm(len(y), generator=g)[:64]
            optimizer.zero_grad()
            F.cross_entropy(net(x[ids]), y[ids]).backward()
            rec.batch(ids)
            optimizer.step()


def engine_at(rev: str, into: Path) -> Path:
    """The ``engine`` package of git revision ``rev``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "engine"], check=True, capture_output=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def explain(pythonpath: str, run: Path, dtype: str, out: Path) -> dict:
    """One ``explain`` in its own process, with ``engine`` from the first entry of ``pythonpath``
    (run in ``out``'s folder: ``python -c`` puts its working directory first on the path)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    code = "import sys, torch; torch.set_num_threads(1); from engine.cli import main; sys.exit(main())"
    # the run names this file's model: engines that ask for trust in it are given it
    cli = Path(pythonpath.split(os.pathsep)[0]) / "engine" / "cli.py"
    trust = ["--trust-run"] if "--trust-run" in cli.read_text() else []
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "explain", str(run), "--out", str(out), "--test", "val:16",
                           "--dtype", dtype, *trust, "--json"], cwd=out.parent, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"explain failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall": wall, "mean_nodes": summary["mean_nodes"], "max_nodes": summary["max_nodes"],
            "evaluations": summary["gradient_evaluations"], "residual": summary["max_rel_residual"],
            "notes": len(summary["notes"])}


def report(rows: list[dict], rev: str) -> str:
    lines = [
        "# Cutting at the switch points of max pooling",
        "",
        f"Generated by `.venv/bin/python bench/bench_selections.py --before {rev}`: a max-pooling CNN on "
        f"scikit-learn's digits (2 762 parameters, ReLU or tanh), {STEPS} recorded SGD-momentum steps of 64 "
        "examples, `python -m engine explain RUN --test val:16 --dtype D` (10 logits, components view), one CPU "
        f"thread, each run its own process; before (`{rev}`) and after alternate for {ROUNDS} rounds on a shared "
        "2-core machine. Wall time is the median over the rounds; the other columns are the same in every round.",
        "",
        "| activation | dtype | engine | wall s (median) | nodes per step and example (mean) | (largest) "
        "| gradient evaluations | max_rel_residual | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for act in ACTIVATIONS:
        for dtype in DTYPES:
            for side in ("before", "after"):
                mine = [r for r in rows if (r["act"], r["dtype"], r["side"]) == (act, dtype, side)]
                r = mine[0]
                lines.append(f"| {act} | {dtype} | {side} | {median(m['wall'] for m in mine):.1f} | "
                             f"{r['mean_nodes']:.1f} | {r['max_nodes']} | {r['evaluations']:,} | "
                             f"{r['residual']:.1e} | {r['notes']} |")
    lines += ["", "Wall-time ratio after / before (median): " + ", ".join(
        f"{act} {dtype} {_ratio(rows, act, dtype):.2f}" for act in ACTIVATIONS for dtype in DTYPES) + ".", ""]
    return "\n".join(lines)


def _ratio(rows: list[dict], act: str, dtype: str) -> float:
    wall = {side: median(r["wall"] for r in rows if (r["act"], r["dtype"], r["side"]) == (act, dtype, side))
            for side in ("before", "after")}
    return wall["after"] / wall["before"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the engine to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        before = engine_at(args.before, scratch / "before")
        paths = {"before": f"{before}{os.pathsep}{ROOT}", "after": str(ROOT)}
        (scratch / "out").mkdir()
        for act in ACTIVATIONS:
            record(scratch / f"run-{act}", act)
        for round_ in range(ROUNDS):
            for act in ACTIVATIONS:
                for dtype in DTYPES:
                    for side in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                        result = explain(paths[side], scratch / f"run-{act}", dtype, scratch / "out" / f"{side}.duckdb")
                        rows.append({"act": act, "dtype": dtype, "side": side, "round": round_, **result})
                        print(act, dtype, side, round_, result, flush=True)
    RESULTS.write_text(report(rows, args.before))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
