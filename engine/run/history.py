"""Read a run directory written by :class:`engine.run.record.Recorder`.

Access is lazy and chunk-wise: one chunk (a range of steps) is loaded at a time, so
reading a long run costs the memory of one chunk. Every file is held to the format declared in
``engine.run.schema``: the manifest and the layout of every file (tensor names, dtypes, shapes,
Parquet columns) when the run is opened, the values (finite, in range, ids within the training
set, one row per step and parameter group) when a chunk is read. Problems raise
``CorruptRunError`` naming the file, the field and what was expected. Runs of schema version 1
read as runs without buffers whose training forward is unknown (``training_forward`` is None).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.errors import CorruptRunError, IncompleteRunError, RunNotFoundError, SchemaVersionError
from engine.model.task import Task, run_task
from engine.run import schema
from engine.run.record import FORMAT, HPARAM_COLUMNS, SCHEMA_VERSION, RandomState

Params = dict[str, torch.Tensor]
T = TypeVar("T")


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
        """Open a run directory, checking its manifest and the layout of every file it lists.

        The manifest is checked against ``engine.run.schema.MANIFEST`` and against itself (chunk
        ranges, step count, parameter groups); every chunk file must exist with the tensors,
        dtypes, shapes and columns the manifest implies. Values are checked when a chunk is read.
        Raises RunNotFoundError, CorruptRunError, SchemaVersionError, or IncompleteRunError
        (unless ``allow_incomplete``) with a message naming the file and the problem.
        """
        path = Path(path)
        history = cls(path, _read_manifest(path))
        history._check_manifest()
        history._check_files()
        if not history.complete and not allow_incomplete:
            raise IncompleteRunError(
                f"the recording in {path} did not finish (status {history.manifest['status']!r}); "
                f"{history.num_steps} steps in complete chunks are readable. "
                "Open it with allow_incomplete=True (CLI: --allow-incomplete) to use them"
            )
        if history.num_steps == 0:
            raise CorruptRunError(f"{path} holds no recorded steps")
        return history

    def task(self, trust_run: bool = False) -> Task:
        """The task that rebuilds this run's model and data (see ``engine.model.task.run_task``)."""
        return run_task(self.model_spec, f"run {self.path}", trust_run)

    def _check_manifest(self) -> None:
        """The manifest against itself: unique names, existing groups, contiguous chunks, the step count."""
        file = self.path / "manifest.json"
        groups = len(self.manifest["optimizer"]["groups"])
        seen: set[str] = set()
        for p in self.manifest["parameters"]:
            if p["name"] in seen:
                raise CorruptRunError(f"{file} lists the parameter {p['name']!r} twice")
            seen.add(p["name"])
            if p["group"] >= groups:
                raise CorruptRunError(f"{file}: parameter {p['name']!r} is in group {p['group']}, but the optimizer "
                                      f"lists {groups} group(s)")
        buffers = [b["name"] for b in self.manifest.get("buffers", [])]
        twice = sorted({n for n in buffers if buffers.count(n) > 1} | (seen & set(buffers)))
        if twice:
            raise CorruptRunError(f"{file} lists the buffer {twice[0]!r} twice or also as a parameter")
        expected = 0
        for meta in self._chunks_meta:
            if meta["first_step"] != expected or meta["last_step"] < meta["first_step"]:
                raise CorruptRunError(f"{file}: chunk {meta['stem']} covers steps {meta['first_step']}.."
                                      f"{meta['last_step']}; expected a range starting at step {expected}")
            if meta["stem"] != f"chunk-{expected:08d}":
                raise CorruptRunError(f"{file}: the chunk of step {expected} is named {meta['stem']!r}; "
                                      f"expected 'chunk-{expected:08d}'")
            expected = meta["last_step"] + 1
        if self.manifest["steps"] != self.num_steps:
            raise CorruptRunError(f"{file} says {self.manifest['steps']} steps, but its chunks cover {self.num_steps}")

    def _check_files(self) -> None:
        """Every chunk file exists with the tensors and columns the manifest implies; so does final.safetensors."""
        for meta in self._chunks_meta:
            base = self.path / "chunks" / meta["stem"]
            file = base.with_name(f"{meta['stem']}.safetensors")
            layout, expected = _tensor_layout(file), self._chunk_layout(meta)
            schema.check_tensor_layout(file, layout, expected)
            unlisted = [n for n in layout if n.startswith(("buffer/", "buffer_end/")) and n not in expected]
            if unlisted:
                raise CorruptRunError(f"{file} holds the tensor {unlisted[0]!r}, but the manifest's chunk "
                                      f"{meta['stem']} does not list that buffer as changed")
            for table, columns in schema.TABLES.items():
                file = base.with_name(f"{meta['stem']}.{table}.parquet")
                schema.check_table_layout(file, _read(file, "Parquet", pl.read_parquet_schema), columns)
        if self.buffer_shapes:
            file = self.path / "buffers.safetensors"
            schema.check_tensor_layout(file, _tensor_layout(file),
                                       schema.expected_tensors(schema.BUFFER_TENSORS, self.manifest))
        final = self.path / "final.safetensors"
        if self.complete:
            schema.check_tensor_layout(final, _tensor_layout(final),
                                       schema.expected_tensors(schema.FINAL_TENSORS, self.manifest))
        initial = self.path / "initial_state.safetensors"
        if initial.exists():
            schema.check_tensor_layout(initial, _tensor_layout(initial), self._initial_state_layout(initial))

    def _chunk_layout(self, meta: dict[str, Any]) -> dict[str, schema.TensorSpec]:
        """The tensors of a chunk's safetensors file: by the manifest, its step count and the buffers it lists."""
        count = meta["last_step"] - meta["first_step"] + 1
        try:
            return schema.expected_tensors(schema.CHUNK_TENSORS, self.manifest, count, meta.get("buffers", []))
        except CorruptRunError as exc:
            raise CorruptRunError(f"{self.path}/{exc}") from None

    def _initial_state_layout(self, file: Path) -> dict[str, schema.TensorSpec]:
        """``<state>/<tensor>`` entries of a recorded tensor, shaped like it, in the storage dtype."""
        expected = {}
        dtype = getattr(torch, self.manifest["dtype"])
        rule = schema.TensorRule("{state}/{tensor}", "run", ("shape",))
        for name in _tensor_layout(file):
            _, _, tensor = name.partition("/")
            if tensor not in self.param_shapes:
                raise CorruptRunError(f"{file}: tensor {name!r} is not '<optimizer state>/<recorded tensor>'")
            expected[name] = schema.TensorSpec(dtype, self.param_shapes[tensor], False, rule)
        return expected

    def initial_state(self) -> dict[str, torch.Tensor]:
        """Optimizer state carried into the first recorded step (keys ``<state>/<tensor>``), checked; {} if none."""
        file = self.path / "initial_state.safetensors"
        if not file.exists():
            return {}
        tensors = _read(file, "safetensors", load_file)
        expected = self._initial_state_layout(file)
        schema.check_tensor_layout(file, _loaded_layout(tensors), expected)
        schema.check_tensor_values(file, tensors, expected)
        return tensors

    def final_params(self) -> Params:
        """θ_N as stored in final.safetensors (a complete run), checked."""
        final = self.final_state()
        return {n: final[n] for n in self.param_names}

    def final_state(self) -> Params:
        """θ_N and the buffers at θ_N as stored in final.safetensors (a complete run), checked."""
        file = self.path / "final.safetensors"
        tensors = _read(file, "safetensors", load_file)
        expected = schema.expected_tensors(schema.FINAL_TENSORS, self.manifest)
        schema.check_tensor_layout(file, _loaded_layout(tensors), expected)
        schema.check_tensor_values(file, tensors, expected)
        return {n: tensors[n] for n in expected}

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
        """b_0: every recorded floating buffer when recording started, checked."""
        if self._initial_buffers is None:
            buffers: Params = {}
            if self.buffer_shapes:
                file = self.path / "buffers.safetensors"
                tensors = _read(file, "safetensors", load_file)
                expected = schema.expected_tensors(schema.BUFFER_TENSORS, self.manifest)
                schema.check_tensor_layout(file, _loaded_layout(tensors), expected)
                schema.check_tensor_values(file, tensors, expected)
                buffers = {n: tensors[n] for n in self.buffer_shapes}
            self._initial_buffers = buffers
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
        frames = [self._table(meta, "metrics") for meta in self._chunks_meta]
        long = pl.concat(frames) if frames else pl.DataFrame(
            schema={"step": pl.Int64, "name": pl.Utf8, "value": pl.Float64}
        )
        if long.height == 0:
            return pl.DataFrame(schema={"step": pl.Int64})
        wide = long.pivot(on="name", index="step", values="value", aggregate_function="last")
        return wide.sort("step")

    def hparams_table(self) -> pl.DataFrame:
        """Per-step, per-group hyper-parameters (learning rate schedule etc.) as one frame."""
        return pl.concat([self._table(meta, "hparams") for meta in self._chunks_meta], how="vertical_relaxed")

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

    def _table(self, meta: dict[str, Any], table: str) -> pl.DataFrame:
        """One Parquet file of a chunk, checked against its declaration and the chunk's step range."""
        file = self.path / "chunks" / f"{meta['stem']}.{table}.parquet"
        columns = schema.TABLES[table]
        frame = _read(file, "Parquet", pl.read_parquet)
        schema.check_table_layout(file, frame.schema, columns)
        schema.check_table_values(file, frame, columns)
        if table != "metrics":
            outside = frame.filter((pl.col("step") < meta["first_step"]) | (pl.col("step") > meta["last_step"]))
            if outside.height:
                raise CorruptRunError(f"{file} has rows of step {outside['step'][0]}, outside the chunk's steps "
                                      f"{meta['first_step']}..{meta['last_step']}")
        return frame.select(list(columns))

    def _load(self, meta: dict[str, Any]) -> _Chunk:
        if self._cache is not None and self._cache.stem == meta["stem"]:
            return self._cache
        base = self.path / "chunks" / meta["stem"]
        file = base.with_name(f"{meta['stem']}.safetensors")
        first, last = meta["first_step"], meta["last_step"]
        tensors = _read(file, "safetensors", load_file)
        expected = self._chunk_layout(meta)
        schema.check_tensor_layout(file, _loaded_layout(tensors), expected)
        schema.check_tensor_values(file, tensors, expected, first_step=first)
        random = tensors.get("random")
        if random is not None and bool(random.any()) and "rng_cpu" not in tensors:
            step = first + int(random.nonzero()[0, 0])
            raise CorruptRunError(f"{file}: step {step} drew random numbers in its training forward, but the file "
                                  "lacks the tensor 'rng_cpu' holding the generator state before it")
        batches = self._table(meta, "batches")
        hparams = self._table(meta, "hparams")
        ids = batches["example"]
        if ids.len() and ids.max() >= self.n_train:
            raise CorruptRunError(
                f"{base}.batches.parquet has example ids outside the training set 0..{self.n_train - 1} "
                f"(found {ids.min()}..{ids.max()})"
            )
        by_step = {
            int(key[0]): (torch.from_numpy(part["example"].to_numpy().copy()),
                          torch.from_numpy(part["weight"].cast(pl.Float64).to_numpy().copy()))
            for key, part in batches.partition_by("step", as_dict=True, maintain_order=True).items()
        }
        groups = self._groups_by_step(base.with_name(f"{meta['stem']}.hparams.parquet"), hparams, first, last)
        missing = [s for s in range(first, last + 1) if s not in by_step]
        if missing:
            raise CorruptRunError(f"{base}.batches.parquet has no rows for steps {missing[:5]}")
        self._cache = _Chunk(meta["stem"], first, last, tensors, by_step, groups)
        return self._cache

    def _groups_by_step(self, file: Path, hparams: pl.DataFrame, first: int,
                        last: int) -> dict[int, tuple[GroupHParams, ...]]:
        """Every step's hyper-parameters, one row per parameter group 0..G-1; those the family reads are set."""
        count = len(self.manifest["optimizer"]["groups"])
        needed = schema.FAMILY_HPARAMS[self.optimizer_family]
        groups: dict[int, list[GroupHParams]] = {step: [] for step in range(first, last + 1)}
        for row in hparams.sort(["step", "group"]).iter_rows(named=True):
            rows = groups[row["step"]]
            if row["group"] != len(rows) or row["group"] >= count:
                raise CorruptRunError(f"{file}: step {row['step']} has a row of parameter group {row['group']}; "
                                      f"expected one row for each group 0..{count - 1}")
            unset = [c for c in needed if row[c] is None]
            if unset:
                raise CorruptRunError(f"{file}: {unset[0]!r} at step {row['step']}, parameter group {row['group']} "
                                      f"is empty; the {self.optimizer_family} update reads it")
            rows.append(GroupHParams(**{c: row[c] for c in HPARAM_COLUMNS}))
        for step, rows in groups.items():
            if len(rows) != count:
                raise CorruptRunError(f"{file}: step {step} has rows of {len(rows)} parameter group(s); the "
                                      f"manifest lists {count}")
        return {s: tuple(g) for s, g in groups.items()}


