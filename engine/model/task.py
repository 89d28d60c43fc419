"""The task interface: a model, its data and its loss, described by a JSON-able spec.

A ``Task`` is what the engine needs to rebuild a recorded run without the training
script: ``build_model()`` gives a module with the recorded parameter names,
``dataset(split)`` gives the exact training and validation tensors, and
``per_example_loss`` gives the loss whose gradients the optimizer followed.
The built-in tasks live in ``engine.tasks`` and are named here by import path
(``BUILTIN_TASKS``); ``ImportedTask`` wraps a user's own model, data and (optionally) loss
functions named by import path. ``get_task`` turns a spec back into a task; ``run_task`` does
so for the spec found in a recorded run, where code named by import path (model, data, loss —
a Hugging Face model spec included) runs only when the user trusts the run.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import BadInputError, UntrustedRunError
from engine.model.groups import ParamLayout
from engine.model.units import Partition

SPLITS = ("train", "val")

# The built-in tasks by name, as import paths: rebuilding a run of a built-in task loads its
# module only then, and nothing below ``engine.tasks`` imports it.
BUILTIN_TASKS = {
    "modular-addition": "engine.tasks.modular_addition:ModularAdditionTask",
    "digits-cnn": "engine.tasks.digits_cnn:DigitsCNNTask",
}
GREY_RAMP = " .:-=+*#%@"


@dataclass(frozen=True)
class Dataset:
    """One split of a task: model inputs, targets and how to show an example.

    ``labels`` are int64 class ids ``(n,)`` (classification) or floating-point targets
    ``(n, ...)`` (regression, or any loss of float targets; ``regression`` is then true).
    ``kind`` selects the renderer: ``"modular"`` (inputs are ``(a, b, =)`` token rows,
    ``meta["p"]`` the modulus), ``"digits"`` (inputs are ``(1, 8, 8)`` images in [0, 1]) or
    ``"generic"`` (anything else).
    """

    inputs: Tensor
    labels: Tensor
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        classes = self.labels.dtype == torch.int64 and self.labels.dim() == 1
        if not classes and not (self.labels.is_floating_point() and self.labels.dim() >= 1):
            raise BadInputError(
                f"dataset labels must be 1-D int64 class ids or floating-point targets, got {self.labels.dtype} "
                f"with shape {tuple(self.labels.shape)}; convert class ids with labels.long(), targets with "
                "labels.float()"
            )
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise BadInputError(
                f"dataset has {self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels; "
                "both must have one row per example"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def regression(self) -> bool:
        """The targets are floating-point values, not class ids."""
        return self.labels.is_floating_point()

    def render(self, i: int) -> str:
        """A short human-readable text of example ``i`` (shown in the dashboard)."""
        x = self.inputs[i]
        if self.regression:
            return f"{short_numbers(x)} → target {short_numbers(self.labels[i])}"
        y = int(self.labels[i])
        if self.kind == "modular":
            a, b = int(x[0]), int(x[1])
            return f"{a} + {b} = {y} (mod {self.meta['p']})"
        if self.kind == "digits":
            image = x.reshape(8, 8).clamp(0.0, 1.0)
            top = len(GREY_RAMP) - 1
            rows = ["".join(GREY_RAMP[round(float(v) * top)] for v in row) for row in image]
            return "\n".join([*rows, f"label {y}"])
        return f"{short_numbers(x)} → {y}"

    def fingerprint(self) -> str:
        """sha256 over dtype, shape and bytes of inputs and labels; stable across runs."""
        return data_fingerprint(self.inputs, self.labels)


def short_numbers(values: Tensor, shown: int = 8) -> str:
    """``0.5`` for one number, ``[0.1, 0.2, …]`` for more (the first ``shown``)."""
    flat = values.flatten()
    if flat.numel() == 1:
        return f"{float(flat[0]):.4g}"
    more = ", …" if flat.numel() > shown else ""
    return "[" + ", ".join(f"{float(v):.3g}" for v in flat[:shown]) + more + "]"


def data_fingerprint(inputs: torch.Tensor, labels: torch.Tensor) -> str:
    """A stable SHA-256 over the training inputs and labels (dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for tensor in (inputs, labels):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_layer(tensor_name: str) -> str:
    """Default layer label: the module path up to the first index inside a container (a block of a
    stack), else the top-level module.

    ``fc1.weight`` → ``fc1``; ``blocks.3.attn.q.weight`` → ``blocks.3``; ``0.weight`` → ``0``;
    ``transformer.h.1.attn.c_attn.weight`` → ``transformer.h.1``; ``transformer.wte.weight`` →
    ``transformer``.
    """
    parts = tensor_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(output: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each example: ``(batch, classes), (batch,) int64 → (batch,)``.

    ``F.cross_entropy``'s value, as the log-softmax at the label (0 at its ``ignore_index``, -100):
    under ``vmap`` ``F.cross_entropy`` runs a decomposition whose checks import sympy (0.3 s and
    ~35 MiB on first use)."""
    ignored = labels == -100
    picked = F.log_softmax(output, dim=1).gather(1, labels.masked_fill(ignored, 0)[:, None])[:, 0]
    return torch.where(ignored, 0.0, -picked)  # (any other label out of range is refused by gather, as by torch)


def mse(output: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of each example over its outputs: ``(batch, ...), (batch, ...) → (batch,)``.

    The batch mean is ``F.mse_loss(output, targets)``; targets of ``(batch,)`` for outputs of
    ``(batch, 1)`` are taken as one column.
    """
    if targets.numel() != output.numel():
        raise BadInputError(f"mse: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                            f"{tuple(output.shape)}")
    return (output - targets.reshape(output.shape).to(output.dtype)).pow(2).reshape(output.shape[0], -1).mean(1)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


class Task(ABC):
    """A model, its data and its per-example loss, fully determined by ``config``."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named configuration overrides (``train --preset``)

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model; the same parameters for the same ``config.seed``."""

    @abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The ``"train"`` or ``"val"`` split, deterministic from the configuration."""

    def per_example_loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of each example: ``(batch, classes), (batch,) → (batch,)``."""
        return cross_entropy(output, labels)

    def spec(self) -> dict[str, Any]:
        """The JSON-able description ``get_task`` turns back into this task."""
        return {"task": self.name, "config": _jsonable(asdict(self.config))}

    def layer_of(self, tensor_name: str) -> str:
        """The layer a parameter tensor belongs to, for grouping attributions."""
        return default_layer(tensor_name)

    def partitions(self, layout: ParamLayout) -> dict[str, Partition]:
        """The model's built-in groups finer than a tensor (heads, neurons, embedding rows,
        bases), by name (``engine.model.units``); none unless the task knows its model."""
        return {}

    def token_embedding(self) -> str | None:
        """The tensor whose rows embed the input tokens, if the model has one."""
        return None

    @staticmethod
    def check_split(split: str) -> None:
        if split not in SPLITS:
            raise BadInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _jsonable(value: Any) -> Any:
    """Tuples become lists so that a spec survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
IMPORT_SPEC_KEYS = ("model", "model_kwargs", "data", "data_kwargs", "loss")


def load_object(path: str, what: str) -> Any:
    """Import ``"pkg.mod:attr"``; failures raise ``BadInputError`` naming the path."""
    if not isinstance(path, str) or not _IMPORT_PATH.match(path):
        raise BadInputError(f"{what} {path!r} is not an import path of the form 'package.module:name'")
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise BadInputError(
            f"cannot import module {module_name!r} for {what} {path!r}: {exc}; "
            "check that it is installed or on PYTHONPATH"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise BadInputError(f"module {module_name!r} has no attribute {attr_path!r} ({what} {path!r})") from exc
    return obj


class ImportedTask(Task):
    """A user's model class, data function and loss, named by import path.

    Spec: ``{"model": "pkg.mod:Class", "model_kwargs": {...}, "data": "pkg.mod:func",
    "data_kwargs": {...}, "loss": "cross_entropy"}``. The data function returns
    ``{"train": (inputs, labels), "val": (inputs, labels)}``: integer class ids, or
    floating-point targets. The loss is ``cross_entropy`` (integer class ids), ``mse``
    (floating-point targets) or the import path of a function ``fn(output, labels) → (batch,)``,
    the loss of each example. The model is built under ``torch.manual_seed(model_kwargs.get("seed",
    0))`` unless it seeds itself.
    """

    name = "imported"

    def __init__(self, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - set(IMPORT_SPEC_KEYS))
        if unknown or "model" not in spec or "data" not in spec:
            raise BadInputError(
                f"import spec has keys {sorted(spec)}; it needs 'model' and 'data' and may have "
                f"{', '.join(IMPORT_SPEC_KEYS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        loss = spec.get("loss", "cross_entropy")
        if not isinstance(loss, str) or (loss not in LOSSES and ":" not in loss):
            raise BadInputError(f"import spec loss {loss!r} is not supported; choose one of {', '.join(LOSSES)} "
                                "or give the import path 'package.module:function' of a per-example loss")
        for key in ("model_kwargs", "data_kwargs"):
            if not isinstance(spec.get(key) or {}, dict):
                raise BadInputError(f"import spec {key} must be an object of keyword arguments, got "
                                    f"{spec[key]!r}")
        self._spec = {
            "model": spec["model"],
            "model_kwargs": dict(spec.get("model_kwargs") or {}),
            "data": spec["data"],
            "data_kwargs": dict(spec.get("data_kwargs") or {}),
            "loss": loss,
        }
        self._model_cls = load_object(self._spec["model"], "model")
        self._data_fn = load_object(self._spec["data"], "data")
        self._loss = LOSSES[loss] if loss in LOSSES else load_object(loss, "loss")
        if not all(callable(f) for f in (self._model_cls, self._data_fn, self._loss)):
            raise BadInputError(f"model {spec['model']!r}, data {spec['data']!r} and loss {loss!r} must be callable")
        self._splits: dict[str, Dataset] | None = None
        super().__init__(config=None)

    def per_example_loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """The spec's loss of each example: ``(batch, ...), (batch, ...) → (batch,)``."""
        losses = self._loss(output, labels)
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (output.shape[0],):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise BadInputError(f"loss {self._spec['loss']!r} returned {shape} for a batch of {output.shape[0]}; it "
                                "must return one loss per example (reduction='none')")
        return losses

    def build_model(self) -> nn.Module:
        kwargs = self._spec["model_kwargs"]
        try:
            model = seeded_model(lambda: self._model_cls(**kwargs), int(kwargs.get("seed", 0)))
        except TypeError as exc:
            raise BadInputError(f"model {self._spec['model']!r} rejected model_kwargs {kwargs}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise BadInputError(f"model {self._spec['model']!r} built a {type(model).__name__}, not a torch.nn.Module")
        return model

    def dataset(self, split: str) -> Dataset:
        self.check_split(split)
        if self._splits is None:
            self._splits = self._load_splits()
        return self._splits[split]

    def _load_splits(self) -> dict[str, Dataset]:
        path, loss = self._spec["data"], self._spec["loss"]
        try:
            raw = self._data_fn(**self._spec["data_kwargs"])
        except TypeError as exc:
            raise BadInputError(f"data {path!r} rejected data_kwargs {self._spec['data_kwargs']}: {exc}") from exc
        if not isinstance(raw, dict) or set(SPLITS) - set(raw):
            raise BadInputError(f"data {path!r} must return a dict with keys 'train' and 'val', each (inputs, labels)")
        splits = {}
        for split in SPLITS:
            try:
                inputs, labels = raw[split]
            except (TypeError, ValueError) as exc:
                raise BadInputError(f"data {path!r} split {split!r} is not an (inputs, labels) pair") from exc
            inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
            if labels.is_floating_point() and loss == "cross_entropy":
                raise BadInputError(f"data {path!r} split {split!r}: the loss cross_entropy needs integer class ids; "
                                    "for float targets use loss 'mse' or a loss function")
            if not labels.is_floating_point() and loss == "mse":
                raise BadInputError(f"data {path!r} split {split!r}: the loss mse needs floating-point targets, got "
                                    f"{labels.dtype}")
            labels = labels if labels.is_floating_point() else labels.long()
            splits[split] = Dataset(inputs=inputs, labels=labels, kind="generic", meta={"source": path})
        return splits

    def spec(self) -> dict[str, Any]:
        return _jsonable(dict(self._spec))


def seeded_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def builtin_task(name: Any) -> type[Task]:
    """The class of built-in task ``name``."""
    if not isinstance(name, str) or name not in BUILTIN_TASKS:
        raise BadInputError(f"unknown task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}")
    return load_object(BUILTIN_TASKS[name], f"built-in task {name!r}")


def make_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The default configuration of built-in task ``name`` with ``overrides`` applied, validated.

    Every value must have its field's type (numbers finite; a tuple field takes a list or
    tuple of that many values) before the task's own checks run.
    """
    config_cls = builtin_task(name).config_cls
    overrides = dict(overrides or {})
    valid = [f.name for f in fields(config_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise BadInputError(f"task {name!r} has no config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(config_cls)
    for key, value in overrides.items():
        if not _fits(hints[key], value):
            raise BadInputError(f"task {name!r}: config {key!r} must be {_words(hints[key])}, got {value!r}")
    try:
        return config_cls(**overrides)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"task {name!r}: invalid config {overrides}: {exc}") from exc


def _fits(kind: Any, value: Any) -> bool:
    """Whether ``value`` (from JSON or the command line) fits the config field type ``kind``."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value) if isinstance(value, (list, tuple)) else ()
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_fits(a, v) for a, v in zip(args, value, strict=True)))
    return True


def _words(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        plural = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}.get(args[0], "values")
        return f"a list of {plural}" if args[-1] is Ellipsis else f"a list of {len(args)} {plural}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, str(kind))


def get_task(spec: dict[str, Any]) -> Task:
    """The task a spec describes: a built-in ``{"task", "config"}`` or an import spec."""
    if not isinstance(spec, dict):
        raise BadInputError(f"a task spec must be a dict, got {type(spec).__name__}")
    if "task" in spec:
        extra = sorted(set(spec) - {"task", "config"})
        if extra:
            raise BadInputError(f"built-in task spec has unexpected key(s) {', '.join(extra)}; use 'task' and 'config'")
        config = spec.get("config") or {}
        if not isinstance(config, dict):
            raise BadInputError(f"task spec 'config' must be a dict, got {type(config).__name__}")
        return builtin_task(spec["task"])(make_config(spec["task"], config))
    if "model" in spec or "data" in spec:
        return ImportedTask(spec)
    raise BadInputError(
        f"task spec with keys {sorted(spec)} names neither a built-in task ('task': one of "
        f"{', '.join(BUILTIN_TASKS)}) nor an import spec ('model' and 'data' import paths)"
    )


def run_task(spec: Any, source: str, trust_run: bool = False) -> Task:
    """The task of a recorded run's spec; code the spec names runs only when ``trust_run``.

    A built-in task (``{"task": name, ...}``) is always rebuilt: it loads only the modules in
    ``BUILTIN_TASKS``. Any other spec names code by import path (its model, data and loss);
    importing it would run that code, so without ``trust_run`` it raises UntrustedRunError
    saying what ``source`` (e.g. ``"run runs/r1"``) wants to import and how to allow it.
    """
    if isinstance(spec, dict) and "task" in spec:
        return get_task(spec)
    if not trust_run:
        named = [f"{key} {value!r}" for key, value in _import_paths(spec)]
        shown = ", ".join(named) if named else f"the model spec {str(spec)[:80]}"
        raise UntrustedRunError(
            f"{source} is not a built-in task: rebuilding it imports and runs {shown}. Code named in a run "
            "runs only when you trust the run: pass --trust-run (from Python: trust_run=True)"
        )
    return get_task(spec)


def _import_paths(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(key path, import path) of every ``pkg.mod:name`` string in a spec."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _import_paths(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _import_paths(v, f"{key}[{i}]")
    elif isinstance(value, str) and _IMPORT_PATH.match(value):
        yield key, value
