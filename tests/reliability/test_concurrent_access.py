"""Several writers and readers at once: two processes starting a Monitor on one ``log_dir`` (one is
refused, the run holds only the other's steps), two Monitors on one model (two separate, correct
runs), readers (``gradscope check`` in other processes, ``load``, ``report``) while training writes,
and a reader arriving in the milliseconds while a Monitor creates its run.

The in-process refusal of a second Monitor on a ``log_dir`` in use is tested in
``tests/collect/test_monitor_errors.py``; here the contenders are real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reliability_support import (
    assert_prefix,
    finish_forked,
    gradscope_warnings,
    logged_losses,
    mlp,
    run_forked,
    start_forked,
    train,
)

import gradscope
from gradscope.store.sqlite import DB_NAME, LOCK_NAME, RunWriter

FLUSH = 3


def test_two_processes_on_one_log_dir_one_is_refused_and_nothing_interleaves(tmp_path: Path) -> None:
    log_dir = tmp_path / "shared"
    cases: list[dict[str, Any]] = [
        {
            "kind": "contend",
            "seed": seed,
            "steps": 20,
            "flush_every": FLUSH,
            "sleep": 0.05,  # the winner holds the directory for over a second, long after the other tried
            "overwrite": True,  # even a writer allowed to replace a run must not replace a live one
            "log_dir": str(log_dir),
            "losses": str(tmp_path / f"losses{seed}.txt"),
            "error_file": str(tmp_path / f"error{seed}.txt"),
        }
        for seed in (1, 2)
    ]
    results, stderr = run_forked(cases, tmp_path)
    exits = sorted(r["exit"] for r in results)
    assert exits == [0, 3], (results, stderr)  # 3: the Monitor refused to start
    winner = next(c for c, r in zip(cases, results, strict=True) if r["exit"] == 0)
    loser = next(c for c, r in zip(cases, results, strict=True) if r["exit"] == 3)

    message = Path(loser["error_file"]).read_text(encoding="utf-8")
    assert message == (
        f"log_dir {str(log_dir)!r} is being written by another Monitor (possibly in another process); "
        "give each run its own log_dir"
    )
    assert logged_losses(Path(loser["losses"])) == []  # it never trained with a Monitor

    run = gradscope.load(log_dir)
    assert run.meta["user"] == {"seed": winner["seed"]}
    assert run.status == "complete"
    assert_prefix(run, logged_losses(Path(winner["losses"])), 20)  # the winner's steps, all of them, only them


def test_two_monitors_on_one_model_make_two_separate_correct_runs(tmp_path: Path) -> None:
    """A second Monitor on a model that already has one is allowed: each records its own run, and
    closing one leaves the other recording exactly what a lone Monitor records."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options: dict[str, Any] = {"flush_every": FLUSH, "flush_seconds": None, "activation_every": 1, "update_every": 1, "on_finding": None}
    with gradscope.Monitor(model, opt, log_dir=tmp_path / "outer", **options) as outer:
        with gradscope.Monitor(model, opt, log_dir=tmp_path / "inner", **options) as inner:
            losses = train(model, opt, _Pair(outer, inner), 5)
        losses += train(model, opt, outer, 5, first=5)  # the inner Monitor is closed: only the outer records

    alone_model = mlp()
    alone_opt = torch.optim.SGD(alone_model.parameters(), lr=0.1, momentum=0.9)
    with gradscope.Monitor(alone_model, alone_opt, log_dir=tmp_path / "alone", **options) as alone:
        alone_losses = train(alone_model, alone_opt, alone, 10)
    assert losses == alone_losses  # two Monitors did not change the training

    runs = {name: gradscope.load(tmp_path / name) for name in ("outer", "inner", "alone")}
    assert runs["outer"].n_steps == 10 and runs["inner"].n_steps == 5
    reference = runs["alone"].to_pandas()
    pd_outer = runs["outer"].to_pandas()
    np.testing.assert_array_equal(pd_outer[["step", "layer", "metric"]].to_numpy(), reference[["step", "layer", "metric"]].to_numpy())
    np.testing.assert_allclose(pd_outer["value"], reference["value"], rtol=1e-6)
    inner_values = runs["inner"].to_pandas()["value"]
    np.testing.assert_allclose(inner_values, reference[reference["step"] < 5]["value"], rtol=1e-6)