def _read(file: Path, what: str, reader: Callable[[str], T]) -> T:
    """``reader(file)``; a missing, unreadable or damaged file raises CorruptRunError naming it."""
    try:
        with open(file, "rb"):
            pass
    except FileNotFoundError:
        raise CorruptRunError(f"{file} is missing; the run directory is incomplete or was edited") from None
    except PermissionError:
        raise CorruptRunError(f"{file} cannot be read: permission denied. Ask the owner of the run to make "
                              "its files readable (chmod -R a+rX on the run directory)") from None
    except OSError as exc:
        raise CorruptRunError(f"{file} cannot be read ({exc.strerror or exc})") from None
    try:
        return reader(str(file))
    except Exception as exc:  # safetensors and polars raise several error types for damaged files
        raise CorruptRunError(f"{file} is not valid {what} ({_first_line(exc)}); the file is truncated or "
                              "foreign") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# safetensors dtype codes by name, as ``str(torch dtype)`` writes them
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _tensor_layout(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name → (dtype, shape) of every tensor of a safetensors file, read from its header."""

    def header(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        with safe_open(name, "pt") as handle:
            layout = {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                part = handle.get_slice(key)
                code = part.get_dtype()
                layout[key] = (_SAFETENSORS_DTYPES.get(code, code), tuple(part.get_shape()))
            return layout

    return _read(file, "safetensors", header)


def _loaded_layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()}


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of run directory ``path``, checked against its declaration."""
    file = path / "manifest.json"
    if not path.exists():
        raise RunNotFoundError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise CorruptRunError(f"{path} is a file, not a run directory (expected {file})")
    if not file.exists():
        raise CorruptRunError(f"{path} has no manifest.json: it is not a run directory written by the Recorder")

    def parse(name: str) -> Any:
        with open(name, encoding="utf-8") as handle:
            return json.load(handle)

    manifest = _read(file, "JSON", parse)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptRunError(f"{file} is not an ExPLAIND Studio run manifest (format != {FORMAT!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION or version < 1:
        raise SchemaVersionError(
            f"{file} has schema version {version!r}; this release reads versions 1 to {SCHEMA_VERSION}. "
            "Upgrade explaind-studio to open it"
        )
    schema.check_json(file, manifest, schema.MANIFEST, version=version)
    return manifest
