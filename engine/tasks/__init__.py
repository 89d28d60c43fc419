"""Built-in tasks and the spec → task mapping used to rebuild a recorded run.

A spec is either ``{"task": NAME, "config": {...}}`` for a built-in task (missing
config keys take their defaults) or an import spec ``{"model": "pkg.mod:Class",
"model_kwargs": {...}, "data": "pkg.mod:func", "data_kwargs": {...},
"loss": "cross_entropy"}`` for a user's own model (see ``ImportedTask``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import BadInputError
from engine.tasks import digits_cnn, modular_addition
from engine.tasks.base import Dataset, ImportedTask, Task
from engine.tasks.digits_cnn import DigitsCNNConfig, DigitsCNNTask
from engine.tasks.modular_addition import ModularAdditionConfig, ModularAdditionTask

TASKS: dict[str, tuple[type[Task], type]] = {
    ModularAdditionTask.name: (ModularAdditionTask, ModularAdditionConfig),
    DigitsCNNTask.name: (DigitsCNNTask, DigitsCNNConfig),
}

TRAINERS: dict[str, Callable[..., Path]] = {
    ModularAdditionTask.name: modular_addition.train,
    DigitsCNNTask.name: digits_cnn.train,
}


def make_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The default configuration of task ``name`` with ``overrides`` applied, validated."""
    _, config_cls = _lookup(name)
    overrides = dict(overrides or {})
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise BadInputError(f"task {name!r} has no config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    try:
        return config_cls(**overrides)
    except TypeError as exc:
        raise BadInputError(f"task {name!r}: invalid config {overrides}: {exc}") from exc


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
        task_cls, _ = _lookup(spec["task"])
        return task_cls(make_config(spec["task"], config))
    if "model" in spec or "data" in spec:
        return ImportedTask(spec)
    raise BadInputError(
        f"task spec with keys {sorted(spec)} names neither a built-in task ('task': one of "
        f"{', '.join(TASKS)}) nor an import spec ('model' and 'data' import paths)"
    )


def train_task(
    name: str,
    out_dir: Path | str,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train built-in task ``name`` (defaults + ``overrides``), recording into ``out_dir``."""
    config = make_config(name, overrides)
    return TRAINERS[name](config, Path(out_dir), progress=progress, overwrite=overwrite)


def _lookup(name: Any) -> tuple[type[Task], type]:
    if name not in TASKS:
        raise BadInputError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = [
    "TASKS",
    "Dataset",
    "DigitsCNNConfig",
    "DigitsCNNTask",
    "ImportedTask",
    "ModularAdditionConfig",
    "ModularAdditionTask",
    "Task",
    "get_task",
    "make_config",
    "train_task",
]
