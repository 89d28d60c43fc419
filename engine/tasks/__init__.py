"""Built-in tasks: their models, data and training loops (which record through ``engine.run``).

A spec is either ``{"task": NAME, "config": {...}}`` for a built-in task (missing config
keys take their defaults) or an import spec for a user's own model; ``engine.model.task``
turns either back into a task. This package adds what only training needs: the config
classes by name (one command-line flag per field) and the training loops.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.model.task import BUILTIN_TASKS, Dataset, ImportedTask, Task, get_task, make_config
from engine.tasks import digits_cnn, modular_addition
from engine.tasks.digits_cnn import DigitsCNNConfig, DigitsCNNTask
from engine.tasks.modular_addition import ModularAdditionConfig, ModularAdditionTask

TASKS: dict[str, type[Task]] = {
    ModularAdditionTask.name: ModularAdditionTask,
    DigitsCNNTask.name: DigitsCNNTask,
}

TRAINERS: dict[str, Callable[..., Path]] = {
    ModularAdditionTask.name: modular_addition.train,
    DigitsCNNTask.name: digits_cnn.train,
}


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


__all__ = [
    "BUILTIN_TASKS",
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
