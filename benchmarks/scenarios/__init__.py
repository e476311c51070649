"""The detection benchmark's scenarios: small training runs, healthy or with one injected fault each.

``all_scenarios()`` lists them (healthy first, then faults, each in definition order);
``get_scenario(name).run(seed, log_dir)`` trains one. See :mod:`benchmarks.scenarios.core` for the
contract a scenario follows.
"""

from __future__ import annotations

from benchmarks.scenarios import faults, healthy  # noqa: F401  (defining the functions registers them)
from benchmarks.scenarios.core import EvalSet, Label, Probe, Scenario, ScenarioRun, registered

__all__ = ["EvalSet", "Label", "Probe", "Scenario", "ScenarioRun", "all_scenarios", "get_scenario"]


def all_scenarios(*, fast_only: bool = False) -> list[Scenario]:
    """Every registered scenario (or only the fast subset), healthy ones first."""
    found = [s for s in registered().values() if s.fast or not fast_only]
    return sorted(found, key=lambda s: not s.healthy)  # stable: definition order within each group


def get_scenario(name: str) -> Scenario:
    scenarios = registered()
    if name not in scenarios:
        raise KeyError(f"expected a scenario among {', '.join(scenarios)} but got {name!r}")
    return scenarios[name]
