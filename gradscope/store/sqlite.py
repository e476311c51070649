"""SQLite storage of a run: the one place that knows the file format.

A run directory holds ``run.sqlite``. Series are stored as *streams*: each stream has a fixed
list of columns ``(layer, metric)`` and is appended in chunks, one chunk per flush, each chunk a
``(rows, columns)`` float32 matrix plus its step numbers. One row per step per stream keeps the
file compact (a few bytes per value) and makes a flush a single ``INSERT``.

Crash safety comes from SQLite itself: every flush is one transaction in WAL mode, so a process
killed with SIGKILL leaves the run holding every flush that committed, and readers in other
processes see a consistent state while the writer goes on.

Damage is caught by checksums: SQLite checks the structure of its pages but not the values inside
them, so bytes overwritten inside a chunk would load as made-up statistics, and inside a name as a
layer or metric that does not exist. Every row carries ``crc32``, the CRC32 of its other fields,
and a chunk also ``data_crc32``, that of its data blob; readers check them all. Runs written before
these columns existed have none and load unchecked, and older readers ignore them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
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
    "check_other_chunks",
    "column_pick",
    "connect_for_reading",
    "database_file",
    "read_stream_columns",
    "read_stream_rows",
]

DB_NAME = "run.sqlite"
LOCK_NAME = ".gradscope.lock"
SCHEMA_VERSION = 1

# ``crc32`` columns: see _row_crc32. A chunk's sit before its blobs, so that reading them does not
# walk the blobs' overflow pages.
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, crc32 INTEGER);
CREATE TABLE columns (
    stream TEXT NOT NULL, col INTEGER NOT NULL, layer TEXT NOT NULL, metric TEXT NOT NULL, crc32 INTEGER,
    PRIMARY KEY (stream, col)
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
    first_step INTEGER NOT NULL, last_step INTEGER NOT NULL,
    n_rows INTEGER NOT NULL, n_cols INTEGER NOT NULL,
    crc32 INTEGER, data_crc32 INTEGER,
    steps BLOB NOT NULL, data BLOB NOT NULL
);
CREATE INDEX chunks_by_stream ON chunks (stream, last_step);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, kind TEXT NOT NULL, payload TEXT NOT NULL, crc32 INTEGER
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
            f"('{key}', '{json.dumps(value)}', {_row_crc32(key, json.dumps(value))})"
            for key, value in {"schema_version": SCHEMA_VERSION, "status": "running"}.items()
        )
        try:
            self.conn.executescript(f"BEGIN;\n{_SCHEMA}\nINSERT INTO meta (key, value, crc32) VALUES {first_meta};\nCOMMIT;")
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

    # Rows are checksummed as SQLite stores them, so text columns get str(): what SQLite makes of a
    # name that is not text (TEXT affinity), which would otherwise read back unlike its checksum.

    def set_meta(self, items: Mapping[str, Any]) -> None:
        rows = [(str(key), json.dumps(value, allow_nan=True)) for key, value in items.items()]
        with self._transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value, crc32) VALUES (?, ?, ?)", [(*row, _row_crc32(*row)) for row in rows]
            )

    def define_stream(self, stream: str, columns: Sequence[tuple[str, str]]) -> None:
        rows = [(str(stream), col, str(layer), str(metric)) for col, (layer, metric) in enumerate(columns)]
        with self._transaction():
            self.conn.executemany(
                "INSERT INTO columns (stream, col, layer, metric, crc32) VALUES (?, ?, ?, ?, ?)",
                [(*row, _row_crc32(*row)) for row in rows],
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
            step_bytes, data_bytes = steps.tobytes(), data.tobytes()
            fields = (str(stream), int(steps[0]), int(steps[-1]), data.shape[0], data.shape[1], zlib.crc32(data_bytes))
            rows.append((*fields, _row_crc32(*fields, blob=step_bytes), step_bytes, data_bytes))
        if not rows:
            return
        with self._transaction():
            self.conn.executemany(
                "INSERT INTO chunks (stream, first_step, last_step, n_rows, n_cols, data_crc32, crc32, steps, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def add_event(self, kind: str, step: int | None, payload: Mapping[str, Any]) -> None:
        row = (None if step is None else int(step), str(kind), json.dumps(payload))
        with self._transaction():
            self.conn.execute("INSERT INTO events (step, kind, payload, crc32) VALUES (?, ?, ?, ?)", (*row, _row_crc32(*row)))

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


def _row_crc32(*fields: object, blob: bytes = b"") -> int:
    """The ``crc32`` of a row: CRC32 of its fields' reprs (so that 5 and "5", or None and "None",
    differ), then of ``blob`` (a chunk's steps; its data blob has a checksum of its own).

    CRC32 because it is the cheapest check in the standard library (zlib.crc32, ~4 GB/s) and
    catches every burst of damage up to 32 bits long and all but 1 in 4 billion of the longer ones:
    damage is what it guards against, not tampering. A value read back from a damaged file may come
    out as another type (bytes where text was), whose repr then does not match.
    """
    return zlib.crc32(blob, zlib.crc32("\x00".join(map(repr, fields)).encode()))


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
    """Open a run directory (or its ``run.sqlite``) for reading, turning every failure into a GradscopeError.

    A run in a read-only directory, on a read-only mount or in a read-only file is read as it is. One
    whose writer was killed, left with its write-ahead log (``run.sqlite-wal``) but without the
    ``-shm`` index SQLite needs to read that log without writing, can only be read from a writable
    copy: that is refused with an error that says so.
    """
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
    log_pending = _log_has_commits(db)
    read_only = not (os.access(db.parent, os.W_OK) and os.access(db, os.W_OK))
    # A run whose log is folded in (closed cleanly) that nobody may write to has no writer to share
    # it with, now or later: read the file as it stands. Without immutable=1, SQLite wants to create
    # the -wal and -shm files beside it even to read, and a read-only directory fails that.
    conn = _connect(db, immutable=read_only and not log_pending)
    try:
        try:
            _probe(conn)
        except sqlite3.OperationalError as e:
            if not _is_read_only_error(e):
                raise
            conn.close()
            if log_pending:
                raise UnreadableRunError(
                    f"cannot read run {str(db)!r}: expected to replay its write-ahead log {DB_NAME}-wal (its writer was "
                    "killed, or is still running) but the run's directory is read-only for this process and SQLite cannot "
                    f"read the log without writing ({e}); copy the whole run directory somewhere writable and read the copy"
                ) from None
            # os.access() said writable but SQLite may not write (ACLs, root squash on NFS): with
            # nothing to replay, the file as it stands is the run.
            conn = _connect(db, immutable=True)
            _probe(conn)
    except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: a damaged schema that is not UTF-8
        no_tables = _has_no_tables(conn)
        conn.close()
        error = IncompleteRunError if no_tables else UnreadableRunError
        raise error(f"cannot read run {str(db)!r}: the database is corrupt or not a run ({e})") from None
    return conn, db


def _connect(db: Path, *, immutable: bool) -> sqlite3.Connection:
    # Quoted: a '?', '#' or '%' in a run's path would otherwise end the file name in the URI, and
    # SQLite would open (or create) another file. Quoted as bytes, so any file name the OS has works.
    uri = f"file:{urllib.parse.quote(os.fsencode(db))}"
    # Read-write open (not mode=ro) when a writer may still be at work or its log may need replaying:
    # SQLite then replays the WAL of a run whose writer was killed and removes its -wal and -shm files
    # when the last reader closes; we never write through this connection (query_only).
    uri += "?mode=ro&immutable=1" if immutable else "?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.DatabaseError as e:
        raise UnreadableRunError(f"cannot read run {str(db)!r}: the database cannot be opened ({e})") from None
    return conn


def _probe(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only=ON")
    conn.execute("SELECT count(*) FROM meta").fetchone()


def _log_has_commits(db: Path) -> bool:
    """Whether ``db`` has a write-ahead log with content: a writer is at work, or was killed before
    folding its log into the file. A clean close removes the log, and the log is empty until the
    writer's first commit."""
    try:
        return Path(f"{db}-wal").stat().st_size > 0
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume a log, so that it is replayed rather than ignored


_SQLITE_READONLY = 8  # result codes from sqlite3.h; extended codes keep them in their low byte
_SQLITE_CANTOPEN = 14


def _is_read_only_error(e: sqlite3.Error) -> bool:
    """Whether SQLite failed because it may not write the run's file or create the files beside it."""
    code = getattr(e, "sqlite_errorcode", None)  # Python ≥ 3.11
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_READONLY, _SQLITE_CANTOPEN)
    return "readonly" in str(e) or "unable to open" in str(e)


