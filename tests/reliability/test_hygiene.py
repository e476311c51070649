"""After a Monitor ends, however it ends, the model is as if it had never been monitored: no hook
left, nothing keeping it alive, and it trains at the speed of a never-monitored copy.

``tests/collect/test_hooks_removed.py`` covers ``close()``, a second ``close()``, an exception in
the ``with`` block and a refused start, with garbage collection after ``close()`` and an exception;
this file adds the ways a run ends on a fault (live detection raising ``TrainingFailure``, a hook
failing under ``strict=True``, a full disk, an unwritable ``log_dir``) and measures the speed.
"""

from __future__ import annotations

import copy
import errno
import gc
import statistics
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reliability_support import FullDisk, gradscope_warnings, train
from test_hooks_removed import _differences, _state
from torch import nn

import gradscope
from gradscope.store.sqlite import RunWriter


class _Unreadable(tuple):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        raise RuntimeError("this output cannot be iterated")


class _Side(nn.Module):
    def forward(self, h: torch.Tensor) -> Any:
        return _Unreadable((h,))


class _Net(nn.Module):
    def __init__(self, side: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.side = side or nn.Identity()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        self.side(h)
        return self.fc2(h)


def _nan_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) * float("nan")


def _end(how: str, model: nn.Module, opt: torch.optim.Optimizer, log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a Monitor on ``model`` until it ends the way ``how`` says; returns nothing that refers to it."""
    options: dict[str, Any] = {"log_dir": log_dir, "flush_every": 2, "activation_every": 1, "update_every": 1, "on_finding": None}
    if how == "complete":
        with gradscope.Monitor(model, opt, **options) as mon:
            train(model, opt, mon, 4)
    elif how == "training_failure":
        options.update(on_finding="raise", detect_every=1)
        with pytest.raises(gradscope.TrainingFailure, match="nonfinite"), gradscope.Monitor(model, opt, **options) as mon:
            train(model, opt, mon, 6, loss_fn=_nan_loss)
    elif how == "strict_hook_error":
        model.side = _Side()
        with pytest.raises(RuntimeError, match="cannot be iterated"), gradscope.Monitor(model, opt, strict=True, **options) as mon:
            train(model, opt, mon, 2)
    elif how == "write_error":
        real_append = RunWriter.append_chunks

        def append_chunks(self: RunWriter, chunks: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(RunWriter, "append_chunks", append_chunks)
        with gradscope_warnings(), gradscope.Monitor(model, opt, **options) as mon:
            train(model, opt, mon, 5)
        monkeypatch.setattr(RunWriter, "append_chunks", real_append)
    elif how == "full_disk":
        with gradscope_warnings(), gradscope.Monitor(model, opt, **options) as mon:
            mon._writer.conn = disk = FullDisk(mon._writer.conn)  # type: ignore[assignment]
            train(model, opt, mon, 3)
            disk.full = True
            train(model, opt, mon, 3, first=3)
    elif how == "unwritable_log_dir":
        (log_dir.parent / "file").write_text("not a directory")
        with pytest.raises(gradscope.InvalidInputError, match="Not a directory") as caught:
            gradscope.Monitor(model, opt, **{**options, "log_dir": log_dir.parent / "file" / "run"})
        del caught  # its traceback holds the half-built Monitor, and with it the model
    else:
        raise AssertionError(how)


HOW = ["complete", "training_failure", "strict_hook_error", "write_error", "unwritable_log_dir"]
FULL_DISK = pytest.param("full_disk")


@pytest.mark.parametrize("how", [*HOW, FULL_DISK])
def test_no_hook_and_no_reference_is_left_however_the_run_ends(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _state(model, opt)
    _end(how, model, opt, tmp_path / "run", monkeypatch)
    model.side = nn.Identity()  # the faulty module of strict_hook_error is not part of the comparison
    assert _differences(before, _state(model, opt)) == []
    refs: list[weakref.ref[Any]] = [weakref.ref(model), weakref.ref(opt), weakref.ref(model.fc1.weight)]
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def _time_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - started


def test_training_after_close_runs_at_bare_speed(tmp_path: Path) -> None:
    """Per-step time after close() over a never-monitored copy, measured in the same process in
    alternating blocks (so load on a shared machine hits both alike), compared by medians."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    bare = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bare_opt = torch.optim.Adam(bare.parameters(), lr=1e-3)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    with gradscope.Monitor(model, opt, log_dir=tmp_path / "run", flush_every=5, activation_every=1, update_every=1) as mon:
        train(model, opt, mon, 20, make_batch=lambda step: (x, y))
    _time_steps(bare, bare_opt, x, y, 20)  # the same warm-up for the copy

    closed: list[float] = []
    never: list[float] = []
    for block in range(40):
        pair = [(closed, model, opt), (never, bare, bare_opt)]
        for times, m, o in pair if block % 2 == 0 else pair[::-1]:
            times.append(_time_steps(m, o, x, y, 5))
    ratio = statistics.median(closed) / statistics.median(never)
    assert ratio < 1.3, f"training after close() is {ratio:.2f}× slower than without gradscope"
