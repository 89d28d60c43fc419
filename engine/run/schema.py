"""The run directory format, declared once: the keys of ``manifest.json``, the tensors of the
chunk files and the columns of the Parquet files, with the checks that hold a file to them.

``engine.run.history`` checks every file against these declarations when it opens or reads
it; a file that does not match raises ``CorruptRunError`` naming the file, the field and what
was expected, so no reader ever meets a missing key, a wrong type or a value out of range. A
new manifest key, chunk tensor or Parquet column is one entry here. Keys, tensors and columns
that are not declared are ignored by readers.

Schema version 2 added the model's floating buffers (``buffers.safetensors``, the manifest's
``buffers`` and each chunk's ``buffers`` list, the chunk tensors ``buffer/<b>`` and
``buffer_end/<b>``, the final buffers in ``final.safetensors``), the training forward
(``training_forward``) and its random states (``random``, ``rng_cpu``, ``rng_cuda``). A key or
tensor declared ``since=2`` is required in a version-2 run and may be absent from a version-1
run, which reads as a run without buffers whose training forward is unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch

from engine.errors import CorruptRunError

STATUSES = ("recording", "complete", "incomplete")
FAMILIES = ("adam", "sgd", "other")
DTYPES = ("float32", "float64")
CHUNK_STEM = r"chunk-\d{8}"


# ---------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Value:
    """A JSON value or a table cell: its accepted kinds and the conditions on it.

    Kinds: ``str``, ``int``, ``number`` (int or float), ``bool``, ``null``, ``dict`` and
    ``list`` (contents not declared here). Numbers are finite unless ``finite`` is False.
    """

    kinds: tuple[str, ...]
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None      # exclusive
    pattern: str | None = None
    finite: bool = True

    def describe(self) -> str:
        words = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
                 "null": "null", "dict": "an object", "list": "a list"}
        text = " or ".join(words[k] for k in self.kinds)
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        if self.pattern is not None:
            text += f" matching {self.pattern}"
        if self.minimum is not None:
            text += f" ≥ {self.minimum:g}"
        if self.maximum is not None:
            text += f" and < {self.maximum:g}"
        if self.finite and ("number" in self.kinds or "int" in self.kinds) and "null" not in self.kinds:
            text = text.replace("a number", "a finite number")
        return text

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit, or None."""
        kind = _kind(value)
        if kind not in self.kinds and not (kind == "int" and "number" in self.kinds):
            return "has the wrong type"
        if kind == "number" and not math.isfinite(value):
            if self.finite:
                return "is not finite"
            return None
        if self.choices is not None and value not in self.choices:
            return "is not an allowed value"
        if self.pattern is not None and kind == "str" and not re.fullmatch(self.pattern, value):
            return "does not have the expected form"
        if kind in ("int", "number"):
            if self.minimum is not None and value < self.minimum:
                return "is too small"
            if self.maximum is not None and value >= self.maximum:
                return "is too large"
        return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


@dataclass(frozen=True)
class Key:
    """One key of a JSON object: what its value is and whether it must be present.

    A required key with ``since`` > 1 is required from that schema version on and may be
    absent from earlier versions.
    """

    spec: Spec
    required: bool = True
    since: int = 1


@dataclass(frozen=True)
class Record:
    """A JSON object with declared keys."""

    keys: dict[str, Key]

    def describe(self) -> str:
        return "an object with the keys " + ", ".join(self.keys)


@dataclass(frozen=True)
class OrNull:
    """null or a value that fits ``spec`` (a record or list that may be unknown)."""

    spec: Spec

    def describe(self) -> str:
        return f"null or {self.spec.describe()}"


@dataclass(frozen=True)
class ListOf:
    """A JSON list whose items all fit ``item``."""

    item: Spec
    min_length: int = 0

    def describe(self) -> str:
        return f"a list of at least {self.min_length} item(s)" if self.min_length else "a list"


Spec = Value | Record | ListOf | OrNull

STR = Value(("str",))
COUNT = Value(("int",), minimum=0)

# One parameter group's optimizer hyper-parameters; optimizers without a key store null. The
# manifest lists them per group as recorded at the start, the hparams Parquet files per step.
HPARAMS: dict[str, Value] = {
    "lr": Value(("number",), minimum=0),
    "weight_decay": Value(("number",), minimum=0),
    "beta1": Value(("number", "null"), minimum=0, maximum=1),
    "beta2": Value(("number", "null"), minimum=0, maximum=1),
    "eps": Value(("number", "null"), minimum=0),
    "momentum": Value(("number", "null"), minimum=0),
    "dampening": Value(("number", "null")),
    "nesterov": Value(("bool",)),
    "maximize": Value(("bool",)),
    "amsgrad": Value(("bool",)),
    "decoupled": Value(("bool",)),
}
# hyper-parameters that the update rule of an optimizer family reads, so they cannot be null
FAMILY_HPARAMS: dict[str, tuple[str, ...]] = {"adam": ("beta1", "beta2", "eps"), "sgd": (), "other": ()}

