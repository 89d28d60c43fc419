"""Read a run directory written by :class:`engine.run.record.Recorder`.

Access is lazy and chunk-wise: one chunk (a range of steps) is loaded at a time, so
reading a long run costs the memory of one chunk. Every tensor is checked for shape and
finiteness when its chunk is loaded; problems raise errors that name the file. The format
is described in ``engine.run.record``; runs of schema version 1 read as runs without
buffers whose training forward is unknown (``training_forward`` is None).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.errors import CorruptRunError, IncompleteRunError, RunNotFoundError, SchemaVersionError
from engine.run.record import FORMAT, HPARAM_COLUMNS, SCHEMA_VERSION, RandomState

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GroupHParams:
    """One parameter group's hyper-parameters at one step (None where the optimizer has no such key)."""

    lr: float
    weight_decay: float
    beta1: float | None
    beta2: float | None
    eps: float | None
    momentum: float | None
    dampening: float | None
    nesterov: bool
    maximize: bool
    amsgrad: bool
    decoupled: bool


@dataclass(frozen=True)
class StepRecord:
    """Everything recorded about optimizer step ``step`` (θ_s → θ_{s+1})."""

    step: int
    params: Params                 # θ_s
    update: Params                 # Δ_s = θ_{s+1} − θ_s
    batch_ids: torch.Tensor        # (batch,) int64 training-example ids
    batch_weights: torch.Tensor    # (batch,) float64 loss weights w_{s,k}
    hparams: tuple[GroupHParams, ...]
    second_moment: Params | None   # Adam v_{s+1} (amsgrad: its running max), after the step
    adam_step: dict[str, float] | None  # Adam step counter t after the step, per tensor
    active: dict[str, bool]        # whether the tensor had a gradient (was stepped)
    clip_scale: float              # global gradient scale applied between backward() and step()
    buffers: Params                # b_s: every recorded floating buffer at θ_s
    buffers_after: Params          # b_{s+1}, at θ_{s+1}
    rng: RandomState | None        # generator state before the training forward, if it drew random numbers


@dataclass
class _Chunk:
    stem: str
    first: int
    last: int
    tensors: dict[str, torch.Tensor]
    batches: dict[int, tuple[torch.Tensor, torch.Tensor]]   # step -> (ids, weights)
    hparams: dict[int, tuple[GroupHParams, ...]]            # step -> per-group hyper-parameters


