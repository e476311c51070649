"""gradscope: find out why a PyTorch training run is failing.

Attach a :class:`Monitor` to any ``nn.Module``; it records per-layer gradient, update and activation
statistics into a run store; :func:`diagnose` reads a run and returns :class:`Finding`s with
concrete :class:`Fix`es.
"""

from gradscope._version import __version__
from gradscope.collect.monitor import Monitor
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
from gradscope.store.run import ModuleInfo, Run, load

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
    "Run",
    "RunNotFoundError",
    "Severity",
    "TrainingFailure",
    "UnreadableRunError",
    "UnsupportedSetupError",
    "__version__",
    "diagnose",
    "load",
    "registered_detectors",
]
