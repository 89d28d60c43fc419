"""The measurements behind ``docs/pruning.md``: which score ranks the grokking transformer's parameters.

    export PYTHONPATH=$PWD OMP_NUM_THREADS=1
    .venv/bin/python docs/pruning_study.py train   --dir /tmp/study        # the recorded runs (minutes)
    .venv/bin/python docs/pruning_study.py explain --dir /tmp/study NAME [--tests 20]   # one run's importance view
    .venv/bin/python docs/pruning_study.py tables  --dir /tmp/study        # pruning sweeps → Markdown tables

Runs (``RUNS``): the grokking sample's training (modular addition, AdamW, weight decay 1, 1000
steps) explained as the sample's main pass does (the first ``--tests`` validation examples, log-probability
of the true class) but with two Gauss–Legendre nodes per step instead of the adaptive rule — once on
the same examples and once on 200 examples spread over the validation split; the same training
stopped at step 100 (memorised, before grokking; also explained with the sample's own adaptive rule
to check the cheap one) and at step 850 (half-way through the rise of validation accuracy), and a
run without weight decay. Every explained database
is pruned by every method at ``SPARSITIES`` in both scopes; ``tables`` prints the tables of the page,
including two diagnostics that need no new explain: how much of the gross influence cancels in
the net influence Ψ, and pruning that *resets* elements to their initial values instead of zeroing
them — the change Ψ̄ actually attributes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl
import torch

from engine import store
from engine.analysis.prune import (
    METHODS,
    SCOPES,
    PruneConfig,
    compare,
    keep_masks,
    load_setup,
    log_probs,
    run_prune,
    summarize,
)
from engine.decompose import ExplainConfig, explain_history
from engine.run.history import History
from engine.samples import PRUNE_SPARSITIES, SAMPLES
from engine.tasks import get_task, train_task

SPARSITIES = PRUNE_SPARSITIES
SAMPLE = SAMPLES["grokking"]
RANKING_TESTS = 200


@dataclass(frozen=True)
class Run:
    """One explained database: the training it explains and the main-pass options that differ."""

    training: str
    explain: dict[str, Any] = field(default_factory=dict)
    spread: bool = False  # rank on examples spread over the validation split instead of its first ones


TRAININGS: dict[str, dict[str, Any]] = {
    "grokking": dict(SAMPLE.train),
    "step100": {**SAMPLE.train, "steps": 100},
    "step850": {**SAMPLE.train, "steps": 850},
    "no-decay": {**SAMPLE.train, "weight_decay": 0.0},
}
CHEAP = {"quadrature": "gauss:2", "rtol": None}  # ~20× cheaper than the sample's adaptive rule with rtol 1e-5
RUNS: dict[str, Run] = {
    "grokking": Run("grokking", CHEAP),
    "grokking-spread": Run("grokking", CHEAP, spread=True),
    "step100": Run("step100", CHEAP),
    "step100-adaptive": Run("step100"),  # the sample's own rule, to check the cheap one against
    "step850": Run("step850", CHEAP),
    "no-decay": Run("no-decay", CHEAP),
}


def explain_config(run: Run, n_val: int, tests: int) -> ExplainConfig:
    main = {k: v for k, v in SAMPLE.components.items() if k != "test_size"}
    options = {**main, "views": ("importance",), **run.explain, "device": "cpu"}
    if run.spread:
        return ExplainConfig(**options, test_ids=tuple(range(0, n_val, n_val // tests))[:tests])
    return ExplainConfig(**options, test_size=tests)


def cmd_train(args: argparse.Namespace) -> None:
    for name, overrides in TRAININGS.items():
        out = args.dir / "runs" / name
        if not out.exists():
            train_task("modular-addition", out, overrides, progress=True)
    full = History.open(args.dir / "runs" / "grokking")
    for name in ("step100", "step850"):  # the shorter trainings are prefixes of the full one
        part = History.open(args.dir / "runs" / name)
        end = part.num_steps
        same = all(torch.equal(full.params(end)[n], part.params(end)[n]) for n in full.param_names)
        print(f"{name}: parameters at step {end} equal the full training's: {same}")


def cmd_explain(args: argparse.Namespace) -> None:
    run = RUNS[args.name]
    history = History.open(args.dir / "runs" / run.training)
    task = get_task(history.model_spec)
    config = explain_config(run, len(task.dataset("val")), args.tests)
    explanation = explain_history(history, task, config, progress=True)
    path = store.write_run(args.dir / f"{args.name}.duckdb", explanation.to_bundle(history, task))
    summary = explanation.summary()
    print(path, {k: summary[k] for k in ("seconds", "max_rel_residual", "gradient_evaluations", "mean_nodes")})


# ---------------------------------------------------------------------------------------- tables
def sweeps(path: Path) -> pl.DataFrame:
    """Every method × scope × sparsity of one database (random: mean of 3 seeds), computed once."""
    cached = path.with_suffix(".pruning.parquet")
    if cached.exists():
        return pl.read_parquet(cached)
    frames = [run_prune(path, PruneConfig(sparsities=SPARSITIES, scope=scope), write=False)[1] for scope in SCOPES]
    frame = summarize(pl.concat(frames))
    frame.write_parquet(cached)
    return frame


def curve_table(frame: pl.DataFrame, measure: str, scope: str, sparsities: tuple[float, ...]) -> str:
    rows = frame.filter((pl.col("scope") == scope) & pl.col("sparsity").is_in(sparsities))
    header = "| method | " + " | ".join(f"{s:.0%}" if s < 0.99 else f"{s:.1%}" for s in sparsities) + " |"
    lines = [header, "|---" * (len(sparsities) + 1) + "|"]
    for method in METHODS:
        values = rows.filter(pl.col("method") == method).sort("sparsity")[measure].to_list()
        if values:
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def net_over_gross(path: Path) -> dict[str, float]:
    """Σ_i Ψ̄_i / Σ_i (Ψ̄_grad,i + Ψ̄_reg,i): the share of the gross influence left after cancellation."""
    with store.RunDB.open(path) as db:
        imp = db.importance()
    net, grad, decay = (float(imp[c].sum()) for c in ("importance", "gradient", "decay"))
    return {"net / gross": net / (grad + decay), "decay / gross": decay / (grad + decay)}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def diagnostics(path: Path) -> dict[str, float]:
    """Where the kernel ranking's kept set lies: elements weight decay has emptied, and rank correlations."""
    setup = load_setup(path)
    history = History.open(setup.run_dir)
    first = history.params(0)
    names = setup.prunable

    def flat(scores: dict[str, torch.Tensor]) -> np.ndarray:
        return torch.cat([scores[n].reshape(-1).double() for n in names]).numpy()

    final, initial = flat(setup.params), flat(first)
    displacement = np.abs(final - initial)
    emptied = np.abs(final) < 0.1 * np.abs(initial)
    out = {"emptied elements (|θ_N| < 0.1 |θ_0|)": float(emptied.mean())}
    for method in ("kernel", "kernel-decay", "taylor", "magnitude"):
        score = flat(setup.scores(method))
        top = score >= np.quantile(score, 0.5)
        out[f"{method}: emptied share of its top half"] = float(emptied[top].mean())
    kernel = flat(setup.scores("kernel"))
    out["rank corr. kernel ~ |θ_N − θ_0|"] = rank_correlation(kernel, displacement)
    out["rank corr. kernel ~ |θ_N|"] = rank_correlation(kernel, np.abs(final))
    out["rank corr. kernel-decay ~ taylor"] = rank_correlation(flat(setup.scores("kernel-decay")),
                                                               flat(setup.scores("taylor")))
    return out