def _has_no_tables(conn: sqlite3.Connection) -> bool:
    """True for a database whose tables are not created yet (the state between the writer's first two commits)."""
    try:
        count: int = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        return count == 0
    except (sqlite3.DatabaseError, ValueError):
        return False


def database_file(conn: sqlite3.Connection) -> str:
    """The file ``conn`` reads (``"the in-memory run"`` for a run kept in memory), to name in errors."""
    try:
        for _, name, file in conn.execute("PRAGMA database_list"):
            if name == "main":
                return str(file) if file else "the in-memory run"
    except sqlite3.Error:
        pass  # naming the file is a courtesy: never let it hide the error being reported
    return "the run's file"


def read_meta(conn: sqlite3.Connection, where: str) -> dict[str, Any]:
    try:
        checked = _checksummed(conn, "meta")
        rows = conn.execute(f"SELECT key, value, {'crc32' if checked else 'NULL'} FROM meta").fetchall()
    except sqlite3.OperationalError as e:  # locked, unreadable, …: not necessarily damage
        raise UnreadableRunError(f"cannot read run {where!r}: {e}") from None
    except sqlite3.DatabaseError as e:
        raise UnreadableRunError(f"cannot read run {where!r}: its metadata is corrupt ({e})") from None
    try:
        meta = {str(k): json.loads(v) for k, v, _ in rows}
        version = meta.get("schema_version")
        # A newer gradscope may checksum its rows otherwise: its runs are refused as newer (by the
        # caller, with "upgrade gradscope"), not as corrupt.
        if not (isinstance(version, int) and version > SCHEMA_VERSION):
            for key, value, crc in rows:
                _check_row(checked, crc, (key, value), f"the entry {key!r}")
        return meta
    except (ValueError, TypeError) as e:  # damaged bytes that are no longer JSON text
        raise UnreadableRunError(f"cannot read run {where!r}: its metadata is corrupt ({e})") from None


