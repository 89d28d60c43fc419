"""Pruning check of component attribution (MATH.md §5).

The final parameters θ_N of a recorded run are ranked by a score, the top fraction of
each ranking is kept, the rest is set to zero and the model is evaluated without
retraining. The output layer is never pruned. Methods (``METHODS``), by their score:

- ``kernel``: the kernel importance Ψ̄ = Σ_x Σ_j |Ψ| of the signed net influence Ψ of each
  element along the whole path, as ``explain`` stored it in the run database;
- ``kernel-gradient`` and ``kernel-decay``: the same absolute sum of the gradient part and of the
  weight-decay part of Ψ alone (Ψ = Ψ_grad + Ψ_reg, summed per example and output before the
  absolute value); ``kernel-balance``: their balance D = Ψ̄_grad − Ψ̄_reg (stored with the decay split);
- ``taylor``: Σ_x Σ_j |θ_N ⊙ ∇g(x; θ_N)|, the first-order estimate of zeroing each element, which
  needs no path (stored by ``explain`` beside Ψ̄);
- ``magnitude`` (|θ_N|) and ``random`` (uniform scores, one ranking per seed).

Rules shared by every method:

- *Scope*. ``global`` ranks all prunable elements together against one threshold;
  ``per-tensor`` removes the same fraction from every prunable tensor.
- *Count*. A fraction ``s`` of ``n`` candidates removes ``floor(s·n + ½)`` elements, so the
  achieved fraction is within half an element of ``s`` (globally, or per tensor).
- *Ties*. Equal scores keep the element that comes first in model order (tensor order,
  then flat index): a stable descending sort.
- *Sets*. Ψ̄ was summed over the database's test examples (the ranking set: ids of the
  split ``explain`` explained, ``meta["test_split"]``, the validation split by default).
  Pruned models are evaluated on the validation examples that are *not* in the ranking set.
- *Seeds*. ``random`` writes one row per seed (``seed`` = 0, 1, …) and readers average
  over seeds; deterministic methods write ``seed = -1``.
- *Reference*. Every sweep also writes the unpruned model as method ``dense`` at sparsity 0
  (agreement 1 and KL 0 by definition; its accuracy on the same held-out examples), the
  point every curve starts from.

Measures per row: ``agreement`` (arg-max equal to the unpruned model's), ``accuracy``
(arg-max equal to the label), ``kl`` = mean over examples of KL(unpruned ‖ pruned) of the
softmax outputs, ``achieved_sparsity`` = fraction of prunable elements that are zero in
the pruned model. The frame returned by :func:`prune` also carries ``layer_sparsity``, a
JSON object mapping each layer to its achieved sparsity (not stored in the database).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from engine import store
from engine.errors import BadInputError, CorruptRunError, RunNotFoundError
from engine.model.task import Task
from engine.run.history import History

log = logging.getLogger(__name__)

# method → column of the importance view holding its score (magnitude and random come from θ_N and a seed)
STORED_SCORES = {"kernel": "importance", "kernel-gradient": "gradient", "kernel-decay": "decay",
                 "kernel-balance": "balance", "taylor": "taylor"}
METHODS = (*STORED_SCORES, "magnitude", "random")
SCOPES = ("global", "per-tensor")
DEFAULT_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
DENSE = "dense"  # method name of the unpruned reference row
NO_SEED = -1  # seed of the deterministic methods
COLUMNS = ("method", "scope", "sparsity", "seed", "agreement", "accuracy", "kl", "achieved_sparsity")

Params = dict[str, Tensor]


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; validated on construction (``BadInputError``).

    ``methods=None`` prunes by every method whose scores the database holds.
    """

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    methods: tuple[str, ...] | None = None
    scope: str = "global"
    seeds: int = 3
    min_eval: int = 20         # fewest held-out validation examples accepted
    batch_size: int = 4096     # examples per forward pass

    def __post_init__(self) -> None:
        sparsities = tuple(self.sparsities)
        if not sparsities:
            raise BadInputError("no sparsities given; pass fractions in (0, 1) such as 0.7,0.9,0.99")
        for s in sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) < 1.0:
                raise BadInputError(
                    f"sparsity {s!r} is not a fraction strictly between 0 and 1; use e.g. 0.9 for 90 % zeros"
                )
        object.__setattr__(self, "sparsities", tuple(sorted({float(s) for s in sparsities})))
        if self.methods is not None:
            methods = tuple(dict.fromkeys(self.methods))
            unknown = [m for m in methods if m not in METHODS]
            if unknown or not methods:
                raise BadInputError(f"unknown pruning method(s) {unknown or 'none given'}; choose from "
                                    f"{', '.join(METHODS)}")
            object.__setattr__(self, "methods", methods)
        if self.scope not in SCOPES:
            raise BadInputError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        for name in ("seeds", "min_eval", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInputError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PruneSetup:
    """Everything a pruning sweep needs, loaded once from a run database and its run directory."""

    db_path: Path
    run_dir: Path
    task: Task
    model: nn.Module
    params: Params                 # θ_N of every recorded tensor, model order
    prunable: tuple[str, ...]      # recorded tensors outside the output layer, model order
    output: tuple[str, ...]        # output-layer tensors, never pruned
    layer: dict[str, str]          # tensor -> layer label
    ranked: dict[str, Params]      # method → score per prunable tensor, shaped like it (float64); not random
    ranking_ids: Tensor            # (rank,) ids Ψ̄ was summed over, in the database's test split
    eval_ids: Tensor               # (eval,) validation ids not in the ranking set
    eval_inputs: Tensor            # (eval, ...) model inputs
    eval_labels: Tensor            # (eval,) int64

    def scores(self, method: str, seed: int = NO_SEED) -> Params:
        """The ranking score of every prunable element under ``method`` (higher = kept first)."""
        if method in self.ranked:
            return self.ranked[method]
        if method == "random":
            if seed < 0:
                raise BadInputError(f"random pruning needs a seed >= 0, got {seed}")
            generator = torch.Generator().manual_seed(seed)
            sizes = [self.params[n].numel() for n in self.prunable]
            flat = torch.rand(sum(sizes), generator=generator, dtype=torch.float64)  # (prunable,)
            return {n: part.reshape(self.params[n].shape)
                    for n, part in zip(self.prunable, flat.split(sizes), strict=True)}
        if method in STORED_SCORES:
            why = ("its importance view was written by an older release" if method == "taylor" else
                   "it was explained without the weight-decay split (turned off, or an optimizer it does not "
                   "support) or by an older release")
            raise BadInputError(
                f"{self.db_path} holds no {method} scores: {why}; re-run `python -m engine explain {self.run_dir} "
                f"--views importance --out {self.db_path}` to compute them, or prune by {', '.join(self.methods)}"
            )
        raise BadInputError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this database can rank by, in ``METHODS`` order."""
        return tuple(m for m in METHODS if m in self.ranked or m == "random")

    def pruned(self, method: str, sparsity: float, scope: str, seed: int = NO_SEED) -> Params:
        """θ_N with the lowest-scoring fraction ``sparsity`` of the prunable elements set to zero."""
        masks = keep_masks(self.scores(method, seed), sparsity, scope, order=self.prunable)
        return apply_masks(self.params, masks)


# ------------------------------------------------------------------------------ masks
def _pruned_count(sparsity: float, n: int) -> int:
    return min(n, math.floor(sparsity * n + 0.5))


def _keep_top(flat: Tensor, n_prune: int) -> Tensor:
    """Boolean mask keeping all but the ``n_prune`` lowest scores; ties keep earlier positions."""
    order = torch.sort(flat, descending=True, stable=True).indices  # (n,)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[: flat.numel() - n_prune]] = True
    return keep


def keep_masks(scores: Params, sparsity: float, scope: str, order: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Boolean keep-masks (True = kept) removing a fraction ``sparsity`` of the scored elements.

    ``order`` fixes the model order used to break ties (default: the order of ``scores``).
    """
    if not 0.0 <= sparsity < 1.0:
        raise BadInputError(f"sparsity {sparsity!r} must lie in [0, 1)")
    names = list(order) if order is not None else list(scores)
    if scope == "per-tensor":
        return {n: _keep_top(scores[n].reshape(-1).double(), _pruned_count(sparsity, scores[n].numel()))
                .reshape(scores[n].shape) for n in names}
    if scope != "global":
        raise BadInputError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])  # (prunable,)
    keep = _keep_top(flat, _pruned_count(sparsity, flat.numel()))
    sizes = [scores[n].numel() for n in names]
    return {n: part.reshape(scores[n].shape) for n, part in zip(names, keep.split(sizes), strict=True)}


