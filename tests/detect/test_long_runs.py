"""Findings and report figures do not depend on how a run is read: loaded whole, or read lazily from
its file metric by metric (every request evicting the others) with whole-run scans in blocks of a
few rows, as a long run is. The detectors and the report read long runs in windows and blocks to
bound their memory; this guards that those give exactly the numbers of a whole-run computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import synth

import gradscope
from gradscope.detect import advice
from gradscope.detect import functional as F
from gradscope.reporting import downsample
from gradscope.reporting.figures import build_figures, figure_json
from gradscope.store import run as run_module
from gradscope.store.run import Run
from gradscope.testing import save_run, synthetic_run

CHUNK_ROWS = 37  # an odd flush size: blocks and windows cross chunk boundaries


def _diagnosis(path: Path) -> tuple[str, str]:
    """The findings and the report's figures as JSON text (where NaN equals NaN)."""
    run = gradscope.load(path)
    findings = list(gradscope.diagnose(run))
    figures = [figure_json(spec) for spec in build_figures(run, findings)]
    return json.dumps([f.to_dict() for f in findings]), json.dumps(figures)


@pytest.mark.parametrize("name", sorted({**synth.FAULTY, **synth.HEALTHY}))
def test_a_run_read_lazily_in_small_blocks_gives_the_findings_and_figures_of_a_whole_read(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builders = {**synth.FAULTY, **synth.HEALTHY}
    path = save_run(builders[name](), tmp_path / name, rows_per_write=CHUNK_ROWS)
    whole = _diagnosis(path)
    monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 0)
    monkeypatch.setattr(run_module, "CACHE_BYTES", 1)
    monkeypatch.setattr(advice, "BLOCK_ROWS", 7)
    monkeypatch.setattr(downsample, "_BLOCK_VALUES", 50)
    assert isinstance(gradscope.load(path)._streams["step"][1], run_module._StoredStream)
    findings, figures = _diagnosis(path)
    assert findings == whole[0]
    assert figures == whole[1]


# --------------------------------------------------------------------------- windows and blocks


def _varied_run(n: int = 120) -> Run:
    """Per-layer series with zeros, NaN and Inf in different places for every layer, and a dead
    ReLU that dies late: what windowed and blocked reads must reproduce value for value."""
    rng = np.random.default_rng(3)
    layers = ["fc0", "fc1", "fc2", "head"]

    def series(scale: float) -> np.ndarray:
        values = scale * rng.lognormal(0, 2, n)
        values[rng.random(n) < 0.1] = np.nan
        values[rng.random(n) < 0.03] = 0.0
        values[rng.random(n) < 0.02] = np.inf
        return values

    dead = np.r_[np.full(n // 2, 0.1), np.full(n - n // 2, 0.97)]
    return synthetic_run(
        np.geomspace(2.3, 0.5, n),
        grad_norm={layer: series(10.0**-i) for i, layer in enumerate(layers)},
        weight_norm={layer: series(1.0) for layer in layers},
        update_norm={layer: series(0.05) for layer in layers},
        module_types={"fc0": "Linear", "act0": "ReLU", "fc1": "Linear", "act1": "ReLU", "fc2": "Linear", "head": "Linear"},
        activations={"act_dead_frac": {"act0": dead, "act1": np.full(n, 0.2)}},
    )


def _whole_log_grad(f: advice.RunFacts) -> pd.DataFrame:
    frame = f.run.metric("grad_norm")
    cols = [c for c in f.weight_layers if c in frame.columns]
    return pd.DataFrame(F.log10_positive(frame[cols].to_numpy()).reshape(len(frame), len(cols)), index=frame.index, columns=cols)


def _whole_update_ratio(f: advice.RunFacts) -> pd.DataFrame:
    frame = f.run.metric("update_ratio")
    return frame[[c for c in frame.columns if c in set(f.weight_layers) and c not in set(f.zero_weight_layers)]]


ROWS = [slice(None), slice(0, 1), slice(0, 10), slice(5, 60), slice(100, None), slice(-13, None), slice(119, 200), slice(7, 7)]


def test_windows_and_blocks_of_the_run_facts_equal_slices_of_the_whole_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(advice, "BLOCK_ROWS", 7)
    f = advice.RunFacts(_varied_run())
    log_grad, update_ratio = _whole_log_grad(f), _whole_update_ratio(f)
    assert f.grad_rows == len(log_grad) == 120
    for rows in ROWS:
        pd.testing.assert_frame_equal(f.log_grad(rows), log_grad.iloc[rows], check_exact=True, check_names=False, obj=str(rows))
        pd.testing.assert_frame_equal(f.update_ratio(rows), update_ratio.iloc[rows], check_exact=True, obj=str(rows))
    for layer in update_ratio.columns:
        np.testing.assert_array_equal(f.update_ratio_of(layer), update_ratio[layer].to_numpy(), strict=True)
    assert f.early_update_ratio == float(update_ratio.iloc[:10].median().max())
    first = update_ratio.iloc[:3].to_numpy()
    assert f.first_update_ratio == float(np.median(first[np.isfinite(first)]))
    for rows in ROWS:
        med = update_ratio.iloc[rows].median()
        med = med[med > 0]
        assert f.typical_update_ratio(rows) == (float(med.max()) if len(med) else pytest.approx(np.nan, nan_ok=True))
    values = update_ratio.to_numpy()
    for threshold in (0.01, 0.1, 1.0, 10.0, 100.0):
        for upto in (-1, 0, 6, 7, 50, 119, 500):
            upto_rows = values[f.run.steps <= upto]
            assert f.update_ratio_reached(threshold, upto) == bool((np.isfinite(upto_rows) & (upto_rows >= threshold)).any())


def test_the_rise_of_layer_gradients_read_around_a_row_equals_the_whole_run_computation() -> None:
    f = advice.RunFacts(_varied_run())
    lg = _whole_log_grad(f)
    for half_window in (1, 3, 10):
        for row in [*range(0, 15), *range(105, 120)]:
            at = lg.iloc[row].to_numpy(dtype=np.float64)
            before = lg.iloc[max(0, row - half_window) : row] if row > 0 else lg.iloc[row + 1 : row + 1 + half_window]
            base = before.median(skipna=True).to_numpy(dtype=np.float64) if len(before) else np.full(at.shape, np.nan)
            rise = at - base
            order = np.argsort(-np.nan_to_num(rise, nan=-np.inf))
            expected = [str(lg.columns[i]) for i in order if np.isfinite(rise[i]) and rise[i] > 0.5]
            assert f.grad_rise_layers(row, half_window) == expected, (row, half_window)


def test_the_onset_of_vanishing_gradients_does_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    n, onset = 300, 211
    rng = np.random.default_rng(0)
    starved = np.where(np.arange(n) < onset, 0.3, 3e-5) * rng.lognormal(0, 0.1, n)
    steps = set()
    for block_rows in (1, 7, 100, 8192):
        monkeypatch.setattr(advice, "BLOCK_ROWS", block_rows)
        run = synthetic_run(np.geomspace(2.3, 2.0, n), grad_norm={"fc0": starved, "fc1": np.full(n, 0.2), "fc2": np.full(n, 0.3)})
        (finding,) = gradscope.diagnose(run, select=["vanishing_gradients"])
        steps.add(finding.step)
    assert steps == {onset}
