"""Detectors never crash on odd runs (empty, one step, constant, NaN-laced, huge, tiny), a crashing
detector does not take the others down, every detector is documented, and diagnosis is fast."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import numpy as np
import pytest
import synth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradscope
from gradscope import Detector, Finding, Severity
from gradscope.detect.docs import threshold_rationales
from gradscope.detect.registry import DETECTOR_ERROR, diagnose_live
from gradscope.store.run import Run
from gradscope.testing import synthetic_run

CODES = {
    "nonfinite",
    "exploding_loss",
    "exploding_gradients",
    "vanishing_gradients",
    "stalled_training",
    "dead_units",
    "saturated_activations",
    "oscillating_loss",
    "no_gradient",
}

values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 2.302585]),
)


def errors(findings: Iterable[Finding]) -> list[str]:
    return [f.message for f in findings if f.code == DETECTOR_ERROR]


def test_every_required_code_is_registered_with_documentation_and_explained_thresholds() -> None:
    detectors = gradscope.registered_detectors()
    assert set(detectors) >= CODES
    for code, cls in detectors.items():
        doc = cls.__doc__ or ""
        for section in ("**Symptom.**", "**Why it matters.**", "**Rule.**", "**Fixes.**"):
            assert section in doc, f"{code}: docstring lacks {section}"
        assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen  # type: ignore[attr-defined]
        rationale = threshold_rationales(cls)
        for field in dataclasses.fields(cls.Config):
            assert f"``{field.name}``" in doc, f"{code}: the Rule section does not mention threshold {field.name}"
            assert len(rationale.get(field.name, "")) > 20, f"{code}: threshold {field.name} has no rationale comment"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_runs_with_almost_no_steps_do_not_crash_any_detector(n: int) -> None:
    run = synth.mlp_run(np.full(n, 2.3))
    assert errors(gradscope.diagnose(run)) == []
    bare = synthetic_run(np.zeros(n), lr=None, optimizer=None)
    assert errors(gradscope.diagnose(bare)) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    loss=st.lists(values, min_size=0, max_size=90),
    grad=st.lists(values, min_size=1, max_size=4),
    act=st.lists(values, min_size=1, max_size=4),
    every=st.integers(1, 12),
)
def test_arbitrary_series_never_make_a_detector_fail(loss: list[float], grad: list[float], act: list[float], every: int) -> None:
    n = len(loss)
    cycle = lambda xs: np.resize(np.asarray(xs, dtype=np.float64), n)  # noqa: E731
    k = len(range(0, n, every))
    acts = {
        metric: {"act0": np.resize(np.asarray(act, dtype=np.float64), k), "(input)": np.resize(np.asarray(act[::-1], dtype=np.float64), k)}
        for metric in ("act_mean", "act_std", "act_dead_frac", "act_saturated_frac", "act_max_abs", "act_nonfinite")
    }
    run = synthetic_run(
        loss,
        grad_norm={"fc0": cycle(grad), "head": cycle(grad[::-1])},
        update_norm={"fc0": np.abs(cycle(act)), "head": cycle(grad)},
        grad_missing={"fc0": (cycle(grad) > 1).astype(float)},
        output_nonfinite={"act0": (cycle(act) < 0).astype(float)},
        activations=acts,
        activation_steps=np.arange(0, n, every),
        module_types={"fc0": "Linear", "act0": "ReLU", "head": "Linear"},
        lr=cycle(act),
    )
    assert errors(gradscope.diagnose(run)) == []


@pytest.mark.parametrize("level", [0.0, 1e-12, 2.302585, 7e5, -3.0])
def test_a_constant_loss_never_crashes_and_is_never_an_error(level: float) -> None:
    findings = gradscope.diagnose(synth.mlp_run(np.full(300, level)))
    assert errors(findings) == []
    assert not [f for f in findings if f.severity is Severity.ERROR]


def test_a_crashing_detector_becomes_a_finding_and_the_others_still_report() -> None:
    class Broken(Detector):
        """**Symptom.** none. **Why it matters.** none. **Rule.** none. **Fixes.** none."""

        code = "broken_for_test"

        def check(self, run: Run) -> Iterable[Finding]:
            raise ZeroDivisionError("boom")

    try:
        findings = gradscope.diagnose(synth.lr_too_low())
        broken = [f for f in findings if f.code == DETECTOR_ERROR]
        assert len(broken) == 1 and "broken_for_test" in broken[0].message and "ZeroDivisionError" in broken[0].message
        assert broken[0].severity is Severity.INFO
        assert [f for f in findings if f.code == "stalled_training"]
    finally:
        from gradscope.detect import base

        base._REGISTRY.pop("broken_for_test", None)


def test_live_diagnosis_on_a_run_in_progress_matches_the_offline_one() -> None:
    run = synth.diverged()
    run.meta["status"] = "running"
    live = {(f.code, f.severity) for f in diagnose_live(run)}
    assert ("exploding_loss", Severity.ERROR) in live


def test_live_window_with_a_gap_in_the_steps_is_read_by_step_number() -> None:
    # Live detection reads the first and the last steps of a long run: rows are not steps.
    full = synth.lr_too_low(n=600)
    keep = np.r_[0:200, 400:600]
    streams = {}
    for name, (cols, chunk) in full._streams.items():
        mask = np.isin(chunk.steps, keep)
        streams[name] = (cols, type(chunk)(chunk.steps[mask], chunk.data[mask]))
    windowed = Run(dict(full.meta, status="running"), streams, [])
    f = next(f for f in gradscope.diagnose(windowed) if f.code == "stalled_training")
    assert f.last_step == 599


def test_a_long_wide_run_is_diagnosed_in_a_few_seconds() -> None:
    rng = np.random.default_rng(0)
    n, width = 100_000, 50
    layers = {f"fc{i}": np.exp(rng.normal(-1, 0.3, n)) for i in range(width)}
    types = {}
    for i in range(width):
        types[f"fc{i}"] = "Linear"
        types[f"act{i}"] = "ReLU"
    act_steps = np.arange(0, n, 10)
    acts = {"act_dead_frac": {f"act{i}": rng.uniform(0, 0.1, act_steps.size) for i in range(width)}}
    run = synthetic_run(
        np.geomspace(2.3, 0.05, n) * 10 ** rng.normal(0, 0.1, n),
        grad_norm=layers,
        module_types=types,
        activations=acts,
        activation_steps=act_steps,
    )
    started = time.perf_counter()
    findings = gradscope.diagnose(run)
    elapsed = time.perf_counter() - started
    assert errors(findings) == []
    assert elapsed < 6.0, f"diagnosis took {elapsed:.1f} s"
