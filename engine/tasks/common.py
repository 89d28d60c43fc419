"""What the built-in tasks' training loops share: determinism, accuracy and the recorder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.model.task import Dataset, Task
from engine.run.record import Recorder


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms(True)`` and restore the previous mode after.

    Filling fresh memory with NaN (a debugging aid of deterministic mode) is switched off:
    no operation here reads uninitialised memory, and the fill costs a sixth of a step.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(dim=-1) == labels).double().mean())


def open_recorder(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Dataset,
    out_dir: Path | None,
    overwrite: bool = False,
) -> AbstractContextManager[Any]:
    """A ``Recorder`` writing the run into ``out_dir``, or a no-op context yielding ``None``."""
    if out_dir is None:
        return nullcontext(None)
    return Recorder(
        model,
        optimizer,
        out_dir,
        model_spec=task.spec(),
        train_data=(train.inputs, train.labels),
        overwrite=overwrite,
    )
