"""Small models, data and a hand-written training loop shared by the tests.

The model and data functions are importable by path (``tests.helpers:TinyMLP``), so runs
recorded here can be rebuilt by ``engine.tasks.get_task`` exactly like a user's own code.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.run.record import Recorder


class TinyMLP(nn.Module):
    def __init__(self, n_in: int = 4, hidden: int = 6, n_out: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(n_in, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def tiny_data(n_train: int = 24, n_val: int = 8, n_in: int = 4, n_out: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, n_in, generator=g)
    y = torch.randint(0, n_out, (n_train + n_val,), generator=g)
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def tiny_spec(**model_kwargs) -> dict:
    return {"model": "tests.helpers:TinyMLP", "model_kwargs": model_kwargs,
            "data": "tests.helpers:tiny_data", "data_kwargs": {}, "loss": "cross_entropy"}


def record_tiny_run(
    out: Path,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int = 12,
    batch_size: int = 8,
    clip: float | None = None,
    scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    weighted: bool = False,
    chunk_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Train TinyMLP with a plain loop and the Recorder; return the run directory."""
    model = TinyMLP()
    if dtype == torch.float64:
        model = model.double()
    x, y = tiny_data()["train"]
    x = x.to(dtype)
    optimizer = make_optimizer(model)
    sched = scheduler(optimizer) if scheduler else None
    g = torch.Generator().manual_seed(1)
    with Recorder(model, optimizer, out, model_spec=tiny_spec(), train_data=tiny_data()["train"],
                  chunk_steps=chunk_steps, dtype=dtype) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:batch_size]
            optimizer.zero_grad()
            losses = F.cross_entropy(model(x[ids]), y[ids], reduction="none")
            if weighted:
                w = torch.linspace(0.5, 1.5, len(ids), dtype=losses.dtype) / len(ids)
                (losses * w).sum().backward()
                rec.batch(ids, weights=w)
            else:
                losses.mean().backward()
                rec.batch(ids)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if sched is not None:
                sched.step()
            rec.log(train_loss=float(losses.detach().mean()))
    return out


# ---------------------------------------------------------------------------------- checkpoint series
VOCAB = 13


def tiny_gpt2(seed: int = 0, n_embd: int = 8, n_layer: int = 1):
    """A GPT-2 of a few hundred parameters (``VOCAB`` tokens, sequences of up to 10)."""
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=10, n_embd=n_embd, n_layer=n_layer, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def write_series(folder: Path, steps=(0, 10, 30), scale: float = 0.3, **model_kwargs) -> Path:
    """``checkpoint-<step>`` folders of a tiny GPT-2 whose weights move by random steps."""
    model = tiny_gpt2(**model_kwargs)
    g = torch.Generator().manual_seed(1)
    for i, step in enumerate(steps):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g) * p.std().clamp_min(0.05))
        model.save_pretrained(folder / f"checkpoint-{step}")
    return folder


def write_inputs(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def foreign_payloads(seed: int) -> list[bytes]:
    """Bytes a loader meets in the wild: random content behind every magic number ``torch.load``
    dispatches on (pickle protocols 2-5, zip), and a real ``torch.save`` file cut short anywhere."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    torch.save([{"w": torch.arange(6.0).reshape(2, 3)}], buffer)
    real = buffer.getvalue()
    heads = [b"\x80" + bytes([protocol]) for protocol in (2, 3, 4, 5)] + [b"PK\x03\x04"]
    payloads = [head + rng.bytes(int(rng.integers(0, 600))) for head in heads for _ in range(40)]
    payloads += [real[:int(cut)] for cut in rng.integers(4, len(real) - 1, size=40)]
    return payloads