MANIFEST = Record({
    "format": Key(STR),
    "schema_version": Key(Value(("int",), minimum=1)),
    "status": Key(Value(("str",), choices=STATUSES)),
    "created": Key(STR),
    "torch_version": Key(STR),
    "model": Key(Value(("dict",))),          # a task spec, checked when the task is rebuilt
    "parameters": Key(ListOf(Record({
        "name": Key(STR),
        "shape": Key(ListOf(COUNT)),
        "group": Key(COUNT),
    }), min_length=1)),
    "optimizer": Key(Record({
        "class": Key(STR),
        "family": Key(Value(("str",), choices=FAMILIES)),
        "data_axis_reason": Key(Value(("str", "null")), required=False),
        "groups": Key(ListOf(Record({name: Key(value) for name, value in HPARAMS.items()}), min_length=1)),
    })),
    "data": Key(Record({
        "n_train": Key(Value(("int",), minimum=1)),
        "fingerprint": Key(STR),
    })),
    "dtype": Key(Value(("str",), choices=DTYPES)),
    "chunk_steps": Key(Value(("int",), minimum=1)),
    "chunks": Key(ListOf(Record({
        "stem": Key(Value(("str",), pattern=CHUNK_STEM)),
        "first_step": Key(COUNT),
        "last_step": Key(COUNT),
        "buffers": Key(ListOf(STR), since=2),      # the buffers that differ from b_0 in the chunk
    }))),
    "steps": Key(COUNT),
    "buffers": Key(ListOf(Record({                  # every floating buffer of the model
        "name": Key(STR),
        "shape": Key(ListOf(COUNT)),
    })), since=2),
    "training_forward": Key(OrNull(Record({         # null: unknown (imported runs)
        "dtype": Key(Value(("str",), choices=("float16", "bfloat16", "float32", "float64"))),
        "device": Key(STR),
        "threads": Key(Value(("int",), minimum=1)),
        "eval_modules": Key(ListOf(STR)),
        "random": Key(Value(("bool",))),
        "irregular": Key(Value(("str", "null"))),
    })), since=2),
    "import": Key(Value(("dict",)), required=False),   # written by importers: where the run came from
})


