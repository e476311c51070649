"""A log directory that cannot be written, at the start of a run or in the middle of it.

At the start nothing has trained yet, so the Monitor refuses with a one-line GradscopeError that
names the directory and the reason: the user fixes the path before spending compute. In the middle
of a run, training must go on: gradscope warns once, never raises into the loop unless
``strict=True``, keeps every step it committed before the failure, and never mislabels steps.

Failures are injected three ways: SQLite's own "database or disk is full" (a page limit on the real
connection), a write that raises ``OSError(ENOSPC)``, and a connection whose every write transaction
is refused (a disk with no byte left, where even the final status cannot be written).
"""

from __future__ import annotations

import copy
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reliability_support import FullDisk, assert_prefix, detector_errors, gradscope_warnings, mlp, train
from test_hooks_removed import _differences, _state

import gradscope
from gradscope.store import sqlite as store_sqlite
from gradscope.store.sqlite import RunWriter

FLUSH = 4
STEPS = 30
FULL_AT = 10  # the disk fills before step 10; the flush in step 8 (steps 0-7) was the last to commit


# --------------------------------------------------------------------------- at the start


@pytest.fixture
def read_only_sqlite(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SQLite opens every new run file read-only, as on a read-only mount (root ignores chmod, so
    file permissions cannot stand in for it in CI)."""
    real_connect = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        Path(database).touch()
        return real_connect(f"file:{database}?mode=ro", *args, uri=True, **{k: v for k, v in kwargs.items() if k != "uri"})

    monkeypatch.setattr(sqlite3, "connect", connect)
    yield


@pytest.fixture
def full_sqlite(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every new run file sits on a disk with room for one page: creating the tables fails with
    SQLite's "database or disk is full"."""
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA max_page_count = 1")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    yield


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("under_a_file", "Not a directory"),
        ("read_only", "attempt to write a readonly database"),
        ("disk_full", "database or disk is full"),
    ],
)
def test_an_unwritable_log_dir_is_refused_at_start_with_the_reason(fault: str, reason: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    log_dir = tmp_path / "run"
    if fault == "under_a_file":
        (tmp_path / "notes.txt").write_text("a file, not a directory")
        log_dir = tmp_path / "notes.txt" / "run"
    else:
        request.getfixturevalue({"read_only": "read_only_sqlite", "disk_full": "full_sqlite"}[fault])
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _state(model, opt)
    with pytest.raises(gradscope.InvalidInputError) as caught:
        gradscope.Monitor(model, opt, log_dir=log_dir, on_finding=None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"expected log_dir {str(log_dir)!r} to be a directory gradscope can write a run to, but writing failed: {reason}")
    assert message.endswith("pass a writable directory with free space, or log_dir=None to keep the run in memory")
    assert _differences(before, _state(model, opt)) == []  # no hook left behind
    if fault != "under_a_file":
        # No half-made run.sqlite is left to block the directory (see the next test).
        assert sorted(p.name for p in log_dir.iterdir()) == [".gradscope.lock"]


def test_the_directory_works_again_once_the_fault_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refused start released the directory's lock and removed its half-made file: once the disk
    has room, a Monitor starts there at once, without overwrite=True."""
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: _limited(real_connect(*a, **k)))
    with pytest.raises(gradscope.InvalidInputError, match="database or disk is full"):
        gradscope.Monitor(mlp(), log_dir=tmp_path, on_finding=None)
    monkeypatch.undo()
    with gradscope.Monitor(mlp(), log_dir=tmp_path, on_finding=None) as mon:
        mon.step(1.0)
    assert gradscope.load(tmp_path).loss.tolist() == [1.0]


def _limited(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute("PRAGMA max_page_count = 1")
    return conn


# --------------------------------------------------------------------------- in the middle of the run


def _enospc_from(monkeypatch: pytest.MonkeyPatch, step_of: Any, first_bad: int, last_bad: int | None = None) -> None:
    """Every flush made while ``first_bad <= step_of() <= last_bad`` raises OSError(ENOSPC)."""
    real_append = RunWriter.append_chunks

    def append_chunks(self: RunWriter, chunks: Any) -> None:
        if step_of() >= first_bad and (last_bad is None or step_of() <= last_bad):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, chunks)

    monkeypatch.setattr(RunWriter, "append_chunks", append_chunks)


class _Loop:
    """A training run whose Monitor may meet a full disk; remembers the losses it saw and how far it got."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.model = mlp()
        self.bare = copy.deepcopy(self.model)  # never monitored: the training gradscope must not change
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.log_dir = tmp_path / "run"
        self.options = {"flush_every": FLUSH, "flush_seconds": None, "activation_every": 2, "update_every": 1, "on_finding": None, **options}
        self.step = 0
        self.losses: list[float] = []

    def run(self, steps: int = STEPS, before_step: Any = None) -> gradscope.Monitor:
        with gradscope.Monitor(self.model, self.opt, log_dir=self.log_dir, **self.options) as mon:
            for self.step in range(steps):
                if before_step is not None:
                    before_step(mon, self.step)
                self.losses += train(self.model, self.opt, mon, 1, first=self.step)
        return mon

    def assert_training_unchanged(self) -> None:
        """The monitored model ends exactly where the never-monitored copy does."""
        train(self.bare, torch.optim.SGD(self.bare.parameters(), lr=0.1), None, STEPS)
        for a, b in zip(self.model.parameters(), self.bare.parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_full_disk_mid_run_never_raises_into_training_and_keeps_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = _Loop(tmp_path)
    _enospc_from(monkeypatch, lambda: loop.step, FULL_AT)
    with gradscope_warnings() as warned:
        loop.run()
    assert loop.step == STEPS - 1 and len(loop.losses) == STEPS  # every training step ran
    loop.assert_training_unchanged()
    assert warned, "the user is told that the run is not being written"
    assert all("No space left on device" in w for w in warned), warned

    run = gradscope.load(loop.log_dir)
    assert_prefix(run, loop.losses, 8)  # the flushes before the disk filled, all of them
    assert detector_errors(gradscope.diagnose(run)) == []
    assert "<!DOCTYPE html>" in gradscope.report(run, tmp_path / "r.html").read_text(encoding="utf-8")


def test_a_full_disk_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = _Loop(tmp_path)
    _enospc_from(monkeypatch, lambda: loop.step, FULL_AT)
    with gradscope_warnings() as warned:
        loop.run()
    assert len(warned) == 1, warned


def test_a_disk_full_for_every_write_does_not_raise_out_of_close(tmp_path: Path) -> None:
    loop = _Loop(tmp_path)
    disk: dict[str, FullDisk] = {}

    def fill(mon: gradscope.Monitor, step: int) -> None:
        if step == 0:
            disk["conn"] = mon._writer.conn = FullDisk(mon._writer.conn)  # type: ignore[assignment]
        disk["conn"].full = step >= FULL_AT

    with gradscope_warnings() as warned:
        loop.run(before_step=fill)  # must not raise, even in close()
    assert disk["conn"].refused >= 2  # the flushes and the final status were refused
    assert len(warned) == 1, warned
    run = gradscope.load(loop.log_dir)
    assert_prefix(run, loop.losses, 8)
    assert run.is_partial  # the final status could not be written: the run reads as cut short


def test_after_a_write_failure_steps_keep_their_numbers_and_the_run_reads_as_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = _Loop(tmp_path)
    _enospc_from(monkeypatch, lambda: loop.step, FULL_AT, 17)  # full for a while, then space is freed
    with gradscope_warnings():
        mon = loop.run()
    assert mon.steps_recorded == STEPS
    run = gradscope.load(loop.log_dir)
    np.testing.assert_array_equal(run.steps[:8], np.arange(8))
    assert run.steps[-1] == STEPS - 1  # recording went on once the disk had room
    # Whatever was kept in memory or dropped during the failure, every stored step has its own loss.
    np.testing.assert_array_equal(run.loss, np.asarray(loop.losses, dtype=np.float32)[run.steps])
    assert run.is_partial and run.n_steps < STEPS


def test_strict_raises_the_write_error_into_the_training_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = _Loop(tmp_path, strict=True)
    _enospc_from(monkeypatch, lambda: loop.step, FULL_AT)
    before = _state(loop.model, loop.opt)
    with pytest.raises(OSError, match="No space left on device"):
        loop.run()
    assert loop.step == 12  # the step whose step() flushed: the first write after the disk filled
    assert len(loop.losses) == 12
    assert _differences(before, _state(loop.model, loop.opt)) == []  # the exception still removed every hook
    run = gradscope.load(loop.log_dir)
    assert_prefix(run, loop.losses, 8)
    assert run.status == "failed"


def test_sqlites_own_disk_full_error_reaches_the_user_unmasked(tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself when the disk is full; rolling back again used to
    raise "cannot rollback - no transaction is active" and hide the real cause."""
    loop = _Loop(tmp_path)

    def fill(mon: gradscope.Monitor, step: int) -> None:
        if step == FULL_AT:
            conn = mon._writer.conn
            conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")

    with gradscope_warnings() as warned:
        loop.run(steps=120, before_step=fill)  # enough steps to need more pages than the limit allows
    assert warned and all("database or disk is full" in w for w in warned), warned
    assert not any("no transaction is active" in w for w in warned)
    run = gradscope.load(loop.log_dir)
    assert run.n_steps >= 8
    assert_prefix(run, loop.losses, run.n_steps)


# --------------------------------------------------------------------------- the writer on its own


def test_the_writer_recovers_when_space_comes_back(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer.set_meta({"modules": []})
    writer.define_stream("s", [("l", "m")])
    pages = writer.conn.execute("PRAGMA page_count").fetchone()[0]
    writer.conn.execute(f"PRAGMA max_page_count = {pages}")
    big = np.ones((4096, 1), dtype=np.float32)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        writer.append("s", np.arange(4096), big)
    assert not writer.conn.in_transaction  # nothing left open to make every later write fail
    writer.conn.execute("PRAGMA max_page_count = 1000000")
    writer.append("s", np.arange(4096), big * 2)
    writer.close("complete")
    run = gradscope.load(tmp_path)
    assert run.metric("m")["l"].tolist() == [2.0] * 4096  # only the write that succeeded is there


def test_closing_on_a_full_disk_releases_the_file_and_the_lock(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer.conn = FullDisk(writer.conn)  # type: ignore[assignment]
    writer.conn.full = True  # type: ignore[attr-defined]
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        writer.close("complete")
    writer.close("complete")  # a second close does nothing
    conn, _ = store_sqlite.connect_for_reading(tmp_path)
    assert store_sqlite.read_meta(conn, "run")["status"] == "running"  # the final status never made it: partial
    conn.close()
    RunWriter(tmp_path, overwrite=True).close("complete")  # the lock was released
