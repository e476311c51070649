"""The errors gradscope raises, all under one root so callers can catch them together.

Messages follow "expected … but got …, do …" so that the reader can act on them.
"""

from __future__ import annotations

__all__ = [
    "GradscopeError",
    "InvalidInputError",
    "RunNotFoundError",
    "TrainingFailure",
    "UnreadableRunError",
    "UnsupportedSetupError",
]


class GradscopeError(Exception):
    """Root of every error gradscope raises on purpose."""


class InvalidInputError(GradscopeError, ValueError):
    """An argument has the wrong type or value (a non-module model, a non-scalar loss, …)."""


class RunNotFoundError(GradscopeError, FileNotFoundError):
    """The path given as a run does not exist or holds no run."""


class UnreadableRunError(GradscopeError):
    """The path holds something that is not a readable run: corrupt, truncated, a newer schema, or empty."""


class UnsupportedSetupError(GradscopeError):
    """The training setup is one gradscope cannot measure correctly, so it refuses rather than be wrong."""


class TrainingFailure(GradscopeError):
    """Raised into the training loop by ``Monitor(on_finding="raise")`` when a detector reports an error.

    ``finding`` is the :class:`gradscope.Finding` that stopped training.
    """

    def __init__(self, finding: object) -> None:
        self.finding = finding
        super().__init__(str(finding))


def expect_int(name: str, value: object, *, at_least: int) -> int:
    """``value`` if it is an integer (not a bool) ≥ ``at_least``; else an ``InvalidInputError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        raise InvalidInputError(f"expected {name} to be an integer ≥ {at_least} but got {value!r}")
    return value