def apply_masks(params: Params, masks: dict[str, Tensor]) -> Params:
    """A copy of ``params`` with masked-out elements set to zero; unmasked tensors are shared."""
    return {n: torch.where(masks[n], p, torch.zeros((), dtype=p.dtype)) if n in masks else p
            for n, p in params.items()}


def achieved_sparsity(params: Params, names: Iterable[str]) -> float:
    """Fraction of the elements of tensors ``names`` that are exactly zero."""
    names = list(names)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    return zeros / total if total else 0.0


def layer_sparsity(params: Params, names: Sequence[str], layer: dict[str, str]) -> dict[str, float]:
    """Achieved sparsity of each layer over tensors ``names`` (layers in model order)."""
    layers: dict[str, list[str]] = {}
    for n in names:
        layers.setdefault(layer[n], []).append(n)
    return {label: achieved_sparsity(params, members) for label, members in layers.items()}


# ------------------------------------------------------------------------------ output layer
def output_tensors(task: Task, model: nn.Module, sample: Tensor, recorded: Sequence[str]) -> tuple[str, ...]:
    """Names of the output layer's parameters: they produce the model output directly.

    A task may name them with an ``output_tensors()`` method. Otherwise one forward pass
    on ``sample`` finds the leaf module (one with parameters and no child modules) whose
    output is the model's output, or else the last such module to run; its parameters
    are the output layer.
    """
    hook = getattr(task, "output_tensors", None)
    if callable(hook):
        names = tuple(hook())
        missing = [n for n in names if n not in recorded]
        if not names or missing:
            raise BadInputError(
                f"task {task.name!r} output_tensors() returned {list(names)}; every name must be a recorded "
                f"parameter ({', '.join(recorded)})"
            )
        return names
    calls: list[tuple[str, Any]] = []
    handles = []
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own and not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, prefix=prefix: calls.append((prefix, out))))
    try:
        with torch.no_grad():
            result = model(sample)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise BadInputError(
            f"cannot find the output layer of the model of task {task.name!r}: no module with parameters ran "
            "in its forward pass; give the task an output_tensors() method naming the output layer's parameters"
        )
    direct = [prefix for prefix, out in calls if out is result]
    prefix = direct[-1] if direct else calls[-1][0]
    module = model.get_submodule(prefix)
    names = tuple(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False))
    return tuple(n for n in names if n in recorded)


