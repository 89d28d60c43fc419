"""A series of checkpoints read as a run without optimizer state or batches (MATH.md §7).

Checkpoints ``θ_{c_0}, θ_{c_1}, …`` at training steps ``c_0 < c_1 < …`` come from a folder of
``checkpoint-<step>/`` folders (Hugging Face ``Trainer`` or ``save_pretrained``: config.json
and safetensors), or from a list of state-dict files (``.safetensors``, ``.pt``/``.pth``/``.bin``
read with ``weights_only=True``) or ``save_pretrained`` folders, in training order.
``find_checkpoints`` finds them and their steps (from the names, or given) and checks the
order; ``CheckpointSeries.open`` checks every checkpoint against the model — a missing,
unknown or misshapen tensor is refused by name — and reads the buffers, which must agree
across the series (held fixed along the path; a buffer term between checkpoints is not split
off).

``CheckpointSeries`` offers what the decomposition reads of a ``History``: interval ``k`` is
"step" ``k`` of the path identity, from checkpoint ``k`` to ``k + 1``. Two checkpoints are held
in memory at a time; each is hashed as it is read (``digest``), which keys resumption.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from engine.errors import BadInputError, CorruptRunError, unreadable_reason
from engine.model.task import Dataset, Task
from engine.run.history import GroupHParams, StepRecord

CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TRAINER_STATE = "trainer_state.json"
DATA_AXIS_REASON = ("a checkpoint series has no per-step batches or optimizer state; record the training loop "
                    "with engine.run.record.Recorder to split changes by training example")
_NO_HPARAMS = (GroupHParams(lr=math.nan, weight_decay=math.nan, beta1=None, beta2=None, eps=None, momentum=None,
                            dampening=None, nesterov=False, maximize=False, amsgrad=False, decoupled=False),)
CACHED = 2  # checkpoints held in memory: the two ends of one interval


# ------------------------------------------------------------------------------------ finding
@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: its training step, its folder or file, its weight files and config."""

    step: int
    path: Path
    files: tuple[Path, ...]
    config: Path | None = None  # config.json of a Hugging Face folder

    @property
    def label(self) -> str:
        return self.path.name


