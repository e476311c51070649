"""gradscope: find out why a PyTorch training run is failing.

Attach a :class:`Monitor` to any ``nn.Module``; it records per-layer gradient, update and activation
statistics into a run store; :func:`diagnose` reads a run and returns :class:`Finding`s with
concrete :class:`Fix`es; :func:`report` renders a run as one HTML page.

Reading, diagnosing and reporting a run never import torch, so ``gradscope check`` starts fast and
runs on machines without it; the names that need torch (``Monitor``, ``preflight``, ``trace_step``) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradscope._version import __version__
from gradscope.checks import assert_healthy
from gradscope.detect.base import Detector
from gradscope.detect.registry import Findings, diagnose, registered_detectors
from gradscope.errors import (
    GradscopeError,
    InvalidInputError,
    RunNotFoundError,
    TrainingFailure,
    UnreadableRunError,
    UnsupportedSetupError,
)
from gradscope.findings import Finding, Fix, FixKind, Severity
from gradscope.reporting import report
from gradscope.store.run import ModuleInfo, Run, load

if TYPE_CHECKING:
    from gradscope.collect.monitor import Monitor
    from gradscope.preflight_checks import PreflightResult, preflight
    from gradscope.trace import StepTrace, trace_step

__all__ = [
    "Detector",
    "Finding",
    "Findings",
    "Fix",
    "FixKind",
    "GradscopeError",
    "InvalidInputError",
    "ModuleInfo",
    "Monitor",
    "PreflightResult",
    "Run",
    "RunNotFoundError",
    "Severity",
    "StepTrace",
    "TrainingFailure",
    "UnreadableRunError",
    "UnsupportedSetupError",
    "__version__",
    "assert_healthy",
    "diagnose",
    "load",
    "preflight",
    "registered_detectors",
    "report",
    "trace_step",
]

# Names whose modules import torch, loaded on first access (PEP 562).
_LAZY = {
    "Monitor": "gradscope.collect.monitor",
    "PreflightResult": "gradscope.preflight_checks",
    "preflight": "gradscope.preflight_checks",
    "StepTrace": "gradscope.trace",
    "trace_step": "gradscope.trace",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
