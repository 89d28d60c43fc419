"""Record a plain PyTorch training loop into a run directory.

The Recorder attaches to an unmodified ``torch.optim`` optimizer through its step hooks
and to the parameters through post-accumulate-grad hooks. The training loop adds three
things: create the recorder, tell it each batch's example ids (and weights, when the loss
is not a plain mean) before ``optimizer.step()``, and close it::

    with Recorder(model, optimizer, "runs/r1", model_spec=spec, train_data=(x, y)) as rec:
        for step in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[ids]), y[ids])
            loss.backward()
            rec.batch(ids)
            optimizer.step()
            rec.log(train_loss=loss.item())

Per step it stores what MATH.md §3 needs: the parameters before the step, every group's
hyper-parameters, Adam's second moment (or amsgrad maximum) and step counters after the
step, which tensors had a gradient, and the effective gradient-clipping scale. Steps are
buffered one chunk at a time and flushed to ``chunks/`` (safetensors + Parquet), so memory
does not grow with the number of steps; the manifest is rewritten atomically after every
chunk, which leaves a crashed recording readable up to its last complete chunk.

State that is not a parameter and randomness (MATH.md §6). Every floating buffer of the
model is recorded at every step (only the chunks in which a buffer differs from its
starting value store it), so the engine evaluates the model with the buffers of each step.
A forward pre-hook on the model notes, for the first forward with gradients enabled in each
step (the training forward), the random-number state (CPU, and CUDA for a model on a GPU),
which modules are in evaluation mode, and whether the forward drew random numbers (dropout);
the engine replays that forward exactly to split the batch gradient into examples.

Before the first step the Recorder rebuilds the model and the data from ``model_spec`` and
refuses a spec that does not describe the live model (``engine.run.spec.check_live``); a
second Recorder on an optimizer that already has one is refused too.

Run directory, schema version 2 (version 1 lacks the parts marked v2; it reads as a run
without buffers whose training forward is unknown)::

    manifest.json               keys below; rewritten atomically after every chunk
    buffers.safetensors         (v2) b_0: every floating buffer when recording started, by name
    initial_state.safetensors   optimizer state from before the first step ("<state>/<tensor>")
    final.safetensors           θ_N and the final floating buffers by name (complete runs)
    chunks/chunk-<first step, 8 digits>.safetensors
        theta/<p>      (steps, *shape)  θ_s before each step; theta_end/<p>: θ after the last
        v/<p>          (steps, *shape)  Adam's second moment after each step (Adam only)
        adam_step      float64 (steps, tensors); active uint8 (steps, tensors);
        clip_scale     float64 (steps,)
        buffer/<b>     (v2, steps, *shape)  b_s for the buffers the chunk lists; buffer_end/<b>
        random         (v2) uint8 (steps,): 1 where the training forward drew random numbers
        rng_cpu        (v2) uint8 (steps, 5056): CPU generator state before that forward
                       (chunks with a random step; zero rows elsewhere)
        rng_cuda       (v2) uint8 (steps, 16): the same for the model's CUDA device
    chunks/chunk-<first step>.batches.parquet   step int64, example int64, weight float64
    chunks/chunk-<first step>.hparams.parquet   step, group and HPARAM_COLUMNS
    chunks/chunk-<first step>.metrics.parquet   step int64, name str, value float64

Manifest keys: ``format`` (str), ``schema_version`` (int), ``status`` ("recording",
"complete" or "incomplete"), ``created``, ``torch_version`` (str), ``model`` (the spec,
dict), ``parameters`` (list of {name str, shape [int], group int}), ``optimizer`` ({class,
family, data_axis_reason str|null, groups [dict]}), ``data`` ({n_train int, fingerprint
str}), ``dtype`` (storage dtype, str), ``chunk_steps`` (int), ``chunks`` (list of {stem str,
first_step int, last_step int, buffers [str] (v2)}), ``steps`` (int), and in v2
``buffers`` (list of {name str, shape [int]}) and ``training_forward`` (null when unknown, as
for imported runs, or {dtype str, device str, threads int, eval_modules [str], random bool,
irregular str|null}: the dtype, device
and intra-op thread count of the training, the modules in evaluation mode during the
training forward, whether any training forward drew random numbers, and the first reason
the training forward cannot be replayed exactly, if any).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import save_file

from engine.errors import BadInputError
from engine.model.task import data_fingerprint
from engine.run.schema import CHUNK_STEM, HPARAMS
from engine.run.spec import check_live, floating_buffers

FORMAT = "explaind-studio-run"
SCHEMA_VERSION = 2
DEFAULT_CHUNK_BYTES = 64 * 2**20
MAX_CHUNK_STEPS = 256

# Hyper-parameters stored per step and group (declared in engine.run.schema); a missing key is stored as null.
HPARAM_COLUMNS = tuple(HPARAMS)
# What a run directory holds; ``--overwrite`` replaces a folder only when it holds nothing else.
RUN_ENTRIES = ("manifest.json", "chunks", "buffers.safetensors", "final.safetensors", "initial_state.safetensors")
_RUN_LEFTOVERS = re.compile(r"\.manifest\.json\.tmp-\d+")
_CHUNK_ENTRIES = re.compile(rf"\.?{CHUNK_STEM}(\.safetensors|\.batches\.parquet|\.hparams\.parquet|"
                            r"\.metrics\.parquet|\.tmp)")

# The Recorder attached to each optimizer: a second one would record every step twice.
_RECORDING: weakref.WeakKeyDictionary[torch.optim.Optimizer, Recorder] = weakref.WeakKeyDictionary()


def optimizer_family(optimizer: torch.optim.Optimizer) -> tuple[str, str | None]:
    """Classify an optimizer for the data axis: ("adam"|"sgd", None) or ("other", reason)."""
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is Adam with decoupled decay
        return "adam", None
    if type(optimizer) is torch.optim.SGD:
        return "sgd", None
    name = type(optimizer).__name__
    return "other", (
        f"{name} is recorded (its updates serve the component and step views), but its update "
        "is not split into per-example terms; the data view supports SGD, Adam and AdamW"
    )


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """``safetensors`` file at ``path`` with the mode any new file gets (safetensors itself writes 0600)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o666 & ~_umask())


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` holds the manifest of a run directory this tool wrote."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_run_target(out: Path, overwrite: bool) -> None:
    """Refuse an output run directory that cannot be created or holds data this tool did not write.

    An existing non-empty folder is replaced only with ``overwrite``, and only when it is a run
    directory (its manifest says so) holding nothing but what a run directory holds.
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise BadInputError(f"run directory {out} cannot be created: {existing} is a file")
    if existing == out and not out.is_dir():
        raise BadInputError(f"{out} is a file; the run directory must be a new or empty folder")
    if not os.access(existing, os.W_OK):
        raise BadInputError(f"run directory {out} cannot be written: {existing} is not writable (permission denied)")
    if existing != out or not any(out.iterdir()):
        return
    if not overwrite:
        raise BadInputError(f"run directory {out} already exists and is not empty; "
                            "choose a new directory or pass overwrite=True (CLI: --overwrite)")
    if not is_run_directory(out):
        raise BadInputError(f"{out} is not a run directory (it has no manifest.json of a recording); overwriting "
                            "replaces only run directories: choose another directory or empty this one yourself")
    foreign = [e.name for e in out.iterdir() if e.name not in RUN_ENTRIES and not _RUN_LEFTOVERS.fullmatch(e.name)]
    chunks = out / "chunks"
    if chunks.is_dir():
        foreign += [f"chunks/{e.name}" for e in chunks.iterdir() if not _CHUNK_ENTRIES.fullmatch(e.name)]
    elif chunks.exists():
        foreign.append("chunks")
    if foreign:
        raise BadInputError(f"{out} is a run directory but also holds {', '.join(sorted(foreign)[:3])}, which the "
                            "recording did not write; overwriting would delete them: move them away or choose "
                            "another directory")


def _group_hparams(group: Mapping[str, Any], decoupled_default: bool) -> dict[str, Any]:
    betas = group.get("betas")
    return {
        "lr": float(group["lr"]),
        "weight_decay": float(group.get("weight_decay", 0.0)),
        "beta1": None if betas is None else float(betas[0]),
        "beta2": None if betas is None else float(betas[1]),
        "eps": None if "eps" not in group else float(group["eps"]),
        "momentum": None if "momentum" not in group else float(group["momentum"]),
        "dampening": None if "dampening" not in group else float(group["dampening"]),
        "nesterov": bool(group.get("nesterov", False)),
        "maximize": bool(group.get("maximize", False)),
        "amsgrad": bool(group.get("amsgrad", False)),
        "decoupled": bool(group.get("decoupled_weight_decay", decoupled_default)),
    }


@dataclass(frozen=True)
class RandomState:
    """The random-number generators' state before a training forward (uint8 tensors as torch returns them)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None


@dataclass(frozen=True)
class StepData:
    """What one optimizer step contributes to the record (θ_s and the state after the step)."""

    theta: dict[str, torch.Tensor]             # θ_s, before the step
    batch_ids: torch.Tensor                    # (batch,) int64
    batch_weights: torch.Tensor                # (batch,) float64
    hparams: list[dict[str, Any]]              # one dict of HPARAM_COLUMNS per parameter group
    active: list[bool]                         # per tensor (writer order): had a gradient
    clip_scale: float = 1.0
    second_moment: dict[str, torch.Tensor] | None = None   # Adam v_{s+1} (amsgrad: running max)
    adam_step: list[float] | None = None       # Adam step counter after the step, per tensor
    buffers: dict[str, torch.Tensor] | None = None  # b_s: the floating buffers at θ_s
    rng: RandomState | None = None             # state before the training forward, if it drew random numbers


def _not_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None."""
    return next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _check_finite(step: int, data: StepData) -> None:
    bad = _not_finite(data.theta)
    if bad is not None:
        cause = (f"the update of step {step - 1} made it NaN or Inf (training diverged; lower the learning rate)"
                 if step else "the initial parameters are not finite")
        raise BadInputError(f"step {step}: parameter {bad!r} holds NaN or Inf: {cause}")
    bad = _not_finite(data.buffers or {})
    if bad is not None:
        cause = (f"the training of step {step - 1} made it NaN or Inf (training diverged)"
                 if step else "the model's buffers are not finite when recording starts")
        raise BadInputError(f"step {step}: buffer {bad!r} holds NaN or Inf: {cause}")
    for group, row in enumerate(data.hparams):
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise BadInputError(f"step {step}: {key} of parameter group {group} is {value}; optimizer "
                                    "hyper-parameters must be finite")
    if not torch.isfinite(data.batch_weights).all():
        raise BadInputError(f"step {step}: the batch weights hold NaN or Inf")
    if not math.isfinite(data.clip_scale):
        raise BadInputError(f"step {step}: the gradients were scaled by {data.clip_scale} between backward() and "
                            "step(); they hold NaN or Inf")


class RunWriter:
    """Writes a run directory step by step, one chunk of steps in memory at a time.

    The Recorder feeds it from hooks; importers of other formats feed it directly. A chunk is
    flushed when full, once the parameters (and buffers) that end its last step (the next
    step's θ) are known; the manifest is rewritten atomically after each flush.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        parameters: Mapping[str, tuple[tuple[int, ...], int]],
        model_spec: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        n_train: int,
        fingerprint: str,
        dtype: torch.dtype = torch.float32,
        chunk_steps: int | None = None,
        overwrite: bool = False,
        buffers: Mapping[str, torch.Tensor] | None = None,
        training_forward: Mapping[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        check_run_target(self.out_dir, overwrite)
        if dtype not in (torch.float32, torch.float64):
            raise BadInputError(f"storage dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.names = list(parameters)
        self.initial_buffers = {n: b.detach().to("cpu", dtype, copy=True) for n, b in (buffers or {}).items()}
        numel = sum(math.prod(shape) for shape, _ in parameters.values())
        per_step = numel * (2 if optimizer.get("family") == "adam" else 1) * torch.finfo(dtype).bits // 8
        self.chunk_steps = chunk_steps or max(1, min(MAX_CHUNK_STEPS, DEFAULT_CHUNK_BYTES // max(per_step, 1)))
        self.steps = 0
        self._buffer: list[StepData] = []
        self._metrics: list[dict[str, Any]] = []
        self._chunks: list[dict[str, Any]] = []
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            shutil.rmtree(self.out_dir)
        (self.out_dir / "chunks").mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "status": "recording",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
            "model": dict(model_spec),
            "parameters": [
                {"name": n, "shape": list(shape), "group": group} for n, (shape, group) in parameters.items()
            ],
            "optimizer": dict(optimizer),
            "data": {"n_train": int(n_train), "fingerprint": fingerprint},
            "dtype": str(dtype).removeprefix("torch."),
            "chunk_steps": self.chunk_steps,
            "chunks": [],
            "steps": 0,
            "buffers": [{"name": n, "shape": list(b.shape)} for n, b in self.initial_buffers.items()],
            "training_forward": None if training_forward is None else {
                "random": False, "irregular": None, **training_forward},
        }
        if self.initial_buffers:
            save_tensors(self.initial_buffers, self.out_dir / "buffers.safetensors")
        self._write_manifest()

    def set_data_axis_reason(self, reason: str | None) -> None:
        self.manifest["optimizer"]["data_axis_reason"] = reason

    def note_irregular(self, reason: str) -> None:
        """Keep the first reason why a training forward cannot be replayed exactly."""
        if self.manifest["training_forward"] is not None and self.manifest["training_forward"]["irregular"] is None:
            self.manifest["training_forward"]["irregular"] = reason

    def save_initial_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Optimizer state that existed before the first recorded step (keys ``"<state>/<tensor>"``)."""
        if tensors:
            save_tensors({k: v.to("cpu", self.dtype) for k, v in tensors.items()},
                         self.out_dir / "initial_state.safetensors")

    def add_step(self, data: StepData) -> None:
        """Buffer one step; refuses non-finite parameters, buffers or hyper-parameters (training diverged)."""
        _check_finite(self.steps, data)
        if len(self._buffer) == self.chunk_steps:
            self._flush(data.theta, data.buffers)
        self._buffer.append(data)
        self.steps += 1
        if data.rng is not None and self.manifest["training_forward"] is not None:
            self.manifest["training_forward"]["random"] = True

    def log(self, step: int, **metrics: float) -> None:
        for name, value in metrics.items():
            self._metrics.append({"step": int(step), "name": name, "value": float(value)})

    def finish(self, theta_end: Mapping[str, torch.Tensor], status: str,
               buffers_end: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Flush the last chunk (ending at ``theta_end`` and ``buffers_end``) and mark the run ``status``.

        When ``theta_end`` or ``buffers_end`` is not finite the last step diverged: the record ends before it, the
        run is marked incomplete, and (for a run meant to be complete) BadInputError says so.
        """
        diverged = _not_finite({**theta_end, **(buffers_end or {})})
        if diverged is not None and self._buffer:
            last = self._buffer.pop()
            theta_end, buffers_end = last.theta, last.buffers
            self.steps -= 1
        self._flush(theta_end, buffers_end)
        if status == "complete" and diverged is None:
            final = {n: theta_end[n].to("cpu", self.dtype) for n in self.names}
            final.update({n: b.to("cpu", self.dtype) for n, b in (buffers_end or {}).items()})
            save_tensors(final, self.out_dir / "final.safetensors")
        self.manifest["status"] = status if diverged is None else "incomplete"
        self._write_manifest()
        if diverged is not None and status == "complete":
            what = "parameter" if diverged in self.names else "buffer"
            raise BadInputError(f"step {self.steps}: the update made {what} {diverged!r} NaN or Inf (training "
                                f"diverged; lower the learning rate). {self.out_dir} keeps steps 0..{self.steps - 1} "
                                "and is marked incomplete")
        return self.out_dir

    def _write_manifest(self) -> None:
        write_json_atomic(self.out_dir / "manifest.json", self.manifest)

    def _changed_buffers(self, steps: list[StepData], end: Mapping[str, torch.Tensor] | None) -> list[str]:
        """The buffers that differ from their starting value at some step of the chunk or at its end."""
        def differs(name: str, value: torch.Tensor) -> bool:
            start = self.initial_buffers[name]
            return value is not start and not torch.equal(value.to("cpu", self.dtype), start)

        return [n for n in self.initial_buffers
                if any(d.buffers is not None and differs(n, d.buffers[n]) for d in steps)
                or (end is not None and differs(n, end[n]))]

    def _flush(self, theta_end: Mapping[str, torch.Tensor], buffers_end: Mapping[str, torch.Tensor] | None) -> None:
        count = len(self._buffer)
        if count == 0:
            return
        first = self.steps - count
        last = self.steps - 1
        stem = f"chunk-{first:08d}"
        steps = self._buffer
        tensors: dict[str, torch.Tensor] = {}
        for n in self.names:
            tensors[f"theta/{n}"] = torch.stack([d.theta[n] for d in steps]).to(self.dtype)
            tensors[f"theta_end/{n}"] = theta_end[n].to("cpu", self.dtype, copy=True)
            if steps[0].second_moment is not None:
                tensors[f"v/{n}"] = torch.stack([d.second_moment[n] for d in steps]).to(self.dtype)
        changed = self._changed_buffers(steps, buffers_end)
        for n in changed:
            tensors[f"buffer/{n}"] = torch.stack([d.buffers[n] for d in steps]).to(self.dtype)
            tensors[f"buffer_end/{n}"] = buffers_end[n].to("cpu", self.dtype, copy=True)
        tensors["active"] = torch.tensor([d.active for d in steps], dtype=torch.uint8).reshape(count, len(self.names))
        tensors["clip_scale"] = torch.tensor([d.clip_scale for d in steps], dtype=torch.float64)
        tensors["random"] = torch.tensor([d.rng is not None for d in steps], dtype=torch.uint8)
        random = [d.rng for d in steps if d.rng is not None]
        for device, width in (("cpu", random[0].cpu.numel() if random else 0),
                              ("cuda", random[0].cuda.numel() if random and random[0].cuda is not None else 0)):
            if width:
                rows = torch.zeros(count, width, dtype=torch.uint8)
                for i, d in enumerate(steps):
                    if d.rng is not None:
                        rows[i] = getattr(d.rng, device)
                tensors[f"rng_{device}"] = rows
        if steps[0].adam_step is not None:
            tensors["adam_step"] = torch.tensor([d.adam_step for d in steps], dtype=torch.float64)
        chunks = self.out_dir / "chunks"
        tmp = chunks / f".{stem}.tmp"
        save_tensors(tensors, tmp)
        os.replace(tmp, chunks / f"{stem}.safetensors")

        pl.DataFrame({
            "step": [first + i for i, d in enumerate(steps) for _ in range(d.batch_ids.numel())],
            "example": torch.cat([d.batch_ids for d in steps]).numpy(),
            "weight": torch.cat([d.batch_weights for d in steps]).numpy(),
        }, schema={"step": pl.Int64, "example": pl.Int64, "weight": pl.Float64}).write_parquet(
            chunks / f"{stem}.batches.parquet")
        pl.DataFrame([{"step": first + i, "group": g, **row}
                      for i, d in enumerate(steps) for g, row in enumerate(d.hparams)]).write_parquet(
            chunks / f"{stem}.hparams.parquet")
        pl.DataFrame(self._metrics, schema={"step": pl.Int64, "name": pl.Utf8, "value": pl.Float64}).write_parquet(
            chunks / f"{stem}.metrics.parquet")

        self._chunks.append({"stem": stem, "first_step": first, "last_step": last, "buffers": changed})
        self.manifest["chunks"] = self._chunks
        self.manifest["steps"] = last + 1
        self._write_manifest()
        self._buffer = []
        self._metrics = []


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input of a forward call: its first tensor argument (positional, else keyword)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _eval_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules in evaluation mode ("" is the model itself)."""
    return [name for name, module in model.named_modules() if not module.training]


class Recorder:
    """Hooks that record every optimizer step of a training loop into ``out_dir``.

    Args:
        model: the module being trained; parameters are keyed by ``named_parameters()`` names.
        optimizer: an unmodified ``torch.optim`` optimizer over (some of) those parameters.
        out_dir: the run directory to create; it must not exist or be empty.
        model_spec: how to rebuild the model and data: ``{"task": name, "config": {...}}`` or
            ``{"model": "pkg.mod:Class", "model_kwargs": {...}, "data": "pkg.mod:func", ...}``.
            It is rebuilt and checked against ``model`` and ``train_data`` before anything is
            written (``engine.run.spec.check_live``).
        train_data: ``(inputs, labels)`` of the whole training set, fingerprinted and sized;
            batch ids index it, and the training forward is expected to run on
            ``inputs[ids]`` in the order of the ids given to ``batch``.
        dtype: storage dtype of parameters, buffers and optimizer state (float32 by default).
        chunk_steps: steps per chunk file; by default as many as fit in 64 MiB (at most 256).
        overwrite: replace an existing non-empty run directory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        out_dir: str | os.PathLike[str],
        *,
        model_spec: Mapping[str, Any],
        train_data: tuple[torch.Tensor, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        chunk_steps: int | None = None,
        overwrite: bool = False,
    ) -> None:
        other = _RECORDING.get(optimizer)
        if other is not None:
            raise BadInputError(
                f"this optimizer already has a Recorder writing {other.out_dir} (at step {other.step}); "
                "close that one first (rec.close() or leave its with-block): two would record every step twice"
            )
        self.optimizer = optimizer
        self.dtype = dtype
        self.family, reason = optimizer_family(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self._params: dict[str, torch.nn.Parameter] = {}
        group_of: dict[str, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise BadInputError(
                        "the optimizer holds a parameter that is not among model.named_parameters(); "
                        "pass the model whose parameters the optimizer trains"
                    )
                group_of[names[id(p)]] = index
                self._params[names[id(p)]] = p
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        self.names = sorted(self._params, key=order.__getitem__)
        if self.family != "other" and any(len(optimizer.state[p]) for p in self._params.values()):
            reason = (
                "the optimizer already had state (momentum or moments) when recording started, so "
                "earlier gradients that it carries are not in the record"
            )
        inputs, labels = train_data
        self.n_train = int(labels.shape[0])
        if int(inputs.shape[0]) != self.n_train:
            raise BadInputError(f"train_data inputs have {inputs.shape[0]} rows but labels have {self.n_train}")
        check_live(model, model_spec, inputs, labels)
        self._model = model
        self._inputs = inputs
        self._buffers = floating_buffers(model)
        reference = self._params[self.names[0]] if self.names else None
        self._device = reference.device if reference is not None else torch.device("cpu")
        self._decoupled_default = isinstance(optimizer, torch.optim.AdamW)
        self.writer = RunWriter(
            out_dir,
            parameters={n: (tuple(self._params[n].shape), group_of[n]) for n in self.names},
            model_spec=model_spec,
            optimizer={
                "class": type(optimizer).__name__,
                "family": self.family,
                "data_axis_reason": reason,
                "groups": [_group_hparams(g, self._decoupled_default) for g in optimizer.param_groups],
            },
            n_train=self.n_train,
            fingerprint=data_fingerprint(inputs, labels),
            dtype=dtype,
            chunk_steps=chunk_steps,
            overwrite=overwrite,
            buffers=self._buffers,
            training_forward={
                "dtype": str(reference.dtype if reference is not None else dtype).removeprefix("torch."),
                "device": self._device.type,
                "threads": torch.get_num_threads(),
                "eval_modules": _eval_modules(model),
            },
        )
        self.writer.save_initial_state({
            f"{key}/{n}": value
            for n in self.names
            for key, value in optimizer.state.get(self._params[n], {}).items()
            if isinstance(value, torch.Tensor) and value.shape == self._params[n].shape
        })
        self._buffers_now = self.writer.initial_buffers  # b_s of the coming step
        self._pending_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._in_step: dict[str, Any] | None = None
        self._raw_sq_norm: dict[str, float] = {}
        self._forward: dict[str, Any] | None = None  # the coming step's training forward
        self._forwards = 0                           # forwards with gradients enabled in the coming step
        self._modes_seen = False
        self._closed = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        for name, p in self._params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
        _RECORDING[optimizer] = self

    @property
    def out_dir(self) -> Path:
        return self.writer.out_dir

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self.writer.steps

    # ----------------------------------------------------------------- user calls
    def batch(self, ids: Sequence[int] | torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None,
              reduction: str = "mean") -> None:
        """Declare the training examples of the coming ``optimizer.step()``.

        ``weights`` are the per-example factors of the loss (``w_{s,k}`` in MATH.md); when
        omitted they are ``1/|B|`` for ``reduction="mean"`` and 1 for ``reduction="sum"``.
        The ids are in the order of the rows of the batch the training forward ran on.
        """
        ids_t = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
        if ids_t.numel() == 0:
            raise BadInputError(f"step {self.step}: the batch has no example ids")
        bad = ids_t[(ids_t < 0) | (ids_t >= self.n_train)]
        if bad.numel():
            raise BadInputError(
                f"step {self.step}: batch ids {bad[:5].tolist()} are outside the training set "
                f"(valid ids are 0..{self.n_train - 1})"
            )
        if weights is None:
            if reduction not in ("mean", "sum"):
                raise BadInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
            value = 1.0 / ids_t.numel() if reduction == "mean" else 1.0
            w = torch.full((ids_t.numel(),), value, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
            if w.shape != ids_t.shape:
                raise BadInputError(f"step {self.step}: {w.numel()} weights for {ids_t.numel()} ids")
            if not torch.isfinite(w).all():
                raise BadInputError(f"step {self.step}: batch weights contain NaN or Inf")
        self._pending_batch = (ids_t, w)

    def log(self, step: int | None = None, **metrics: float) -> None:
        """Record metrics (e.g. ``train_loss``, ``val_acc``) of the step just taken (or of ``step``)."""
        at = self.step - 1 if step is None else int(step)
        if at < 0:
            raise BadInputError("log() was called before the first optimizer.step(); pass step= explicitly")
        self.writer.log(at, **metrics)

    def close(self) -> Path:
        """Flush the last chunk, store the final parameters and mark the run complete."""
        return self._finish("complete")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._finish("complete" if exc_type is None else "incomplete")

    # ----------------------------------------------------------------- hooks
    def _grad_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self._raw_sq_norm[name] = float(p.grad.detach().double().pow(2).sum())
        return hook

    def _before_forward(self, module, args, kwargs) -> None:
        """The first forward with gradients enabled in a step is its training forward: note its state."""
        if self._closed or not torch.is_grad_enabled():
            return
        self._forwards += 1
        if self._forwards > 1:
            return
        cuda = torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None
        self._forward = {"rng": RandomState(torch.get_rng_state(), cuda), "input": _first_tensor(args, kwargs),
                         "random": False, "done": False}
        modes = _eval_modules(module)
        if not self._modes_seen:
            self.writer.manifest["training_forward"]["eval_modules"] = modes
            self._modes_seen = True
        elif modes != self.writer.manifest["training_forward"]["eval_modules"]:
            self.writer.note_irregular(
                f"at step {self.step} the modules in evaluation mode during the training forward changed "
                f"(now {modes[:5]}); the replay uses those of the first step"
            )

    def _after_forward(self, module, args, output) -> None:
        forward = self._forward
        if forward is None or forward["done"]:
            return
        forward["done"] = True
        rng = forward["rng"]
        forward["random"] = not torch.equal(rng.cpu, torch.get_rng_state()) or (
            rng.cuda is not None and not torch.equal(rng.cuda, torch.cuda.get_rng_state(self._device)))

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        if self._pending_batch is None:
            raise BadInputError(
                f"step {self.step}: optimizer.step() was called without rec.batch(ids) for this step"
            )
        ids, weights = self._pending_batch
        self._pending_batch = None
        self._in_step = {
            "theta": self._snapshot(),
            "batch_ids": ids,
            "batch_weights": weights,
            "active": [self._params[n].grad is not None for n in self.names],
            "clip_scale": self._clip_scale(),
            "buffers": self._buffers_now,
            "rng": self._training_forward(ids),
        }

    def _training_forward(self, ids: torch.Tensor) -> RandomState | None:
        """The random state of this step's training forward if it drew random numbers; notes what the
        replay of the forward cannot reproduce."""
        forward, count = self._forward, self._forwards
        self._forward, self._forwards = None, 0
        if forward is None:
            self.writer.note_irregular(
                f"at step {self.step} no forward of the model with gradients enabled was seen before "
                "optimizer.step(); the replay cannot restore that forward's random state"
            )
            return None
        if count > 1:
            self.writer.note_irregular(
                f"step {self.step} ran {count} forwards of the model with gradients enabled (gradient "
                "accumulation?); the replay runs one forward over the step's declared batch"
            )
        given = forward["input"]
        if given is not None and not self._rows_match(given, ids):
            self.writer.note_irregular(
                f"at step {self.step} the training forward's input is not train_data inputs[ids] row by row; "
                "the replay needs rec.batch(ids) in the order of the batch's rows"
            )
        return forward["rng"] if forward["random"] else None

    def _rows_match(self, given: torch.Tensor, ids: torch.Tensor) -> bool:
        rows = self._inputs[ids]
        if tuple(given.shape) != tuple(rows.shape) or given.is_floating_point() != rows.is_floating_point():
            return False
        return torch.equal(given.detach().cpu(), rows.to(given.dtype))

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._closed or self._in_step is None:
            return
        second_moment = adam_step = None
        if self.family == "adam":
            second_moment, adam_step = {}, []
            for n in self.names:
                p = self._params[n]
                state = optimizer.state.get(p, {})
                key = "max_exp_avg_sq" if "max_exp_avg_sq" in state else "exp_avg_sq"
                if key in state:
                    second_moment[n] = state[key].detach().to("cpu", self.dtype, copy=True)
                    adam_step.append(float(state["step"]))
                else:
                    second_moment[n] = torch.zeros(p.shape, dtype=self.dtype)
                    adam_step.append(0.0)
        hparams = [_group_hparams(g, self._decoupled_default) for g in optimizer.param_groups]
        self.writer.add_step(StepData(**self._in_step, hparams=hparams, second_moment=second_moment,
                                      adam_step=adam_step))
        self._in_step = None
        self._raw_sq_norm = {}
        self._buffers_now = self._snapshot_buffers()

    # ----------------------------------------------------------------- internals
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: self._params[n].detach().to("cpu", self.dtype, copy=True) for n in self.names}

    def _snapshot_buffers(self) -> dict[str, torch.Tensor]:
        """The floating buffers now; a buffer equal to its previous snapshot keeps that tensor."""
        out = {}
        for n, live in self._buffers.items():
            now = live.detach().to("cpu", self.dtype)
            previous = self._buffers_now[n]
            out[n] = previous if torch.equal(now, previous) else now.clone()
        return out

    def _clip_scale(self) -> float:
        """Ratio of the gradient the optimizer sees to the one backward produced (1.0 if untouched).

        Only a global scale keeps the update linear in the per-example gradients; a tensor-wise
        change (``clip_grad_value_``, per-tensor clipping) withdraws the data view, with the reason.
        """
        ratios = {}
        for n, raw in self._raw_sq_norm.items():
            grad = self._params[n].grad
            if grad is not None and raw > 0.0:
                ratios[n] = (float(grad.detach().double().pow(2).sum()), raw)
        if not ratios:
            return 1.0
        scale = math.sqrt(sum(now for now, _ in ratios.values()) / sum(raw for _, raw in ratios.values()))
        if any(abs(math.sqrt(now / raw) - scale) > 1e-4 * scale for now, raw in ratios.values()):
            self.writer.set_data_axis_reason(
                f"at step {self.step} the gradients were changed non-uniformly between backward() and "
                "step() (e.g. clip_grad_value_ or per-tensor clipping); only a global scale is linear"
            )
        return scale

    def _finish(self, status: str) -> Path:
        if self._closed:
            return self.out_dir
        for handle in self._handles:
            handle.remove()
        if _RECORDING.get(self.optimizer) is self:
            del _RECORDING[self.optimizer]
        if self._in_step is not None:
            # interrupted inside optimizer.step(): that step never completed, so it ends the record
            end, buffers, status = self._in_step["theta"], self._in_step["buffers"], "incomplete"
        else:
            end, buffers = self._snapshot(), self._snapshot_buffers()
        self._closed = True
        return self.writer.finish(end, status, buffers)
