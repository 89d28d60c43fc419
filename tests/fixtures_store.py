"""Synthetic run bundles for store tests, dashboard tests and the store benchmark.

``synthetic_bundle`` builds a ``RunBundle`` of any size with numpy (10^7 rows in seconds)
whose numbers are internally consistent: a window's component rows sum (over tensors) to
the reconstructed change of its steps, a data window's rows sum (over training examples
and the regularizer) to the component rows of the same steps, and the reconstructed
change differs from the true change by a small completeness residual.

``make_demo_bundle`` is a tiny modular-addition-like run with transformer parameter names,
for tests that need a realistic-looking run database without running the engine.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from engine.store import REGULARIZER, RunBundle

DEMO_TENSORS = (  # (tensor, module, layer, size) of a one-layer transformer, d_model 4, p 5
    ("embed.W_E", "embed", "embed", 20),
    ("pos_embed.W_pos", "pos_embed", "embed", 12),
    ("blocks.0.attn.W_Q", "blocks.0.attn", "attn", 16),
    ("blocks.0.attn.W_K", "blocks.0.attn", "attn", 16),
    ("blocks.0.attn.W_V", "blocks.0.attn", "attn", 16),
    ("blocks.0.attn.W_O", "blocks.0.attn", "attn", 16),
    ("blocks.0.mlp.W_in", "blocks.0.mlp", "mlp", 32),
    ("blocks.0.mlp.b_in", "blocks.0.mlp", "mlp", 8),
    ("blocks.0.mlp.W_out", "blocks.0.mlp", "mlp", 32),
    ("blocks.0.mlp.b_out", "blocks.0.mlp", "mlp", 4),
    ("unembed.W_U", "unembed", "unembed", 20),
)


def default_tensors(n: int, size: int = 12) -> tuple[tuple[str, str, str, int], ...]:
    """``n`` tensors: pairs (weight, bias) form modules, two modules form a layer."""
    out = []
    for t in range(n):
        layer, module = t // 4, t // 2
        kind = "weight" if t % 2 == 0 else "bias"
        out.append((f"layer{layer}.block{module}.{kind}", f"layer{layer}.block{module}", f"layer{layer}", size))
    return tuple(out)


def _examples(rng: np.random.Generator, n_train: int, n_test: int, classes: int, accuracy: float) -> pl.DataFrame:
    total = n_train + n_test
    side = max(math.ceil(math.sqrt(total)), classes)
    pairs = rng.permutation(side * side)[:total]
    a, b = pairs // side, pairs % side
    label = (a + b) % classes
    guess = np.where(rng.random(total) < accuracy, label, rng.integers(0, classes, total))
    split = np.array(["train"] * n_train + ["test"] * n_test)
    example = np.concatenate([np.arange(n_train), np.arange(n_test)])
    return pl.DataFrame({
        "split": split,
        "example": example.astype(np.int64),
        "label": label.astype(np.int64),
        "text": [f"{x} + {y} (mod {classes})" for x, y in zip(a.tolist(), b.tolist(), strict=True)],
        "predicted": guess.astype(np.int64),
        "correct": guess == label,
    })


def _steps(rng: np.random.Generator, n_steps: int) -> pl.DataFrame:
    s = np.arange(n_steps, dtype=np.float64)
    progress = s / max(n_steps - 1, 1)
    train_loss = 2.5 * np.exp(-6 * progress) + 0.01
    val_loss = 2.5 - 2.3 / (1 + np.exp(-12 * (progress - 0.6)))
    return pl.DataFrame({
        "step": np.arange(n_steps, dtype=np.int64),
        "lr": np.full(n_steps, 1e-3),
        "weight_decay": np.full(n_steps, 1.0),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "train_acc": np.minimum(1.0, 0.2 + 1.6 * progress),
        "val_acc": 0.2 + 0.8 / (1 + np.exp(-12 * (progress - 0.6))),
        "update_norm": 0.05 * np.exp(-2 * progress) + 0.001 * rng.random(n_steps),
        "param_norm": 10 + 2 * np.sin(3 * progress),
        "loss_change": np.diff(train_loss, append=train_loss[-1]),
    })


def synthetic_bundle(
    *,
    windows: int = 8,
    window: int = 5,
    tensors: tuple[tuple[str, str, str, int], ...] | int = 6,
    tensor_size: int = 12,
    n_test: int = 10,
    n_train: int = 16,
    outputs: int = 1,
    classes: int = 5,
    data_window: int | None = None,
    data_tests: int | None = None,
    accuracy: float = 0.8,
    with_data: bool = True,
    with_importance: bool = True,
    seed: int = 0,
    marker: str = "synthetic",
    task: str = "synthetic",
    quantity: str = "logprob",
) -> RunBundle:
    """A consistent random bundle.

    ``windows`` component windows of ``window`` steps; ``tensors`` is a count (of tensors
    with ``tensor_size`` elements) or explicit (tensor, module, layer, size) rows; the data
    view uses windows of ``data_window`` steps (a multiple of ``window``) over the first
    ``data_tests`` test examples. Predictions are written when ``outputs == classes``
    (every logit explained).
    """
    rng = np.random.default_rng(seed)
    spec = default_tensors(tensors, tensor_size) if isinstance(tensors, int) else tuple(tensors)
    n_tensors, n_steps = len(spec), windows * window
    data_window = data_window or window
    data_tests = n_test if data_tests is None else data_tests
    if data_window % window or n_steps % data_window:
        raise ValueError("data_window must be a multiple of window and divide the number of steps")

    # components: smooth per-tensor activity profiles over time times random per-test effects
    t_axis = (np.arange(windows) + 0.5) / windows  # (window,)
    centers = np.linspace(0.1, 0.9, n_tensors)  # (tensor,)
    profile = np.exp(-((t_axis[:, None] - centers[None, :]) ** 2) / 0.08)  # (window, tensor)
    sign = rng.choice([-1.0, 1.0], n_tensors)  # (tensor,)
    noise = rng.standard_normal((windows, n_tensors, n_test, outputs))  # (window, tensor, test, out)
    comp = profile[:, :, None, None] * (0.5 * sign[None, :, None, None] + noise)
    decay = comp * rng.uniform(-0.3, 0.1, (1, n_tensors, 1, 1))
    w_idx, t_idx, x_idx, o_idx = (a.ravel() for a in np.indices(comp.shape))
    names = pl.Series([t[0] for t in spec])
    components = pl.DataFrame({
        "step_lo": (w_idx * window).astype(np.int64),
        "step_hi": ((w_idx + 1) * window).astype(np.int64),
        "tensor": names.gather(t_idx),
        "test": x_idx.astype(np.int64),
        "output": o_idx.astype(np.int64),
        "value": comp.ravel(),
        "decay": decay.ravel(),
    })

    # completeness: each window's reconstructed change is spread evenly over its steps
    per_window = comp.sum(axis=1)  # (window, test, out)
    recon = np.repeat(per_window / window, window, axis=0)  # (step, test, out)
    residual = 1e-9 * rng.standard_normal(recon.shape)
    s_idx, cx_idx, co_idx = (a.ravel() for a in np.indices(recon.shape))
    completeness = pl.DataFrame({
        "step": s_idx.astype(np.int64),
        "test": cx_idx.astype(np.int64),
        "output": co_idx.astype(np.int64),
        "true_change": (recon + residual).ravel(),
        "reconstructed": recon.ravel(),
        "quadrature_residual": residual.ravel(),
        "optimizer_residual": 1e-10 * rng.standard_normal(recon.size),
        "nodes": rng.choice(np.array([2, 3, 4], dtype=np.int32), recon.size),
    })

    data = None
    if with_data:
        merge = data_window // window
        totals = per_window[:, :data_tests].reshape(n_steps // data_window, merge, data_tests, outputs).sum(1)
        members = n_train + 1  # training examples and the regularizer
        raw = rng.standard_normal((totals.shape[0], members, data_tests, outputs))  # (dwindow, train, test, out)
        spread = totals[:, None] / members + 0.3 * (raw - raw.mean(axis=1, keepdims=True))
        dw, k, dx, do = (a.ravel() for a in np.indices(spread.shape))
        train_ids = np.append(np.arange(n_train), REGULARIZER)
        data = pl.DataFrame({
            "step_lo": (dw * data_window).astype(np.int64),
            "step_hi": ((dw + 1) * data_window).astype(np.int64),
            "train": train_ids[k].astype(np.int64),
            "test": dx.astype(np.int64),
            "output": do.astype(np.int64),
            "value": spread.ravel(),
        })

    groups = pl.DataFrame({
        "tensor": [t[0] for t in spec],
        "module": [t[1] for t in spec],
        "layer": [t[2] for t in spec],
        "size": np.array([t[3] for t in spec], dtype=np.int64),
        "position": np.arange(n_tensors, dtype=np.int32),
    })
    importance = None
    if with_importance:
        sizes = groups["size"].to_numpy()
        importance = pl.DataFrame({
            "tensor": names.gather(np.repeat(np.arange(n_tensors), sizes)),
            "index": np.concatenate([np.arange(n) for n in sizes]).astype(np.int64),
            "importance": rng.exponential(1.0, int(sizes.sum())),
            "gradient": rng.exponential(1.0, int(sizes.sum())),
            "decay": rng.exponential(1.0, int(sizes.sum())),
            "taylor": rng.exponential(1.0, int(sizes.sum())),
            "magnitude": np.abs(rng.standard_normal(int(sizes.sum()))),
        }).with_columns(balance=pl.col("gradient") - pl.col("decay")).select(
            "tensor", "index", "importance", "gradient", "decay", "balance", "taylor", "magnitude")

    predictions = None
    if outputs == classes:
        initial = rng.standard_normal((n_test, outputs))
        total_change = per_window.sum(axis=0)  # (test, out)
        px, po = (a.ravel() for a in np.indices(initial.shape))
        predictions = pl.DataFrame({
            "test": px.astype(np.int64),
            "output": po.astype(np.int64),
            "initial": initial.ravel(),
            "true_final": (initial + total_change + residual.sum(axis=0)).ravel(),
            "reconstructed_final": (initial + total_change).ravel(),
        })

    exactness = pl.DataFrame({
        "quadrature": ["gauss:4", "midpoint:10"],
        "agreement": [1.0, 0.93],
        "kl": [0.0, 0.041],
        "gradient_evaluations": np.array([4 * n_steps, 10 * n_steps], dtype=np.int64),
        "max_rel_residual": [2e-8, 3e-3],
    })
    sparsities = [0.7, 0.9, 0.99]
    pruning = pl.DataFrame({
        "method": [m for m in ("kernel", "magnitude", "random") for _ in sparsities],
        "scope": ["global"] * 9,
        "sparsity": sparsities * 3,
        "seed": np.zeros(9, dtype=np.int64),
        "agreement": [0.99, 0.95, 0.7, 0.99, 0.94, 0.6, 0.8, 0.4, 0.2],
        "accuracy": [0.97, 0.93, 0.6, 0.97, 0.92, 0.5, 0.7, 0.3, 0.2],
        "kl": [0.01, 0.08, 0.9, 0.02, 0.1, 1.2, 0.5, 2.0, 3.0],
        "achieved_sparsity": sparsities * 3,
    })

    meta = {
        "task": task,
        "steps": n_steps,
        "quantity": quantity,
        "quadrature": "gauss:4",
        "data_fingerprint": f"sha256:{seed:064x}",
        "model_summary": {"parameters": int(groups["size"].sum()), "tensors": n_tensors},
        "optimizer": {"class": "AdamW", "family": "adam",
                      "groups": [{"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 1.0, "eps": 1e-8}]},
        "model_spec": {"task": task, "config": {"classes": classes}},
        "run_dir": f"runs/{marker}",
        "seconds": 1.5,
        "gradient_evaluations": 4 * n_steps,
        "max_rel_residual": 2e-8,
        "max_abs_residual": 1e-8,
        "marker": marker,
    }
    return RunBundle(
        meta=meta,
        steps=_steps(rng, n_steps),
        groups=groups,
        examples=_examples(rng, n_train, n_test, classes, accuracy),
        components=components,
        data=data,
        importance=importance,
        completeness=completeness,
        predictions=predictions,
        exactness=exactness,
        pruning=pruning,
    )


def make_demo_bundle(seed: int = 0) -> RunBundle:
    """A tiny realistic run: modular addition mod 5, one-layer transformer, 40 AdamW steps,
    all 5 logits explained, component windows of 5 steps, data windows of 10 steps."""
    return synthetic_bundle(
        windows=8, window=5, tensors=DEMO_TENSORS, n_test=10, n_train=15, outputs=5, classes=5,
        data_window=10, seed=seed, marker="demo", task="modular-addition", quantity="logits",
    )