def read_columns(conn: sqlite3.Connection, stream: str) -> list[tuple[str, str]]:
    """The ``(layer, metric)`` of each column of ``stream``, in order.

    Raises ``ValueError`` for a row that does not match its checksum or a column that is missing.
    """
    checked = _checksummed(conn, "columns")
    # NOT INDEXED here and below: the table is small, and a damaged index could hide or invent rows.
    rows = conn.execute(
        f"SELECT stream, col, layer, metric, {'crc32' if checked else 'NULL'} FROM columns NOT INDEXED "
        "WHERE stream = ? ORDER BY col",
        (stream,),
    )
    columns = []
    for expected_col, (stored_stream, col, layer, metric, crc) in enumerate(rows):
        _check_row(checked, crc, (stored_stream, col, layer, metric), f"column {col} of stream {stream!r}")
        if col != expected_col:  # columns are numbered from 0 when a stream is defined
            raise ValueError(f"stream {stream!r} has no column {expected_col}")
        columns.append((layer, metric))
    return columns


def read_streams(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT stream FROM columns NOT INDEXED ORDER BY stream")]


def _checksummed(conn: sqlite3.Connection, table: str) -> bool:
    """Whether ``table`` carries row checksums. Every table of a run written since they were added
    does, in every row (so a missing one is damage); older runs have none."""
    return any(row[1] == "crc32" for row in conn.execute(f"PRAGMA table_info({table})"))


def _check_row(checked: bool, crc: object, fields: tuple[object, ...], what: str, *, blob: bytes = b"") -> None:
    if checked and crc != _row_crc32(*fields, blob=blob):
        raise ValueError(f"{what} does not match its checksum")


@dataclass(frozen=True)
class StreamRows:
    """The rows of one stream as a reader found them: its chunks by id and, in a window, which of their
    rows it keeps. Columns read later from these (:func:`read_stream_columns`) come from the same
    snapshot however much a writer has appended since, because chunks are never changed once written."""

    stream: str
    n_cols: int
    chunk_ids: tuple[int, ...]
    chunk_rows: tuple[int, ...]
    chunk_crc32: tuple[int | None, ...]  # CRC32 of each chunk's data blob; None for runs written without checksums
    steps: np.ndarray  # (rows kept,) int64
    keep: np.ndarray | None = None  # (sum(chunk_rows),) bool, the rows inside the window; None keeps all

    @property
    def nbytes(self) -> int:
        """Bytes of every column of the kept rows as float32."""
        return len(self.steps) * self.n_cols * 4

    def checked(self) -> StreamRows:
        """These rows without their checksums, for once every chunk was read and matched them: the
        metrics of a long run read on request then skip a check that costs half as much again as the
        read, and they read the same chunks, of the same run (see ``run._RunFile``), which are never
        rewritten."""
        return replace(self, chunk_crc32=(None,) * len(self.chunk_ids))

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
            tuple(self.chunk_crc32[i] for i in chosen),
            self.steps[start:stop],
            np.concatenate([inside[bounds[i] : bounds[i + 1]] for i in chosen]) if chosen else np.zeros(0, dtype=bool),
        )


