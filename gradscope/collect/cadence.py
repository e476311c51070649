"""Which steps the sampled measurements (activation statistics, ‖Δθ‖ and ‖θ‖) run on.

A sample costs far more than the per-step recording: hooks on every watched module, several
reductions per module, a copy of every parameter. Its cost is nearly fixed per sample, so on a
fast model it is a large share of a step. By default the first steps of a run, where most failures
start (initialisation, warm-up) and where short debugging runs end, are sampled four times as
often as the rest (updates eight times): activation statistics every 50 steps for the first
1,000, updates every 25; after them both every 200, on the same steps, where one sampled step's
cold caches and full path of ``step()`` serve both. On the 0.6 ms-step MLP of
``benchmarks.overhead`` the samples cost ~3 points of its step time at the early spacing and about
half a point at the later one (see docs/performance.md). A number given to the Monitor is a fixed
spacing from step 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DEFAULT_ACTIVATIONS", "DEFAULT_UPDATES", "EARLY_STEPS", "Cadence"]

# Steps sampled at the early spacing under the default cadences. A multiple of both later spacings,
# so that every spacing lines up at the switch.
EARLY_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Sample every ``early_every`` steps before step ``early_steps``, every ``every`` steps from it
    on (0: never)."""

    every: int
    early_every: int
    early_steps: int

    @classmethod
    def fixed(cls, every: int) -> Cadence:
        """The same spacing from step 0 (0: never sampled)."""
        return cls(every, every, 0)

    @classmethod
    def default(cls, early_every: int, every: int) -> Cadence:
        return cls(every, early_every, EARLY_STEPS)

    def __post_init__(self) -> None:
        if self.every and self.early_steps % self.every:
            raise ValueError(f"the switch at step {self.early_steps} must fall on a sampled step of every {self.every}")

    @property
    def densest(self) -> int:
        """The shortest spacing in use (0: never sampled): how many samples a span of steps can hold."""
        spacings = [k for k in (self.every, self.early_every if self.early_steps else 0) if k]
        return min(spacings, default=0)

    def spacing(self, step: int) -> int:
        """The spacing in force at ``step`` (0: not sampled)."""
        return self.early_every if step < self.early_steps else self.every

    def due(self, step: int) -> bool:
        """Whether ``step`` is sampled."""
        k = self.spacing(step)
        return k > 0 and step % k == 0

    def next_due(self, step: int) -> int | None:
        """The first sampled step from ``step`` on (None: none is)."""
        if step < self.early_steps and self.early_every:
            due = -(-step // self.early_every) * self.early_every  # the next multiple
            if due < self.early_steps:
                return due
        if not self.every:
            return None
        return -(-max(step, self.early_steps) // self.every) * self.every

    def due_steps(self, steps: np.ndarray) -> np.ndarray:
        """``due`` for an array of steps."""
        steps = np.asarray(steps)
        spacing = np.where(steps < self.early_steps, self.early_every, self.every)
        due: np.ndarray = (spacing > 0) & (steps % np.maximum(spacing, 1) == 0)
        return due

    def describe(self) -> int | str:
        """The cadence as stored with the run: the spacing itself when it is fixed."""
        if self.early_steps == 0 or self.early_every == self.every:
            return self.every
        return f"every {self.early_every} steps until step {self.early_steps}, then every {self.every}"


# The Monitor's defaults: activation statistics every 50 steps, then every 200; updates every 25,
# then every 200.
DEFAULT_ACTIVATIONS = Cadence.default(50, 200)
DEFAULT_UPDATES = Cadence.default(25, 200)
