"""``ScalarOps``: tensor–number arithmetic with the same values, and forward mode without
PyTorch's Python zero-tangent kernels (nor the evaluator's forward passes)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap

from engine.decompose import ExplainConfig, explain
from engine.decompose.scalar_ops import ScalarOps
from engine.run.record import Recorder

FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "x * 1.7": lambda x: x * 1.7,
    "1.7 * x": lambda x: 1.7 * x,
    "x * 3": lambda x: x * 3,
    "torch.mul(x, 1.7)": lambda x: torch.mul(x, 1.7),
    "torch.mul(1.7, x)": lambda x: torch.mul(1.7, x),
    "x.mul(1.7)": lambda x: x.mul(1.7),
    "x / 1.7": lambda x: x / 1.7,
    "torch.div(x, 1.7)": lambda x: torch.div(x, 1.7),
    "x + 1.7": lambda x: x + 1.7,
    "1.7 + x": lambda x: 1.7 + x,
    "x - 1.7": lambda x: x - 1.7,
    "1.7 - x": lambda x: 1.7 - x,
    "x.sub(1.7)": lambda x: x.sub(1.7),
    "x *= 1.7": lambda x: _inplace(x, "__imul__"),
    "x /= 1.7": lambda x: _inplace(x, "__itruediv__"),
    "x += 1.7": lambda x: _inplace(x, "__iadd__"),
    "x -= 1.7": lambda x: _inplace(x, "__isub__"),
    "x.mul_(1.7)": lambda x: _inplace(x, "mul_"),
}


def _inplace(x: torch.Tensor, method: str) -> torch.Tensor:
    y = x.clone()  # in place on a copy, not on the function input
    return getattr(y, method)(1.7)


@contextmanager
def python_kernels() -> Iterator[list[str]]:
    """Names of the ``torch._refs`` functions called inside the block."""
    called: list[str] = []

    def trace(frame, event, arg):
        if event == "call" and "torch/_refs/" in frame.f_code.co_filename.replace("\\", "/"):
            called.append(frame.f_code.co_name)

    sys.setprofile(trace)
    try:
        yield called
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_tangents_are_unchanged(form, dtype):
    f = FORMS[form]
    x, v = torch.randn(5, 3, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    plain, d_plain = f(x.clone()), jvp(f, (x,), (v,))[1]
    with ScalarOps():
        routed = f(x.clone())
        with python_kernels() as called:
            d_routed = jvp(f, (x,), (v,))[1]
    assert routed.dtype == plain.dtype and torch.equal(routed, plain)
    assert torch.equal(d_routed, d_plain)
    assert called == []


def test_forward_mode_without_the_mode_takes_the_python_kernels():
    """The reason for the mode: if this starts failing, PyTorch no longer needs it."""
    x, v = torch.randn(5, 3), torch.randn(5, 3)
    with python_kernels() as called:
        jvp(lambda z: z * 1.7, (x,), (v,))
    assert called


def test_other_operands_run_as_called():
    ints, flags = torch.arange(6), torch.tensor([True, False])
    with ScalarOps():
        assert torch.equal(ints * 2, torch.arange(0, 12, 2)) and (ints * 2).dtype == torch.int64
        assert (ints / 2).dtype == torch.float32  # true division of integers promotes as usual
        assert torch.equal(flags * True, flags)
        x = torch.randn(4)
        assert torch.equal(x * torch.tensor(2.0), x * 2.0)
        assert torch.equal(torch.add(x, 1.0, alpha=3), x + 3.0)
        assert torch.equal(vmap(lambda row: row * 0.5)(torch.ones(3, 2)), torch.full((3, 2), 0.5))


class ScaledNet(nn.Module):
    """A small transformer-style classifier: scaled embedding, attention with a scaled score,
    biased layers, a ReLU MLP and log-probabilities read at the last position."""

    def __init__(self, n_token: int = 7, d: int = 8, n_out: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.d = d
        self.emb = nn.Embedding(n_token, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.up = nn.Linear(d, 16)
        self.down = nn.Linear(16, d)
        self.out = nn.Linear(d, n_out, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) * math.sqrt(self.d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + (q @ k.transpose(1, 2) / math.sqrt(self.d)).softmax(-1) @ v
        x = x + self.down(F.relu(self.up(x)))
        return self.out(x[:, -1]).log_softmax(-1)


def scaled_data(n_train: int = 32, n_val: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (n_train + n_val, 3), generator=g)
    y = x.sum(1) % 5
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}


def test_an_adaptive_explanation_stays_out_of_the_python_kernels(tmp_path):
    model, (x, y) = ScaledNet(), scaled_data()["train"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    spec = {"model": "tests.test_scalar_ops:ScaledNet", "model_kwargs": {}, "data": "tests.test_scalar_ops:scaled_data",
            "data_kwargs": {}, "loss": "cross_entropy"}
    g = torch.Generator().manual_seed(1)
    with Recorder(model, optimizer, tmp_path / "run", model_spec=spec, train_data=(x, y)) as rec:
        for _ in range(4):
            ids = torch.randperm(len(y), generator=g)[:8]
            optimizer.zero_grad()
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            rec.batch(ids)
            optimizer.step()
    config = ExplainConfig(test_split="val", quantity="logits", views=("components",), dtype="float64", engine="jvp")
    with python_kernels() as called:
        result = explain(tmp_path / "run", config, progress=False, trust_run=True)
    assert result.max_rel_residual <= 1e-12
    assert called == []
