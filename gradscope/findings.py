"""What detectors report: a :class:`Finding` with ranked :class:`Fix` suggestions.

These two types are the contract between the detectors and everything downstream
(reports, the CLI, live warnings, integrations): those read only findings and the run.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradscope.errors import InvalidInputError

__all__ = ["Finding", "Fix", "FixKind", "Severity"]


class Severity(str, enum.Enum):
    """How bad a finding is. Ordered: ``info < warning < error``.

    - ``error``: training is broken now (non-finite values, divergence).
    - ``warning``: a confirmed problem and the outcome already suffers.
    - ``info``: a symptom worth knowing that has not hurt the outcome yet.
    """

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    @classmethod
    def parse(cls, value: str | Severity) -> Severity:
        """Turn a user's string into a severity, with an error that lists the valid ones."""
        if isinstance(value, Severity):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise InvalidInputError(f"expected a severity ({valid}) but got {value!r}") from None

    def __str__(self) -> str:
        return self.value


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


class FixKind(str, enum.Enum):
    """What a fix changes. Stable: CI checks and tests assert on these values."""

    LEARNING_RATE = "learning_rate"
    GRADIENT_CLIPPING = "gradient_clipping"
    ACTIVATION = "activation"
    NORMALIZATION = "normalization"
    INITIALIZATION = "initialization"
    ARCHITECTURE = "architecture"
    OPTIMIZER = "optimizer"
    DATA = "data"
    CODE = "code"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Fix:
    """One concrete change to try, e.g. ``Fix("learning_rate", "lr=8.0 diverged; try lr=0.8")``."""

    kind: FixKind
    action: str

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", FixKind(self.kind))
        except ValueError:
            valid = ", ".join(k.value for k in FixKind)
            raise InvalidInputError(f"expected a fix kind ({valid}) but got {self.kind!r}") from None

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "action": self.action}


@dataclass(frozen=True)
class Finding:
    """A problem a detector found in a run.

    Attributes:
        code: the detector's stable snake_case code, e.g. ``"exploding_gradients"``.
        severity: ``info``, ``warning`` or ``error`` (a :class:`Severity`).
        step: the first optimizer step the finding applies to (``None`` when it is not tied to one).
        layers: module names as in ``model.named_modules()``, most implicated first.
        message: one sentence a person reads first.
        evidence: the numbers behind the verdict (all plain floats/ints).
        fixes: ranked suggestions, the most likely to work first.
        last_step: the last step it applies to, when the finding spans a range.
    """

    code: str
    severity: Severity
    step: int | None
    layers: tuple[str, ...] = ()
    message: str = ""
    evidence: Mapping[str, float] = field(default_factory=dict)
    fixes: tuple[Fix, ...] = ()
    last_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", Severity.parse(self.severity))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fixes", tuple(self.fixes))
        object.__setattr__(self, "evidence", dict(self.evidence))

    @property
    def fix_kinds(self) -> list[str]:
        return [f.kind.value for f in self.fixes]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite evidence becomes the strings ``"nan"``/``"inf"``/``"-inf"``."""
        return {
            "code": self.code,
            "severity": self.severity.value,
            "step": self.step,
            "last_step": self.last_step,
            "layers": list(self.layers),
            "message": self.message,
            "evidence": {k: json_number(v) for k, v in self.evidence.items()},
            "fixes": [f.to_dict() for f in self.fixes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            code=data["code"],
            severity=data["severity"],
            step=data.get("step"),
            last_step=data.get("last_step"),
            layers=tuple(data.get("layers", ())),
            message=data.get("message", ""),
            evidence={k: float(v) for k, v in data.get("evidence", {}).items()},
            fixes=tuple(Fix(f["kind"], f["action"]) for f in data.get("fixes", ())),
        )

    def __str__(self) -> str:
        where = f"step {self.step}" if self.step is not None else "run"
        noun = "layer" if len(self.layers) == 1 else "layers"  # Sequential layers are named 0, 1, 2…: not steps
        layers = f" [{noun} {', '.join(self.layers[:4])}{', …' if len(self.layers) > 4 else ''}]" if self.layers else ""
        return f"{self.severity.value}: {self.code} at {where}{layers}: {self.message}"


def json_number(value: float) -> float | int | str:
    """A number as strict JSON allows it: NaN and ±Inf become the strings "nan", "inf", "-inf";
    booleans become 0/1; ints stay ints."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def sort_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Most severe first, then earliest step, then code: the order people and CI read them in."""
    return sorted(
        findings,
        key=lambda f: (-f.severity.rank, f.step if f.step is not None else -1, f.code, f.layers),
    )
