"""Import a run recorded with the published ``explaind`` package (0.1) into a run directory.

That package's training wrappers keep their history in three ``torch.save`` files in one
directory; the importer reads them, checks them against the model and data they are said
to belong to, writes our run format with ``RunWriter`` and replays every update
(``engine.run.verify``):

``model_checkpoint.pt`` (``ModelPath``)
    a list of ``N + 1`` state dicts of the wrapped model: ``θ_0`` before training, then the
    parameters after every optimizer step (buffers included).
``optimizer_checkpoint.pt``
    ``AdamWOptimizerPath``: ``N + 1`` dicts ``{"exp_avg": {...}, "exp_avg_sq": {...}}``; entry 0
    holds zeros, entry ``s + 1`` the moments after step ``s``, keyed by the wrapper model's
    state-dict names (``"model."`` + parameter name when the optimizer wrapped a
    ``ModelPath``), with ``"lr"`` / ``"weight_decay"`` only when tracked. Parameters that
    never had a gradient are absent. ``SGDOptimizerPath``: ``N + 1`` dicts ``{"lr",
    "weight_decay"}`` (entry 0 before training; either key only when tracked).
``data_checkpoint.pt`` (``DataPath``)
    a list of ``N`` dicts ``{"X", "y", "indices"}``: the batch of every step and the dataset
    positions of its examples.

What the files do not hold is taken from ``ExplaindOptimizer`` (AdamW betas and eps; SGD
momentum and dampening; learning rate and weight decay when untracked), defaulting to the
wrapper's constructor defaults. For AdamW the recorded moments let the importer check
betas, learning rate and weight decay before writing anything; a mismatch raises an
error that states the values the record implies. A learning rate recorded in entry
``s + 1`` is the one step ``s`` used (the optimizer is logged right after its step).

The training loss must be the mean of a per-example cross-entropy of the model output
(the package's ``RegularizedCrossEntropyLoss`` with ``alpha=0`` on log-probabilities is);
the replay check measures whether the record is reproduced, and a run that is not
keeps its exact component and step views but has its data view withdrawn, with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from engine.errors import BadInputError, CorruptRunError, RunNotFoundError, unreadable_reason
from engine.model.task import Dataset, Task, data_fingerprint, get_task
from engine.run.checkpoints import load_plain
from engine.run.record import HPARAM_COLUMNS, RunWriter, StepData, check_run_target, write_json_atomic

log = logging.getLogger(__name__)

MODEL_FILE = "model_checkpoint.pt"
OPTIMIZER_FILE = "optimizer_checkpoint.pt"
DATA_FILE = "data_checkpoint.pt"
CSV_DIR = "dataset"                 # where the package's modular-addition script writes train.csv / val.csv
CSV_DATA = "engine.importers.explaind:csv_dataset"
SOURCE = "explaind 0.1 (ModelPath / AdamWOptimizerPath / SGDOptimizerPath / DataPath)"
KINDS = ("auto", "adamw", "sgd")
# Constructor defaults of the package's optimizer wrappers (used for values the files lack).
WRAPPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8},
    "sgd": {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9, "dampening": 0.0},
}
CHECK_TOLERANCE = 1e-3    # relative error of the gradient-free AdamW checks that flags wrong hyper-parameters
REPLAY_TOLERANCE = 1e-4   # replay error above which the data view is withdrawn


@dataclass(frozen=True)
class ExplaindOptimizer:
    """Optimizer settings the package's files do not record; ``None`` = recorded value or wrapper default.

    ``kind`` is ``auto`` (AdamW when the optimizer file holds moments, else SGD), ``adamw``
    or ``sgd``. ``lr`` and ``weight_decay`` apply when the files do not track them; a given
    value that contradicts a tracked one is an error.
    """

    kind: str = "auto"
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    momentum: float | None = None
    dampening: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"optimizer kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if self.betas is not None:
            betas = tuple(float(b) for b in self.betas)
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise BadInputError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
            object.__setattr__(self, "betas", betas)
        for name in ("lr", "weight_decay", "eps", "momentum", "dampening"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(float(value)) or float(value) < 0.0):
                raise BadInputError(f"{name} must be a finite non-negative number, got {value!r}")


# ============================================================================ data
def csv_dataset(path: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Train and val splits from ``PATH/train.csv`` and ``PATH/val.csv``.

    The layout is the one the package's modular-addition script saves: one row per
    example in dataset order, the input tokens in the leading columns (``a, add, b, eq``)
    and the class in the column ``target``. Integer columns become int64 inputs, others
    float32.
    """
    import polars as pl

    splits = {}
    for split in ("train", "val"):
        file = Path(path) / f"{split}.csv"
        if not file.is_file():
            raise BadInputError(f"{file} does not exist; the CSV dataset needs train.csv and val.csv")
        try:
            frame = pl.read_csv(file)
        except Exception as exc:  # polars raises several error types for malformed CSV
            raise BadInputError(f"{file} cannot be read as CSV ({exc})") from exc
        if "target" not in frame.columns or frame.width < 2:
            raise BadInputError(f"{file} needs input columns and a 'target' column, found {frame.columns}")
        features = frame.drop("target")
        integer = all(dtype.is_integer() for dtype in features.dtypes)
        inputs = torch.from_numpy(features.to_numpy().astype(np.int64 if integer else np.float32))
        labels = torch.from_numpy(frame["target"].to_numpy().astype(np.int64))
        splits[split] = (inputs, labels)
    return splits