def find_checkpoints(sources: Sequence[str | Path], steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """The checkpoints of ``sources`` in training order.

    One folder holding ``checkpoint-<step>/`` folders gives those, ordered by step. Otherwise
    every source is a checkpoint (a weight file, or a folder with ``model.safetensors`` or
    ``pytorch_model.bin``) listed in training order; its step is given in ``steps`` or read from
    its name (``checkpoint-200``, ``step_200.pt``: the last number in the name).
    """
    paths = [Path(s) for s in sources]
    for path in paths:
        if not path.exists():
            raise BadInputError(f"checkpoint {path} does not exist")
    if len(paths) == 1 and paths[0].is_dir() and not _weights_in(paths[0]):
        folders = [p for p in paths[0].iterdir() if p.is_dir() and CHECKPOINT_FOLDER.match(p.name)]
        if not folders:
            raise BadInputError(f"{paths[0]} holds neither checkpoint-<step> folders nor model weights")
        if steps is not None:
            raise BadInputError("steps are read from the checkpoint-<step> folder names; leave out --steps")
        found = sorted(((int(CHECKPOINT_FOLDER.match(p.name).group(1)), p) for p in folders), key=lambda x: x[0])
        for (a, first), (b, second) in itertools.pairwise(found):
            if a == b:
                raise BadInputError(f"{first.name} and {second.name} are both checkpoints of step {a}")
        checkpoints = [_checkpoint(step, path) for step, path in found]
    else:
        if steps is None:
            steps = [_step_in_name(p) for p in paths]
        elif len(steps) != len(paths):
            raise BadInputError(f"{len(steps)} steps given for {len(paths)} checkpoints; give one step per checkpoint")
        checkpoints = [_checkpoint(int(step), path) for step, path in zip(steps, paths, strict=True)]
        for first, second in itertools.pairwise(checkpoints):
            if second.step <= first.step:
                raise BadInputError(
                    f"checkpoints are not in training order: {first.label} (step {first.step}) is listed before "
                    f"{second.label} (step {second.step}); list them by increasing step")
    if len(checkpoints) < 2:
        raise BadInputError(f"a checkpoint series needs at least two checkpoints, found {len(checkpoints)}")
    if checkpoints[0].step < 0:
        raise BadInputError(f"step {checkpoints[0].step} of {checkpoints[0].label} is negative")
    return checkpoints


def _step_in_name(path: Path) -> int:
    name = path.name if path.is_dir() else path.stem
    numbers = re.findall(r"\d+", name)
    if not numbers:
        raise BadInputError(f"the name of {path} holds no step number; give the steps with --steps")
    return int(numbers[-1])


def _weights_in(folder: Path) -> tuple[Path, ...]:
    """The weight files of a ``save_pretrained`` folder (sharded ones through their index)."""
    for index in HF_INDEXES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BadInputError(f"{folder / index} is not a shard index with a 'weight_map': {exc}") from exc
            return tuple(folder / name for name in sorted(set(weight_map.values())))
    return tuple(folder / name for name in HF_WEIGHTS if (folder / name).is_file())[:1]


def _checkpoint(step: int, path: Path) -> Checkpoint:
    if path.is_dir():
        files = _weights_in(path)
        if not files:
            raise BadInputError(f"{path} has no {' or '.join(HF_WEIGHTS)}")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BadInputError(f"{path} lacks the weight file {missing[0].name} named by its shard index")
        config = path / "config.json"
        return Checkpoint(step, path, files, config if config.is_file() else None)
    if path.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise BadInputError(f"{path} is not a state-dict file ({', '.join(STATE_DICT_SUFFIXES)}) or a checkpoint "
                            "folder")
    return Checkpoint(step, path, (path,))


# ------------------------------------------------------------------------------------ reading
def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def load_plain(source: Any, **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code in the file runs), quiet about pickle
    protocols the file was not written with (foreign files carry any)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)


def _torch_state(data: bytes, path: Path) -> dict[str, Tensor]:
    """A ``torch.save``-d state dict (also nested as ``state_dict`` or ``model``), read with
    ``weights_only=True``: no code in the file runs."""
    try:
        state = load_plain(io.BytesIO(data))
    except Exception as exc:  # the unpickler fails on foreign bytes with any error type
        raise CorruptRunError(f"{path} cannot be read as a PyTorch state dict ({unreadable_reason(exc)}); the "
                              "file is truncated or foreign") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) == 1:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CorruptRunError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _read_file(path: Path, digest: Any | None = None) -> dict[str, Tensor]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptRunError(f"{path} cannot be read: {exc}") from exc
    if digest is not None:
        digest.update(data)
    if not _is_safetensors(path):
        return _torch_state(data, path)
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise CorruptRunError(f"{path} cannot be read as safetensors ({exc}); the file is truncated or foreign") \
            from exc