def reset_table(path: Path, sparsities: tuple[float, ...]) -> str:
    """Agreement when the lowest-ranked elements are zeroed vs reset to θ_0 (global scope)."""
    setup = load_setup(path)
    first = History.open(setup.run_dir).params(0)
    reference = log_probs(setup.model, setup.params, setup.eval_inputs, 4096)
    rankings = {
        "kernel": setup.scores("kernel"),
        "displacement |θ_N − θ_0|": {n: (setup.params[n] - first[n]).abs().double() for n in setup.prunable},
        "magnitude": setup.scores("magnitude"),
        "random (seed 0)": setup.scores("random", 0),
    }
    lines = ["| ranking | pruned elements set to | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---" + "|---" * len(sparsities) + "|"]
    for name, scores in rankings.items():
        for fill in ("zero", "θ_0"):
            cells = []
            for sparsity in sparsities:
                masks = keep_masks(scores, sparsity, "global", order=setup.prunable)
                params = {n: torch.where(masks[n], p, torch.zeros_like(p) if fill == "zero" else first[n].to(p.dtype))
                          if n in masks else p for n, p in setup.params.items()}
                out = log_probs(setup.model, params, setup.eval_inputs, 4096)
                cells.append(f"{compare(reference, out, setup.eval_labels)['agreement']:.3f}")
            lines.append(f"| {name} | {fill} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_sample_table(path: Path, sparsities: tuple[float, ...]) -> str:
    """Agreement on the ranking examples themselves (global scope): does a ranking hold where it was computed?"""
    setup = load_setup(path)
    val = setup.task.dataset("val")  # every run here ranks on validation examples
    inputs = val.inputs[setup.ranking_ids]
    reference = log_probs(setup.model, setup.params, inputs, 4096)
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---" * (len(sparsities) + 1) + "|"]
    for method in ("kernel", "kernel-decay", "taylor", "magnitude", "random"):
        cells = []
        for sparsity in sparsities:
            pruned = setup.pruned(method, sparsity, "global", seed=0 if method == "random" else -1)
            out = log_probs(setup.model, pruned, inputs, 4096)
            cells.append(f"{compare(reference, out, val.labels[setup.ranking_ids])['agreement']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def covered_table(path: Path, sparsities: tuple[float, ...]) -> str:
    """Agreement on the held-out examples whose tokens all occur in the ranking set (global scope):
    pruning without the blind spot of embedding rows no ranking example uses."""
    setup = load_setup(path)
    val = setup.task.dataset("val")
    ranking = set(setup.ranking_ids.tolist())
    seen = set(val.inputs[setup.ranking_ids][:, :2].flatten().tolist())  # the two operand tokens
    ids = torch.as_tensor([i for i in range(len(val))
                           if i not in ranking and set(val.inputs[i, :2].tolist()) <= seen])
    inputs, labels = val.inputs[ids], val.labels[ids]
    reference = log_probs(setup.model, setup.params, inputs, 4096)
    lines = [f"{len(ids)} covered held-out examples\n",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---" * (len(sparsities) + 1) + "|"]
    for method in ("kernel", "kernel-balance", "taylor", "magnitude", "random"):
        cells = []
        for sparsity in sparsities:
            pruned = setup.pruned(method, sparsity, "global", seed=0 if method == "random" else -1)
            cells.append(f"{compare(reference, log_probs(setup.model, pruned, inputs, 4096), labels)['agreement']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_tables(args: argparse.Namespace) -> None:
    present = {name: args.dir / f"{name}.duckdb" for name in RUNS if (args.dir / f"{name}.duckdb").exists()}
    light = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    for name, path in present.items():
        frame = sweeps(path)
        dense = frame.filter(pl.col("method") == "dense").row(0, named=True)
        print(f"\n## {name}: {path}\n\ndense model: accuracy {dense['accuracy']:.4f} on the held-out examples\n")
        for scope in SCOPES:
            print(f"agreement, {scope} scope\n\n{curve_table(frame, 'agreement', scope, SPARSITIES)}\n")
        print(f"KL(dense ‖ pruned), global scope\n\n{curve_table(frame, 'kl', 'global', light)}\n")
        print("| diagnostic | value |\n|---|---|")
        for key, value in {**net_over_gross(path), **diagnostics(path)}.items():
            print(f"| {key} | {value:.3f} |")
        print(f"\nagreement on the ranking examples themselves, global scope\n\n{in_sample_table(path, light)}")
        print(f"\nagreement on held-out examples of ranked tokens only, global scope\n\n{covered_table(path, light)}")
    if "grokking" in present:
        print(f"\n## resetting instead of zeroing (grokking)\n\n{reset_table(present['grokking'], light)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "explain", "tables"):
        command = sub.add_parser(name)
        command.add_argument("--dir", type=Path, required=True, help="folder of the runs and databases")
        if name == "explain":
            command.add_argument("name", choices=sorted(RUNS))
            command.add_argument("--tests", type=int, default=RANKING_TESTS,
                                 help="ranking examples (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"train": cmd_train, "explain": cmd_explain, "tables": cmd_tables}[args.command](args)


if __name__ == "__main__":
    main()