def resolve_dataset(directory: Path, dataset: str | None, data_kwargs: Mapping[str, Any] | None) -> tuple[str, dict]:
    """``(data import path, data_kwargs)`` for the import spec.

    ``dataset`` is an import path ``pkg.mod:func`` (returning ``{"train": (x, y), "val": (x, y)}``,
    called with ``data_kwargs``), a directory holding ``train.csv`` and ``val.csv``, or
    ``None``: the ``dataset/`` folder beside the checkpoints, where the package's
    modular-addition script saves its CSV data.
    """
    if dataset is None:
        folder = directory / CSV_DIR
        if not (folder / "train.csv").is_file():
            raise BadInputError(
                f"no dataset given and {folder}/train.csv does not exist; pass --dataset with a directory "
                "holding train.csv and val.csv, or an import path 'pkg.mod:func' of a function returning "
                "{'train': (inputs, labels), 'val': (inputs, labels)}"
            )
        return CSV_DATA, {"path": str(folder.resolve())}
    if ":" in dataset and not Path(dataset).exists():
        return dataset, dict(data_kwargs or {})
    folder = Path(dataset)
    if not (folder / "train.csv").is_file():
        raise BadInputError(
            f"--dataset {dataset!r} is neither an import path 'pkg.mod:func' nor a directory with train.csv and val.csv"
        )
    if data_kwargs:
        raise BadInputError("data_kwargs apply to an import-path dataset, not to a CSV directory")
    return CSV_DATA, {"path": str(folder.resolve())}


# ============================================================================ loading
_ZIP_MAGIC = b"PK\x03\x04"   # torch.save's default format is a zip archive
_PICKLE_MAGIC = b"\x80"       # its legacy format starts with a pickle protocol byte


