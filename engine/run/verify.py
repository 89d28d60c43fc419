"""Replay check: reproduce every recorded update from the recorded batch and state.

For each step the batch gradient ``Σ_k w_k ∇ℓ(x_k; θ_s)`` is recomputed from the rebuilt
model and data by replaying the training forward (``engine.run.replay``: the recorded module
modes, buffers ``b_s`` and random state, in the training's dtype), pushed through the MATH.md
§3 formulas (``engine.run.updates``, not ``torch.optim``), and the result ``Δ̂_s`` is compared
with the recorded ``Δ_s``.

Two errors are reported per step, both relative to ``‖Δ_s‖₂``:

* ``raw``: ``‖Δ̂_s − Δ_s‖₂``;
* ``grid``: the part of ``|Δ̂_s − Δ_s|`` beyond two units in the last place of the stored
  parameters. A recorded update is the difference of two parameter vectors stored in the
  recording dtype, so it is only defined to that grid (AdamW rounds twice — after the
  decay, then after the step — hence two units); for small steps on float32 parameters this
  rounding alone is ~1e-6..1e-5 of ``‖Δ_s‖``, whereas a wrong learning rate, batch or
  clipping scale shows up as an error of the size of the mistake.

``max_rel_error`` is the largest ``grid`` error over the steps. The replay runs with the
intra-op thread count the training ran with (one for runs that do not record it): CPU
reductions are split by thread, so the figure depends on the recording only, not on the
machine's load or the caller's thread setting.

Before replaying, ``verify`` reads every file of the run and cross-checks it: the manifest
against the chunks (steps, tensor names, dtypes, shapes), every value (finite, in range,
batch ids within the training set, one hyper-parameter row per step and group), the
metrics, the optimizer state carried in, and the final parameters and buffers against the
end of the last chunk. Any disagreement raises ``CorruptRunError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import CorruptRunError
from engine.run.history import History, Params
from engine.run.replay import BATCHED, RANDOM_PROBE_EXAMPLES, DataSplit, TrainingForward, choose_split, pinned_threads
from engine.run.spec import check_data_matches, check_model_matches
from engine.run.updates import initial_buffer, replay, rule_for

GRID_ULPS = 2.0  # rounding allowance of a recorded update, in units in the last place


@dataclass(frozen=True)
class VerifyReport:
    run: str
    steps: int
    max_rel_error: float          # largest grid-aware relative error over steps
    max_rel_error_raw: float      # largest plain ‖Δ̂ − Δ‖ / ‖Δ‖ over steps
    worst_step: int
    rel_errors: tuple[float, ...]  # grid-aware error of every step
    notes: tuple[str, ...] = ()    # how the training forward was replayed, and what it cannot reproduce

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "steps": self.steps,
            "max_rel_error": self.max_rel_error,
            "max_rel_error_raw": self.max_rel_error_raw,
            "worst_step": self.worst_step,
            "notes": list(self.notes),
        }


def _grid_excess(delta_hat: Params, record_before: Params, record_update: Params) -> tuple[float, float, float]:
    """(‖Δ̂−Δ‖², ‖excess beyond GRID_ULPS ulps‖², ‖Δ‖²) summed over tensors, in float64."""
    raw_sq = excess_sq = norm_sq = 0.0
    for name, delta in record_update.items():
        before = record_before[name]
        after = before + delta
        ulp = GRID_ULPS * np.spacing(np.maximum(np.abs(before.numpy()), np.abs(after.numpy())))
        diff = (delta_hat[name] - delta.double()).abs().numpy()
        raw_sq += float((diff**2).sum())
        excess_sq += float((np.maximum(diff - ulp, 0.0) ** 2).sum())
        norm_sq += float(delta.double().pow(2).sum())
    return raw_sq, excess_sq, norm_sq


def check_files(history: History) -> None:
    """Read every file of the run beyond the chunks' tensors and batches, cross-checking what repeats."""
    history.metrics()
    history.hparams_table()
    history.initial_state()
    history.initial_buffers()
    if history.complete:
        end = {**history.params(history.num_steps), **history.buffers(history.num_steps)}
        for name, value in history.final_state().items():
            if not torch.equal(value, end[name]):
                raise CorruptRunError(
                    f"{history.path}/final.safetensors: tensor {name!r} differs from the "
                    f"{'parameters' if name in history.param_shapes else 'buffers'} that end the last chunk; one of "
                    "the two files was replaced or damaged"
                )


def verify(run: str | Path, allow_incomplete: bool = False, progress: bool = True,
           trust_run: bool = False) -> VerifyReport:
    """Replay every recorded step; see the module docstring for the checks and the error measures.

    The run's model and data code is imported only for a built-in task or with ``trust_run``.
    """
    history = History.open(run, allow_incomplete=allow_incomplete)
    check_files(history)
    rule = rule_for(history)
    task = history.task(trust_run)
    model = check_model_matches(history, task)
    train = check_data_matches(history, task)
    device = torch.device("cpu")
    split = choose_split(history, model, device, train.inputs[:RANDOM_PROBE_EXAMPLES])
    forward = TrainingForward(history, task, model, device)
    buffer = initial_buffer(history, rule)
    recorded = history.training_forward
    errors: list[float] = []
    raw_errors: list[float] = []
    steps = tqdm(history.iter_steps(), total=history.num_steps, desc="verify", unit="step", disable=not progress)
    with pinned_threads(recorded["threads"] if recorded else 1):
        for record in steps:
            split_s = rule.split(record)
            ids = record.batch_ids
            g = forward.batch_gradient(record, train.inputs[ids], train.labels[ids], record.batch_weights)
            delta_hat, buffer = replay(split_s, buffer, {n: g[n].double() for n in history.param_names})
            raw_sq, excess_sq, norm_sq = _grid_excess(delta_hat, record.params, record.update)
            scale = norm_sq**0.5
            errors.append((excess_sq**0.5) / scale if scale else float(excess_sq > 0))
            raw_errors.append((raw_sq**0.5) / scale if scale else float(raw_sq > 0))
    worst = int(np.argmax(errors))
    return VerifyReport(
        run=str(history.path),
        steps=history.num_steps,
        max_rel_error=float(errors[worst]),
        max_rel_error_raw=float(max(raw_errors)),
        worst_step=worst,
        rel_errors=tuple(errors),
        notes=_notes(split),
    )


def _notes(split: DataSplit) -> tuple[str, ...]:
    notes = []
    if split.mode == BATCHED:
        notes.append(f"the training forward was replayed with the recorded buffers and random state ({split.reason})")
    if split.unreplayed is not None:
        notes.append(f"not replayed exactly: {split.unreplayed}")
    return tuple(notes)
