"""Recording a training run and reading it back: ``record`` (the Recorder a training loop
uses), ``history`` (reading a run directory), ``updates`` (one rule per optimizer family)
and ``verify`` (replay of every update from the record)."""

from engine.run.record import Recorder

__all__ = ["Recorder"]
