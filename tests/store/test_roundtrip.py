"""What the Monitor saw is what ``gradscope.load`` gives back, on disk and in memory, and the tidy
frame holds every per-layer series."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import gradscope
from gradscope.store.schema import ACTIVATION_METRICS, LAYER_METRICS, PARAM_METRICS

STEPS = 12


def _monitored(case: Any, log_dir: Path | None, quiet: dict[str, Any]) -> tuple[gradscope.Monitor, gradscope.Run, list[Any]]:
    model = case.model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    with gradscope.Monitor(model, opt, log_dir=log_dir, flush_every=5, activation_every=4, metadata={"name": "exp1", "seed": 0}, update_every=1, **quiet) as mon:
        trace = case.train(model, opt, mon, STEPS)
        seen = mon.run  # what the Monitor holds just before it closes
    return mon, seen, trace


def _all_frames(run: gradscope.Run) -> dict[str, pd.DataFrame]:
    return {metric: run.metric(metric) for metric in run.metrics}


def test_load_gives_the_series_the_monitor_saw(cases: Any, quiet: dict[str, Any], tmp_path: Path, close: Any) -> None:
    _, seen, trace = _monitored(cases["cnn"], tmp_path / "exp1", quiet)
    loaded = gradscope.load(tmp_path / "exp1")
    assert loaded.n_steps == seen.n_steps == STEPS
    assert sorted(loaded.metrics) == sorted(seen.metrics)
    for metric, frame in _all_frames(seen).items():
        pd.testing.assert_frame_equal(loaded.metric(metric), frame, check_exact=True, obj=metric)
    pd.testing.assert_frame_equal(loaded.to_pandas(), seen.to_pandas())
    close(loaded.loss, [t.loss for t in trace])
    np.testing.assert_array_equal(loaded.activation_steps, [0, 4, 8])
    assert loaded.status == "complete" and not loaded.is_partial
    assert loaded.path == tmp_path / "exp1"
    # the file itself can be given, too
    assert gradscope.load(tmp_path / "exp1" / "run.sqlite").n_steps == STEPS
    # and a window of it
    window = gradscope.load(tmp_path / "exp1", since_step=7)
    np.testing.assert_array_equal(window.steps, np.arange(7, STEPS))
    np.testing.assert_array_equal(window.loss, loaded.loss[7:])


def test_in_memory_runs_hold_the_same_values(cases: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    _, on_disk, _ = _monitored(cases["mlp"], tmp_path, quiet)
    mon, in_memory, _ = _monitored(cases["mlp"], None, quiet)
    assert mon.log_dir is None and in_memory.path is None
    for metric, frame in _all_frames(on_disk).items():
        pd.testing.assert_frame_equal(in_memory.metric(metric), frame, check_exact=True, obj=metric)
    after_close = mon.run
    assert after_close.status == "complete" and after_close.n_steps == STEPS
    assert list((tmp_path.parent).glob("*.sqlite")) == []  # in memory means no file anywhere


def test_to_pandas_is_tidy_and_holds_every_per_layer_series(cases: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    _monitored(cases["mlp"], tmp_path, quiet)
    run = gradscope.load(tmp_path)
    df = run.to_pandas()
    assert list(df.columns) == ["step", "layer", "metric", "value"]
    assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64
    assert not df["value"].isna().any()
    assert not df.duplicated(["step", "layer", "metric"]).any()  # one value per (step, layer, metric)
    assert set(df.metric) >= {"loss", "global_grad_norm", "lr.0", "update_ratio", *LAYER_METRICS, *PARAM_METRICS, *ACTIVATION_METRICS}
    for metric in ("grad_norm", "weight_norm", "update_norm", "update_ratio"):
        rows = df[df.metric == metric]
        assert sorted(rows.layer.unique()) == sorted(run.layers) == ["0", "2", "4"]
        wide = rows.pivot(index="step", columns="layer", values="value")
        pd.testing.assert_frame_equal(wide, run.metric(metric)[wide.columns], check_names=False, check_exact=True)
    loss = df[(df.metric == "loss")]
    assert set(loss.layer) == {"(run)"}
    np.testing.assert_array_equal(loss.value.to_numpy(), run.loss)
    act = df[(df.metric == "act_mean") & (df.layer == "1")]
    np.testing.assert_array_equal(act.step.to_numpy(), [0, 4, 8])
    np.testing.assert_array_equal(act.value.to_numpy(), run.metric("act_mean")["1"].to_numpy())


def test_run_metadata_describes_model_optimizer_and_versions(cases: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    started = time.time()
    _monitored(cases["cnn"], tmp_path, quiet)
    run = gradscope.load(tmp_path)
    meta = run.meta
    assert meta["schema_version"] == gradscope.store.SCHEMA_VERSION
    assert meta["gradscope_version"] == gradscope.__version__
    assert meta["torch_version"] == torch.__version__
    assert started - 5 < meta["started_at"] <= meta["ended_at"] < time.time() + 1
    assert meta["model_class"] == "Sequential"
    assert meta["steps"] == STEPS
    assert meta["user"] == {"name": "exp1", "seed": 0}
    assert meta["optimizer"]["class"] == "Adam"
    group = meta["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.01 and group["betas"] == [0.8, 0.95] and group["n_params"] == 6
    assert run.modules["0"] == gradscope.ModuleInfo("0", "Conv2d", 40, 40, True)
    assert run.modules["1"].type == "BatchNorm2d" and run.modules["1"].n_params == 8
    assert run.modules[""].is_leaf is False and run.modules[""].n_params == 0
    assert meta["config"]["flush_every"] == 5 and meta["config"]["activation_every"] == 4


def test_diagnose_accepts_a_path_a_run_or_a_monitor(cases: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    mon, _, _ = _monitored(cases["mlp"], tmp_path, quiet)
    results = [gradscope.diagnose(tmp_path), gradscope.diagnose(str(tmp_path)), gradscope.diagnose(gradscope.load(tmp_path)), gradscope.diagnose(mon)]
    for findings in results:
        assert isinstance(findings, list)
        assert all(isinstance(f, gradscope.Finding) for f in findings)
    assert len({tuple((f.code, f.layers) for f in findings) for findings in results}) == 1
    with pytest.raises(gradscope.InvalidInputError, match=r"expected a run directory, a gradscope\.Run or a gradscope\.Monitor but got int"):
        gradscope.diagnose(3)  # type: ignore[arg-type]


def test_metric_array_is_a_read_only_view_of_the_same_values(cases: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    _monitored(cases["cnn"], tmp_path / "run", quiet)
    run = gradscope.load(tmp_path / "run")
    for metric in [*LAYER_METRICS, *PARAM_METRICS, "act_mean", "update_ratio"]:
        values, names = run.metric_array(metric)
        frame = run.metric(metric)
        assert names == [str(c) for c in frame.columns]
        np.testing.assert_array_equal(values.astype(np.float64), frame.to_numpy(), err_msg=metric)
        assert values.dtype == np.float32 and not values.flags.writeable
    grad, _ = run.metric_array("param_grad_norm")
    assert np.shares_memory(grad, run.metric_array("param_grad_norm")[0])  # no copy per call
    with pytest.raises(gradscope.GradscopeError, match="expected one of the run's metrics"):
        run.metric_array("no_such_metric")


def test_save_run_writes_a_run_that_loads_back_equal(cases: Any, quiet: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradscope.store import run as run_module
    from gradscope.testing import save_run, synthetic_run

    built = synthetic_run(np.linspace(2.0, 0.5, 50), grad_norm={"fc1": np.linspace(1.0, 0.1, 50)}, meta={"user": {"seed": 3}})
    saved = gradscope.load(save_run(built, tmp_path / "built", rows_per_write=7))
    assert saved.status == built.status == "complete" and saved.meta["user"] == {"seed": 3}
    pd.testing.assert_frame_equal(saved.to_pandas(), built.to_pandas())

    # a run read lazily from its file (as long runs are) saves whole, and "running" stays running
    _, seen, _ = _monitored(cases["mlp"], tmp_path / "trained", quiet)
    monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 0)
    lazy = gradscope.load(tmp_path / "trained")
    assert isinstance(lazy._streams["step"][1], run_module._StoredStream)
    lazy.meta["status"] = "running"
    copied = gradscope.load(save_run(lazy, tmp_path / "copy"))
    assert copied.status == "running"
    pd.testing.assert_frame_equal(copied.to_pandas(), seen.to_pandas())

    with pytest.raises(gradscope.InvalidInputError, match="expected rows_per_write to be an integer ≥ 1 but got 0"):
        save_run(built, tmp_path / "bad", rows_per_write=0)