def read_stream_rows(
    conn: sqlite3.Connection, stream: str, n_cols: int, *, since_step: int | None = None, head_steps: int = 0
) -> StreamRows:
    """The chunks and steps of a stream (those of steps ≥ ``since_step`` or < ``head_steps`` when a
    window is given), without its values: those are read per column by :func:`read_stream_columns`.

    Raises ``ValueError`` for a chunk that does not match its checksum or its shape (a damaged file).
    """
    # A whole stream is found by scanning the table, not through the chunks_by_stream index: a damaged
    # index page would silently leave chunks out, and the scan costs little (the blobs are not read).
    # A window, read live through the writer's own connection, uses the index to skip old chunks.
    where, index = "stream = ?", "NOT INDEXED"
    args: list[Any] = [stream]
    if since_step is not None:
        where += " AND (last_step >= ? OR first_step < ?)"
        args += [since_step, head_steps]
        index = ""
    checked = _checksummed(conn, "chunks")
    ids, rows, crcs, steps = [], [], [], []
    for chunk_id, stored_stream, first_step, last_step, n_rows, chunk_cols, data_crc, crc, step_blob in conn.execute(
        f"SELECT id, stream, first_step, last_step, n_rows, n_cols, {'data_crc32, crc32' if checked else 'NULL, NULL'}, steps "
        f"FROM chunks {index} WHERE {where} ORDER BY id",
        args,
    ):
        if not isinstance(step_blob, bytes):
            raise ValueError(f"chunk {chunk_id} of stream {stream!r} holds {type(step_blob).__name__} where its steps belong")
        fields = (stored_stream, first_step, last_step, n_rows, chunk_cols, data_crc)
        _check_row(checked, crc, fields, f"chunk {chunk_id} of stream {stream!r}", blob=step_blob)
        if stored_stream != stream:  # a damaged index entry
            raise ValueError(f"chunk {chunk_id} was found for stream {stream!r} but belongs to {stored_stream!r}")
        if chunk_cols != n_cols:
            raise ValueError(f"a chunk of stream {stream!r} has {chunk_cols} columns, expected {n_cols}")
        steps.append(np.frombuffer(step_blob, dtype="<i8"))
        if len(steps[-1]) != n_rows:
            raise ValueError(f"a chunk of stream {stream!r} has {len(steps[-1])} steps, expected {n_rows}")
        ids.append(int(chunk_id))
        rows.append(int(n_rows))
        crcs.append(data_crc)
    all_steps = np.concatenate(steps).astype(np.int64) if steps else np.zeros(0, dtype=np.int64)
    keep = None
    if since_step is not None:
        keep = (all_steps >= since_step) | (all_steps < head_steps)
        all_steps = all_steps[keep]
    return StreamRows(stream, n_cols, tuple(ids), tuple(rows), tuple(crcs), all_steps, keep)