def _shapes(path: Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name → (shape, floating point) of every tensor in a weight file (safetensors: header only)."""
    if not _is_safetensors(path):
        return {k: (tuple(v.shape), v.is_floating_point()) for k, v in _read_file(path).items()}
    try:
        with safe_open(str(path), "pt") as handle:
            out = {}
            for key in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                part = handle.get_slice(key)
                out[key] = (tuple(part.get_shape()), part.get_dtype() in ("F16", "BF16", "F32", "F64"))
            return out
    except (SafetensorError, OSError) as exc:
        raise CorruptRunError(f"{path} cannot be read as safetensors ({exc}); the file is truncated or foreign") \
            from exc


def _buffer_values(path: Path, names: list[str]) -> dict[str, Tensor]:
    if not names:
        return {}
    if not _is_safetensors(path):
        state = _read_file(path)
        return {n: state[n] for n in names}
    with safe_open(str(path), "pt") as handle:
        return {n: handle.get_tensor(n) for n in names}


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Reference:
    """What a checkpoint of the model must hold: its parameters (names and shapes, model order),
    tied aliases of parameters, persistent buffers, and entries the model class ignores."""

    params: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    buffers: dict[str, tuple[int, ...]]
    ignored: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, ignored: tuple[str, ...] = ()) -> Reference:
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        owner = {id(p): n for n, p in model.named_parameters()}
        state = model.state_dict(keep_vars=True)
        aliases = {k: owner[id(v)] for k, v in state.items() if k not in params and id(v) in owner}
        buffers = {k: tuple(v.shape) for k, v in state.items() if k not in params and k not in aliases}
        return cls(params, aliases, buffers, ignored)

    def ignores(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignored)


# ------------------------------------------------------------------------------------ the series
class CheckpointSeries:
    """Checkpoints checked against a model, read two at a time. Open with ``CheckpointSeries.open``.

    Interval ``k`` (``0 ≤ k < num_steps``) runs from checkpoint ``k`` to ``k + 1``; ``steps``
    are the training steps of the checkpoints. The attributes the decomposition reads of a
    ``History`` (``param_names``, ``param_shapes``, ``num_steps``, ``params``, ``iter_steps``,
    ``optimizer_family``, ``data_axis_reason``, ``manifest``, ``model_spec``, ``path``, and the
    buffer accessors, empty: buffers the checkpoints share are loaded into the model and held
    fixed, ``saved_buffers``) are here.
    """

    def __init__(self, checkpoints: list[Checkpoint], reference: Reference, buffers: dict[str, Tensor],
                 model_spec: dict[str, Any], notes: list[str]) -> None:
        self.checkpoints = tuple(checkpoints)
        self.reference = reference
        self.saved_buffers = buffers
        self.notes = notes
        self.path = checkpoints[0].path.parent
        self.param_names: list[str] = list(reference.params)
        self.param_shapes: dict[str, tuple[int, ...]] = dict(reference.params)
        self.manifest = {
            "model": model_spec,
            "optimizer": {"class": "unknown", "family": "none", "groups": [], "data_axis_reason": DATA_AXIS_REASON},
            "data": {"fingerprint": None},
        }
        self._cache: OrderedDict[int, tuple[dict[str, Tensor], str]] = OrderedDict()

    @classmethod
    def open(cls, checkpoints: list[Checkpoint], model: nn.Module, model_spec: dict[str, Any],
             ignored: tuple[str, ...] = ()) -> CheckpointSeries:
        """Check every checkpoint's tensors against ``model`` (headers only where the format
        allows) and read the buffers; raises ``BadInputError`` naming the checkpoint and tensor."""
        reference = Reference.of(model, ignored)
        saved_buffers: dict[str, Tensor] | None = None
        first = checkpoints[0]
        for checkpoint in checkpoints:
            found = {}  # name → ((shape, floating point), file)
            for file in checkpoint.files:
                found.update({k: (v, file) for k, v in _shapes(file).items()})
            _check_tensors(checkpoint, found, reference)
            values = {}
            for file in checkpoint.files:
                names = [k for k in reference.buffers if k in found and found[k][1] == file]
                values.update(_buffer_values(file, names))
            if saved_buffers is None:
                saved_buffers = values
            _check_buffers(first, saved_buffers, checkpoint, values)
        notes = []
        missing = [n for n in reference.buffers if n not in saved_buffers]
        if missing:
            notes.append(f"buffers {', '.join(missing)} are not in the checkpoints: the model's own values are used")
        return cls(checkpoints, reference, saved_buffers, model_spec, notes)

    # -- facts
    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(c.step for c in self.checkpoints)

    @property
    def num_steps(self) -> int:
        """Number of intervals (checkpoints − 1)."""
        return len(self.checkpoints) - 1

    @property
    def model_spec(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def optimizer_family(self) -> str:
        return "none"

    @property
    def data_axis_reason(self) -> str:
        return DATA_AXIS_REASON

    @property
    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """No buffer changes along a series (the model holds the shared ones)."""
        return {}

    @property
    def changing_buffers(self) -> list[str]:
        return []

    @property
    def training_forward(self) -> None:
        return None

    def initial_buffers(self) -> dict[str, Tensor]:
        return {}

    def buffers(self, k: int) -> dict[str, Tensor]:
        return {}

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes.values())

    # -- checkpoints
    def params(self, k: int) -> dict[str, Tensor]:
        """The parameters of checkpoint ``k`` (``0 ≤ k ≤ num_steps``), by name in model order."""
        return self._load(k)[0]

    def digest(self, k: int) -> str:
        """SHA-256 of checkpoint ``k``'s weight files."""
        return self._load(k)[1]

    def iter_steps(self, start: int = 0, stop: int | None = None) -> Iterator[StepRecord]:
        """One record per interval ``start ≤ k < stop``: θ of its first checkpoint and the change."""
        stop = self.num_steps if stop is None else stop
        if not 0 <= start <= stop <= self.num_steps:
            raise IndexError(f"intervals [{start}, {stop}) are outside the series' 0..{self.num_steps}")
        for k in range(start, stop):
            before, after = self.params(k), self.params(k + 1)
            yield StepRecord(
                step=k, params=before, update={n: after[n] - before[n] for n in self.param_names},
                batch_ids=torch.zeros(0, dtype=torch.int64), batch_weights=torch.zeros(0, dtype=torch.float64),
                hparams=_NO_HPARAMS, second_moment=None, adam_step=None,
                active=dict.fromkeys(self.param_names, True), clip_scale=1.0,
                buffers={}, buffers_after={}, rng=None,
            )

    def trainer_log(self) -> pl.DataFrame:
        """``step, train_loss, lr`` logged by a Hugging Face ``Trainer`` (``trainer_state.json`` of
        the last checkpoint folder that has one); empty when there is none."""
        schema = {"step": pl.Int64, "train_loss": pl.Float64, "lr": pl.Float64}
        for checkpoint in reversed(self.checkpoints):
            path = checkpoint.path / TRAINER_STATE
            if checkpoint.path.is_dir() and path.is_file():
                try:
                    history = json.loads(path.read_text()).get("log_history", [])
                except (OSError, ValueError, AttributeError) as exc:
                    raise CorruptRunError(f"{path} cannot be read as JSON: {exc}") from exc
                rows = [{"step": int(r["step"]), "train_loss": float(r["loss"]),
                         "lr": float(r["learning_rate"]) if "learning_rate" in r else None}
                        for r in history if isinstance(r, dict) and "loss" in r and "step" in r]
                return pl.DataFrame(rows, schema=schema)
        return pl.DataFrame(schema=schema)

    def _load(self, k: int) -> tuple[dict[str, Tensor], str]:
        if not 0 <= k <= self.num_steps:
            raise IndexError(f"checkpoint {k} is outside the series' 0..{self.num_steps}")
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        checkpoint = self.checkpoints[k]
        digest = hashlib.sha256()
        tensors: dict[str, Tensor] = {}
        for file in checkpoint.files:
            tensors.update(_read_file(file, digest))
        by_alias = {alias: name for alias, name in self.reference.aliases.items() if alias in tensors}
        params = {}
        for name in self.param_names:
            value = tensors.get(name)
            if value is None:
                value = next(tensors[a] for a, n in by_alias.items() if n == name)
            if tuple(value.shape) != self.param_shapes[name]:
                raise CorruptRunError(f"{checkpoint.label}: tensor {name!r} has shape {tuple(value.shape)}, the "
                                      f"model's is {self.param_shapes[name]}; the file changed while being read")
            if not torch.isfinite(value).all():
                raise CorruptRunError(f"{checkpoint.label}: tensor {name!r} contains NaN or Inf; training diverged "
                                      "or the file is damaged")
            params[name] = value
        self._cache[k] = (params, digest.hexdigest())
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return self._cache[k]