# ------------------------------------------------------------------------------ loading
def _resolve_run_dir(db_path: Path, meta: dict, run_dir: str | os.PathLike | None) -> Path:
    if run_dir is not None:
        path = Path(run_dir)
        if not path.exists():
            raise RunNotFoundError(
                f"run directory {path} does not exist; pass the run that {db_path} was explained from"
            )
        return path
    recorded = meta.get("run_dir")
    if not isinstance(recorded, str) or not recorded:
        raise RunNotFoundError(
            f"{db_path} does not record the run directory it was explained from; pass it with --run RUN_DIR"
        )
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [path, db_path.parent / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise RunNotFoundError(
        f"run directory {recorded} recorded in {db_path} does not exist (looked in "
        f"{', '.join(str(c) for c in candidates)}); the recording is needed for pruning: pass its "
        "location with --run RUN_DIR"
    )


def _stored_columns(importance: pl.DataFrame, db_path: Path) -> tuple[str, ...]:
    """The score columns of the importance view with a value in every row; all-null ones were not
    computed, partly null ones make the view corrupt."""
    present = []
    for column in STORED_SCORES.values():
        nulls = importance.get_column(column).null_count()
        if 0 < nulls < importance.height:
            raise CorruptRunError(
                f"the importance view of {db_path} has {column} scores for some elements only; re-run "
                "`python -m engine explain` with --views importance"
            )
        if nulls == 0:
            present.append(column)
    return tuple(present)


def _dense(frame: pl.DataFrame, name: str, shape: tuple[int, ...], columns: Sequence[str],
           db_path: Path) -> dict[str, Tensor]:
    """One tensor's scores from importance rows (tensor, index, *columns), each shaped like the tensor;
    the rows are checked to cover every element once."""
    numel = math.prod(shape)
    index = frame.get_column("index").to_numpy()
    if len(index) != numel or (len(index) and (index.min() < 0 or index.max() >= numel)) \
            or len(np.unique(index)) != numel:
        raise CorruptRunError(
            f"the importance view of {db_path} has {len(index)} rows for tensor {name!r} but it has {numel} "
            "elements (each index once); re-run `python -m engine explain` with --views importance"
        )
    out = {}
    for column in columns:
        values = frame.get_column(column).to_numpy().astype(np.float64)
        if not np.isfinite(values).all():
            raise CorruptRunError(
                f"the importance view of {db_path} has non-finite {column} values for tensor {name!r}; "
                "re-run `python -m engine explain` with --views importance"
            )
        dense = np.empty(numel, dtype=np.float64)
        dense[index] = values
        out[column] = torch.from_numpy(dense).reshape(shape)
    return out


def _read_database(db_path: Path) -> tuple[dict, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    with store.RunDB.open(db_path) as db:
        meta = db.meta()
        if db.views().get("importance", 0) == 0:
            run = meta.get("run_dir", "RUN")
            raise BadInputError(
                f"{db_path} has no importance view, which ranks parameters for pruning; compute it with "
                f"`python -m engine explain {run} --views importance --out {db_path}` and prune again"
            )
        return meta, db.importance(), db.groups(), db.examples("test")


def _check_same_run(db_path: Path, meta: dict, history: History) -> None:
    """Refuse a run directory whose recording is not the one the database was explained from."""
    fingerprint = meta.get("data_fingerprint")
    if isinstance(fingerprint, str) and fingerprint != history.manifest["data"]["fingerprint"]:
        raise CorruptRunError(
            f"run {history.path} was trained on other data than the run {db_path} was explained from "
            "(data fingerprints differ); pass the right run directory with --run RUN_DIR"
        )
    steps = meta.get("steps")
    if isinstance(steps, int) and steps != history.num_steps:
        raise CorruptRunError(
            f"run {history.path} has {history.num_steps} steps but {db_path} was explained from a run of {steps}; "
            "pass the right run directory with --run RUN_DIR"
        )
    explained = meta.get("explained_steps")
    if isinstance(explained, list) and len(explained) == 2 and explained[1] != history.num_steps:
        log.warning("%s explains steps %s of %d: Ψ̄ ranks the final parameters by part of their path",
                    db_path, explained, history.num_steps)


def _ranking_and_eval(db_path: Path, run_path: Path, task: Task, meta: dict, ranking: pl.DataFrame,
                      min_eval: int) -> tuple[Tensor, Tensor]:
    """Ids of the ranking set (in the explained split) and of the held-out validation examples."""
    split = meta.get("test_split", "val")
    if split not in ("train", "val"):
        raise CorruptRunError(f"{db_path} names test split {split!r}; expected 'train' or 'val'")
    data = task.dataset(split)
    ranking_ids = torch.tensor(ranking.get_column("example").to_list(), dtype=torch.int64)
    if ranking_ids.numel() == 0:
        raise CorruptRunError(f"{db_path} lists no test examples, so its importance view ranks nothing")
    if int(ranking_ids.min()) < 0 or int(ranking_ids.max()) >= len(data):
        raise CorruptRunError(
            f"{db_path} has test ids up to {int(ranking_ids.max())} but the {split} split of run {run_path} "
            f"has {len(data)} examples; the database was explained from another run"
        )
    labels = torch.tensor(ranking.get_column("label").to_list(), dtype=torch.int64)
    if not torch.equal(data.labels[ranking_ids], labels):
        raise CorruptRunError(
            f"the test labels in {db_path} differ from the {split} labels of run {run_path}; "
            "the database was explained from another run (pass the right one with --run RUN_DIR)"
        )
    held_out = torch.ones(len(task.dataset("val")), dtype=torch.bool)
    if split == "val":
        held_out[ranking_ids] = False
    eval_ids = held_out.nonzero().squeeze(1)  # (eval,)
    if eval_ids.numel() < min_eval:
        raise BadInputError(
            f"only {eval_ids.numel()} validation examples of run {run_path} are outside the {ranking_ids.numel()} "
            f"examples {db_path} was explained on, fewer than {min_eval}; explain fewer test examples "
            "(e.g. --test val:16) so that the others can evaluate the pruned models, or lower --min-eval"
        )
    return ranking_ids, eval_ids


def load_setup(db_path: str | os.PathLike, run_dir: str | os.PathLike | None = None,
               min_eval: int = PruneConfig.min_eval, trust_run: bool = False) -> PruneSetup:
    """Read Ψ̄ and the ranking set from ``db_path`` and θ_N, model and data from its run directory.

    The run's model and data code is imported only for a built-in task or with ``trust_run``.
    """
    db_path = Path(db_path)
    meta, importance, groups, ranking = _read_database(db_path)
    run_path = _resolve_run_dir(db_path, meta, run_dir)
    history = History.open(run_path)
    _check_same_run(db_path, meta, history)
    task = history.task(trust_run)
    if task.dataset("val").regression:
        raise BadInputError(f"{run_path} has floating-point targets: the pruning check compares predicted classes "
                            "(agreement, accuracy, KL)")
    params = history.params(history.num_steps)
    recorded = list(history.param_names)
    dtype = params[recorded[0]].dtype
    model = task.build_model().to(dtype).eval()
    with torch.no_grad():  # the buffers the training left (running statistics), not the initial ones
        for name, value in history.buffers(history.num_steps).items():
            model.get_buffer(name).copy_(value)
    known = dict(model.named_parameters())
    foreign = [n for n in recorded if n not in known or tuple(known[n].shape) != tuple(params[n].shape)]
    if foreign:
        raise CorruptRunError(
            f"run {run_path} records tensors {foreign[:5]} that the model of its spec does not have with that shape; "
            "the model code changed since recording"
        )
    ranking_ids, eval_ids = _ranking_and_eval(db_path, run_path, task, meta, ranking, min_eval)
    val = task.dataset("val")
    eval_inputs = val.inputs[eval_ids]
    eval_inputs = eval_inputs.to(dtype) if eval_inputs.is_floating_point() else eval_inputs

    output = output_tensors(task, model, eval_inputs[:2], recorded)
    prunable = tuple(n for n in recorded if n not in output)
    if not prunable:
        raise BadInputError(f"every recorded tensor of run {run_path} is in the output layer; nothing to prune")
    layer_of = dict(zip(groups.get_column("tensor").to_list(), groups.get_column("layer").to_list(), strict=True))
    layer = {n: layer_of.get(n, task.layer_of(n)) for n in recorded}
    by_tensor = {name: frame for (name,), frame in importance.partition_by("tensor", as_dict=True).items()}
    missing = [n for n in prunable if n not in by_tensor]
    if missing:
        raise CorruptRunError(
            f"the importance view of {db_path} lacks the tensors {missing[:5]}; re-run "
            f"`python -m engine explain {run_path} --views importance`"
        )
    columns = _stored_columns(importance, db_path)
    stored = {n: _dense(by_tensor[n], n, tuple(params[n].shape), columns, db_path) for n in prunable}
    ranked = {method: {n: stored[n][column] for n in prunable}
              for method, column in STORED_SCORES.items() if column in columns}
    ranked["magnitude"] = {n: params[n].double().abs() for n in prunable}
    return PruneSetup(
        db_path=db_path, run_dir=run_path, task=task, model=model, params=params, prunable=prunable,
        output=output, layer=layer, ranked=ranked, ranking_ids=ranking_ids, eval_ids=eval_ids,
        eval_inputs=eval_inputs, eval_labels=val.labels[eval_ids],
    )


# ------------------------------------------------------------------------------ evaluation
def log_probs(model: nn.Module, params: Params, inputs: Tensor, batch_size: int) -> Tensor:
    """Log-softmax of the model outputs under ``params``: ``(examples, ...) → (examples, classes)`` float64."""
    parts = []
    with torch.no_grad():
        for batch in inputs.split(batch_size):
            logits = functional_call(model, params, (batch,))  # (batch, classes)
            parts.append(torch.log_softmax(logits.double(), dim=-1))
    return torch.cat(parts)


def compare(reference: Tensor, pruned: Tensor, labels: Tensor) -> dict[str, float]:
    """Agreement, accuracy and mean KL(reference ‖ pruned) from log-probabilities ``(examples, classes)``."""
    predicted = pruned.argmax(dim=-1)
    kl = (reference.exp() * (reference - pruned)).sum(dim=-1)  # (examples,)
    return {
        "agreement": float((predicted == reference.argmax(dim=-1)).double().mean()),
        "accuracy": float((predicted == labels).double().mean()),
        "kl": max(float(kl.mean()), 0.0),  # ≥ 0 exactly; only round-off can go below
    }


# ------------------------------------------------------------------------------ sweep
def sweep(setup: PruneSetup, config: PruneConfig, progress: bool = False) -> pl.DataFrame:
    """Evaluate every (method, seed, sparsity) of ``config`` on the held-out examples."""
    methods = config.methods or setup.methods
    for method in methods:
        if method not in setup.methods:
            setup.scores(method)  # raises: names the scores the database lacks
    reference = log_probs(setup.model, setup.params, setup.eval_inputs, config.batch_size)
    runs = [(m, s) for m in methods for s in (range(config.seeds) if m == "random" else (NO_SEED,))]
    rows = [{
        "method": DENSE, "scope": config.scope, "sparsity": 0.0, "seed": NO_SEED,
        **compare(reference, reference, setup.eval_labels),
        "achieved_sparsity": achieved_sparsity(setup.params, setup.prunable),
        "layer_sparsity": json.dumps(layer_sparsity(setup.params, setup.prunable, setup.layer)),
    }]
    with tqdm(total=len(runs) * len(config.sparsities), desc="pruning", disable=not progress) as bar:
        for method, seed in runs:
            scores = setup.scores(method, seed)
            for sparsity in config.sparsities:
                masks = keep_masks(scores, sparsity, config.scope, order=setup.prunable)
                pruned = apply_masks(setup.params, masks)
                measures = compare(reference, log_probs(setup.model, pruned, setup.eval_inputs, config.batch_size),
                                   setup.eval_labels)
                rows.append({
                    "method": method, "scope": config.scope, "sparsity": sparsity, "seed": seed, **measures,
                    "achieved_sparsity": achieved_sparsity(pruned, setup.prunable),
                    "layer_sparsity": json.dumps(layer_sparsity(pruned, setup.prunable, setup.layer)),
                })
                bar.update()
    return pl.DataFrame(rows, schema={
        "method": pl.String, "scope": pl.String, "sparsity": pl.Float64, "seed": pl.Int64, "agreement": pl.Float64,
        "accuracy": pl.Float64, "kl": pl.Float64, "achieved_sparsity": pl.Float64, "layer_sparsity": pl.String,
    })


def run_prune(db_path: str | os.PathLike, config: PruneConfig, *, run_dir: str | os.PathLike | None = None,
              write: bool = True, progress: bool = False, trust_run: bool = False) -> tuple[PruneSetup, pl.DataFrame]:
    """Load, sweep and (with ``write``) store; returns the setup and the new rows.

    The rows replace the stored rows of the same (method, scope) and keep the others, in one
    atomic update under the database's writer lock (``engine.store.add_pruning``).
    """
    setup = load_setup(db_path, run_dir=run_dir, min_eval=config.min_eval, trust_run=trust_run)
    log.info("pruning %d tensors (%d elements) of %s; output layer kept: %s; %d ranking / %d held-out examples",
             len(setup.prunable), sum(setup.params[n].numel() for n in setup.prunable), setup.run_dir,
             ", ".join(setup.output), setup.ranking_ids.numel(), setup.eval_ids.numel())
    frame = sweep(setup, config, progress=progress)
    if write:
        store.add_pruning(setup.db_path, frame.select(COLUMNS), keep_other_curves=True)
    return setup, frame


def prune(
    db_path: str | os.PathLike,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    methods: Sequence[str] | None = None,
    scope: str = "global",
    seeds: int = 3,
    *,
    run_dir: str | os.PathLike | None = None,
    min_eval: int = PruneConfig.min_eval,
    write: bool = True,
    progress: bool = False,
    trust_run: bool = False,
) -> pl.DataFrame:
    """Prune the final model of the run behind ``db_path`` by ``methods`` (default: every method
    the database holds scores for; MATH.md §5).

    Returns one row per (method, seed, sparsity) in the pruning-frame columns plus
    ``layer_sparsity`` (JSON). With ``write`` the rows go into the database's pruning
    table atomically, replacing earlier rows of the same (method, scope) and keeping the
    others. ``run_dir`` overrides the run directory recorded in the database; ``trust_run``
    allows importing the model and data code a run names (built-in tasks need no trust).
    """
    config = PruneConfig(sparsities=tuple(sparsities), methods=None if methods is None else tuple(methods),
                         scope=scope, seeds=seeds, min_eval=min_eval)
    return run_prune(db_path, config, run_dir=run_dir, write=write, progress=progress, trust_run=trust_run)[1]


def summarize(frame: pl.DataFrame) -> pl.DataFrame:
    """Mean of every measure over seeds per (method, scope, sparsity), with the number of seeds."""
    measures = ("agreement", "accuracy", "kl", "achieved_sparsity")
    return (frame.group_by("method", "scope", "sparsity", maintain_order=True)
            .agg(*[pl.col(m).mean() for m in measures], pl.len().alias("seeds"))
            .sort("method", "scope", "sparsity"))


# ------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m engine prune``."""
    parser.add_argument("db", help="run database (.duckdb) with an importance view")
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES),
                        help="comma-separated fractions of zeros in (0, 1) (default %(default)s)")
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated from {','.join(METHODS)}, or all: every method the database holds "
                             "scores for (default %(default)s)")
    parser.add_argument("--scope", choices=SCOPES, default="global",
                        help="one threshold over all prunable elements, or the same fraction per tensor")
    parser.add_argument("--seeds", type=int, default=3, help="random-pruning seeds (default %(default)s)")
    parser.add_argument("--run", default=None, help="run directory (default: the one recorded in the database)")
    parser.add_argument("--min-eval", type=int, default=PruneConfig.min_eval,
                        help="fewest held-out validation examples accepted (default %(default)s)")
    parser.add_argument("--trust-run", action="store_true",
                        help="import the model and data code the run names (needed unless it is a built-in task)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_sparsities(text: str) -> list[float]:
    try:
        return [float(v) for v in _split(text)]
    except ValueError:
        raise BadInputError(f"--sparsities {text!r} is not a comma-separated list of numbers such as 0.7,0.9"
                            ) from None


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m engine prune``: run the sweep, store it, summarize it."""
    methods = None if args.methods.strip() == "all" else tuple(_split(args.methods))
    config = PruneConfig(sparsities=tuple(_parse_sparsities(args.sparsities)), methods=methods, scope=args.scope,
                         seeds=args.seeds, min_eval=args.min_eval)
    setup, frame = run_prune(args.db, config, run_dir=args.run, progress=not args.json, trust_run=args.trust_run)
    curves = {
        f"{row['method']} @ {row['sparsity']:g}": {k: row[k] for k in ("agreement", "accuracy", "kl",
                                                                        "achieved_sparsity", "seeds")}
        for row in summarize(frame).to_dicts()
    }
    return {
        "db": str(setup.db_path), "run": str(setup.run_dir), "scope": config.scope,
        "output_layer": list(setup.output),
        "prunable_parameters": sum(setup.params[n].numel() for n in setup.prunable),
        "ranking_examples": setup.ranking_ids.numel(), "eval_examples": setup.eval_ids.numel(),
        "rows": frame.height, "curves": curves,
    }