def _check(log_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gradscope.cli", "check", str(log_dir), "--format", "json", "--fail-on", "error"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_readers_while_training_writes(tmp_path: Path) -> None:
    log_dir = tmp_path / "live"
    stop = tmp_path / "stop"
    losses_file = tmp_path / "losses.txt"
    case = {
        "kind": "clean",
        "seed": 5,
        "steps": 100_000,  # until told to stop
        "flush_every": FLUSH,
        "activation_every": 2,
        "live": True,  # the trainer reads its own run too (live detection)
        "strict": True,  # any gradscope error in the writer (a "database is locked") ends the trainer
        "sleep": 0.005,
        "stop_file": str(stop),
        "log_dir": str(log_dir),
        "losses": str(losses_file),
    }
    trainer = start_forked([case], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (log_dir / "run.sqlite").exists() or gradscope.load(log_dir).n_steps < 2 * FLUSH:
            assert time.monotonic() < deadline, "the trainer did not start"
            assert trainer.poll() is None, trainer.communicate()
            time.sleep(0.05)
        checks = [_check(log_dir), _check(log_dir)]  # two other processes reading at once
        seen, reports = [], 0
        with gradscope_warnings() as warned:
            while any(c.poll() is None for c in checks) or reports < 2:
                run = gradscope.load(log_dir)
                assert run.status == "running" and run.is_partial
                assert run.n_steps % FLUSH == 0  # whole flushes only, never half of one
                assert_prefix(run, logged_losses(losses_file), run.n_steps)
                seen.append(run.n_steps)
                if reports < 2:
                    page = gradscope.report(log_dir, tmp_path / f"live{reports}.html").read_text(encoding="utf-8")
                    assert "<strong>Partial run</strong> (status: running)" in page
                    reports += 1
        assert warned == []
        outputs = [c.communicate(timeout=60) for c in checks]
        still_running = trainer.poll() is None
    finally:
        stop.touch()
    results, stderr = finish_forked(trainer)
    assert still_running, "the trainer was expected to outlive its readers"
    assert results == [{"exit": 0, "signal": None}], stderr

    assert seen == sorted(seen) and seen[-1] > seen[0]  # the readers saw the run grow
    for check, (out, err) in zip(checks, outputs, strict=True):
        assert check.returncode in (0, 1), err
        summary = json.loads(out)["summary"]
        assert summary["partial"] is True and summary["status"] == "running"
        assert summary["steps"] >= seen[0] and summary["steps"] % FLUSH == 0

    final = gradscope.load(log_dir)
    losses = logged_losses(losses_file)
    assert final.status == "complete"
    assert_prefix(final, losses, len(losses))  # every step, after all that reading


@pytest.mark.parametrize("order", ["outer_first", "inner_first"])
def test_closing_either_of_two_monitors_leaves_the_other_hooked(order: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gradscope.Monitor(model, opt, activation_every=1, update_every=1, on_finding=None)
    second = gradscope.Monitor(model, opt, activation_every=1, update_every=1, on_finding=None)
    closing, staying = (first, second) if order == "outer_first" else (second, first)
    train(model, opt, _Pair(first, second), 2)
    closing.close()
    train(model, opt, staying, 2, first=2)
    staying.close()
    run = staying.run
    assert run.n_steps == 4
    assert run.metric("act_mean").notna().all().all()  # its forward hooks kept working after the other closed
    assert np.isfinite(run.metric("update_norm").to_numpy()).all()  # and its optimizer hooks too
    assert closing.run.n_steps == 2


class _Pair:
    def __init__(self, *monitors: gradscope.Monitor) -> None:
        self.monitors = monitors

    def step(self, loss: torch.Tensor) -> None:
        for mon in self.monitors:
            mon.step(loss)


def _header(writer: RunWriter) -> None:
    writer.set_meta({"modules": [], "layers": []})


@pytest.mark.parametrize("stage", ["no_file_yet", "old_run_being_replaced", "empty_file", "tables_without_header"])
def test_a_reader_arriving_while_a_run_is_created_waits_for_its_header(stage: str, tmp_path: Path) -> None:
    """A Monitor takes the directory, creates run.sqlite (removing an old run first with
    overwrite=True), its tables and the model description in separate steps; a live report started
    with the training can land in between. It waits for the header instead of calling the run
    missing, empty, corrupt or dead."""
    writers: list[RunWriter] = []
    if stage == "no_file_yet":
        (tmp_path / LOCK_NAME).touch()  # the lock is taken; run.sqlite comes next
        later = lambda: (writers.append(RunWriter(tmp_path)), _header(writers[-1]))  # noqa: E731
    elif stage == "old_run_being_replaced":
        RunWriter(tmp_path).close("complete")
        (tmp_path / DB_NAME).unlink()  # what overwrite=True does before it creates the new file
        os.utime(tmp_path / LOCK_NAME)
        later = lambda: (writers.append(RunWriter(tmp_path)), _header(writers[-1]))  # noqa: E731
    elif stage == "empty_file":
        (tmp_path / LOCK_NAME).touch()
        (tmp_path / DB_NAME).touch()  # what sqlite3.connect() leaves before its first write
        later = lambda: (writers.append(RunWriter(tmp_path, overwrite=True)), _header(writers[-1]))  # noqa: E731
    else:
        writers.append(RunWriter(tmp_path))
        later = lambda: _header(writers[0])  # noqa: E731
    timer = threading.Timer(0.3, later)
    timer.start()
    try:
        started = time.monotonic()
        run = gradscope.load(tmp_path)
        waited = time.monotonic() - started
    finally:
        timer.join()
        for writer in writers:
            writer.close("complete")
    assert run.modules == {} and run.status == "running"
    assert waited >= 0.25  # it waited for the header (an upper bound would only measure machine load)


def test_a_directory_a_monitor_left_long_ago_without_a_run_is_refused_at_once(tmp_path: Path) -> None:
    RunWriter(tmp_path).close("complete")
    (tmp_path / DB_NAME).unlink()  # the run was deleted; the lock file stays
    an_hour_ago = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (an_hour_ago, an_hour_ago))
    started = time.monotonic()
    with pytest.raises(gradscope.RunNotFoundError, match=r"the directory holds no run\.sqlite"):
        gradscope.load(tmp_path)
    assert time.monotonic() - started < 0.5


def test_an_incomplete_run_from_long_ago_is_refused_at_once(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)  # died before writing the model description
    writer.close("running")
    an_hour_ago = time.time() - 3600
    os.utime(tmp_path / DB_NAME, (an_hour_ago, an_hour_ago))
    started = time.monotonic()
    with pytest.raises(gradscope.UnreadableRunError, match="it holds no model description; the writer died before its first flush"):
        gradscope.load(tmp_path)
    assert time.monotonic() - started < 0.5
