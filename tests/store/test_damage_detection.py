"""Damage inside a run's file is refused when the run is loaded, never loaded as made-up values.

SQLite checks the structure of its pages, not the values inside them: bytes overwritten inside a
chunk of step values used to load as gradient norms of 1e26 or NaN inputs, which ``gradscope check``
then reported as findings, and a damaged name as a layer or metric that does not exist. Every row of
a run now carries a CRC32 of its fields and every chunk one of its values (``gradscope/store/sqlite.py``),
checked on load; runs written before them still load.
"""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from store_runs import write_small_run

import gradscope
from gradscope.cli import main as cli
from gradscope.store import run as run_module

STEPS, FLUSH_EVERY = 20, 4


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small complete run written by a Monitor, closed (its WAL folded into run.sqlite)."""
    return write_small_run(tmp_path_factory.mktemp("good") / "run", steps=STEPS, flush_every=FLUSH_EVERY)


def _copy(good_run: Path, to: Path) -> Path:
    to.mkdir()
    shutil.copyfile(good_run / "run.sqlite", to / "run.sqlite")
    return to


def _query(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read from ``db`` as it stands (immutable: no -wal or -shm file is made)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _overwrite(db: Path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of ``old`` in the file's bytes by ``new``, as a bad disk would."""
    data = db.read_bytes()
    assert data.count(old) == 1, f"expected {old!r} once in the file, found it {data.count(old)} times"
    db.write_bytes(data.replace(old, new))


def _unreadable(run_dir: Path, problem: str) -> str:
    """The message of the UnreadableRunError that loading ``run_dir`` raises: it names the problem and the file."""
    with pytest.raises(gradscope.UnreadableRunError) as raised:
        gradscope.load(run_dir)
    message = str(raised.value)
    assert re.search(problem, message), message
    return message


def _same_run(loaded: gradscope.Run, original: gradscope.Run) -> bool:
    return (
        loaded.meta == original.meta
        and loaded.events == original.events
        and _same_frame(loaded.to_pandas(), original.to_pandas())
    )


