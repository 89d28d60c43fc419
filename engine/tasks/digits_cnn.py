"""Handwritten digits (scikit-learn's bundled 8×8 set) with a small CNN.

Mini-batch SGD with momentum, a little weight decay and a cosine learning-rate
schedule: the classic optimizer set-up whose every step the engine can split into
per-example terms. No BatchNorm and no dropout, so a recorded run replays exactly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from engine.errors import BadInputError
from engine.model.task import Dataset, Task, seeded_model
from engine.tasks.common import accuracy, deterministic_algorithms, open_recorder

N_CLASSES = 10
PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class DigitsCNNConfig:
    """Everything that determines data, model and training of the digits task."""

    val_frac: float = 0.2
    channels: tuple[int, int] = (8, 16)
    hidden: int = 64
    steps: int = 400
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        whole = all(float(c).is_integer() for c in self.channels)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels) if whole else self.channels)
        checks = [
            (0.0 < self.val_frac < 1.0, "val_frac must lie strictly between 0 and 1"),
            (
                whole and len(self.channels) == 2 and min(self.channels) > 0,
                "channels must be two positive whole numbers",
            ),
            (self.hidden > 0 and self.batch_size > 0, "hidden and batch_size must be positive"),
            (self.steps >= 1 and self.eval_every >= 1, "steps and eval_every must be at least 1"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be positive and weight_decay non-negative"),
            (0 <= self.momentum < 1, "momentum must lie in [0, 1)"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(f"digits-cnn config: {message} (got {self})")


@functools.cache
def all_digits() -> tuple[Tensor, Tensor]:
    """All 1797 images ``(n, 1, 8, 8)`` scaled to [0, 1] and their labels ``(n,)``, in file order."""
    from sklearn.datasets import load_digits  # 140 MiB and 2 s to import: only where digits are read

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX
    return images, torch.tensor(digits.target, dtype=torch.int64)


class DigitsCNN(nn.Module):
    """conv1 → ReLU → conv2 → ReLU → flatten → fc1 → ReLU → fc2; ``(batch, 1, 8, 8)`` → ``(batch, 10)``."""

    def __init__(self, channels: tuple[int, int] = (8, 16), hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], kernel_size=3)  # 8×8 → 6×6
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3)  # 6×6 → 4×4
        self.fc1 = nn.Linear(channels[1] * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        x = F.relu(self.conv1(images))  # (batch, c1, 6, 6)
        x = F.relu(self.conv2(x))  # (batch, c2, 4, 4)
        x = F.relu(self.fc1(x.flatten(1)))  # (batch, hidden)
        return self.fc2(x)  # (batch, 10)


class DigitsCNNTask(Task):
    """The 1797 scikit-learn digits, a seeded ``val_frac`` held out."""

    name = "digits-cnn"
    config_cls = DigitsCNNConfig
    config: DigitsCNNConfig

    def __init__(self, config: DigitsCNNConfig | None = None) -> None:
        super().__init__(config or DigitsCNNConfig())

    def build_model(self) -> DigitsCNN:
        c = self.config
        model = seeded_model(lambda: DigitsCNN(c.channels, c.hidden), c.seed)
        assert isinstance(model, DigitsCNN)
        return model

    def dataset(self, split: str) -> Dataset:
        self.check_split(split)
        images, labels = all_digits()
        n = labels.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed))
        n_val = round(self.config.val_frac * n)
        ids = (order[n_val:] if split == "train" else order[:n_val]).sort().values
        return Dataset(inputs=images[ids], labels=labels[ids], kind="digits", meta={"classes": N_CLASSES})

    def layer_of(self, tensor_name: str) -> str:
        """``conv1``, ``conv2``, ``fc1`` or ``fc2``."""
        return tensor_name.split(".")[0]


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Dataset ids of each step's batch: a seeded reshuffle every epoch, the last partial batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    out: list[Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=generator)
        out.extend(order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return out[:steps]


def make_scheduler(optimizer: torch.optim.Optimizer, config: DigitsCNNConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing to 0 over ``steps``, a ×0.3 drop every third of the run, or a constant rate."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, config.steps // 3), gamma=0.3)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def fit(
    config: DigitsCNNConfig, out_dir: Path | None = None, progress: bool = True, overwrite: bool = False
) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train; record into ``out_dir`` when given. Returns the model and per-step metrics.

    ``batch_loss`` is the loss of the step's mini-batch; ``train_*`` and ``val_*`` are
    measured on the whole split at the parameters ``θ_s`` of the step, every
    ``eval_every`` steps and at the last step (``nan`` otherwise).
    """
    task = DigitsCNNTask(config)
    train, val = task.dataset("train"), task.dataset("val")
    model = task.build_model()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    scheduler = make_scheduler(optimizer, config)
    keys = ("batch_loss", "train_loss", "train_acc", "val_loss", "val_acc")
    history: dict[str, list[float]] = {k: [] for k in keys}
    with deterministic_algorithms(), open_recorder(task, model, optimizer, train, out_dir, overwrite) as rec:
        step_batches = batches(len(train), config.batch_size, config.steps, config.seed)
        for step, ids in enumerate(tqdm(step_batches, desc=task.name, disable=not progress)):
            metrics = {}
            if step % config.eval_every == 0 or step == config.steps - 1:
                metrics = _evaluate(task, model, train, val)
            optimizer.zero_grad()
            loss = task.per_example_loss(model(train.inputs[ids]), train.labels[ids]).mean()
            loss.backward()
            if rec is not None:
                rec.batch(ids)
            optimizer.step()
            scheduler.step()
            metrics["batch_loss"] = float(loss.detach())
            if rec is not None:
                rec.log(**metrics)
            for key, values in history.items():
                values.append(metrics.get(key, math.nan))
    return model, history


def train(config: DigitsCNNConfig, out_dir: Path, progress: bool = True, overwrite: bool = False) -> Path:
    """Train with the Recorder attached and return the run directory."""
    fit(config, Path(out_dir), progress=progress, overwrite=overwrite)
    return Path(out_dir)


def _evaluate(task: Task, model: nn.Module, train: Dataset, val: Dataset) -> dict[str, float]:
    metrics = {}
    with torch.no_grad():
        for split, data in (("train", train), ("val", val)):
            logits = model(data.inputs)  # (n, 10)
            metrics[f"{split}_loss"] = float(task.per_example_loss(logits, data.labels).mean())
            metrics[f"{split}_acc"] = accuracy(logits, data.labels)
    return metrics


__all__ = ["DigitsCNN", "DigitsCNNConfig", "DigitsCNNTask", "fit", "train"]
