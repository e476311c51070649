"""When the Monitor writes, and when live detection runs: writes come every ``flush_every`` steps or
``flush_seconds``, whichever is first; live detection spends about 1% of *training* time (measured
per step, so a pause in the loop does not buy extra runs), except that the first NaN/Inf is checked
at once."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import Finding
from gradscope.collect import monitor as monitor_module
from gradscope.detect import registry
from gradscope.errors import InvalidInputError


def _step(model: nn.Module, opt: torch.optim.Optimizer, mon: gradscope.Monitor, *, nan: bool = False, give_loss: bool = True) -> None:
    opt.zero_grad()
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    if nan:
        loss = loss * math.nan
    loss.backward()
    mon.step(loss if give_loss else None)
    opt.step()


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, "2", True])
def test_a_bad_flush_seconds_is_refused(value: Any, tmp_path: Path) -> None:
    model, opt = _model()
    with pytest.raises(InvalidInputError, match="flush_seconds"):
        gradscope.Monitor(model, opt, log_dir=tmp_path, flush_seconds=value)


def test_a_slow_loop_is_written_every_flush_seconds(tmp_path: Path) -> None:
    model, opt = _model()
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=1000, flush_seconds=0.05, on_finding=None) as mon:
        for _ in range(4):
            _step(model, opt, mon)
            time.sleep(0.06)
        _step(model, opt, mon)
        # written while training goes on, long before 1000 steps: a crash now would keep them
        assert gradscope.load(tmp_path).n_steps == 4
    assert gradscope.load(tmp_path).n_steps == 5


def test_without_flush_seconds_only_the_step_count_triggers_a_write(tmp_path: Path) -> None:
    model, opt = _model()
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=3, flush_seconds=None, on_finding=None) as mon:
        for _ in range(2):
            _step(model, opt, mon)
            time.sleep(0.03)
        assert gradscope.load(tmp_path).n_steps == 0
        for _ in range(2):
            _step(model, opt, mon)
        assert gradscope.load(tmp_path).n_steps == 3


@pytest.fixture
def slow_detection(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Live detection that takes 20 ms a run; returns the step of every run."""
    runs: list[int] = []
    real = registry.diagnose_live

    def diagnose_live(run: gradscope.Run, **options: Any) -> Any:
        runs.append(run.n_steps)
        time.sleep(0.02)
        return real(run, **options)

    monkeypatch.setattr(registry, "diagnose_live", diagnose_live)
    return runs


def test_a_pause_in_the_loop_does_not_buy_extra_detection_runs(slow_detection: list[int], tmp_path: Path) -> None:
    model, opt = _model()
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=10, on_finding=lambda f: None) as mon:
        for step in range(60):
            _step(model, opt, mon)
            if step == 15:
                time.sleep(1.2)  # an evaluation pass: 60× the detection's cost, but no training
        # 20 ms of detection waits for 99 × 20 ms of training at ~1 ms a step: thousands of steps
        assert slow_detection == [10]
    assert slow_detection == [10, 60]  # and once more at close, on the whole run


def test_the_first_nan_is_checked_at_the_next_write_whatever_the_budget(slow_detection: list[int], tmp_path: Path) -> None:
    model, opt = _model()
    seen: list[Finding] = []
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=10, on_finding=seen.append) as mon:
        for step in range(60):
            _step(model, opt, mon, nan=step >= 33)
        assert slow_detection == [10, 40]  # the budget alone would allow no second run
    assert [f.code for f in seen] == ["nonfinite"] and seen[0].step == 33


def test_steps_given_no_loss_do_not_use_up_the_check_of_the_first_nan(slow_detection: list[int], tmp_path: Path) -> None:
    """A step given no loss stores a NaN placeholder: it is not the run's first NaN, so the real one
    later is still checked at the next write."""
    model, opt = _model()
    seen: list[Finding] = []
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=10, on_finding=seen.append) as mon:
        for step in range(60):
            _step(model, opt, mon, nan=step >= 33, give_loss=step % 5 == 0 or step >= 33)
        assert slow_detection == [10, 40]
    assert [f.code for f in seen] == ["nonfinite"] and seen[0].step == 33


def test_an_early_write_after_one_step_does_not_stall_live_detection(
    slow_detection: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write right after step 0 (user code reading ``monitor.run``) has no step time yet: the
    budget is re-read at every write with the current step time, so detection still comes back."""
    monkeypatch.setattr(monitor_module, "LIVE_DETECTION_SHARE", 0.5)  # wait 1× the cost, to keep the test short
    monkeypatch.setattr(monitor_module, "LIVE_DETECTION_SECONDS", 0.0)
    model, opt = _model()
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=50, on_finding=lambda f: None) as mon:
        _step(model, opt, mon)
        mon.flush()
        for _ in range(600):
            _step(model, opt, mon)
        # ~20-40 ms of detection at ~0.3-1 ms a step: another run every ~100 steps at this share
        assert len(slow_detection) >= 3


def test_live_detection_waits_for_its_least_training_time_between_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However cheap a run is, the next waits for LIVE_DETECTION_SECONDS of training: findings come
    that late at most, and detection's share of a fast loop stays small. (Here 0.25 s, with the
    share set to wait only 1× the run's cost.)"""
    monkeypatch.setattr(monitor_module, "LIVE_DETECTION_SHARE", 0.5)
    runs: list[float] = []
    real = registry.diagnose_live

    def diagnose_live(run: gradscope.Run, **options: Any) -> Any:
        runs.append(time.perf_counter())
        return real(run, **options)

    monkeypatch.setattr(registry, "diagnose_live", diagnose_live)
    model, opt = _model()
    for least in (0.0, 0.25):
        monkeypatch.setattr(monitor_module, "LIVE_DETECTION_SECONDS", least)
        runs.clear()
        with gradscope.Monitor(model, opt, flush_every=10, on_finding=lambda f: None) as mon:
            started = time.perf_counter()
            while time.perf_counter() - started < 1.0:
                _step(model, opt, mon)
            live = list(runs)
        gaps = np.diff(live)
        if least:
            assert 2 <= len(live) <= 5 and gaps.min() >= 0.8 * least  # training time is the loop's whole time here
        else:
            assert len(live) > 10  # by the share alone, a run every few writes
