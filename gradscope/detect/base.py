"""The detector base class: it owns registration, configuration and the result type; a detector
declares its ``code`` and thresholds and implements one :meth:`Detector.check`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

from gradscope.errors import InvalidInputError
from gradscope.findings import Finding
from gradscope.store.run import Run

__all__ = ["Detector", "NoConfig"]

_REGISTRY: dict[str, type[Detector]] = {}


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """For detectors without thresholds."""


class Detector:
    """Base class of every detector.

    A subclass sets ``code`` (stable, snake_case), optionally ``Config`` (a frozen dataclass of
    thresholds, each default with its rationale), writes its user documentation as the class
    docstring (symptom, why it matters, rule and thresholds, fixes), and implements :meth:`check`.
    Defining the subclass registers it; do not override ``__init__`` or :meth:`run`.
    """

    code: ClassVar[str] = ""
    Config: ClassVar[type[Any]] = NoConfig
    # Codes whose findings a finding of this detector replaces in a diagnosis: the same symptom read
    # as another fault, with that fault's (here wrong) fix. Only a finding actually made replaces
    # them, so a user who ignores this code, or tunes it not to fire, still gets theirs.
    supersedes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.code:
            return  # an abstract intermediate class
        if cls.code in _REGISTRY and _REGISTRY[cls.code].__qualname__ != cls.__qualname__:
            raise TypeError(f"detector code {cls.code!r} is already registered by {_REGISTRY[cls.code].__qualname__}")
        _REGISTRY[cls.code] = cls

    def __init__(self, config: Any | None = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        if not isinstance(base, self.Config):
            raise InvalidInputError(f"expected a {self.Config.__qualname__} for {self.code} but got {type(base).__name__}")
        try:
            self.config = dataclasses.replace(base, **overrides) if overrides else base
        except TypeError:
            names = ", ".join(f.name for f in dataclasses.fields(self.Config))
            raise InvalidInputError(
                f"expected thresholds of {self.code} ({names}) but got {', '.join(overrides)}"
            ) from None

    def check(self, run: Run) -> Iterable[Finding]:
        """Return the findings of this detector on ``run`` (none when healthy)."""
        raise NotImplementedError

    def run(self, run: Run) -> list[Finding]:
        return list(self.check(run))


def detector_classes() -> dict[str, type[Detector]]:
    return dict(_REGISTRY)
