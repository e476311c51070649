"""SQLite storage of a run: the one place that knows the file format.

A run directory holds ``run.sqlite``. Series are stored as *streams*: each stream has a fixed
list of columns ``(layer, metric)`` and is appended in chunks, one chunk per flush, each chunk a
``(rows, columns)`` float32 matrix plus its step numbers. One row per step per stream keeps the
file compact (a few bytes per value) and makes a flush a single ``INSERT``.

Crash safety comes from SQLite itself: every flush is one transaction in WAL mode, so a process
killed with SIGKILL leaves the run holding every flush that committed, and readers in other
processes see a consistent state while the writer goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradscope.errors import InvalidInputError, RunNotFoundError, UnreadableRunError

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "Chunk",
    "IncompleteRunError",
    "RunWriter",
    "StreamRows",
    "being_created",
    "column_pick",
    "connect_for_reading",
    "read_stream_columns",
    "read_stream_rows",
]

DB_NAME = "run.sqlite"
LOCK_NAME = ".gradscope.lock"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE columns (
    stream TEXT NOT NULL, col INTEGER NOT NULL, layer TEXT NOT NULL, metric TEXT NOT NULL,
    PRIMARY KEY (stream, col)
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
    first_step INTEGER NOT NULL, last_step INTEGER NOT NULL,
    n_rows INTEGER NOT NULL, n_cols INTEGER NOT NULL,
    steps BLOB NOT NULL, data BLOB NOT NULL
);
CREATE INDEX chunks_by_stream ON chunks (stream, last_step);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, kind TEXT NOT NULL, payload TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Chunk:
    steps: np.ndarray  # (rows,) int64
    data: np.ndarray  # (rows, cols) float32


class RunWriter:
    """Appends a run to ``<log_dir>/run.sqlite`` (or to memory when ``log_dir`` is None).

    Holds an exclusive lock on the directory while open so that two writers never interleave.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None, *, overwrite: bool = False) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._lock_fd: int | None = None
        self._closed = False
        if self.log_dir is None:
            self.conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            self._create_schema()
            return
        created: Path | None = None
        try:
            self.conn, created = self._open_dir(self.log_dir, overwrite)
            self._create_schema()
        except (OSError, sqlite3.Error) as e:
            # Nothing has been trained yet: refusing now, with the reason, beats losing the run later.
            if created is not None:
                self.conn.close()
                _remove_db(created)  # a half-created file would read as "not a run" and block the next Monitor
            self._release_lock()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise InvalidInputError(
                f"expected log_dir {str(self.log_dir)!r} to be a directory gradscope can write a run to, but writing "
                f"failed: {reason}; pass a writable directory with free space, or log_dir=None to keep the run in memory"
            ) from None
        except BaseException:
            self._release_lock()
            raise

    def _create_schema(self) -> None:
        # Tables and the first metadata in one transaction: a reader never sees a half-made run (a
        # meta table without a schema version reads as "not written by gradscope").
        first_meta = ", ".join(
            f"('{key}', '{json.dumps(value)}')" for key, value in {"schema_version": SCHEMA_VERSION, "status": "running"}.items()
        )
        try:
            self.conn.executescript(f"BEGIN;\n{_SCHEMA}\nINSERT INTO meta (key, value) VALUES {first_meta};\nCOMMIT;")
        except BaseException:
            _rollback(self.conn)
            raise

    def _open_dir(self, log_dir: Path, overwrite: bool) -> tuple[sqlite3.Connection, Path]:
        """Lock ``log_dir`` and open a new ``run.sqlite`` in it; return the connection and the file's path."""
        if log_dir.exists() and not log_dir.is_dir():
            raise InvalidInputError(f"expected log_dir to be a directory but {str(log_dir)!r} is a file; pass a directory path")
        log_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(log_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise InvalidInputError(
                f"log_dir {str(log_dir)!r} is being written by another Monitor (possibly in another process); "
                "give each run its own log_dir"
            ) from None
        self._lock_fd = lock_fd
        # The lock file's time says when a writer last took the directory: until run.sqlite exists
        # (and while an overwrite replaces it) that is how readers tell "being created" from "no run".
        os.utime(lock_fd)
        db = log_dir / DB_NAME
        if db.exists():
            if not overwrite:
                self._release_lock()
                raise InvalidInputError(
                    f"log_dir {str(log_dir)!r} already holds a run; choose a new directory or pass overwrite=True to replace it"
                )
            _remove_db(db)
        conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash (our failure model); only an OS
            # crash or power loss can lose the last transactions, and it costs no fsync per flush.
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            _remove_db(db)
            raise
        return conn, db

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def set_meta(self, items: Mapping[str, Any]) -> None:
        with self._transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(k, json.dumps(v, allow_nan=True)) for k, v in items.items()],
            )

    def define_stream(self, stream: str, columns: Sequence[tuple[str, str]]) -> None:
        with self._transaction():
            self.conn.executemany(
                "INSERT INTO columns (stream, col, layer, metric) VALUES (?, ?, ?, ?)",
                [(stream, i, layer, metric) for i, (layer, metric) in enumerate(columns)],
            )

    def append(self, stream: str, steps: np.ndarray, data: np.ndarray) -> None:
        """Write one chunk; ``data`` is ``(len(steps), n_columns)``."""
        self.append_chunks([(stream, steps, data)])

    def append_chunks(self, chunks: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Write ``(stream, steps, data)`` chunks in one transaction: a crash keeps all of them or none,
        so a flush never leaves steps without their activation statistics."""
        rows = []
        for stream, steps, data in chunks:
            if len(steps) == 0:
                continue
            steps = np.ascontiguousarray(steps, dtype="<i8")
            data = np.ascontiguousarray(data, dtype="<f4")
            rows.append((stream, int(steps[0]), int(steps[-1]), data.shape[0], data.shape[1], steps.tobytes(), data.tobytes()))
        if not rows:
            return
        with self._transaction():
            self.conn.executemany(
                "INSERT INTO chunks (stream, first_step, last_step, n_rows, n_cols, steps, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def add_event(self, kind: str, step: int | None, payload: Mapping[str, Any]) -> None:
        with self._transaction():
            self.conn.execute(
                "INSERT INTO events (step, kind, payload) VALUES (?, ?, ?)", (step, kind, json.dumps(payload))
            )

    def close(self, status: str) -> None:
        """Record the final ``status`` and release the file and the directory lock. Safe to call twice.

        When the status cannot be written (a full disk), the file and the lock are released all the
        same and the error is raised; the run then reads as partial (status ``"running"``).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.set_meta({"status": status, "ended_at": time.time()})
        finally:
            try:
                if self.log_dir is not None:
                    self.conn.close()
            finally:
                self._release_lock()

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            _rollback(self.conn)
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)  # else every later BEGIN fails with "transaction within a transaction"
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any, without masking the error that caused it.

    SQLite rolls back by itself on some errors (a full disk, an I/O error); a second ROLLBACK would
    then raise "no transaction is active" and hide the real cause from the user.
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading

