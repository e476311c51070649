"""Helpers the built-in detectors share: step numbers of rows, and the shared loss view."""

from __future__ import annotations

from gradscope.detect.advice import LossView, loss_view
from gradscope.store.run import Run

__all__ = ["LossView", "loss_view", "step_at"]


def step_at(run: Run, index: int | None) -> int | None:
    """The optimizer step of a row of the run (rows and steps differ in windowed live runs)."""
    if index is None or not 0 <= index < run.n_steps:
        return None
    return int(run.steps[index])