def _load_list(file: Path, what: str) -> list[Any]:
    """``torch.load`` a list saved by the package, without executing pickled code."""
    if not file.is_file():
        raise CorruptRunError(
            f"{file} is missing: an explaind run directory holds {MODEL_FILE}, {OPTIMIZER_FILE} and {DATA_FILE} "
            f"(written by save_checkpoints() of ModelPath, the optimizer wrapper and DataPath)"
        )
    try:
        with open(file, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise CorruptRunError(f"{file} cannot be read ({exc.strerror})") from None
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise CorruptRunError(f"{file} is not a file written by torch.save (it starts with {head!r}); "
                              "it is truncated or foreign")
    try:
        try:
            value = load_plain(file, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            value = load_plain(file)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if not lines:
            raise CorruptRunError(f"{file} cannot be read as a torch.save file of tensors, lists and dicts; "
                                  "it is truncated or foreign") from None
        raise CorruptRunError(
            f"{file} holds pickled Python objects other than tensors, lists and dicts ({lines[0]}); it is loaded "
            "with weights_only=True so that importing a file never runs code from it. Re-save the "
            f"{what} as plain lists and dicts of tensors (e.g. torch.save([dict(c) for c in checkpoints], ...))"
        ) from None
    except Exception as exc:  # the unpickler fails on foreign bytes with any error type
        raise CorruptRunError(f"{file} cannot be read by torch.load ({unreadable_reason(exc)}); the file is "
                              "truncated or foreign") from None
    if not isinstance(value, list):
        raise CorruptRunError(f"{file} holds a {type(value).__name__}, expected the list of {what} the package saves")
    return value


def _entry(file: Path, items: list[Any], index: int, what: str) -> Mapping[str, Any]:
    item = items[index]
    if not isinstance(item, Mapping):
        raise CorruptRunError(f"{file}: entry {index} is a {type(item).__name__}, expected a dict ({what})")
    return item


@dataclass(frozen=True)
class _Source:
    """The three files, loaded and checked; ``steps`` = N."""

    model_file: Path
    optimizer_file: Path
    data_file: Path
    params: list[Mapping[str, Tensor]]      # N + 1 state dicts
    optimizer: list[Mapping[str, Any]]      # N + 1 entries
    batches: list[Mapping[str, Any]]        # N entries

    @property
    def steps(self) -> int:
        return len(self.batches)


def _check_directory(directory: Path) -> None:
    if not directory.exists():
        raise RunNotFoundError(f"explaind checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise BadInputError(f"{directory} is a file; pass the directory holding {MODEL_FILE}")


def _load_source(directory: Path) -> _Source:
    _check_directory(directory)
    files = (directory / MODEL_FILE, directory / OPTIMIZER_FILE, directory / DATA_FILE)
    params = _load_list(files[0], "model state dicts")
    optimizer = _load_list(files[1], "optimizer checkpoints")
    batches = _load_list(files[2], "batches")
    if len(params) < 2:
        raise CorruptRunError(f"{files[0]} holds {len(params)} state dict(s); at least θ_0 and one step are needed")
    if not (len(params) == len(optimizer) == len(batches) + 1):
        raise CorruptRunError(
            f"the checkpoint files of {directory} disagree on the number of steps: {MODEL_FILE} has "
            f"{len(params)} state dicts, {OPTIMIZER_FILE} {len(optimizer)} entries and {DATA_FILE} "
            f"{len(batches)} batches (expected N + 1, N + 1 and N); a file is truncated, from another "
            "run, or the DataPath logged batches that were not trained on"
        )
    return _Source(*files, params=params, optimizer=optimizer, batches=batches)


# ============================================================================ checks
def _check_params(src: _Source, model: nn.Module, model_name: str, progress: bool) -> tuple[list[str], torch.dtype]:
    """Parameter names in model order; every state dict must match the model's shapes and be finite."""
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    first = _entry(src.model_file, src.params, 0, "a state dict")
    dtype = None
    for step in tqdm(range(len(src.params)), desc="check parameters", unit="ckpt", disable=not progress):
        state = _entry(src.model_file, src.params, step, "a state dict")
        missing = [n for n in names if n not in state]
        if missing:
            raise BadInputError(
                f"{src.model_file}: state dict {step} lacks parameter(s) {missing[:5]} of model {model_name}; "
                "the model class or model_kwargs differ from the trained model"
            )
        for n in names:
            t = state[n]
            if not isinstance(t, Tensor):
                raise CorruptRunError(f"{src.model_file}: state dict {step} entry {n!r} is not a tensor")
            if tuple(t.shape) != shapes[n]:
                raise BadInputError(
                    f"{src.model_file}: parameter {n!r} has shape {tuple(t.shape)} in state dict {step}, but "
                    f"model {model_name} has {shapes[n]}; pass the model_kwargs the run was trained with"
                )
            if t.dtype not in (torch.float32, torch.float64):
                raise BadInputError(f"{src.model_file}: parameter {n!r} is {t.dtype}; float32 or float64 is supported")
            dtype = t.dtype if dtype is None else dtype
            if t.dtype != dtype:
                raise CorruptRunError(f"{src.model_file}: parameter {n!r} is {t.dtype} but others are {dtype}")
            if not torch.isfinite(t).all():
                raise CorruptRunError(
                    f"{src.model_file}: parameter {n!r} contains NaN or Inf in state dict {step}; "
                    "training diverged or the file is damaged"
                )
        for b, value in buffers.items():
            if b in state and b in first and not torch.equal(state[b].to(value.dtype), first[b].to(value.dtype)):
                raise BadInputError(
                    f"{src.model_file}: buffer {b!r} changes during training (state dict {step}); this importer "
                    "reads parameters only, so models whose buffers train (e.g. BatchNorm statistics) "
                    "cannot be imported"
                )
    for b, value in buffers.items():
        if b in first and (first[b].shape != value.shape or not torch.equal(first[b].to(value.dtype), value)):
            raise BadInputError(
                f"{src.model_file}: buffer {b!r} differs from the one model {model_name} builds; the model "
                "class or model_kwargs differ from the trained model"
            )
    return names, dtype


def _check_batches(src: _Source, train: Dataset) -> list[Tensor]:
    """Batch ids per step; ids must lie in the training set and their inputs and labels match it."""
    ids_per_step = []
    n_train = len(train)
    for step in range(src.steps):
        batch = _entry(src.data_file, src.batches, step, "{'X', 'y', 'indices'}")
        missing = [k for k in ("X", "y", "indices") if k not in batch]
        if missing:
            raise CorruptRunError(f"{src.data_file}: batch {step} lacks {missing}; expected keys X, y, indices")
        ids = torch.as_tensor(batch["indices"]).flatten()
        if ids.is_floating_point() or ids.numel() == 0:
            raise CorruptRunError(f"{src.data_file}: batch {step} has no integer example indices")
        ids = ids.long()
        if int(ids.min()) < 0 or int(ids.max()) >= n_train:
            raise BadInputError(
                f"{src.data_file}: batch {step} has example indices {int(ids.min())}..{int(ids.max())}, outside the "
                f"training set of {n_train} examples given by the dataset; pass the dataset the run was trained on"
            )
        x, y = torch.as_tensor(batch["X"]), torch.as_tensor(batch["y"]).flatten()
        if x.shape[0] != ids.numel() or y.numel() != ids.numel():
            raise CorruptRunError(
                f"{src.data_file}: batch {step} has {ids.numel()} indices but {x.shape[0]} inputs "
                f"and {y.numel()} labels"
            )
        want_x = train.inputs[ids]
        if x.shape != want_x.shape or not torch.equal(x.to(want_x.dtype), want_x) or \
                not torch.equal(y.long(), train.labels[ids]):
            raise BadInputError(
                f"{src.data_file}: the inputs or labels of batch {step} differ from training examples "
                f"{ids[:5].tolist()}... of the dataset; the dataset is not the one the run was trained on "
                "(or not in the same order)"
            )
        ids_per_step.append(ids)
    return ids_per_step


def _state_names(model: nn.Module, keys: Any, file: Path, entry: int) -> dict[str, str]:
    """Map the optimizer file's keys to parameter names.

    The wrapper labels the optimizer's i-th parameter with the i-th key of the (wrapper)
    model's state dict, so a key is resolved through its position in the state dict.
    """
    state_keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    mapping: dict[str, str] = {}
    for key in keys:
        bare = key[len("model."):] if key.startswith("model.") and key[len("model."):] in state_keys else key
        if bare not in state_keys:
            raise BadInputError(
                f"{file}: entry {entry} has state for {key!r}, which is not in the model's state dict; "
                "the model class differs from the trained one"
            )
        position = state_keys.index(bare)
        if position >= len(params):
            raise CorruptRunError(f"{file}: entry {entry} key {key!r} does not correspond to a trained parameter")
        mapping[key] = params[position]
    return mapping


def _detect_kind(src: _Source, kind: str) -> str:
    first = _entry(src.optimizer_file, src.optimizer, 0, "an optimizer checkpoint")
    adam = "exp_avg_sq" in first
    if kind == "auto":
        return "adamw" if adam else "sgd"
    if (kind == "adamw") != adam:
        found = "AdamW moments" if adam else "no moments (an SGDOptimizerPath file)"
        raise BadInputError(f"{src.optimizer_file} holds {found}, but optimizer kind {kind!r} was requested")
    return kind


def _hparam(src: _Source, key: str, step: int, given: float | None, default: float) -> tuple[float, str]:
    """The value of ``key`` at ``step``: tracked in entry ``step + 1``, else given, else the wrapper default."""
    recorded = src.optimizer[step + 1].get(key)
    if recorded is not None:
        value = float(recorded)
        if given is not None and not math.isclose(value, given, rel_tol=1e-6, abs_tol=1e-12):
            raise BadInputError(
                f"{src.optimizer_file} records {key}={value:g} for step {step}, but {key}={given:g} was given; "
                f"drop the option (the recorded value is used)"
            )
        return value, "recorded"
    if given is not None:
        return float(given), "given"
    return float(default), "wrapper default"


def _ulp_excess(predicted: Tensor, before: Tensor, after: Tensor) -> tuple[float, float]:
    """(‖excess of |Δ̂ − Δ| beyond one ulp‖², ‖Δ‖²) in float64."""
    delta = (after.double() - before.double())
    ulp = torch.from_numpy(np.spacing(np.maximum(np.abs(before.numpy()), np.abs(after.numpy()))).astype(np.float64))
    excess = ((predicted - delta).abs() - ulp).clamp_min(0.0)
    return float(excess.pow(2).sum()), float(delta.pow(2).sum())


# ============================================================================ writing
def _adam_steps(src: _Source, model: nn.Module, names: list[str], cfg: ExplaindOptimizer,
                progress: bool) -> tuple[list[StepData], dict[str, str], list[dict[str, Any]]]:
    """AdamW: per-step StepData (batch filled in later) after gradient-free checks of the hyper-parameters."""
    defaults = WRAPPER_DEFAULTS["adamw"]
    beta1, beta2 = cfg.betas or defaults["betas"]
    eps = defaults["eps"] if cfg.eps is None else float(cfg.eps)
    first = src.optimizer[0]
    for key in ("exp_avg", "exp_avg_sq"):
        table = first.get(key)
        if not isinstance(table, Mapping):
            raise CorruptRunError(f"{src.optimizer_file}: entry 0 lacks the {key!r} dict of an AdamWOptimizerPath")
        if any(isinstance(v, Tensor) and bool(v.any()) for v in table.values()):
            raise BadInputError(
                f"{src.optimizer_file}: entry 0 holds non-zero {key}; the optimizer had state before the recorded "
                "steps (a resumed run), which the import cannot attribute"
            )
    counters = dict.fromkeys(names, 0)
    resolved: dict[str, str] = {}
    prev_m: dict[str, Tensor] = {}
    prev_v: dict[str, Tensor] = {}
    out: list[StepData] = []
    sources: dict[str, str] = {}
    hparams_all: list[dict[str, Any]] = []
    worst = (0.0, -1)
    for step in tqdm(range(src.steps), desc="check optimizer", unit="step", disable=not progress):
        entry = _entry(src.optimizer_file, src.optimizer, step + 1, "an optimizer checkpoint")
        m_raw, v_raw = entry.get("exp_avg"), entry.get("exp_avg_sq")
        if not isinstance(m_raw, Mapping) or not isinstance(v_raw, Mapping):
            raise CorruptRunError(f"{src.optimizer_file}: entry {step + 1} lacks 'exp_avg' or 'exp_avg_sq'")
        unseen = [k for k in v_raw if k not in resolved]
        if unseen:
            resolved.update(_state_names(model, unseen, src.optimizer_file, step + 1))
        mapping = resolved
        m = {mapping[k]: m_raw[k] for k in v_raw if k in m_raw}
        v = {mapping[k]: v_raw[k] for k in v_raw}
        lr, lr_src = _hparam(src, "lr", step, cfg.lr, defaults["lr"])
        wd, wd_src = _hparam(src, "weight_decay", step, cfg.weight_decay, defaults["weight_decay"])
        sources.update(lr=lr_src, weight_decay=wd_src)
        before, after = src.params[step], src.params[step + 1]
        active, second, adam_step = [], {}, []
        excess_sq = norm_sq = 0.0
        fit_rows: list[tuple[Tensor, Tensor, Tensor]] = []
        for n in names:
            shape = before[n].shape
            if n in v:
                if n not in m:
                    raise CorruptRunError(
                        f"{src.optimizer_file}: entry {step + 1} has exp_avg_sq but no exp_avg for {n!r}")
                if tuple(v[n].shape) != tuple(shape) or tuple(m[n].shape) != tuple(shape):
                    raise BadInputError(
                        f"{src.optimizer_file}: entry {step + 1} stores moments of shape {tuple(v[n].shape)} for "
                        f"{n!r}, whose parameter has shape {tuple(shape)}"
                    )
                changed = (n not in prev_v or not torch.equal(v[n], prev_v[n]) or not torch.equal(m[n], prev_m[n])
                           or not torch.equal(before[n], after[n]))
            else:
                changed = False
            active.append(changed)
            if changed:
                counters[n] += 1
            t = counters[n]
            adam_step.append(float(t))
            second[n] = v[n] if n in v else torch.zeros(shape, dtype=before[n].dtype)
            if changed:
                if not torch.isfinite(v[n]).all() or not torch.isfinite(m[n]).all():
                    raise CorruptRunError(
                        f"{src.optimizer_file}: moments of {n!r} after step {step} contain NaN or Inf")
                if t == 1:
                    _check_betas(src, n, step, m[n], v[n], beta1, beta2)
                bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
                u = (m[n].double() / bc1) / (v[n].double().sqrt() / math.sqrt(bc2) + eps)
                theta = before[n].double()
                predicted = -lr * wd * theta - lr * u
                fit_rows.append((theta.flatten(), u.flatten(), (after[n].double() - theta).flatten()))
            else:
                predicted = torch.zeros(shape, dtype=torch.float64)
            e, d = _ulp_excess(predicted, before[n], after[n])
            excess_sq += e
            norm_sq += d
        error = math.sqrt(excess_sq / norm_sq) if norm_sq else math.sqrt(excess_sq)
        if error > worst[0]:
            worst = (error, step)
        if error > CHECK_TOLERANCE:
            implied = _implied_lr_wd(fit_rows)
            raise BadInputError(
                f"{src.optimizer_file}: the recorded AdamW moments and parameters do not give the update of step "
                f"{step} with lr={lr:g} ({lr_src}), weight_decay={wd:g} ({wd_src}), betas=({beta1:g}, {beta2:g}), "
                f"eps={eps:g} (relative error {error:.3g}); the record implies {implied}. Pass the training "
                "values with --lr/--weight-decay/--betas/--eps"
            )
        prev_m.update(m)
        prev_v.update(v)
        hp = _hparams_row(lr=lr, weight_decay=wd, beta1=beta1, beta2=beta2, eps=eps, decoupled=True)
        hparams_all.append(hp)
        out.append(StepData(theta=dict(before), batch_ids=torch.empty(0, dtype=torch.int64),
                            batch_weights=torch.empty(0, dtype=torch.float64), hparams=[hp], active=active,
                            second_moment=second, adam_step=adam_step))
    sources.update(betas="given" if cfg.betas else "wrapper default", eps="given" if cfg.eps is not None
                   else "wrapper default")
    log.info("AdamW record check: largest relative error %.3g at step %d", worst[0], worst[1])
    return out, sources, hparams_all


def _check_betas(src: _Source, name: str, step: int, m: Tensor, v: Tensor, beta1: float, beta2: float) -> None:
    """After a tensor's first step m = (1−β1)g and v = (1−β2)g², so (1−β2)m² = (1−β1)²v."""
    m, v = m.double(), v.double()
    lhs, rhs = (1.0 - beta2) * m * m, (1.0 - beta1) ** 2 * v
    scale = float(rhs.abs().sum())
    if scale == 0.0:
        return
    error = float((lhs - rhs).abs().sum()) / scale
    if error > CHECK_TOLERANCE:
        mask = v > 0
        implied = float((m[mask] ** 2 / v[mask]).median())
        raise BadInputError(
            f"{src.optimizer_file}: the moments of {name!r} after step {step} imply (1−β1)²/(1−β2) = {implied:.6g}, "
            f"but betas=({beta1:g}, {beta2:g}) give {(1.0 - beta1) ** 2 / (1.0 - beta2):.6g}; pass --betas B1,B2 with "
            "the values the run was trained with (the wrapper's default is 0.9,0.999)"
        )


def _implied_lr_wd(rows: list[tuple[Tensor, Tensor, Tensor]]) -> str:
    """Least-squares (lr, weight decay) of Δ = −lr·wd·θ − lr·u over the active tensors of one step."""
    if not rows:
        return "no update to fit"
    theta = torch.cat([r[0] for r in rows])
    u = torch.cat([r[1] for r in rows])
    delta = torch.cat([r[2] for r in rows])
    design = torch.stack([-theta, -u], dim=1)  # (D, 2): columns for lr·wd and lr
    solution = torch.linalg.lstsq(design, delta.unsqueeze(1)).solution.squeeze(1)
    a, b = float(solution[0]), float(solution[1])
    if b == 0.0:
        return "a zero learning rate"
    return f"lr ≈ {b:.4g} and weight_decay ≈ {a / b:.4g}"


def _sgd_steps(src: _Source, names: list[str], cfg: ExplaindOptimizer
               ) -> tuple[list[StepData], dict[str, str], list[dict[str, Any]]]:
    """SGD: per-step StepData; a tensor is active when the step changed it."""
    defaults = WRAPPER_DEFAULTS["sgd"]
    momentum = defaults["momentum"] if cfg.momentum is None else float(cfg.momentum)
    dampening = defaults["dampening"] if cfg.dampening is None else float(cfg.dampening)
    out: list[StepData] = []
    sources: dict[str, str] = {}
    hparams_all: list[dict[str, Any]] = []
    for step in range(src.steps):
        _entry(src.optimizer_file, src.optimizer, step + 1, "an optimizer checkpoint")
        lr, lr_src = _hparam(src, "lr", step, cfg.lr, defaults["lr"])
        wd, wd_src = _hparam(src, "weight_decay", step, cfg.weight_decay, defaults["weight_decay"])
        sources.update(lr=lr_src, weight_decay=wd_src)
        before, after = src.params[step], src.params[step + 1]
        active = [not torch.equal(before[n], after[n]) for n in names]
        hp = _hparams_row(lr=lr, weight_decay=wd, momentum=momentum, dampening=dampening, decoupled=False)
        hparams_all.append(hp)
        out.append(StepData(theta=dict(before), batch_ids=torch.empty(0, dtype=torch.int64),
                            batch_weights=torch.empty(0, dtype=torch.float64), hparams=[hp], active=active))
    sources.update(momentum="given" if cfg.momentum is not None else "wrapper default",
                   dampening="given" if cfg.dampening is not None else "wrapper default")
    return out, sources, hparams_all


def _hparams_row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(HPARAM_COLUMNS)
    row.update(nesterov=False, maximize=False, amsgrad=False)
    row.update(values)
    return row


# ============================================================================ entry points
def import_explaind(
    directory: str | Path,
    model: str,
    model_kwargs: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    *,
    out: str | Path,
    optimizer: ExplaindOptimizer | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the explaind checkpoints in ``directory`` into the run directory ``out``.

    ``model`` is the import path ``pkg.mod:Class`` of the trained model class, built with
    ``model_kwargs``; ``dataset`` names the data (see ``resolve_dataset``). After writing,
    every update is replayed (``engine.run.verify``); the result is stored in the manifest under
    ``"import"`` → ``"replay"``, and a replay error above ``REPLAY_TOLERANCE`` withdraws
    the data view with the reason. Returns ``out``.
    """
    from engine.run.verify import verify

    directory = Path(directory)
    _check_directory(directory)
    check_run_target(Path(out), overwrite)
    cfg = optimizer or ExplaindOptimizer()
    data_path, data_args = resolve_dataset(directory, dataset, data_kwargs)
    spec = {"model": model, "model_kwargs": dict(model_kwargs or {}), "data": data_path,
            "data_kwargs": data_args, "loss": "cross_entropy"}
    task: Task = get_task(spec)
    net = task.build_model()
    train = task.dataset("train")
    task.dataset("val")
    src = _load_source(directory)
    names, dtype = _check_params(src, net, model, progress)
    ids = _check_batches(src, train)
    kind = _detect_kind(src, cfg.kind)
    if kind == "adamw":
        steps, sources, hparams = _adam_steps(src, net, names, cfg, progress)
        opt_class, family = "AdamW", "adam"
    else:
        steps, sources, hparams = _sgd_steps(src, names, cfg)
        opt_class, family = "SGD", "sgd"

    writer = RunWriter(
        out,
        parameters={n: (tuple(src.params[0][n].shape), 0) for n in names},
        model_spec=task.spec(),
        optimizer={"class": opt_class, "family": family, "data_axis_reason": None, "groups": [hparams[0]]},
        n_train=len(train),
        fingerprint=data_fingerprint(train.inputs, train.labels),
        dtype=dtype,
        overwrite=overwrite,
    )
    writer.manifest["import"] = {"source": str(directory.resolve()), "format": SOURCE,
                                 "optimizer": asdict(cfg) | {"kind": kind}, "hparam_sources": sources}
    for step, data in enumerate(tqdm(steps, desc="write run", unit="step", disable=not progress)):
        batch = ids[step]
        weights = torch.full((batch.numel(),), 1.0 / batch.numel(), dtype=torch.float64)
        writer.add_step(StepData(theta=data.theta, batch_ids=batch, batch_weights=weights, hparams=data.hparams,
                                 active=data.active, second_moment=data.second_moment, adam_step=data.adam_step))
    run = writer.finish(src.params[-1], "complete")

    report = verify(run, progress=progress, trust_run=True)  # the code is the one the caller named
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["import"]["replay"] = report.to_json()
    if report.max_rel_error > REPLAY_TOLERANCE:
        manifest["optimizer"]["data_axis_reason"] = (
            f"the imported optimizer settings do not reproduce the recorded updates (replay error "
            f"{report.max_rel_error:.3g} at step {report.worst_step}); the component and step views are exact, "
            "the data view is withdrawn. Re-import with the training values of the optimizer options "
            "(SGD momentum/dampening, AdamW betas/eps) or check that the loss was a plain mean cross-entropy"
        )
        log.warning("%s", manifest["optimizer"]["data_axis_reason"])
    write_json_atomic(run / "manifest.json", manifest)
    log.info("imported %d steps into %s; replay max_rel_error %.3g", src.steps, run, report.max_rel_error)
    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``import-explaind`` command-line arguments (for ``engine.cli``)."""
    parser.add_argument("dir", help=f"directory with {MODEL_FILE}, {OPTIMIZER_FILE} and {DATA_FILE}")
    parser.add_argument("--model", required=True, help="import path MODULE:CLASS of the trained model")
    parser.add_argument("--model-kwargs", default=None, help="JSON object of the model's constructor arguments")
    parser.add_argument("--dataset", default=None,
                        help="MODULE:FUNC returning {'train': (x, y), 'val': (x, y)}, or a directory with "
                             "train.csv and val.csv (default: DIR/dataset/)")
    parser.add_argument("--data-kwargs", default=None, help="JSON object of arguments of the dataset function")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--optimizer", choices=KINDS, default="auto", help="optimizer wrapper used (default: auto)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate, when the files do not track it")
    parser.add_argument("--weight-decay", type=float, default=None, help="weight decay, when not tracked")
    parser.add_argument("--betas", default=None, help="AdamW betas B1,B2 (wrapper default 0.9,0.999)")
    parser.add_argument("--eps", type=float, default=None, help="AdamW eps (wrapper default 1e-8)")
    parser.add_argument("--momentum", type=float, default=None, help="SGD momentum (wrapper default 0.9)")
    parser.add_argument("--dampening", type=float, default=None, help="SGD dampening (wrapper default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _json_object(text: str | None, option: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{option} is not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise BadInputError(f"{option} must be a JSON object, got {text!r}")
    return value


def cmd_import_explaind(args: argparse.Namespace) -> dict[str, Any]:
    """CLI handler: import, replay, and summarise (run, steps, optimizer, replay result)."""
    betas = None
    if args.betas is not None:
        try:
            betas = tuple(float(b) for b in str(args.betas).split(","))
        except ValueError as exc:
            raise BadInputError(f"--betas must be two comma-separated numbers, got {args.betas!r}") from exc
    cfg = ExplaindOptimizer(kind=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, betas=betas,
                            eps=args.eps, momentum=args.momentum, dampening=args.dampening)
    run = import_explaind(args.dir, args.model, _json_object(args.model_kwargs, "--model-kwargs"), args.dataset,
                          _json_object(args.data_kwargs, "--data-kwargs"), out=args.out, optimizer=cfg,
                          overwrite=args.overwrite, progress=not args.json)
    manifest = json.loads((run / "manifest.json").read_text())
    info = manifest["import"]
    return {
        "run": str(run),
        "steps": manifest["steps"],
        "optimizer": manifest["optimizer"]["class"],
        "hparam_sources": info["hparam_sources"],
        "replay": info["replay"],
        "data_axis": manifest["optimizer"].get("data_axis_reason") or "available",
    }


__all__ = [
    "ExplaindOptimizer",
    "add_arguments",
    "cmd_import_explaind",
    "csv_dataset",
    "import_explaind",
    "resolve_dataset",
]