def _check_tensors(checkpoint: Checkpoint, found: dict[str, tuple[tuple[tuple[int, ...], bool], Path]],
                   reference: Reference) -> None:
    """Every parameter present (itself or a tied alias) with the model's shape; nothing unknown."""
    for name, shape in reference.params.items():
        keys = [name, *[a for a, n in reference.aliases.items() if n == name]]
        present = [k for k in keys if k in found]
        if not present:
            raise BadInputError(f"{checkpoint.label} lacks tensor {name!r} of the model")
        (got, floating), _ = found[present[0]]
        if got != shape:
            raise BadInputError(f"{checkpoint.label}: tensor {name!r} has shape {got}, the model's is {shape}; the "
                                "checkpoints are of a different architecture")
        if not floating:
            raise BadInputError(f"{checkpoint.label}: tensor {name!r} is not floating point")
    for key, ((got, _), _) in found.items():
        if key in reference.params or key in reference.aliases:
            continue
        if key in reference.buffers:
            if got != reference.buffers[key]:
                raise BadInputError(f"{checkpoint.label}: buffer {key!r} has shape {got}, the model's is "
                                    f"{reference.buffers[key]}")
            continue
        if not reference.ignores(key):
            raise BadInputError(f"{checkpoint.label} has tensor {key!r}, which the model does not have; the "
                                "checkpoints are of a different architecture")


