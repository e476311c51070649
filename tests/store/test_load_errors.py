"""``gradscope.load`` on anything that is not a readable run raises the right GradscopeError with a
message saying what is wrong and what to do: never a raw sqlite, JSON or decoding traceback."""

from __future__ import annotations

import random
import re
import sqlite3
from pathlib import Path

import pytest
from store_runs import write_small_run

import gradscope


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small complete run, closed (so its WAL is folded into run.sqlite)."""
    log_dir = write_small_run(tmp_path_factory.mktemp("good") / "run")
    assert sorted(p.name for p in log_dir.iterdir()) == [".gradscope.lock", "run.sqlite"]
    return log_dir


def _copy(run_dir: Path, to: Path) -> Path:
    to.mkdir()
    (to / "run.sqlite").write_bytes((run_dir / "run.sqlite").read_bytes())
    return to


def test_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(gradscope.RunNotFoundError, match=r"no run at .*nowhere.*: the path does not exist; pass the log_dir given to Monitor"):
        gradscope.load(missing)
    with pytest.raises(FileNotFoundError):  # also catchable as the built-in it stands for
        gradscope.load(missing)


def test_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(gradscope.RunNotFoundError, match=r"the directory holds no run\.sqlite; pass the log_dir given to Monitor"):
        gradscope.load(tmp_path)


def test_an_empty_run_file(tmp_path: Path) -> None:
    (tmp_path / "run.sqlite").touch()
    with pytest.raises(gradscope.UnreadableRunError, match=r"it is an empty file; pass a log_dir written by gradscope\.Monitor"):
        gradscope.load(tmp_path)


def test_a_text_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("loss went down\n")
    with pytest.raises(gradscope.UnreadableRunError, match=r"notes\.txt.*it is not a gradscope run database"):
        gradscope.load(text)
    (tmp_path / "run.sqlite").write_text("not sqlite at all")
    with pytest.raises(gradscope.UnreadableRunError, match=r"it is not a gradscope run database"):
        gradscope.load(tmp_path)


def test_a_directory_where_the_file_should_be(tmp_path: Path) -> None:
    (tmp_path / "run.sqlite").mkdir()
    with pytest.raises(gradscope.UnreadableRunError, match=r"cannot read run .*run\.sqlite"):
        gradscope.load(tmp_path)


def test_a_sqlite_database_that_is_not_a_run(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "run.sqlite") as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(gradscope.UnreadableRunError, match=r"the database is corrupt or not a run \(no such table: meta\)"):
        gradscope.load(tmp_path)


def test_a_database_with_a_meta_table_but_no_schema_version(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "run.sqlite") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('owner', '\"someone\"')")
    with pytest.raises(gradscope.UnreadableRunError, match=r"it has no schema version, so it was not written by gradscope"):
        gradscope.load(tmp_path)


def test_a_newer_schema_version(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "newer")
    newer = gradscope.store.SCHEMA_VERSION + 1
    with sqlite3.connect(run_dir / "run.sqlite") as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(newer),))
    message = f"written with run schema {newer} but this gradscope reads up to {gradscope.store.SCHEMA_VERSION}; upgrade gradscope"
    with pytest.raises(gradscope.UnreadableRunError, match=re.escape(message)):
        gradscope.load(run_dir)


def test_corrupt_metadata(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "meta")
    with sqlite3.connect(run_dir / "run.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '{not json' WHERE key = 'layers'")
    with pytest.raises(gradscope.UnreadableRunError, match=r"its metadata is corrupt"):
        gradscope.load(run_dir)


def test_metadata_that_is_not_utf8_text(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "bytes")
    with sqlite3.connect(run_dir / "run.sqlite") as conn:
        conn.execute("UPDATE meta SET value = CAST(x'22b3ff22' AS TEXT) WHERE key = 'layers'")
    with pytest.raises(gradscope.UnreadableRunError, match=r"cannot read run .*bytes.*: Could not decode to UTF-8 column 'value'"):
        gradscope.load(run_dir)


def test_a_damaged_schema_that_is_not_utf8(good_run: Path, tmp_path: Path) -> None:
    data = bytearray((good_run / "run.sqlite").read_bytes())
    at = data.find(b"chunks_by_stream")  # the index's name in the schema table
    data[at + 3] = 0xB3
    (tmp_path / "run.sqlite").write_bytes(bytes(data))
    with pytest.raises(gradscope.UnreadableRunError, match=r"the database is corrupt or not a run \('utf-8' codec"):
        gradscope.load(tmp_path)


def test_corrupt_chunk_data(good_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(good_run, tmp_path / "chunks")
    with sqlite3.connect(run_dir / "run.sqlite") as conn:
        conn.execute("UPDATE chunks SET data = x'0102' WHERE id = 1")  # 2 bytes where a float32 matrix belongs
    with pytest.raises(gradscope.UnreadableRunError, match=r"the data is corrupt"):
        gradscope.load(run_dir)


@pytest.mark.parametrize("keep", [100, 4096, 8192, 20_000])
def test_a_truncated_file(keep: int, good_run: Path, tmp_path: Path) -> None:
    (tmp_path / "run.sqlite").write_bytes((good_run / "run.sqlite").read_bytes()[:keep])
    with pytest.raises(gradscope.UnreadableRunError, match=r"cannot read run .*(corrupt|malformed|not a run|no model description)"):
        gradscope.load(tmp_path)


def test_damaged_bytes_anywhere_give_a_run_or_an_unreadable_run_error(good_run: Path, tmp_path: Path) -> None:
    """Truncations, overwritten ranges and flipped bits all over the file: loading either works
    (damage in unused space) or raises UnreadableRunError, never anything else. That a run which
    loads is the run as written is checked in test_damage_detection.py."""
    good = (good_run / "run.sqlite").read_bytes()
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(90):
        damaged = bytearray(good)
        if trial % 3 == 0:
            damaged = damaged[: rng.randrange(17, len(damaged))]
        elif trial % 3 == 1:
            at = rng.randrange(16, len(damaged) - 8)
            damaged[at : at + 8] = bytes(rng.randrange(256) for _ in range(8))
        else:
            damaged[rng.randrange(100, len(damaged))] ^= 0xFF
        target = tmp_path / f"t{trial}.sqlite"
        target.write_bytes(bytes(damaged))
        try:
            run = gradscope.load(target)
            run.to_pandas()
            outcomes["loaded"] += 1
        except gradscope.UnreadableRunError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 10 and outcomes["loaded"] > 10  # both paths were exercised


def test_load_passes_a_run_through(good_run: Path) -> None:
    run = gradscope.load(good_run)
    assert gradscope.load(run) is run