def check_other_chunks(conn: sqlite3.Connection, streams: Sequence[str]) -> None:
    """Raise ``ValueError`` if a chunk outside ``streams`` fails its checksum: its stream name was
    damaged, so that no stream reads it and its steps would be silently missing.

    A chunk of a stream without columns matches its checksum and is left alone (no stream reads it).
    Runs written without checksums are not checked.
    """
    if not _checksummed(conn, "chunks"):
        return
    others = f"stream IS NULL OR stream NOT IN ({', '.join(['?'] * len(streams))})" if streams else "1"
    for chunk_id, *fields, crc, step_blob in conn.execute(
        "SELECT id, stream, first_step, last_step, n_rows, n_cols, data_crc32, crc32, steps FROM chunks NOT INDEXED "
        f"WHERE {others}",
        list(streams),
    ):
        blob = step_blob if isinstance(step_blob, bytes) else repr(step_blob).encode()
        _check_row(True, crc, tuple(fields), f"chunk {chunk_id}", blob=blob)


def read_stream_columns(conn: sqlite3.Connection, rows: StreamRows, cols: Sequence[int]) -> np.ndarray:
    """Columns ``cols`` of the rows of a stream as a ``(rows, len(cols))`` float32 array.

    Each chunk is read through SQLite's incremental blob I/O (several times faster than selecting
    the blob) and only the requested columns are kept, so reading one metric of a long run needs
    that metric's size in memory plus one chunk, not the whole stream.

    Raises ``ValueError`` for a chunk that does not match its checksum or its shape (a damaged file).
    """
    cols = list(cols)
    pick = column_pick(cols)
    out = np.empty((len(rows.steps), len(cols)), dtype=np.float32)
    at = kept_at = 0
    for chunk_id, n_rows, crc in zip(rows.chunk_ids, rows.chunk_rows, rows.chunk_crc32, strict=True):
        with conn.blobopen("chunks", "data", chunk_id, readonly=True) as blob:
            if len(blob) != n_rows * rows.n_cols * 4:
                raise ValueError(
                    f"a chunk of stream {rows.stream!r} holds {len(blob)} bytes, expected {n_rows} rows × {rows.n_cols} float32"
                )
            raw = blob.read()
        # The whole blob, even when few columns are wanted: it is read whole anyway. Checking it costs
        # about half as much again as reading it (CRC32 at ~4 GB/s, SQLite's blob reads at 2–3 GB/s).
        if crc is not None and zlib.crc32(raw) != crc:
            raise ValueError(f"chunk {chunk_id} of stream {rows.stream!r} does not match its checksum")
        block = np.frombuffer(raw, dtype="<f4").reshape(n_rows, rows.n_cols)[:, pick]
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
    """One metadata value (``None`` when absent). Raises ``ValueError`` for a damaged entry."""
    checked = _checksummed(conn, "meta")
    row = conn.execute(
        f"SELECT key, value, {'crc32' if checked else 'NULL'} FROM meta NOT INDEXED WHERE key = ?", (key,)
    ).fetchone()
    if row is None:
        return None
    _check_row(checked, row[2], row[:2], f"the metadata entry {key!r}")
    return json.loads(row[1])


def read_events(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every event, oldest first. Raises ``ValueError`` for a damaged one."""
    checked = _checksummed(conn, "events")
    events = []
    for step, kind, payload, crc in conn.execute(
        f"SELECT step, kind, payload, {'crc32' if checked else 'NULL'} FROM events ORDER BY id"
    ):
        _check_row(checked, crc, (step, kind, payload), f"event {kind!r} at step {step}")
        events.append({"step": step, "kind": kind, **json.loads(payload)})
    return events