# A Monitor creates run.sqlite, its tables and the model description in three commits a few
# milliseconds apart. A file that young, next to a Monitor's lock file, and still without them is
# most likely being created right now: readers give the writer this long before calling it broken.
CREATION_WINDOW_S = 10.0


class IncompleteRunError(UnreadableRunError):
    """A run file without its header (tables, model description): being created, or its writer died doing so."""


def being_created(path: str | os.PathLike[str]) -> bool:
    """Whether the run at ``path`` looks like one a Monitor started moments ago (see
    ``CREATION_WINDOW_S``): its file is that young, or there is no file yet but a Monitor took the
    directory that recently (it is about to create the file, or is replacing an old run)."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    try:
        lock_age = time.time() - (run_dir / LOCK_NAME).stat().st_mtime
    except OSError:
        return False  # no Monitor ever wrote here
    try:
        age = time.time() - (run_dir / DB_NAME).stat().st_mtime
    except FileNotFoundError:
        age = lock_age
    except OSError:
        return False
    return age < CREATION_WINDOW_S


def connect_for_reading(path: str | os.PathLike[str]) -> tuple[sqlite3.Connection, Path]:
    """Open a run directory (or its ``run.sqlite``) read-only, turning every failure into a GradscopeError."""
    p = Path(path)
    if not p.exists():
        raise RunNotFoundError(f"no run at {str(p)!r}: the path does not exist; pass the log_dir given to Monitor")
    db = p / DB_NAME if p.is_dir() else p
    if p.is_dir() and not db.exists():
        raise RunNotFoundError(f"no run at {str(p)!r}: the directory holds no {DB_NAME}; pass the log_dir given to Monitor")
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise UnreadableRunError(f"cannot read run {str(db)!r}: {e.strerror}") from None
    if not header:  # sqlite3.connect() creates the file; its first page comes with the first write
        raise IncompleteRunError(f"cannot read run {str(db)!r}: it is an empty file; pass a log_dir written by gradscope.Monitor")
    if header != b"SQLite format 3\x00":
        raise UnreadableRunError(f"cannot read run {str(db)!r}: it is not a gradscope run database; pass a log_dir written by gradscope.Monitor")
    try:
        # Read-write open (not mode=ro) so that SQLite can replay the WAL of a run whose writer was
        # killed; we never write through this connection.
        conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, check_same_thread=False)
    except sqlite3.DatabaseError as e:
        raise UnreadableRunError(f"cannot read run {str(db)!r}: the database cannot be opened ({e})") from None
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("SELECT count(*) FROM meta").fetchone()
    except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: a damaged schema that is not UTF-8
        no_tables = _has_no_tables(conn)
        conn.close()
        error = IncompleteRunError if no_tables else UnreadableRunError
        raise error(f"cannot read run {str(db)!r}: the database is corrupt or not a run ({e})") from None
    return conn, db


def _has_no_tables(conn: sqlite3.Connection) -> bool:
    """True for a database whose tables are not created yet (the state between the writer's first two commits)."""
    try:
        count: int = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        return count == 0
    except (sqlite3.DatabaseError, ValueError):
        return False


def read_meta(conn: sqlite3.Connection, where: str) -> dict[str, Any]:
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.OperationalError as e:  # locked, unreadable, …: not necessarily damage
        raise UnreadableRunError(f"cannot read run {where!r}: {e}") from None
    except sqlite3.DatabaseError as e:
        raise UnreadableRunError(f"cannot read run {where!r}: its metadata is corrupt ({e})") from None
    try:
        return {str(k): json.loads(v) for k, v in rows}
    except (ValueError, TypeError) as e:  # damaged bytes that are no longer JSON text
        raise UnreadableRunError(f"cannot read run {where!r}: its metadata is corrupt ({e})") from None


def read_columns(conn: sqlite3.Connection, stream: str) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT layer, metric FROM columns WHERE stream = ? ORDER BY col", (stream,)).fetchall()
    return [(layer, metric) for layer, metric in rows]


def read_streams(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT stream FROM columns ORDER BY stream")]


@dataclass(frozen=True)
class StreamRows:
    """The rows of one stream as a reader found them: its chunks by id and, in a window, which of their
    rows it keeps. Columns read later from these (:func:`read_stream_columns`) come from the same
    snapshot however much a writer has appended since, because chunks are never changed once written."""

    stream: str
    n_cols: int
    chunk_ids: tuple[int, ...]
    chunk_rows: tuple[int, ...]
    steps: np.ndarray  # (rows kept,) int64
    keep: np.ndarray | None = None  # (sum(chunk_rows),) bool, the rows inside the window; None keeps all

    @property
    def nbytes(self) -> int:
        """Bytes of every column of the kept rows as float32."""
        return len(self.steps) * self.n_cols * 4

    def take(self, start: int, stop: int) -> StreamRows:
        """Kept rows ``start`` to ``stop`` only, in the chunks that hold them (reading the first step
        of a long run reads one chunk)."""
        stored = sum(self.chunk_rows)
        keep = self.keep if self.keep is not None else np.ones(stored, dtype=bool)
        kept_before = np.cumsum(keep) - keep  # (stored rows,) kept rows before each one
        inside = keep & (kept_before >= start) & (kept_before < stop)
        bounds = np.cumsum((0, *self.chunk_rows))
        chosen = [i for i in range(len(self.chunk_ids)) if inside[bounds[i] : bounds[i + 1]].any()]
        return StreamRows(
            self.stream,
            self.n_cols,
            tuple(self.chunk_ids[i] for i in chosen),
            tuple(self.chunk_rows[i] for i in chosen),
            self.steps[start:stop],
            np.concatenate([inside[bounds[i] : bounds[i + 1]] for i in chosen]) if chosen else np.zeros(0, dtype=bool),
        )


def read_stream_rows(
    conn: sqlite3.Connection, stream: str, n_cols: int, *, since_step: int | None = None, head_steps: int = 0
) -> StreamRows:
    """The chunks and steps of a stream (those of steps ≥ ``since_step`` or < ``head_steps`` when a
    window is given), without its values: those are read per column by :func:`read_stream_columns`."""
    where = "stream = ?"
    args: list[Any] = [stream]
    if since_step is not None:
        where += " AND (last_step >= ? OR first_step < ?)"
        args += [since_step, head_steps]
    ids, rows, steps = [], [], []
    for chunk_id, n_rows, chunk_cols, step_blob in conn.execute(
        f"SELECT id, n_rows, n_cols, steps FROM chunks WHERE {where} ORDER BY id", args
    ):
        if chunk_cols != n_cols:
            raise ValueError(f"a chunk of stream {stream!r} has {chunk_cols} columns, expected {n_cols}")
        steps.append(np.frombuffer(step_blob, dtype="<i8"))
        if len(steps[-1]) != n_rows:
            raise ValueError(f"a chunk of stream {stream!r} has {len(steps[-1])} steps, expected {n_rows}")
        ids.append(int(chunk_id))
        rows.append(int(n_rows))
    all_steps = np.concatenate(steps).astype(np.int64) if steps else np.zeros(0, dtype=np.int64)
    keep = None
    if since_step is not None:
        keep = (all_steps >= since_step) | (all_steps < head_steps)
        all_steps = all_steps[keep]
    return StreamRows(stream, n_cols, tuple(ids), tuple(rows), all_steps, keep)


def read_stream_columns(conn: sqlite3.Connection, rows: StreamRows, cols: Sequence[int]) -> np.ndarray:
    """Columns ``cols`` of the rows of a stream as a ``(rows, len(cols))`` float32 array.

    Each chunk is read through SQLite's incremental blob I/O (several times faster than selecting
    the blob) and only the requested columns are kept, so reading one metric of a long run needs
    that metric's size in memory plus one chunk, not the whole stream.
    """
    cols = list(cols)
    pick = column_pick(cols)
    out = np.empty((len(rows.steps), len(cols)), dtype=np.float32)
    at = kept_at = 0
    for chunk_id, n_rows in zip(rows.chunk_ids, rows.chunk_rows, strict=True):
        with conn.blobopen("chunks", "data", chunk_id, readonly=True) as blob:
            if len(blob) != n_rows * rows.n_cols * 4:
                raise ValueError(
                    f"a chunk of stream {rows.stream!r} holds {len(blob)} bytes, expected {n_rows} rows × {rows.n_cols} float32"
                )
            block = np.frombuffer(blob.read(), dtype="<f4").reshape(n_rows, rows.n_cols)[:, pick]
        if rows.keep is not None:
            block = block[rows.keep[at : at + n_rows]]
        out[kept_at : kept_at + len(block)] = block
        at += n_rows
        kept_at += len(block)
    return out


def column_pick(cols: Sequence[int]) -> slice | list[int]:
    """An index for ``array[:, pick]``: a slice (a view) when the columns sit side by side, as the
    Monitor writes a metric's columns, else the list (a copy)."""
    first = cols[0] if len(cols) else 0
    return slice(first, first + len(cols)) if list(cols) == list(range(first, first + len(cols))) else list(cols)


def read_meta_value(conn: sqlite3.Connection, key: str) -> Any:
    """One metadata value (``None`` when absent)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row is not None else None


def read_events(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT step, kind, payload FROM events ORDER BY id").fetchall()
    return [{"step": step, "kind": kind, **json.loads(payload)} for step, kind, payload in rows]
