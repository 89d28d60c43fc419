"""Sweep a few modular-addition configurations and measure when each memorises and groks.

Usage::

    .venv/bin/python bench/grokking_search.py                 # the standard sweep
    .venv/bin/python bench/grokking_search.py --only default --seeds 0 1 2
    .venv/bin/python bench/grokking_search.py --threads 2 --set lr=3e-3 weight_decay=2 steps=3000
    .venv/bin/python bench/grokking_search.py --preset nanda --eval-every 50   # a named set-up (train --preset)

Per configuration it prints the first step with train accuracy ≥ 0.99, the first step
with validation accuracy ≥ 0.9 and ≥ 0.95, the gap between memorisation and
generalisation, the final validation accuracy, the wall time and a coarse
validation-accuracy curve. Training is unrecorded (``fit`` without a run directory).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from engine.tasks.modular_addition import PRESETS, ModularAdditionConfig, fit

SWEEP: dict[str, dict[str, Any]] = {
    "default": {},  # lr 1e-2, weight_decay 1, train_frac 0.3, 1000 steps
    "wd1_lr3e-3": {"lr": 3e-3, "weight_decay": 1.0, "steps": 3000},
    "wd2_lr3e-3": {"lr": 3e-3, "weight_decay": 2.0, "steps": 3000},
    "wd4_lr3e-3": {"lr": 3e-3, "weight_decay": 4.0, "steps": 3000},
    "wd5_lr1e-3": {"lr": 1e-3, "weight_decay": 5.0, "steps": 3000},
    "wd2_lr5e-3": {"lr": 5e-3, "weight_decay": 2.0, "steps": 3000},
    "wd1_lr1e-2": {"lr": 1e-2, "weight_decay": 1.0, "steps": 3000},
    "wd3_lr3e-3_frac0.25": {"lr": 3e-3, "weight_decay": 3.0, "train_frac": 0.25, "steps": 2500},
    "wd1_lr3e-3_frac0.4": {"lr": 3e-3, "weight_decay": 1.0, "train_frac": 0.4, "steps": 2500},
    "wd2_lr3e-3_frac0.4": {"lr": 3e-3, "weight_decay": 2.0, "train_frac": 0.4, "steps": 2500},
}


def first_step(values: list[float], threshold: float) -> int | None:
    """The first step whose value reaches ``threshold`` (nan values are skipped)."""
    return next((s for s, v in enumerate(values) if not math.isnan(v) and v >= threshold), None)


def measure(config: ModularAdditionConfig) -> dict[str, Any]:
    start = time.perf_counter()
    _, history = fit(config, progress=False)
    seconds = time.perf_counter() - start
    train_acc, val_acc = history["train_acc"], history["val_acc"]
    memorised, generalised = first_step(train_acc, 0.99), first_step(val_acc, 0.9)
    evaluated = [(s, v) for s, v in enumerate(val_acc) if not math.isnan(v)]
    curve_every = max(1, round(config.steps / 12 / config.eval_every)) * config.eval_every
    return {
        "train_acc>=0.99": memorised,
        "val_acc>=0.9": generalised,
        "val_acc>=0.95": first_step(val_acc, 0.95),
        "gap": None if memorised is None or generalised is None else generalised - memorised,
        "val_acc_at_memorised": None if memorised is None else _val_at(evaluated, memorised),
        "final_train_acc": round(train_acc[-1], 4),
        "final_val_acc": round(evaluated[-1][1], 4),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "val_curve": {s: round(v, 3) for s, v in evaluated if s % curve_every == 0},
    }


def _val_at(evaluated: list[tuple[int, float]], step: int) -> float:
    """Validation accuracy at the last evaluated step not after ``step``."""
    return round(max((sv for sv in evaluated if sv[0] <= step), default=evaluated[0])[1], 4)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        overrides[key] = ast.literal_eval(text)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(SWEEP), help="run only these named configurations")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="one ad-hoc configuration")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a named set-up; --set values override it")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="repeat each configuration per seed")
    parser.add_argument("--eval-every", type=int, default=None, help="override eval_every for speed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    named = {name: SWEEP[name] for name in (args.only or SWEEP)}
    runs = {"custom": parse_overrides(args.set)} if args.set else named
    if args.preset:
        runs = {args.preset: {**PRESETS[args.preset], **parse_overrides(args.set)}}
    for name, overrides in runs.items():
        config = replace(ModularAdditionConfig(), **overrides)
        if args.eval_every is not None:
            config = replace(config, eval_every=args.eval_every)
        for seed in args.seeds if args.seeds is not None else [config.seed]:
            seeded = replace(config, seed=seed)
            result = measure(seeded)
            print(json.dumps({"name": name, "config": asdict(seeded), **result}), flush=True)


if __name__ == "__main__":
    main()
