"""Property: for any small model, optimizer, schedule and batch size, trained with unmodified
torch.optim and recorded by the Recorder, the influences sum to g(θ_N) − g(θ_0).

The truth is two plain forward passes of the rebuilt model; the reconstruction is the sum of
the engine's per-step reconstructions (= Σ of all component influences). Float32 must agree
to 1e-5 and float64 to 1e-10 of the largest change; where the optimizer splits into
per-example terms, the data view plus the optimizer residual must equal the components.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine.decompose import ExplainConfig, explain
from engine.run.history import History
from engine.run.record import Recorder
from engine.tasks import get_task
from tests.test_decompose import N_IN, N_OUT, data

ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}


class PropMLP(nn.Module):
    def __init__(self, hidden: int = 6, depth: int = 1, activation: str = "tanh", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        sizes = [N_IN] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(sizes[-1], N_OUT)
        self.activation = activation

    def forward(self, x):
        for layer in self.layers:
            x = ACTIVATIONS[self.activation](layer(x))
        return self.head(x)


class TinyTransformer(nn.Module):
    """One attention block over the input features as a sequence of scalar tokens."""

    def __init__(self, width: int = 8, activation: str = "gelu", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(1, width)
        self.pos = nn.Parameter(torch.randn(N_IN, width) * 0.3)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU() if activation == "gelu" else nn.ReLU(),
                                 nn.Linear(2 * width, width))
        self.unembed = nn.Linear(width, N_OUT)

    def forward(self, x):
        h = self.embed(x[:, :, None]) + self.pos            # (batch, seq, width)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        pattern = (q @ k.transpose(1, 2) / math.sqrt(h.shape[-1])).softmax(-1)
        h = h + pattern @ v
        h = h + self.mlp(self.norm(h))
        return self.unembed(h[:, -1])


OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr * 10),
    "sgd-momentum": lambda p, lr: torch.optim.SGD(p, lr=lr * 5, momentum=0.9),
    "sgd-dampening": lambda p, lr: torch.optim.SGD(p, lr=lr * 5, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "sgd-nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr * 5, momentum=0.9, nesterov=True, weight_decay=0.02),
    "sgd-wd": lambda p, lr: torch.optim.SGD(p, lr=lr * 10, weight_decay=0.05),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adam-l2": lambda p, lr: torch.optim.Adam(p, lr=lr, weight_decay=0.1),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.5, betas=(0.9, 0.98)),
    "adamw-amsgrad": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1, amsgrad=True),
}
SCHEDULES = {
    "constant": None,
    "step": lambda o, n: torch.optim.lr_scheduler.StepLR(o, step_size=max(1, n // 3), gamma=0.5),
    "cosine": lambda o, n: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n),
    "onecycle": lambda o, n: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], total_steps=n),
}


def record(out: Path, model_spec: dict, optimizer: str, schedule: str, lr: float, batch: int, steps: int,
           clip: bool) -> History:
    task = get_task(model_spec)
    net = task.build_model()
    x, y = data()["train"]
    opt = OPTIMIZERS[optimizer](net.parameters(), lr)
    sched = SCHEDULES[schedule](opt, steps) if SCHEDULES[schedule] else None
    g = torch.Generator().manual_seed(steps * 31 + batch)
    with Recorder(net, opt, out, model_spec=model_spec, train_data=data()["train"]) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:batch]
            opt.zero_grad()
            F.cross_entropy(net(x[ids]), y[ids]).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            rec.batch(ids)
            opt.step()
            if sched is not None:
                sched.step()
    return History.open(out)


def truth(history: History, dtype: torch.dtype) -> np.ndarray:
    task = get_task(history.model_spec)
    net = task.build_model().to(dtype).eval()
    x = task.dataset("val").inputs.to(dtype)
    values = []
    for step in (0, history.num_steps):
        net.load_state_dict({k: v.to(dtype) for k, v in history.params(step).items()})
        with torch.no_grad():
            values.append(net(x).double().numpy())
    return values[1] - values[0]


def summed(frame: pl.DataFrame, column: str) -> np.ndarray:
    grouped = frame.group_by("test", "output").agg(pl.col(column).sum()).sort("test", "output")
    return grouped[column].to_numpy().reshape(grouped["test"].n_unique(), -1)


models = st.one_of(
    st.builds(lambda h, d, a, s: {"model": "tests.test_completeness_properties:PropMLP",
                                  "model_kwargs": {"hidden": h, "depth": d, "activation": a, "seed": s}},
              st.integers(3, 10), st.integers(1, 2), st.sampled_from(sorted(ACTIVATIONS)), st.integers(0, 99)),
    st.builds(lambda w, a, s: {"model": "tests.test_completeness_properties:TinyTransformer",
                               "model_kwargs": {"width": w, "activation": a, "seed": s}},
              st.sampled_from([4, 8]), st.sampled_from(["gelu", "relu"]), st.integers(0, 99)),
)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model=models, optimizer=st.sampled_from(sorted(OPTIMIZERS)), schedule=st.sampled_from(sorted(SCHEDULES)),
       lr=st.sampled_from([3e-3, 1e-2, 3e-2]), batch=st.integers(1, 8), steps=st.integers(3, 7), clip=st.booleans())
def test_influences_sum_to_the_change_of_g(model, optimizer, schedule, lr, batch, steps, clip):
    model_spec = {**model, "data": "tests.test_decompose:data", "data_kwargs": {}, "loss": "cross_entropy"}
    with tempfile.TemporaryDirectory() as tmp:
        history = record(Path(tmp) / "run", model_spec, optimizer, schedule, lr, batch, steps, clip)
        for dtype, tolerance in (("float32", 1e-5), ("float64", 1e-10)):
            expected = truth(history, getattr(torch, dtype))
            scale = np.abs(expected).max()
            views = ("components", "data") if dtype == "float64" else ("components",)
            e = explain(history.path, ExplainConfig(dtype=dtype, test_size=None, views=views),
                        progress=False, trust_run=True)
            from_components = summed(e.components, "value")
            from_steps = summed(e.completeness, "reconstructed")
            assert np.abs(from_steps - expected).max() <= tolerance * scale, (dtype, e.summary())
            assert np.abs(from_components - expected).max() <= tolerance * scale, dtype
            if dtype == "float64":
                opt = summed(e.completeness, "optimizer_residual")
                assert np.abs(opt).max() <= 1e-4 * scale  # a float32 record replays to its storage grid
                np.testing.assert_allclose(summed(e.data, "value") + opt, from_components, atol=1e-10 * scale)
