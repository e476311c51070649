"""Property-based tests of ``gradscope.diagnose`` over runs no training would make on purpose.

Runs come from ``gradscope.testing.synthetic_run`` with 0 to 200 steps, 1 to 8 layers, activation
modules of every bounded kind, and each series drawn as random, constant, zero, tiny (1e-30), huge
(1e30), all-NaN, laced with NaN/±Inf, decaying, blowing up, or zigzagging. Two properties:

- no detector raises (a raising detector would become a ``detector_error`` finding);
- the findings do not depend on the order the detectors run in: the registry order permuted with
  ``select=``, on a fresh copy of the run and on the same ``Run`` object again (detectors share
  facts cached per run; none may change them for the next).

``tests/detect/test_detector_robustness.py`` feeds arbitrary values to a fixed two-layer run; this
file varies the shape of the run and the detector order. Examples are derandomized: the suite
checks the same runs on every machine.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import detector_errors

import gradscope
from gradscope.store.schema import ACTIVATION_METRICS
from gradscope.testing import synthetic_run

SHAPES = ("random", "constant", "zeros", "tiny", "huge", "all_nan", "nan_laced", "decaying", "spike", "zigzag")
ACTIVATIONS = ("ReLU", "Sigmoid", "Tanh", "GELU", "Softmax")
CODES = sorted(gradscope.registered_detectors())


def series(shape: str, n: int, seed: int, level: float) -> np.ndarray:
    """One positive-ish series of ``n`` values in the given shape."""
    rng = np.random.default_rng(seed)
    base = np.abs(rng.lognormal(np.log(abs(level) + 1e-3), 0.5, n))
    if shape == "random":
        return rng.normal(level, abs(level) + 1, n)
    if shape == "constant":
        return np.full(n, level)
    if shape == "zeros":
        return np.zeros(n)
    if shape == "tiny":
        return base * 1e-30
    if shape == "huge":
        return base * 1e30
    if shape == "all_nan":
        return np.full(n, np.nan)
    if shape == "decaying":
        return np.geomspace(abs(level) + 1, (abs(level) + 1) * 1e-3, n) if n else np.zeros(0)
    if shape == "spike":  # healthy, then a blow-up by six decades from a random step on
        out = np.geomspace(abs(level) + 1, abs(level) + 0.5, n)
        out[rng.integers(0, n) if n else 0 :] *= 1e6
        return out
    if shape == "zigzag":  # a level that jumps up and down by a decade every other step
        return (abs(level) + 1) * np.where(np.arange(n) % 2, 10.0, 1.0)
    laced = base.copy()
    if n:
        at = rng.choice(n, size=max(1, n // 7), replace=True)
        laced[at] = rng.choice([np.nan, np.inf, -np.inf], size=len(at))
    return laced


SPEC = st.fixed_dictionaries(
    {
        "n": st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(4, 200)),
        "layers": st.integers(1, 8),
        "every": st.integers(1, 25),
        "seed": st.integers(0, 2**16),
        "level": st.sampled_from([0.0, 1e-8, 0.5, 2.302585, 1e4, -3.0]),
        "loss": st.sampled_from(SHAPES),
        "grad": st.sampled_from(SHAPES),
        "update": st.sampled_from(SHAPES),
        "act": st.sampled_from(SHAPES),
        "lr": st.sampled_from(["constant", "schedule", "none", "nan"]),
        "status": st.sampled_from(["complete", "running", "failed"]),
    }
)


def build(spec: dict[str, Any]) -> gradscope.Run:
    n, seed = spec["n"], spec["seed"]
    layers = [f"block{i}.linear" for i in range(spec["layers"])]
    types: dict[str, str] = {}
    for i, layer in enumerate(layers):
        types[layer] = "Linear"
        types[f"block{i}.act"] = ACTIVATIONS[(seed + i) % len(ACTIVATIONS)]
    act_steps = np.arange(0, n, spec["every"])
    activations = {
        metric: {
            name: np.clip(series(spec["act"], len(act_steps), seed + 7 * k + j, spec["level"]), 0, 1)
            if metric.endswith("_frac")
            else series(spec["act"], len(act_steps), seed + 7 * k + j, spec["level"])
            for j, name in enumerate([*types, "(input)"])
        }
        for k, metric in enumerate(ACTIVATION_METRICS)
    }
    lr: Any = {
        "constant": 0.1,
        "schedule": np.linspace(0.1, 0.0, n),
        "none": None,
        "nan": np.full(n, np.nan),
    }[spec["lr"]]
    return synthetic_run(
        series(spec["loss"], n, seed, spec["level"]),
        grad_norm={layer: np.abs(series(spec["grad"], n, seed + 1 + i, spec["level"])) for i, layer in enumerate(layers)},
        update_norm={layer: np.abs(series(spec["update"], n, seed + 50 + i, spec["level"])) for i, layer in enumerate(layers)},
        weight_norm={layer: np.abs(series(spec["update"], n, seed + 90 + i, 10.0)) for i, layer in enumerate(layers)},
        grad_missing={layers[0]: (series(spec["grad"], n, seed, 0.0) > 2).astype(float)},
        output_nonfinite={name: (~np.isfinite(series(spec["act"], n, seed + 3, 1.0))).astype(float) for name in list(types)[:2]},
        activations=activations,
        activation_steps=act_steps,
        module_types=types,
        lr=lr,
        optimizer="SGD" if lr is not None else None,
        status=spec["status"],
    )


def canonical(findings: Any) -> list[str]:
    return sorted(json.dumps(f.to_dict(), sort_keys=True) for f in findings)


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPEC, order=st.permutations(CODES))
def test_no_detector_raises_and_findings_do_not_depend_on_detector_order(spec: dict[str, Any], order: list[str]) -> None:
    run = build(spec)
    registry_order = gradscope.diagnose(run)
    assert detector_errors(registry_order) == [], spec
    expected = canonical(registry_order)
    assert canonical(gradscope.diagnose(build(spec), select=order)) == expected, (spec, order)  # a fresh run
    assert canonical(gradscope.diagnose(run, select=order[::-1])) == expected, (spec, order)  # caches shared


def test_the_generated_runs_reach_the_detectors() -> None:
    """The property test is worth something only if its runs make detectors speak: the same
    generator, on a few fixed specs, gives findings of several codes and several severities."""
    seen: set[tuple[str, str]] = set()
    for shape in SHAPES:
        for grad in ("decaying", "huge", "tiny", "spike"):
            spec = {
                "n": 150, "layers": 5, "every": 5, "seed": 3, "level": 2.302585, "loss": shape, "grad": grad,
                "update": grad, "act": shape, "lr": "constant", "status": "complete",
            }  # fmt: skip
            seen |= {(f.code, f.severity.value) for f in gradscope.diagnose(build(spec))}
    assert len({code for code, _ in seen}) >= 7, seen
    assert {severity for _, severity in seen} == {"error", "warning", "info"}, seen
