"""Models and data with state that is not a parameter and with randomness, importable by path.

Each has a plain training loop in ``tests/test_fidelity.py`` recorded by the Recorder: an
MLP with LayerNorm and GELU, a CNN with BatchNorm, an MLP with dropout, and (with the
``hf`` extra) a Hugging Face causal LM with dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 3


class NormMLP(nn.Module):
    """Linear → LayerNorm → GELU → Linear → GELU → Linear."""

    def __init__(self, n_in: int = 6, hidden: int = 12, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(n_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.norm(self.fc1(x))))))


class BatchNormCNN(nn.Module):
    """conv → BatchNorm → ReLU → strided conv → BatchNorm → ReLU → mean over the image → linear."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.head = nn.Linear(2 * channels, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


class DropoutMLP(nn.Module):
    """Linear → tanh → dropout → Linear → tanh → dropout → Linear."""

    def __init__(self, n_in: int = 6, hidden: int = 16, p: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(n_in, hidden)
        self.drop1 = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(p)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop2(torch.tanh(self.fc2(self.drop1(torch.tanh(self.fc1(x)))))))


def _teacher_labels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classes from a random linear teacher on the flattened inputs."""
    weight = torch.randn(x[0].numel(), N_CLASSES, generator=generator)
    return (x.flatten(1) @ weight).argmax(1)


def vectors(n_train: int = 32, n_val: int = 6, n_in: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, n_in, generator=g)
    y = _teacher_labels(x, g)
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def images(n_train: int = 32, n_val: int = 6, size: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, 1, size, size, generator=g)
    y = _teacher_labels(x, g)
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def tokens(n_train: int = 48, n_val: int = 6, length: int = 8, vocab: int = 32, seed: int = 0) -> dict:
    """Sequences of a Fibonacci-like recurrence mod ``vocab`` from random starts; the label is the next token."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(n_train + n_val, length + 1, dtype=torch.int64)
    seq[:, :2] = torch.randint(0, vocab, (n_train + n_val, 2), generator=g)
    for t in range(2, length + 1):
        seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % vocab
    x, y = seq[:, :-1], seq[:, -1]
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def spec(model: str, data: str, **model_kwargs) -> dict:
    return {"model": f"tests.fidelity_models:{model}", "model_kwargs": model_kwargs,
            "data": f"tests.fidelity_models:{data}", "data_kwargs": {}, "loss": "cross_entropy"}
