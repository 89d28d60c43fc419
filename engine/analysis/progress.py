"""Progress measures of modular addition (after Nanda et al., "Progress measures for grokking
via mechanistic interpretability"), computed from the recorded parameters of every step.

*Key frequencies.* The final model's token embedding, restricted to the number tokens
``0 … p−1``, is written in the real Fourier basis over tokens (``engine.model.units.fourier_basis``);
the norm of frequency ``f`` is the squared norm of its cosine and sine rows, summed over the
embedding dimension. The key frequencies are those ``f ≥ 1`` whose norm is at least
``KEY_FRACTION`` of the largest.

*Logits in the Fourier basis of the inputs.* At each step the model gives the logits
``L(a, b, ·)`` of all ``p²`` pairs. With ``c_k(a, b) = cos(2πk(a+b)/p)`` and
``s_k(a, b) = sin(2πk(a+b)/p)`` normalised over the ``p × p`` grid, ``P_K L`` is the projection
of every class's logit table onto ``{c_k, s_k : k ∈ K}`` (orthonormal directions):

- **restricted loss** — the cross-entropy on the validation pairs of the logits kept to the
  key frequencies and the constant term, ``mean_{a,b} L + P_K L``: how well the mechanism
  the final model uses already works;
- **excluded loss** — the cross-entropy on the training pairs of ``L − P_K L``, the logits
  with the key frequencies removed: how much of the training fit does not use them.

Nanda et al. measure the excluded loss on the training data as here; where their paper
leaves the split of the restricted loss open we follow the TransformerLens grokking demo,
which measures it on held-out pairs. Both are stored with the plain losses in
the run database (``store.add_progress``), measure names ``PROGRESS_MEASURES``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from engine import store
from engine.errors import BadInputError
from engine.model.task import Task, get_task
from engine.model.units import fourier_basis
from engine.run.history import History
from engine.run.verify import check_model_matches

KEY_FRACTION = 0.1  # a key frequency's embedding norm is at least this share of the largest
PROGRESS_MEASURES = ("restricted loss", "excluded loss")
BATCH = 16384  # pairs per forward pass


@dataclass(frozen=True)
class Progress:
    """The progress measures of a run: ``measures`` (measure, step, value), ``norms`` (tensor,
    frequency, norm, key) of the final embedding, and the key frequencies."""

    measures: pl.DataFrame
    norms: pl.DataFrame
    key_frequencies: tuple[int, ...]


def frequency_norms(embedding: Tensor, p: int) -> np.ndarray:
    """Norm of each frequency ``0 … ⌊p/2⌋`` of the token embedding's rows ``0 … p−1``: ``(p // 2 + 1,)``."""
    q, freqs = fourier_basis(p)
    rotated = torch.from_numpy(q) @ embedding[:p].double()  # (p, d_model)
    return np.bincount(freqs, weights=(rotated ** 2).sum(1).numpy(), minlength=p // 2 + 1)


def key_frequencies(norms: np.ndarray) -> tuple[int, ...]:
    """The frequencies ``f ≥ 1`` whose norm is at least ``KEY_FRACTION`` of the largest."""
    if len(norms) < 2 or norms[1:].max() <= 0:
        return ()
    return tuple(int(f) for f in np.flatnonzero(norms >= KEY_FRACTION * norms[1:].max()) if f >= 1)


def sum_directions(p: int, keys: tuple[int, ...]) -> Tensor:
    """Orthonormal directions ``cos(2πk(a+b)/p)``, ``sin(2πk(a+b)/p)`` of every key ``k`` over the
    ``(a, b)`` grid, flattened with ``a`` major: ``(2·|keys|, p²)`` float64."""
    ab = (torch.arange(p, dtype=torch.float64)[:, None] + torch.arange(p, dtype=torch.float64)[None]).reshape(-1)
    rows = []
    for k in keys:
        angle = 2 * math.pi * k * ab / p
        for wave in (torch.cos(angle), torch.sin(angle)):
            rows.append(wave / wave.norm())
    return torch.stack(rows) if rows else torch.zeros(0, p * p, dtype=torch.float64)


def _pairs(task: Task) -> tuple[int, Tensor, Tensor, Tensor]:
    """``p``, the inputs of every pair ``(p², 3)`` (``a`` major) and the grid positions of the
    training and validation pairs."""
    train, val = task.dataset("train"), task.dataset("val")
    if train.kind != "modular" or "p" not in train.meta:
        raise BadInputError(f"progress measures are defined for modular addition (inputs a, b, =); "
                            f"this run's task is {task.spec().get('task', 'imported')!r}")
    p = int(train.meta["p"])
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    inputs = torch.stack([a.reshape(-1), b.reshape(-1), torch.full((p * p,), p)], dim=1)  # (p², 3)

    def cells(data: Any) -> Tensor:
        return data.inputs[:, 0] * p + data.inputs[:, 1]

    return p, inputs, cells(train), cells(val)


def progress_measures(run: str | Path | History, every: int = 1, progress: bool = False) -> Progress:
    """The progress measures at steps ``0, every, 2·every, …`` of a recorded modular-addition run."""
    history = run if isinstance(run, History) else History.open(run)
    if not isinstance(every, int) or every < 1:
        raise BadInputError(f"every must be a positive number of steps, got {every!r}")
    task = get_task(history.model_spec)
    embedding = task.token_embedding()
    if embedding is None or embedding not in history.param_names:
        raise BadInputError(f"the model of {history.path} names no token embedding; progress measures need one")
    p, inputs, train_cells, val_cells = _pairs(task)
    model = check_model_matches(history, task).eval()
    buffers = dict(model.named_buffers())
    norms = frequency_norms(history.params(history.num_steps)[embedding], p)
    keys = key_frequencies(norms)
    directions = sum_directions(p, keys)  # (2K, p²)
    labels = (inputs[:, 0] + inputs[:, 1]) % p
    steps = list(range(0, history.num_steps, every))
    rows: dict[str, list[float]] = {m: [] for m in PROGRESS_MEASURES}
    with torch.no_grad():
        for step in tqdm(steps, desc="progress", unit="step", disable=not progress):
            params = history.params(step)
            logits = torch.cat([functional_call(model, {**params, **buffers}, (inputs[a:a + BATCH],))
                                for a in range(0, len(inputs), BATCH)]).double()  # (p², p)
            key_part = directions.T @ (directions @ logits)  # P_K L
            restricted = logits.mean(0, keepdim=True) + key_part
            rows["restricted loss"].append(float(F.cross_entropy(restricted[val_cells], labels[val_cells])))
            rows["excluded loss"].append(float(F.cross_entropy((logits - key_part)[train_cells],
                                                               labels[train_cells])))
    measures = pl.DataFrame({
        "measure": [m for m in PROGRESS_MEASURES for _ in steps],
        "step": np.tile(np.asarray(steps, dtype=np.int64), len(PROGRESS_MEASURES)),
        "value": np.concatenate([rows[m] for m in PROGRESS_MEASURES]),
    })
    table = pl.DataFrame({"tensor": [embedding] * len(norms), "frequency": np.arange(len(norms), dtype=np.int64),
                          "norm": norms, "key": [f in keys for f in range(len(norms))]})
    return Progress(measures, table, keys)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory of a modular-addition run")
    parser.add_argument("--db", required=True, help="its run database (.duckdb), updated atomically")
    parser.add_argument("--every", type=int, default=1, help="measure every N-th step (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_progress(args: argparse.Namespace) -> dict[str, Any]:
    result = progress_measures(args.run, every=args.every, progress=not args.json)
    store.add_progress(args.db, result.measures, result.norms)
    last = result.measures.group_by("measure").agg(pl.col("value").last())
    return {"db": str(args.db), "key_frequencies": list(result.key_frequencies),
            "steps": result.measures["step"].n_unique(), "final": dict(last.iter_rows())}
