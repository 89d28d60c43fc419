"""Training phases of a grokking run, read off the logged accuracy curves.

The rule (applied by ``find_phases`` to the steps frame, one row per logged step):

- a curve *reaches and holds* a threshold at the first logged step ``s`` at which it is
  at or above the threshold and stays there in at least ``HOLD`` (90 %) of the logged
  steps from ``s`` on; a single noisy spike therefore does not count, and a single dip
  afterwards does not undo it;
- **memorization** runs from the first logged step until train accuracy reaches and
  holds ``TRAIN_FIT`` (0.99);
- **circuit formation** runs from there until validation accuracy reaches and holds
  ``VAL_FIT`` (0.9);
- **clean-up** runs from there to the last logged step.

Loss spikes (``find_spikes``) are marked beside the phases: the peak of every run of steps whose
train loss jumps to ``SPIKE_FACTOR`` times the median of the ``SPIKE_WINDOW`` steps before it.

A phase whose start is never reached is left out, and so is an empty one (a run that
generalizes as soon as it fits has no circuit-formation phase). Without accuracy
columns, or with no logged values in them, there are no phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

TRAIN_FIT = 0.99
VAL_FIT = 0.9
HOLD = 0.9
PHASE_NAMES = ("memorization", "circuit formation", "clean-up")
SPIKE_FACTOR = 3.0  # a loss spike: train loss at least this multiple of …
SPIKE_WINDOW = 20  # … the median of the preceding logged steps


@dataclass(frozen=True)
class Phase:
    """One training phase: ``name`` over the step interval ``[start, end]``."""

    name: str
    start: int
    end: int


def reach_and_hold(steps: np.ndarray, values: np.ndarray, threshold: float, hold: float = HOLD) -> int | None:
    """First step at which ``values`` reaches ``threshold`` and holds it (see module docstring).

    ``steps`` and ``values`` are 1-D and aligned; NaN values (steps where the metric was
    not logged) are ignored. Returns ``None`` when the threshold is never reached and held.
    """
    logged = ~np.isnan(values)
    steps, values = steps[logged], values[logged]
    if values.size == 0:
        return None
    above = values >= threshold
    # Fraction of logged steps from i on that are above the threshold.
    remaining_above = np.cumsum(above[::-1])[::-1]
    remaining = np.arange(values.size, 0, -1)
    held = above & (remaining_above >= hold * remaining)
    hits = np.flatnonzero(held)
    return int(steps[hits[0]]) if hits.size else None


def find_phases(
    steps: pl.DataFrame, train_fit: float = TRAIN_FIT, val_fit: float = VAL_FIT, hold: float = HOLD
) -> list[Phase]:
    """The phases of a run from its steps frame (``step``, ``train_acc``, ``val_acc``)."""
    if steps.height == 0 or not {"step", "train_acc", "val_acc"} <= set(steps.columns):
        return []
    frame = steps.sort("step")
    step = frame["step"].to_numpy().astype(np.int64)
    train = frame["train_acc"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    val = frame["val_acc"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    if np.isnan(train).all() and np.isnan(val).all():
        return []
    first, last = int(step[0]), int(step[-1])
    fitted = reach_and_hold(step, train, train_fit, hold)
    generalized = reach_and_hold(step, val, val_fit, hold)
    if fitted is None:
        bounds = [(PHASE_NAMES[0], first, last)]
    else:
        formed = last if generalized is None else max(generalized, fitted)
        bounds = [(PHASE_NAMES[0], first, fitted), (PHASE_NAMES[1], fitted, formed)]
        if generalized is not None:
            bounds.append((PHASE_NAMES[2], formed, last))
    return [Phase(name, start, end) for name, start, end in bounds if end > start]


def find_spikes(steps: pl.DataFrame, column: str = "train_loss", factor: float = SPIKE_FACTOR,
                window: int = SPIKE_WINDOW) -> list[int]:
    """Loss spikes (Adam's "slingshot" events): the peak step of every run of consecutive logged
    steps whose ``column`` is at least ``factor`` times the median of the ``window`` logged
    steps before the run began. Needs ``window`` logged steps of history; none without the column."""
    if steps.height == 0 or column not in steps.columns:
        return []
    frame = steps.sort("step").select("step", pl.col(column).cast(pl.Float64).fill_nan(None)).drop_nulls()
    step, loss = frame["step"].to_numpy(), frame[column].to_numpy()
    if loss.size <= window:
        return []
    # baselines[i - window]: the median of the window steps before step i, all at once
    baselines = np.median(np.lib.stride_tricks.sliding_window_view(loss, window)[:-1], axis=1)
    spikes: list[int] = []
    i = window
    while i < loss.size:
        baseline = baselines[i - window]
        if loss[i] >= factor * baseline > 0:
            end = i
            while end + 1 < loss.size and loss[end + 1] >= factor * baseline:
                end += 1
            spikes.append(int(step[i + int(np.argmax(loss[i:end + 1]))]))
            i = end + 1 + window  # a new baseline after the spike
        else:
            i += 1
    return spikes
