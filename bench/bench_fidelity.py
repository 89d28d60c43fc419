"""Exactness on models with buffers and randomness, recorded from plain loops; writes ``bench/results/fidelity.md``.

Usage::

    .venv/bin/python bench/bench_fidelity.py     # about 10 minutes on 2 CPU threads

Cases (the models and data of ``tests/fidelity_models.py``, larger and longer than the
tests'): an MLP with LayerNorm and GELU under SGD with Nesterov momentum, two parameter
groups, a cosine schedule, weighted batches and gradient clipping; a CNN with BatchNorm; an
MLP with dropout; and a GPT-2-style Hugging Face causal LM (228 480 parameters, dropout 0.1
everywhere) trained with AdamW for 24 steps. Each is trained by a plain loop under the
Recorder, in float32 (and float64 for the small models), then:

* ``verify`` twice — the largest replay error and whether both runs give the same figure;
* ``explain --views components,data --quadrature adaptive:64`` on ``TESTS`` validation examples in the training's
  dtype — the path residual ``max_rel_residual``, the data view's ``max_rel_split_residual``
  and which split the engine chose;
* against ``g`` evaluated independently from the recorded parameters and buffers (a fresh
  model, ``load_state_dict``, evaluation mode): the relative error of the components' sum
  (buffer terms included) and of the data view's sum plus the buffer terms, worst test example.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.decompose import ExplainConfig, explain  # noqa: E402
from engine.model.task import get_task  # noqa: E402
from engine.run.history import History  # noqa: E402
from engine.run.record import Recorder  # noqa: E402
from engine.run.verify import verify  # noqa: E402
from tests.fidelity_models import spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fidelity.md"
TESTS = 4
# Up to 64 Gauss nodes per step: one AdamW step of the language model changes a logit by up to 4,
# and 16 nodes (the default) leave 3e-3 of that step unintegrated
QUADRATURE = "adaptive:64"
LM = {"model_type": "gpt2", "vocab_size": 32, "n_positions": 16, "n_embd": 96, "n_layer": 2, "n_head": 4,
      "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": 0, "eos_token_id": 0}


def norm_mlp_optimizer(model):
    return torch.optim.SGD([{"params": [*model.fc1.parameters(), *model.norm.parameters()], "lr": 0.2},
                            {"params": [*model.fc2.parameters(), *model.head.parameters()], "lr": 0.1,
                             "weight_decay": 0.01}], momentum=0.9, nesterov=True)


# name: (spec, optimizer, steps, batch, options, dtypes)
CASES = {
    "MLP + LayerNorm + GELU, SGD nesterov, 2 groups, cosine, weighted, clipped": (
        {**spec("NormMLP", "vectors", hidden=32), "data_kwargs": {"n_train": 128}}, norm_mlp_optimizer, 40, 16,
        {"weighted": True, "clip": 0.5, "cosine": True}, (torch.float32, torch.float64)),
    "CNN + BatchNorm, SGD momentum": (
        {**spec("BatchNormCNN", "images", channels=8), "data_kwargs": {"n_train": 128}},
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3), 40, 16, {},
        (torch.float32, torch.float64)),
    "MLP + dropout 0.3, AdamW": (
        {**spec("DropoutMLP", "vectors", hidden=32), "data_kwargs": {"n_train": 128}},
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), 40, 16, {},
        (torch.float32, torch.float64)),
    "HF GPT-2 causal LM (228 480 parameters), dropout 0.1, AdamW": (
        {"model": "engine.model.hf:causal_lm", "model_kwargs": {"config": LM, "seed": 0},
         "data": "tests.fidelity_models:tokens", "data_kwargs": {"n_train": 64}, "loss": "cross_entropy"},
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01), 24, 8, {}, (torch.float32,)),
}


def record(out: Path, model_spec: dict, make_optimizer, steps: int, batch: int, options: dict,
           dtype: torch.dtype) -> float:
    task = get_task(model_spec)
    model = task.build_model().to(dtype).train()
    x, y = task.dataset("train").inputs, task.dataset("train").labels
    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if options.get("cosine") else None
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    with Recorder(model, optimizer, out, model_spec=model_spec, train_data=(x, y), dtype=dtype) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:batch]
            optimizer.zero_grad()
            inputs = x[ids].to(dtype) if x.is_floating_point() else x[ids]
            losses = F.cross_entropy(model(inputs), y[ids], reduction="none")
            if options.get("weighted"):
                weights = torch.linspace(0.5, 1.5, len(ids), dtype=dtype) / len(ids)
                (losses * weights).sum().backward()
                rec.batch(ids, weights=weights)
            else:
                losses.mean().backward()
                rec.batch(ids)
            if options.get("clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), options["clip"])
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return time.perf_counter() - start


def true_change(history: History) -> np.ndarray:
    task = get_task(history.model_spec)
    model = task.build_model().double().eval()
    x = task.dataset("val").inputs[:TESTS]
    x = x.double() if x.is_floating_point() else x
    out = []
    for step in (0, history.num_steps):
        state = {n: t.double() for n, t in {**history.params(step), **history.buffers(step)}.items()}
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            out.append(model(x).numpy())
    return out[1] - out[0]


def totals(frame: pl.DataFrame) -> np.ndarray:
    grouped = frame.group_by("test", "output").agg(pl.col("value").sum()).sort("test", "output")
    return grouped["value"].to_numpy().reshape(grouped["test"].n_unique(), -1)


def relative(value: np.ndarray, truth: np.ndarray) -> float:
    return float((np.linalg.norm(value - truth, axis=1) / np.linalg.norm(truth, axis=1)).max())


def measure(name: str, dtype: torch.dtype, scratch: Path) -> dict:
    model_spec, make_optimizer, steps, batch, options, _ = CASES[name]
    run = scratch / f"{len(list(scratch.iterdir()))}"
    record_s = record(run, model_spec, make_optimizer, steps, batch, options, dtype)
    start = time.perf_counter()
    first, second = verify(run, progress=False, trust_run=True), verify(run, progress=False, trust_run=True)
    verify_s = (time.perf_counter() - start) / 2
    start = time.perf_counter()
    explanation = explain(run, ExplainConfig(dtype=str(dtype).removeprefix("torch."), test_size=TESTS,
                                             views=("components", "data"), quadrature=QUADRATURE), progress=False,
                          trust_run=True)
    explain_s = time.perf_counter() - start
    truth = true_change(History.open(run))
    buffers = explanation.components.filter(pl.col("tensor").str.ends_with("<buffers>"))
    buffer_terms = totals(buffers) if buffers.height else 0.0
    return {
        "case": name, "dtype": str(dtype).removeprefix("torch."), "steps": steps,
        "parameters": History.open(run).num_parameters(),
        "verify": first.max_rel_error, "verify_same": first.to_json() == second.to_json(),
        "path": explanation.max_rel_residual, "split": explanation.max_rel_split_residual,
        "components": relative(totals(explanation.components), truth),
        "data": relative(totals(explanation.data) + buffer_terms, truth),
        "mode": explanation.data_split, "record_s": record_s, "verify_s": verify_s, "explain_s": explain_s,
    }


def report(rows: list[dict]) -> str:
    lines = [
        "# Exactness on models with buffers and randomness",
        "",
        f"Generated by `.venv/bin/python bench/bench_fidelity.py` on a shared 2-core machine (torch threads: "
        f"{torch.get_num_threads()}); each case trained by a plain loop under the Recorder, then `verify` twice and "
        f"`explain` (components and data views, {TESTS} validation examples, all logits, the training's dtype, "
        f"quadrature `{QUADRATURE}`). *components* and *data + buffers* are the worst test example's relative error "
        "against g evaluated independently from the recorded parameters and buffers; *path* is "
        "`max_rel_residual` and *split* `max_rel_split_residual` as the engine reports them.",
        "",
        "| case | dtype | parameters | steps | data split | verify (twice the same) | path | split | "
        "components | data + buffers | record s | verify s | explain s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "yes" if r["verify_same"] else "NO"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['parameters']:,} | {r['steps']} | {r['mode']} | "
            f"{r['verify']:.1e} ({same}) | {r['path']:.1e} | {r['split']:.1e} | {r['components']:.1e} | "
            f"{r['data']:.1e} | {r['record_s']:.1f} | {r['verify_s']:.1f} | {r['explain_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            for dtype in case[-1]:
                rows.append(measure(name, dtype, Path(tmp)))
                print(rows[-1], flush=True)
    RESULTS.write_text(report(rows))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
