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

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradscope.errors import InvalidInputError, RunNotFoundError, UnreadableRunError

__all__ = ["DB_NAME", "SCHEMA_VERSION", "Chunk", "RunWriter", "connect_for_reading"]

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
        if self.log_dir is None:
            self.conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        else:
            self.conn = self._open_dir(self.log_dir, overwrite)
        self.conn.executescript(_SCHEMA)
        self.set_meta({"schema_version": SCHEMA_VERSION, "status": "running"})

    def _open_dir(self, log_dir: Path, overwrite: bool) -> sqlite3.Connection:
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
        db = log_dir / DB_NAME
        if db.exists():
            if not overwrite:
                self._release_lock()
                raise InvalidInputError(
                    f"log_dir {str(log_dir)!r} already holds a run; choose a new directory or pass overwrite=True to replace it"
                )
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (our failure model); only an OS
        # crash or power loss can lose the last transactions, and it costs no fsync per flush.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

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
        if self.conn is None:
            return
        try:
            self.set_meta({"status": status, "ended_at": time.time()})
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
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


# ----------------------------------------------------------------------------- reading


def connect_for_reading(path: str | os.PathLike[str]) -> tuple[sqlite3.Connection, Path]:
    """Open a run directory (or its ``run.sqlite``) read-only, turning every failure into a GradscopeError."""
    p = Path(path)
    if not p.exists():
        raise RunNotFoundError(f"no run at {str(p)!r}: the path does not exist; pass the log_dir given to Monitor")
    db = p / DB_NAME if p.is_dir() else p
    if p.is_dir() and not db.exists():
        raise RunNotFoundError(
            f"no run at {str(p)!r}: the directory holds no {DB_NAME}; pass the log_dir given to Monitor"
        )
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise UnreadableRunError(f"cannot read run {str(db)!r}: {e.strerror}") from None
    if header != b"SQLite format 3\x00":
        what = "an empty file" if not header else "not a gradscope run database"
        raise UnreadableRunError(f"cannot read run {str(db)!r}: it is {what}; pass a log_dir written by gradscope.Monitor")
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
        conn.close()
        raise UnreadableRunError(f"cannot read run {str(db)!r}: the database is corrupt or not a run ({e})") from None
    return conn, db


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


def iter_chunks(
    conn: sqlite3.Connection, stream: str, *, since_step: int | None = None, head_steps: int = 0
) -> Iterator[Chunk]:
    """The chunks of a stream in write order; with ``since_step``, only those holding steps from
    ``since_step`` on or before ``head_steps``."""
    query = "SELECT n_rows, n_cols, steps, data FROM chunks WHERE stream = ?"
    args: list[Any] = [stream]
    if since_step is not None:
        query += " AND (last_step >= ? OR first_step < ?)"
        args += [since_step, head_steps]
    for n_rows, n_cols, steps, data in conn.execute(query + " ORDER BY id", args):
        yield Chunk(
            steps=np.frombuffer(steps, dtype="<i8").astype(np.int64),
            data=np.frombuffer(data, dtype="<f4").reshape(n_rows, n_cols),
        )


def read_events(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT step, kind, payload FROM events ORDER BY id").fetchall()
    return [{"step": step, "kind": kind, **json.loads(payload)} for step, kind, payload in rows]


def concat_chunks(chunks: Iterable[Chunk], n_cols: int) -> Chunk:
    chunks = list(chunks)
    if not chunks:
        return Chunk(np.zeros(0, dtype=np.int64), np.zeros((0, n_cols), dtype=np.float32))
    return Chunk(np.concatenate([c.steps for c in chunks]), np.concatenate([c.data for c in chunks]))
