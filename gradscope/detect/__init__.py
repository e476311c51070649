"""Detectors: rules that read a recorded :class:`~gradscope.Run` and report :class:`~gradscope.Finding`s.

Detectors see only what was recorded (numpy/pandas series), never tensors or modules, so a run can
be diagnosed on another machine, later, or after the crash it is meant to explain.
"""

from gradscope.detect.base import Detector
from gradscope.detect.registry import Findings, diagnose, registered_detectors

__all__ = ["Detector", "Findings", "diagnose", "registered_detectors"]
