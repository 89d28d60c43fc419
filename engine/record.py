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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import save_file

from engine.errors import BadInputError

FORMAT = "explaind-studio-run"
SCHEMA_VERSION = 1
DEFAULT_CHUNK_BYTES = 64 * 2**20
MAX_CHUNK_STEPS = 256

# Hyper-parameters stored per step and group; a missing key is stored as null.
HPARAM_COLUMNS = (
    "lr", "weight_decay", "beta1", "beta2", "eps", "momentum", "dampening",
    "nesterov", "maximize", "amsgrad", "decoupled",
)


def data_fingerprint(inputs: torch.Tensor, labels: torch.Tensor) -> str:
    """A stable SHA-256 over the training inputs and labels (dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for tensor in (inputs, labels):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


class Recorder:
    """Hooks that record every optimizer step of a training loop into ``out_dir``.

    Args:
        model: the module being trained; parameters are keyed by ``named_parameters()`` names.
        optimizer: an unmodified ``torch.optim`` optimizer over (some of) those parameters.
        out_dir: the run directory to create; it must not exist or be empty.
        model_spec: how to rebuild the model and data: ``{"task": name, "config": {...}}`` or
            ``{"model": "pkg.mod:Class", "model_kwargs": {...}, "data": "pkg.mod:func", ...}``.
        train_data: ``(inputs, labels)`` of the whole training set, fingerprinted and sized;
            batch ids index it.
        dtype: storage dtype of parameters and optimizer state (float32 by default).
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
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
            raise BadInputError(
                f"run directory {self.out_dir} already exists and is not empty; "
                "choose a new directory or pass overwrite=True"
            )
        if dtype not in (torch.float32, torch.float64):
            raise BadInputError(f"storage dtype must be float32 or float64, got {dtype}")
        self.model = model
        self.optimizer = optimizer
        self.dtype = dtype
        self.family, self.data_axis_reason = optimizer_family(optimizer)

        names = {id(p): n for n, p in model.named_parameters()}
        self.names: list[str] = []
        self.group_of: dict[str, int] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise BadInputError(
                        "the optimizer holds a parameter that is not among model.named_parameters(); "
                        "pass the model whose parameters the optimizer trains"
                    )
                name = names[id(p)]
                self.names.append(name)
                self.group_of[name] = index
                self._params[name] = p
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        self.names.sort(key=order.__getitem__)
        if self.family != "other" and any(len(optimizer.state[p]) for p in self._params.values()):
            self.data_axis_reason = (
                "the optimizer already had state (momentum or moments) when recording started, so "
                "earlier gradients that it carries are not in the record"
            )

        inputs, labels = train_data
        self.n_train = int(labels.shape[0])
        if int(inputs.shape[0]) != self.n_train:
            raise BadInputError(
                f"train_data inputs have {inputs.shape[0]} rows but labels have {self.n_train}"
            )
        self.fingerprint = data_fingerprint(inputs, labels)

        numel = sum(p.numel() for p in self._params.values())
        per_step = numel * (2 if self.family == "adam" else 1) * torch.finfo(dtype).bits // 8
        self.chunk_steps = chunk_steps or max(1, min(MAX_CHUNK_STEPS, DEFAULT_CHUNK_BYTES // max(per_step, 1)))

        self.step = 0                     # index of the next optimizer step
        self._pending_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._in_step: dict[str, torch.Tensor] | None = None
        self._raw_sq_norm: dict[str, float] = {}
        self._reset_buffers()
        self._chunks: list[dict[str, Any]] = []
        self._closed = False

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "chunks").mkdir(exist_ok=True)
        self._manifest: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "status": "recording",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
            "model": dict(model_spec),
            "parameters": [
                {"name": n, "shape": list(self._params[n].shape), "group": self.group_of[n]} for n in self.names
            ],
            "optimizer": {
                "class": type(optimizer).__name__,
                "family": self.family,
                "data_axis_reason": self.data_axis_reason,
                "groups": [
                    _group_hparams(g, isinstance(optimizer, torch.optim.AdamW)) for g in optimizer.param_groups
                ],
            },
            "data": {"n_train": self.n_train, "fingerprint": self.fingerprint},
            "dtype": str(dtype).removeprefix("torch."),
            "chunk_steps": self.chunk_steps,
            "chunks": [],
            "steps": 0,
        }
        self._save_initial_state()
        write_json_atomic(self.out_dir / "manifest.json", self._manifest)

        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        for name, p in self._params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    # ----------------------------------------------------------------- user calls
    def batch(self, ids: Sequence[int] | torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None,
              reduction: str = "mean") -> None:
        """Declare the training examples of the coming ``optimizer.step()``.

        ``weights`` are the per-example factors of the loss (``w_{s,k}`` in MATH.md); when
        omitted they are ``1/|B|`` for ``reduction="mean"`` and 1 for ``reduction="sum"``.
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
        for name, value in metrics.items():
            self._metrics.append({"step": at, "name": name, "value": float(value)})

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

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        if self._pending_batch is None:
            raise BadInputError(
                f"step {self.step}: optimizer.step() was called without rec.batch(ids) for this step"
            )
        snapshot = self._snapshot()
        if self._buffered == self.chunk_steps:
            self._flush(snapshot)
        active = [self._params[n].grad is not None for n in self.names]
        self._in_step = snapshot
        self._theta.append(snapshot)
        self._active.append(active)
        self._clip.append(self._clip_scale())
        ids, w = self._pending_batch
        self._batches.append((self.step, ids, w))
        self._pending_batch = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._closed or self._in_step is None:
            return
        if self.family == "adam":
            v: dict[str, torch.Tensor] = {}
            counters: list[float] = []
            for n in self.names:
                p = self._params[n]
                state = optimizer.state.get(p, {})
                amsgrad = bool(optimizer.param_groups[self.group_of[n]].get("amsgrad", False))
                key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
                if key in state:
                    v[n] = state[key].detach().to("cpu", self.dtype, copy=True)
                    counters.append(float(state["step"]))
                else:
                    v[n] = torch.zeros(p.shape, dtype=self.dtype)
                    counters.append(0.0)
            self._second_moment.append(v)
            self._adam_step.append(counters)
        for index, group in enumerate(optimizer.param_groups):
            row = _group_hparams(group, isinstance(optimizer, torch.optim.AdamW))
            self._hparams.append({"step": self.step, "group": index, **row})
        self._in_step = None
        self._raw_sq_norm = {}
        self.step += 1

    # ----------------------------------------------------------------- internals
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: self._params[n].detach().to("cpu", self.dtype, copy=True) for n in self.names}

    def _clip_scale(self) -> float:
        """Ratio of the gradient the optimizer sees to the one backward produced (1.0 if untouched)."""
        raw = sum(self._raw_sq_norm.get(n, 0.0) for n in self.names)
        if raw == 0.0:
            return 1.0
        now = sum(
            float(self._params[n].grad.detach().double().pow(2).sum())
            for n in self.names if self._params[n].grad is not None and n in self._raw_sq_norm
        )
        scale = math.sqrt(now / raw)
        for n in self._raw_sq_norm:
            grad = self._params[n].grad
            if grad is None or self._raw_sq_norm[n] == 0.0:
                continue
            ratio = math.sqrt(float(grad.detach().double().pow(2).sum()) / self._raw_sq_norm[n])
            if abs(ratio - scale) > 1e-4 * max(scale, 1e-12):
                self.data_axis_reason = (
                    f"at step {self.step} the gradients were changed non-uniformly between backward() and "
                    "step() (e.g. clip_grad_value_ or per-tensor clipping); only a global scale is linear"
                )
                self._manifest["optimizer"]["data_axis_reason"] = self.data_axis_reason
                break
        return scale

    def _reset_buffers(self) -> None:
        self._theta: list[dict[str, torch.Tensor]] = []
        self._second_moment: list[dict[str, torch.Tensor]] = []
        self._adam_step: list[list[float]] = []
        self._active: list[list[bool]] = []
        self._clip: list[float] = []
        self._batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._hparams: list[dict[str, Any]] = []
        self._metrics: list[dict[str, Any]] = getattr(self, "_metrics", [])

    @property
    def _buffered(self) -> int:
        return len(self._theta)

    def _flush(self, theta_end: dict[str, torch.Tensor]) -> None:
        """Write the buffered steps (whose last update ends at ``theta_end``) as one chunk."""
        count = len(self._theta)
        if count == 0:
            return
        first = self._batches[0][0]
        last = first + count - 1
        stem = f"chunk-{first:08d}"
        tensors: dict[str, torch.Tensor] = {}
        for n in self.names:
            tensors[f"theta/{n}"] = torch.stack([t[n] for t in self._theta])
            tensors[f"theta_end/{n}"] = theta_end[n].clone()
            if self._second_moment:
                tensors[f"v/{n}"] = torch.stack([t[n] for t in self._second_moment])
        tensors["active"] = torch.tensor(self._active, dtype=torch.uint8).reshape(count, len(self.names))
        tensors["clip_scale"] = torch.tensor(self._clip, dtype=torch.float64)
        if self._adam_step:
            tensors["adam_step"] = torch.tensor(self._adam_step, dtype=torch.float64)
        chunks = self.out_dir / "chunks"
        tmp = chunks / f".{stem}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, chunks / f"{stem}.safetensors")

        batches = pl.DataFrame({
            "step": [s for s, ids, _ in self._batches for _ in range(ids.numel())],
            "example": torch.cat([ids for _, ids, _ in self._batches]).numpy(),
            "weight": torch.cat([w for _, _, w in self._batches]).numpy(),
        }, schema={"step": pl.Int64, "example": pl.Int64, "weight": pl.Float64})
        batches.write_parquet(chunks / f"{stem}.batches.parquet")
        hparams = pl.DataFrame(self._hparams)
        hparams.write_parquet(chunks / f"{stem}.hparams.parquet")
        metrics = pl.DataFrame(self._metrics, schema={"step": pl.Int64, "name": pl.Utf8, "value": pl.Float64})
        metrics.write_parquet(chunks / f"{stem}.metrics.parquet")

        self._chunks.append({"stem": stem, "first_step": first, "last_step": last})
        self._manifest["chunks"] = self._chunks
        self._manifest["steps"] = last + 1
        write_json_atomic(self.out_dir / "manifest.json", self._manifest)
        self._metrics = []
        self._reset_buffers()

    def _save_initial_state(self) -> None:
        tensors = {}
        for n in self.names:
            for key, value in self.optimizer.state.get(self._params[n], {}).items():
                if isinstance(value, torch.Tensor) and value.shape == self._params[n].shape:
                    tensors[f"{key}/{n}"] = value.detach().to("cpu", self.dtype, copy=True).contiguous()
        if tensors:
            save_file(tensors, str(self.out_dir / "initial_state.safetensors"))

    def _finish(self, status: str) -> Path:
        if self._closed:
            return self.out_dir
        for handle in self._handles:
            handle.remove()
        if self._in_step is not None:
            # interrupted inside optimizer.step(): that step never completed, drop it
            end = self._theta.pop()
            self._active.pop()
            self._clip.pop()
            self._batches.pop()
            self._in_step = None
            status = "incomplete"
        else:
            end = self._snapshot()
        self._flush(end)
        if status == "complete":
            save_file({n: t.contiguous() for n, t in end.items()}, str(self.out_dir / "final.safetensors"))
        self._manifest["status"] = status
        self._manifest["optimizer"]["data_axis_reason"] = self.data_axis_reason
        write_json_atomic(self.out_dir / "manifest.json", self._manifest)
        self._closed = True
        return self.out_dir