def check_json(file: Any, value: Any, spec: Spec, path: str = "", version: int = 1) -> None:
    """Raise CorruptRunError naming ``file`` and the key path unless ``value`` fits ``spec``
    (keys required ``since`` a later schema version than ``version`` may be absent)."""
    where = path or "the top level"
    if isinstance(spec, OrNull):
        if value is not None:
            check_json(file, value, spec.spec, path, version)
    elif isinstance(spec, Record):
        if not isinstance(value, dict):
            raise CorruptRunError(f"{file}: {where} is {_shown(value)}; expected {spec.describe()}")
        for name, key in spec.keys.items():
            inner = f"{path}.{name}" if path else name
            if name not in value:
                if key.required and version >= key.since:
                    raise CorruptRunError(f"{file} lacks the key {inner!r} ({key.spec.describe()})")
                continue
            check_json(file, value[name], key.spec, inner, version)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list) or len(value) < spec.min_length:
            raise CorruptRunError(f"{file}: {where} is {_shown(value)}; expected {spec.describe()}")
        for i, item in enumerate(value):
            check_json(file, item, spec.item, f"{path}[{i}]", version)
    else:
        problem = spec.problem(value)
        if problem is not None:
            raise CorruptRunError(f"{file}: {where} is {_shown(value)}; expected {spec.describe()}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def declared(path: tuple[str | int, ...], spec: Spec = MANIFEST) -> Key | None:
    """The declaration of a key path of the manifest (list positions as ints), or None."""
    key: Key | None = Key(spec)
    for part in path:
        if key is None:
            return None
        inner = key.spec.spec if isinstance(key.spec, OrNull) else key.spec
        if isinstance(inner, Record) and isinstance(part, str):
            key = inner.keys.get(part)
        elif isinstance(inner, ListOf) and isinstance(part, int):
            key = Key(inner.item)
        else:
            return None
    return key


# --------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorRule:
    """Tensors of a safetensors file.

    ``name`` with ``{tensor}`` stands for one tensor per recorded parameter tensor, with
    ``{buffer}`` for one per recorded buffer (of the file: every buffer of the model, or those
    a chunk lists). ``dtype`` is ``"run"`` (the manifest's storage dtype) or a torch dtype name.
    ``shape`` lists ``steps`` (steps in the chunk), ``tensors`` (recorded tensors), ``shape``
    (the tensor's or buffer's own shape) and ``rng_cpu``/``rng_cuda`` (the length of a
    generator state). A rule applies from schema version ``since``; one that is not
    ``required`` names a tensor a file may lack (it is checked where present).
    """

    name: str
    dtype: str
    shape: tuple[str, ...]
    families: tuple[str, ...] = FAMILIES
    minimum: float | None = None
    maximum: float | None = None     # inclusive
    since: int = 1
    required: bool = True


CHUNK_TENSORS = (
    TensorRule("theta/{tensor}", "run", ("steps", "shape")),               # θ_s before each step
    TensorRule("theta_end/{tensor}", "run", ("shape",)),                   # θ after the chunk's last step
    TensorRule("v/{tensor}", "run", ("steps", "shape"), ("adam",), minimum=0.0),  # Adam's second moment
    TensorRule("active", "uint8", ("steps", "tensors"), minimum=0, maximum=1),   # had a gradient
    TensorRule("clip_scale", "float64", ("steps",), minimum=0.0),          # global gradient scale
    TensorRule("adam_step", "float64", ("steps", "tensors"), ("adam",), minimum=0.0),  # Adam's step count
    TensorRule("buffer/{buffer}", "run", ("steps", "shape"), since=2),     # b_s of the buffers the chunk lists
    TensorRule("buffer_end/{buffer}", "run", ("shape",), since=2),         # their values after the last step
    TensorRule("random", "uint8", ("steps",), minimum=0, maximum=1, since=2),  # the training forward drew
    TensorRule("rng_cpu", "uint8", ("steps", "rng_cpu"), since=2, required=False),  # CPU generator state
    TensorRule("rng_cuda", "uint8", ("steps", "rng_cuda"), since=2, required=False),  # CUDA generator state
)
FINAL_TENSORS = (
    TensorRule("{tensor}", "run", ("shape",)),                             # θ_N of a complete run
    TensorRule("{buffer}", "run", ("shape",), since=2),                    # the buffers at θ_N
)
BUFFER_TENSORS = (TensorRule("{buffer}", "run", ("shape",), since=2),)     # b_0, in buffers.safetensors
CUDA_STATE_BYTES = 16   # torch's CUDA generator state: seed and offset


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    steps_axis: bool
    rule: TensorRule


def expected_tensors(rules: tuple[TensorRule, ...], manifest: dict, steps: int = 0,
                     buffers: list[str] | None = None) -> dict[str, TensorSpec]:
    """The tensors a file holds by ``rules`` for a (checked) manifest and a chunk of ``steps`` steps.

    ``{buffer}`` rules stand for ``buffers`` (default: every buffer the manifest lists); a
    name that the manifest does not list raises CorruptRunError.
    """
    params = manifest["parameters"]
    family = manifest["optimizer"]["family"]
    version = manifest["schema_version"]
    buffer_shapes = {b["name"]: b["shape"] for b in manifest.get("buffers", [])}
    for name in buffers or ():
        if name not in buffer_shapes:
            raise CorruptRunError(f"manifest.json: a chunk lists the buffer {name!r}, which the manifest's "
                                  f"'buffers' do not ({', '.join(buffer_shapes) or 'none'})")
    entries = {
        "{tensor}": [(p["name"], p["shape"]) for p in params],
        "{buffer}": [(n, buffer_shapes[n]) for n in (buffer_shapes if buffers is None else buffers)],
    }
    out: dict[str, TensorSpec] = {}
    for rule in rules:
        if family not in rule.families or version < rule.since:
            continue
        dtype = getattr(torch, manifest["dtype"] if rule.dtype == "run" else rule.dtype)
        placeholder = next((p for p in entries if p in rule.name), None)
        for name, own in entries[placeholder] if placeholder else [(rule.name, ())]:
            sizes = {"steps": (steps,), "tensors": (len(params),), "shape": tuple(own),
                     "rng_cpu": (torch.get_rng_state().numel(),), "rng_cuda": (CUDA_STATE_BYTES,)}
            shape = tuple(d for axis in rule.shape for d in sizes[axis])
            full = rule.name.replace(placeholder, name) if placeholder else name
            out[full] = TensorSpec(dtype, shape, rule.shape[0] == "steps", rule)
    return out


def check_tensor_layout(file: Any, found: dict[str, tuple[str, tuple[int, ...]]],
                        expected: dict[str, TensorSpec]) -> None:
    """Names, dtypes (by name: ``float32``) and shapes of a safetensors file against ``expected``."""
    for name, spec in expected.items():
        if name not in found and not spec.rule.required:
            continue
        if name not in found:
            raise CorruptRunError(f"{file} lacks the tensor {name!r} ({_dtype(spec.dtype)} of shape {spec.shape})")
        dtype, shape = found[name]
        if dtype != _dtype(spec.dtype):
            raise CorruptRunError(f"{file}: tensor {name!r} is {dtype}; expected {_dtype(spec.dtype)}")
        if tuple(shape) != spec.shape:
            raise CorruptRunError(
                f"{file}: tensor {name!r} has shape {tuple(shape)}; the manifest implies {spec.shape}")


def check_tensor_values(file: Any, tensors: dict[str, torch.Tensor], expected: dict[str, TensorSpec],
                        first_step: int = 0) -> None:
    """Finite values within each rule's range; the message names the step of the first bad value."""
    for name, spec in expected.items():
        if name not in tensors and not spec.rule.required:
            continue
        value = tensors[name]
        rule = spec.rule
        bad = ~torch.isfinite(value) if value.is_floating_point() else torch.zeros_like(value, dtype=torch.bool)
        what = "NaN or Inf"
        if not bad.any():
            if rule.minimum is not None:
                bad = value < rule.minimum
                what = f"values below {rule.minimum:g}"
            if not bad.any() and rule.maximum is not None:
                bad = value > rule.maximum
                what = f"values above {rule.maximum:g}"
        if bad.any():
            index = bad.nonzero()[0].tolist()
            step = f", step {first_step + index[0]}" if spec.steps_axis else ""
            raise CorruptRunError(f"{file}: tensor {name!r} holds {what} (first at index {index}{step}); "
                                  "training diverged or the file is damaged")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------- tables
# The Parquet files of a chunk, by suffix: their columns (a Value per cell; int and number
# columns hold no null unless declared).
TABLES: dict[str, dict[str, Value]] = {
    "batches": {"step": COUNT, "example": COUNT, "weight": Value(("number",))},
    "hparams": {"step": COUNT, "group": COUNT, **HPARAMS},
    "metrics": {"step": Value(("int",)), "name": STR, "value": Value(("number",), finite=False)},
}


def _dtype_fits(dtype: pl.DataType, value: Value) -> bool:
    if dtype == pl.Null:
        return "null" in value.kinds
    if "int" in value.kinds:
        return dtype.is_integer()
    if "number" in value.kinds:
        return dtype.is_float() or dtype.is_integer()
    if "bool" in value.kinds:
        return dtype == pl.Boolean
    return dtype == pl.String


def check_table_layout(file: Any, schema: dict[str, pl.DataType], columns: dict[str, Value]) -> None:
    """Column names and dtypes of a Parquet file against ``columns``."""
    for name, value in columns.items():
        if name not in schema:
            raise CorruptRunError(f"{file} lacks the column {name!r} ({value.describe()})")
        if not _dtype_fits(schema[name], value):
            raise CorruptRunError(f"{file}: column {name!r} is {schema[name]}; expected {value.describe()}")


def check_table_values(file: Any, frame: pl.DataFrame, columns: dict[str, Value]) -> None:
    """Nulls, non-finite numbers and ranges of every declared column; names the step of the first bad row."""
    for name, value in columns.items():
        col = pl.col(name)
        conditions = []
        if "null" not in value.kinds:
            conditions.append((col.is_null(), "is empty"))
        if frame.schema[name].is_float() and value.finite:
            conditions.append((col.is_nan() | col.is_infinite(), "is NaN or Inf"))
        if value.minimum is not None and frame.schema[name].is_numeric():
            conditions.append((col < value.minimum, f"is below {value.minimum:g}"))
        if value.maximum is not None and frame.schema[name].is_numeric():
            conditions.append((col >= value.maximum, f"is {value.maximum:g} or more"))
        for condition, what in conditions:
            bad = frame.filter(condition)
            if bad.height:
                row = bad.row(0, named=True)
                at = f" at step {row['step']}" if name != "step" and "step" in row else ""
                group = f", parameter group {row['group']}" if "group" in row and name != "group" else ""
                raise CorruptRunError(f"{file}: {name!r}{at}{group} {what} ({row[name]!r}); "
                                      f"expected {value.describe()}")