def _same_frame(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return (
        a.shape == b.shape
        and a[["step", "layer", "metric"]].equals(b[["step", "layer", "metric"]])
        and np.array_equal(a["value"].to_numpy(), b["value"].to_numpy(), equal_nan=True)
    )


def test_a_value_overwritten_inside_a_chunk_is_refused_naming_the_file(
    good_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fault as found: a gradient norm overwritten with 1e26 loaded, and ``check`` reported it."""
    run_dir = _copy(good_run, tmp_path / "copy")
    db = run_dir / "run.sqlite"
    (chunk_id, n_cols, blob), *_ = _query(db, "SELECT id, n_cols, data FROM chunks WHERE stream = 'step' AND first_step = 8")
    ((col,),) = _query(db, "SELECT col FROM columns WHERE stream = 'step' AND layer = '0' AND metric = 'grad_norm'")
    values = np.frombuffer(blob, dtype="<f4").reshape(-1, n_cols).copy()
    values[1, col] = 1e26  # step 9
    _overwrite(db, blob, values.tobytes())

    message = _unreadable(run_dir, rf"the data is corrupt \(chunk {chunk_id} of stream 'step' does not match its checksum\)")
    assert message.endswith(f": {db.resolve()} is damaged; restore it from a backup or record the run again")
    assert cli(["check", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"gradscope: error: {message}\n"  # no finding, no RuntimeWarning


def test_step_numbers_overwritten_inside_a_chunk_are_refused(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "copy")
    ((chunk_id, steps),) = _query(run_dir / "run.sqlite", "SELECT id, steps FROM chunks WHERE stream = 'step' AND first_step = 12")
    assert np.frombuffer(steps, dtype="<i8").tolist() == [12, 13, 14, 15]
    _overwrite(run_dir / "run.sqlite", steps, struct.pack("<4q", 12, 13, 14, 150))
    _unreadable(run_dir, rf"the data is corrupt \(chunk {chunk_id} of stream 'step' does not match its checksum\)")


def test_a_damaged_metric_name_is_refused_not_loaded_as_another_metric(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "copy")
    ((col,),) = _query(
        run_dir / "run.sqlite", "SELECT col FROM columns WHERE layer = '2.bias' AND metric = 'param_update_norm'"
    )
    _overwrite(run_dir / "run.sqlite", b"2.biasparam_update_norm", b"2.biasparam_updatm_norm")  # one bit
    _unreadable(run_dir, rf"the data is corrupt \(column {col} of stream 'step' does not match its checksum\)")


def test_a_damaged_metadata_entry_is_refused(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "copy")
    _overwrite(run_dir / "run.sqlite", b"loss_giventrue", b"loss_gi6entrue")  # the key's row, not its index entry
    _unreadable(run_dir, r"its metadata is corrupt \(the entry 'loss_gi6en' does not match its checksum\)")


def test_a_chunk_whose_stream_name_is_damaged_is_refused_not_left_out(good_run: Path, tmp_path: Path) -> None:
    """No stream would read it: without a check its four steps would be silently missing."""
    run_dir = _copy(good_run, tmp_path / "copy")
    with sqlite3.connect(run_dir / "run.sqlite") as conn:  # the name changes, its checksum does not
        conn.execute("UPDATE chunks SET stream = 'stop' WHERE stream = 'step' AND first_step = 4")
    _unreadable(run_dir, r"the data is corrupt \(chunk \d+ does not match its checksum\)")


def test_a_damaged_index_does_not_hide_steps(good_run: Path, tmp_path: Path) -> None:
    """The index of chunks loses its last entry: a run is read from its table, so it loads whole."""
    run_dir = _copy(good_run, tmp_path / "copy")
    db = run_dir / "run.sqlite"
    ((root,),) = _query(db, "SELECT rootpage FROM sqlite_master WHERE name = 'chunks_by_stream'")
    ((page_size,),) = _query(db, "PRAGMA page_size")
    data = bytearray(db.read_bytes())
    at = (root - 1) * page_size
    assert data[at] == 0x0A  # a leaf page of an index: the whole index of a small run
    cells = int.from_bytes(data[at + 3 : at + 5], "big")
    data[at + 3 : at + 5] = (cells - 1).to_bytes(2, "big")
    db.write_bytes(bytes(data))
    assert _query(db, "SELECT count(*) FROM chunks INDEXED BY chunks_by_stream WHERE stream = 'step'") == [(STEPS // FLUSH_EVERY - 1,)]

    assert _same_run(gradscope.load(run_dir), gradscope.load(good_run))


def test_damage_in_a_long_run_is_refused_at_load_not_at_first_use(
    good_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long run keeps only its run-level series when loaded; every chunk is still checked then."""
    monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 0)
    assert gradscope.load(good_run).metric("grad_norm").notna().all().all()  # read on request, after the check
    run_dir = _copy(good_run, tmp_path / "copy")
    db = run_dir / "run.sqlite"
    ((chunk_id, n_cols, blob),) = _query(db, "SELECT id, n_cols, data FROM chunks WHERE stream = 'step' AND first_step = 16")
    ((col,),) = _query(db, "SELECT col FROM columns WHERE stream = 'step' AND layer = '2' AND metric = 'grad_norm'")
    values = np.frombuffer(blob, dtype="<f4").reshape(-1, n_cols).copy()
    assert np.isfinite(values[0, col])
    values[0, col] = np.nan  # a per-layer series, read on request: not held at load
    _overwrite(db, blob, values.tobytes())
    _unreadable(run_dir, rf"chunk {chunk_id} of stream 'step' does not match its checksum")


@pytest.mark.skipif(sqlite3.sqlite_version_info < (3, 35), reason="ALTER TABLE … DROP COLUMN needs SQLite 3.35")
def test_a_run_written_without_checksums_still_loads(good_run: Path, tmp_path: Path) -> None:
    """As gradscope wrote runs before checksums: the same tables without the crc32 columns."""
    run_dir = _copy(good_run, tmp_path / "copy")
    with sqlite3.connect(run_dir / "run.sqlite") as conn:
        for table in ("meta", "columns", "chunks", "events"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN crc32")
        conn.execute("ALTER TABLE chunks DROP COLUMN data_crc32")
    assert _same_run(gradscope.load(run_dir), gradscope.load(good_run))


def test_damage_anywhere_gives_the_run_as_written_or_an_unreadable_run_error(good_run: Path, tmp_path: Path) -> None:
    """Flipped bits and overwritten bytes all over the file: a copy that loads is the run exactly as
    it was written (the damage fell in unused space), every other one raises UnreadableRunError."""
    good = (good_run / "run.sqlite").read_bytes()
    original = gradscope.load(good_run)
    rng = random.Random(0)
    outcomes = {"as written": 0, "refused": 0}
    for trial in range(150):
        damaged = bytearray(good)
        if trial % 2:
            damaged[rng.randrange(100, len(damaged))] ^= 1 << rng.randrange(8)
        else:
            at = rng.randrange(100, len(damaged) - 8)
            damaged[at : at + 8] = rng.randbytes(8)
        target = tmp_path / f"t{trial}.sqlite"
        target.write_bytes(bytes(damaged))
        try:
            loaded = gradscope.load(target)
        except gradscope.UnreadableRunError:
            outcomes["refused"] += 1
            continue
        assert _same_run(loaded, original), f"trial {trial}: a damaged copy loaded with other contents"
        outcomes["as written"] += 1
    assert outcomes["refused"] > 20 and outcomes["as written"] > 20, outcomes  # both paths were exercised