def _check_buffers(first: Checkpoint, reference: dict[str, Tensor], checkpoint: Checkpoint,
                   values: dict[str, Tensor]) -> None:
    """Buffers are held fixed along the path: each must be the same in every checkpoint."""
    for name in sorted(set(reference) | set(values)):
        a, b = reference.get(name), values.get(name)
        if a is None or b is None:
            raise BadInputError(f"buffer {name!r} is in {(first if b is None else checkpoint).label} but not in "
                                f"{(checkpoint if b is None else first).label}")
        if a.shape != b.shape or not torch.equal(a, b):
            raise BadInputError(
                f"buffer {name!r} differs between {first.label} and {checkpoint.label}: the path between checkpoints "
                "holds buffers fixed and has no buffer term; explain checkpoints whose buffers agree")


# ------------------------------------------------------------------------------------ the task
class SeriesTask(Task):
    """The task a checkpoint series is explained with: one model (the checkpoints' buffers
    loaded), the explained inputs as its ``val`` split, the layer labels and example texts."""

    name = "checkpoint-series"

    def __init__(self, model: nn.Module, inputs: Dataset, spec: dict[str, Any], layer_of: Callable[[str], str],
                 texts: Sequence[str] | None = None) -> None:
        super().__init__(config=None)
        self._model = model
        self._inputs = inputs
        self._spec = spec
        self._layer_of = layer_of
        self._texts = None if texts is None else tuple(texts)

    @property
    def language_model(self) -> bool:
        """Whether the inputs are token sequences (with texts) rather than a task's examples."""
        return self._texts is not None

    def render(self, i: int) -> str:
        """The text of explained input ``i``."""
        return self._texts[i] if self._texts is not None else self._inputs.render(i)

    def build_model(self) -> nn.Module:
        """The one model of the series (parameters are always handed in by name)."""
        return self._model

    def dataset(self, split: str) -> Dataset:
        self.check_split(split)
        if split != "val":
            raise BadInputError(f"a checkpoint series has no {split!r} split: {DATA_AXIS_REASON}")
        return self._inputs

    def layer_of(self, tensor_name: str) -> str:
        return self._layer_of(tensor_name)

    def spec(self) -> dict[str, Any]:
        return self._spec


def load_buffers(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    """Copy the checkpoints' buffers into ``model``."""
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