class History:
    """A recorded training run. Open with :meth:`History.open`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.param_names: list[str] = [p["name"] for p in manifest["parameters"]]
        self.param_shapes: dict[str, tuple[int, ...]] = {
            p["name"]: tuple(p["shape"]) for p in manifest["parameters"]
        }
        self.param_group: dict[str, int] = {p["name"]: int(p["group"]) for p in manifest["parameters"]}
        self.buffer_shapes: dict[str, tuple[int, ...]] = {
            b["name"]: tuple(b["shape"]) for b in manifest.get("buffers", [])
        }
        self._chunks_meta: list[dict[str, Any]] = manifest["chunks"]
        self._cache: _Chunk | None = None
        self._initial_buffers: Params | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, allow_incomplete: bool = False) -> History:
        """Open a run directory, checking its manifest and chunk list.

        Raises RunNotFoundError, CorruptRunError, SchemaVersionError, or IncompleteRunError
        (unless ``allow_incomplete``) with a message naming the file and the problem.
        """
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not path.exists():
            raise RunNotFoundError(f"run directory {path} does not exist")
        if not path.is_dir():
            raise CorruptRunError(f"{path} is a file, not a run directory (expected {path}/manifest.json)")
        if not manifest_path.exists():
            raise CorruptRunError(
                f"{path} has no manifest.json: it is not a run directory written by the Recorder"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptRunError(
                f"{manifest_path} is not valid JSON ({exc}); the file is truncated or foreign"
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CorruptRunError(f"{manifest_path} is not an ExPLAIND Studio run manifest (format != {FORMAT!r})")
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise SchemaVersionError(
                f"{manifest_path} has schema version {version!r}; this release reads version {SCHEMA_VERSION}. "
                "Upgrade explaind-studio to open it"
            )
        required = ("parameters", "chunks", "steps", "model", "optimizer", "data", "status")
        missing = [k for k in required if k not in manifest]
        if missing:
            raise CorruptRunError(f"{manifest_path} lacks the keys {missing}")
        history = cls(path, manifest)
        history._check_chunk_files()
        if manifest["status"] != "complete" and not allow_incomplete:
            raise IncompleteRunError(
                f"the recording in {path} did not finish (status {manifest['status']!r}); "
                f"{history.num_steps} steps in complete chunks are readable. "
                "Open it with allow_incomplete=True (CLI: --allow-incomplete) to use them"
            )
        if history.num_steps == 0:
            raise CorruptRunError(f"{path} holds no recorded steps")
        return history

    def _check_chunk_files(self) -> None:
        expected = 0
        for meta in self._chunks_meta:
            if meta["first_step"] != expected:
                raise CorruptRunError(
                    f"{self.path}/manifest.json: chunk {meta['stem']} starts at step {meta['first_step']}, "
                    f"expected {expected}"
                )
            expected = meta["last_step"] + 1
            for suffix in (".safetensors", ".batches.parquet", ".hparams.parquet", ".metrics.parquet"):
                file = self.path / "chunks" / f"{meta['stem']}{suffix}"
                if not file.exists():
                    raise CorruptRunError(f"{file} is missing; the run directory is incomplete or was edited")

    # ---------------------------------------------------------------- facts
    @property
    def num_steps(self) -> int:
        """Number of recorded optimizer steps N; parameters θ_0 … θ_N are available."""
        return self._chunks_meta[-1]["last_step"] + 1 if self._chunks_meta else 0

    @property
    def complete(self) -> bool:
        return self.manifest["status"] == "complete"

    @property
    def model_spec(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def n_train(self) -> int:
        return int(self.manifest["data"]["n_train"])

    @property
    def optimizer_family(self) -> str:
        return self.manifest["optimizer"]["family"]

    @property
    def changing_buffers(self) -> list[str]:
        """The recorded buffers that change at some step, in model order."""
        changed = {n for meta in self._chunks_meta for n in meta.get("buffers", [])}
        return [n for n in self.buffer_shapes if n in changed]

    @property
    def training_forward(self) -> dict[str, Any] | None:
        """How the training forward ran (``engine.run.record``), or None for a run of schema version 1."""
        return self.manifest.get("training_forward")

    def initial_buffers(self) -> Params:
        """b_0: every recorded floating buffer when recording started."""
        if self._initial_buffers is None:
            path = self.path / "buffers.safetensors"
            self._initial_buffers = self._read(path) if self.buffer_shapes else {}
            for name, shape in self.buffer_shapes.items():
                got = self._initial_buffers.get(name)
                if got is None or tuple(got.shape) != shape:
                    raise CorruptRunError(f"{path} lacks buffer {name!r} of shape {shape} that the manifest lists")
        return self._initial_buffers

    def buffers(self, step: int) -> Params:
        """b_step for step in 0..N: the recorded floating buffers at θ_step."""
        self._check_step(step, allow_end=True)
        if step == self.num_steps:
            chunk = self._load(self._chunks_meta[-1])
            return self._buffers_of(chunk, "buffer_end/", None)
        chunk = self._chunk_for(step)
        return self._buffers_of(chunk, "buffer/", step - chunk.first)

    @property
    def data_axis_reason(self) -> str | None:
        """Why the data view is unavailable for this run, or None when it is available."""
        return self.manifest["optimizer"].get("data_axis_reason")

    def num_parameters(self) -> int:
        total = 0
        for shape in self.param_shapes.values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    # ---------------------------------------------------------------- per step
    def params(self, step: int) -> Params:
        """θ_step for step in 0..N (θ_N are the final parameters)."""
        self._check_step(step, allow_end=True)
        if step == self.num_steps:
            chunk = self._load(self._chunks_meta[-1])
            return {n: chunk.tensors[f"theta_end/{n}"] for n in self.param_names}
        chunk = self._chunk_for(step)
        return {n: chunk.tensors[f"theta/{n}"][step - chunk.first] for n in self.param_names}

    def update(self, step: int) -> Params:
        """Δ_step = θ_{step+1} − θ_step."""
        after = self.params(step + 1)
        before = self.params(step)
        return {n: after[n] - before[n] for n in self.param_names}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(example ids, weights) of the mini-batch of ``step``."""
        record = self.record(step)
        return record.batch_ids, record.batch_weights

    def record(self, step: int) -> StepRecord:
        """The StepRecord of one step (random access; prefer iter_steps for sweeps)."""
        self._check_step(step)
        after, buffers_after = self.params(step + 1), self.buffers(step + 1)
        return self._make_record(self._chunk_for(step), step, after, buffers_after)

    def iter_steps(self, start: int = 0, stop: int | None = None) -> Iterator[StepRecord]:
        """Yield StepRecords for steps start..stop-1, loading one chunk at a time."""
        stop = self.num_steps if stop is None else stop
        if not 0 <= start <= stop <= self.num_steps:
            raise IndexError(f"step range [{start}, {stop}) is outside the recorded 0..{self.num_steps}")
        for meta in self._chunks_meta:
            if meta["last_step"] < start or meta["first_step"] >= stop:
                continue
            chunk = self._load(meta)
            for step in range(max(start, chunk.first), min(stop, chunk.last + 1)):
                if step < chunk.last:
                    after = {n: chunk.tensors[f"theta/{n}"][step + 1 - chunk.first] for n in self.param_names}
                    buffers_after = self._buffers_of(chunk, "buffer/", step + 1 - chunk.first)
                else:
                    after = {n: chunk.tensors[f"theta_end/{n}"] for n in self.param_names}
                    buffers_after = self._buffers_of(chunk, "buffer_end/", None)
                yield self._make_record(chunk, step, after, buffers_after)

    def metrics(self) -> pl.DataFrame:
        """Logged metrics, one row per step that has any, one column per metric name."""
        frames = [
            pl.read_parquet(self.path / "chunks" / f"{meta['stem']}.metrics.parquet")
            for meta in self._chunks_meta
        ]
        long = pl.concat(frames) if frames else pl.DataFrame(
            schema={"step": pl.Int64, "name": pl.Utf8, "value": pl.Float64}
        )
        if long.height == 0:
            return pl.DataFrame(schema={"step": pl.Int64})
        wide = long.pivot(on="name", index="step", values="value", aggregate_function="last")
        return wide.sort("step")

    def hparams_table(self) -> pl.DataFrame:
        """Per-step, per-group hyper-parameters (learning rate schedule etc.) as one frame."""
        return pl.concat(
            [pl.read_parquet(self.path / "chunks" / f"{m['stem']}.hparams.parquet") for m in self._chunks_meta]
        )

    # ---------------------------------------------------------------- internals
    def _check_step(self, step: int, allow_end: bool = False) -> None:
        top = self.num_steps if allow_end else self.num_steps - 1
        if not 0 <= step <= top:
            raise IndexError(f"step {step} is outside the recorded steps 0..{top} of {self.path}")

    def _chunk_for(self, step: int) -> _Chunk:
        for meta in self._chunks_meta:
            if meta["first_step"] <= step <= meta["last_step"]:
                return self._load(meta)
        raise IndexError(f"step {step} is not in any chunk of {self.path}")

    def _buffers_of(self, chunk: _Chunk, prefix: str, index: int | None) -> Params:
        """The buffers of row ``index`` of a chunk (``None``: its end), the starting values where it stores none."""
        out = dict(self.initial_buffers())
        for name in out:
            stored = chunk.tensors.get(f"{prefix}{name}")
            if stored is not None:
                out[name] = stored if index is None else stored[index]
        return out

    def _make_record(self, chunk: _Chunk, step: int, after: Params, buffers_after: Params) -> StepRecord:
        i = step - chunk.first
        before = {n: chunk.tensors[f"theta/{n}"][i] for n in self.param_names}
        ids, weights = chunk.batches[step]
        adam = "adam_step" in chunk.tensors
        random = "random" in chunk.tensors and bool(chunk.tensors["random"][i])
        rng = None
        if random and "rng_cpu" in chunk.tensors:
            cuda = chunk.tensors["rng_cuda"][i] if "rng_cuda" in chunk.tensors else None
            rng = RandomState(chunk.tensors["rng_cpu"][i], cuda)
        return StepRecord(
            step=step,
            params=before,
            update={n: after[n] - before[n] for n in self.param_names},
            batch_ids=ids,
            batch_weights=weights,
            hparams=chunk.hparams[step],
            second_moment={n: chunk.tensors[f"v/{n}"][i] for n in self.param_names} if adam else None,
            adam_step=(
                {n: float(chunk.tensors["adam_step"][i, j]) for j, n in enumerate(self.param_names)} if adam else None
            ),
            active={n: bool(chunk.tensors["active"][i, j]) for j, n in enumerate(self.param_names)},
            clip_scale=float(chunk.tensors["clip_scale"][i]),
            buffers=self._buffers_of(chunk, "buffer/", i),
            buffers_after=buffers_after,
            rng=rng,
        )

    @staticmethod
    def _read(file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptRunError(
                f"{file} cannot be read as safetensors ({exc}); the file is truncated or foreign"
            ) from exc

    def _load(self, meta: dict[str, Any]) -> _Chunk:
        if self._cache is not None and self._cache.stem == meta["stem"]:
            return self._cache
        base = self.path / "chunks" / meta["stem"]
        file = base.with_name(f"{meta['stem']}.safetensors")
        tensors = self._read(file)
        count = meta["last_step"] - meta["first_step"] + 1
        expected = [(f"theta/{n}", (count, *shape), f"theta_end/{n}", shape) for n, shape in self.param_shapes.items()]
        for n in meta.get("buffers", []):
            if n not in self.buffer_shapes:
                raise CorruptRunError(f"{self.path}/manifest.json: chunk {meta['stem']} lists unknown buffer {n!r}")
            shape = self.buffer_shapes[n]
            expected.append((f"buffer/{n}", (count, *shape), f"buffer_end/{n}", shape))
        for key_steps, want_steps, key_end, want_end in expected:
            for key, want in ((key_steps, want_steps), (key_end, want_end)):
                got = tensors.get(key)
                if got is None:
                    raise CorruptRunError(f"{file} lacks tensor {key!r}")
                if tuple(got.shape) != tuple(want):
                    raise CorruptRunError(
                        f"{file}: tensor {key!r} has shape {tuple(got.shape)} but the manifest says {tuple(want)}"
                    )
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad = (~torch.isfinite(value)).nonzero()[0].tolist()
                step = meta["first_step"] + bad[0] if key.startswith(("theta/", "v/", "buffer/")) \
                    else meta["first_step"]
                raise CorruptRunError(
                    f"{file}: tensor {key!r} contains NaN or Inf (first at index {bad}, step {step}); "
                    "training diverged or the file is damaged"
                )
        try:
            batches = pl.read_parquet(base.with_name(f"{meta['stem']}.batches.parquet"))
            hparams = pl.read_parquet(base.with_name(f"{meta['stem']}.hparams.parquet"))
        except Exception as exc:  # polars raises several error types for damaged parquet
            raise CorruptRunError(f"{base}.*.parquet cannot be read ({exc})") from exc
        ids = batches["example"]
        if ids.len() and (ids.min() < 0 or ids.max() >= self.n_train):
            raise CorruptRunError(
                f"{base}.batches.parquet has example ids outside the training set 0..{self.n_train - 1} "
                f"(found {ids.min()}..{ids.max()})"
            )
        by_step = {
            int(key[0]): (torch.from_numpy(part["example"].to_numpy().copy()),
                          torch.from_numpy(part["weight"].to_numpy().copy()))
            for key, part in batches.partition_by("step", as_dict=True, maintain_order=True).items()
        }
        groups: dict[int, list[GroupHParams]] = {}
        for row in hparams.sort(["step", "group"]).iter_rows(named=True):
            groups.setdefault(row["step"], []).append(GroupHParams(**{c: row[c] for c in HPARAM_COLUMNS}))
        missing = [s for s in range(meta["first_step"], meta["last_step"] + 1) if s not in by_step or s not in groups]
        if missing:
            raise CorruptRunError(f"{base}.batches/hparams.parquet have no rows for steps {missing[:5]}")
        self._cache = _Chunk(
            meta["stem"], meta["first_step"], meta["last_step"], tensors, by_step,
            {s: tuple(g) for s, g in groups.items()},
        )
        return self._cache
