"""``Run``: a recorded run as numpy/pandas series, the only thing detectors and reports see."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradscope.errors import GradscopeError, RunNotFoundError, UnreadableRunError
from gradscope.store import sqlite as db
from gradscope.store.schema import (
    FORWARD_STREAM,
    INPUT_LAYER,
    RUN_LAYER,
    STEP_STREAM,
)

__all__ = ["ModuleInfo", "Run", "load", "require_steps"]

# A stream whose values fit in this many bytes is read whole when the run is loaded, in one pass over
# the file (most runs, and every window the Monitor checks live: 4000 steps of ~1000 columns); a
# larger one keeps only its run-level series in memory and reads each other metric when first asked
# for, so a 100,000-step run never holds all its ~1000 columns (300 MB) at once.
EAGER_STREAM_BYTES = 64 << 20
# Metrics read on request stay cached up to this many bytes, least recently used dropped first:
# detectors and the report ask for the same few metrics several times, and each read is a pass over
# the stream (~0.1 s at 100,000 steps), while caching all of them would hold most of the run again.
CACHE_BYTES = 96 << 20


@dataclass(frozen=True)
class ModuleInfo:
    """One module of the monitored model, as recorded at the start of the run."""

    name: str
    type: str
    n_params: int  # parameters owned directly (not by children)
    n_trainable: int
    is_leaf: bool


class Run:
    """A recorded run: per-step, per-layer series as numpy arrays and pandas frames.

    Obtain one with :func:`gradscope.load`. Steps are optimizer steps numbered from 0.

    - :attr:`steps`, :attr:`loss`, :attr:`grad_norm`, :attr:`lr` are run-level arrays aligned on steps.
    - :meth:`metric` gives a ``steps × layers`` frame for a per-layer metric (``"grad_norm"``,
      ``"update_ratio"``, ``"act_dead_frac"``, …); :attr:`layers` lists the modules that own parameters.
    - :meth:`to_pandas` gives every value in tidy form: ``step, layer, metric, value``.

    A long run (a stream of more than 64 MB of values: 100,000 steps of a 50-layer model hold 300 MB)
    keeps its steps and run-level series in memory and reads each other metric from its file when
    first asked for, keeping the recently used ones: it needs the run directory in place while it is
    used, and it sees the rows that were there when it was loaded, however much a writer appends since.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        streams: Mapping[str, tuple[list[tuple[str, str]], db.Chunk | _StoredStream]],
        events: list[dict[str, Any]],
        path: Path | None = None,
        *,
        file: _RunFile | None = None,
    ) -> None:
        self.meta = meta
        self.path = path
        self.events = events
        self._streams = dict(streams)
        self._file = file  # where a _StoredStream's other columns are read from
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # metric -> values read on request, oldest first
        self._index: dict[str, tuple[str, list[int], list[str]]] = {}
        for stream, (columns, _values) in streams.items():
            for col, (layer, metric) in enumerate(columns):
                _, cols, layers = self._index.setdefault(metric, (stream, [], []))
                cols.append(col)
                layers.append(layer)

    # ------------------------------------------------------------------ loading

    @classmethod
    def _from_connection(
        cls,
        conn: sqlite3.Connection,
        where: str,
        path: Path | None = None,
        *,
        since_step: int | None = None,
        head_steps: int = 0,
    ) -> Run:
        meta = db.read_meta(conn, where)
        version = meta.get("schema_version")
        if not isinstance(version, int):
            raise UnreadableRunError(f"cannot read run {where!r}: it has no schema version, so it was not written by gradscope")
        if version > db.SCHEMA_VERSION:
            raise UnreadableRunError(
                f"cannot read run {where!r}: it was written with run schema {version} but this gradscope reads up to "
                f"{db.SCHEMA_VERSION}; upgrade gradscope (pip install -U gradscope)"
            )
        # One read transaction: the streams and their row counts come from the same snapshot even
        # while a writer appends (WAL mode gives readers a consistent view inside a transaction).
        own_transaction = not conn.in_transaction
        if own_transaction:
            conn.execute("BEGIN")
        try:
            streams: dict[str, tuple[list[tuple[str, str]], db.Chunk | _StoredStream]] = {}
            stream_names = db.read_streams(conn)
            if since_step is None:
                db.check_other_chunks(conn, stream_names)
            for stream in stream_names:
                columns = db.read_columns(conn, stream)
                rows = db.read_stream_rows(conn, stream, len(columns), since_step=since_step, head_steps=head_steps)
                if rows.nbytes <= EAGER_STREAM_BYTES:
                    streams[stream] = (columns, db.Chunk(rows.steps, db.read_stream_columns(conn, rows, range(len(columns)))))
                else:
                    held_cols = [col for col, (layer, _) in enumerate(columns) if layer == RUN_LAYER]
                    held = db.read_stream_columns(conn, rows, held_cols)  # reads, and checks, every chunk
                    streams[stream] = (columns, _StoredStream(rows.checked(), held_cols, held))
            events = db.read_events(conn)
        except (sqlite3.DatabaseError, ValueError) as e:  # "database disk image is malformed", a failed checksum, …
            raise UnreadableRunError(
                f"cannot read run {where!r}: the data is corrupt ({e}): {db.database_file(conn)} is damaged; "
                "restore it from a backup or record the run again"
            ) from None
        finally:
            if own_transaction and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # ending a read-only snapshot cannot lose anything
                    conn.execute("ROLLBACK")
        return cls(meta, streams, events, path, file=_RunFile(where, path, conn, meta.get("started_at")))

    # ------------------------------------------------------------------ run-level facts

    @property
    def status(self) -> str:
        """``"complete"``, ``"failed"`` (the training raised), or ``"running"`` (still written, or killed)."""
        return str(self.meta.get("status", "running"))

    @property
    def is_partial(self) -> bool:
        """True when the run did not close cleanly: still being written, or cut short by a crash."""
        return self.status != "complete"

    @cached_property
    def steps(self) -> np.ndarray:
        """Optimizer steps recorded, ``(n_steps,)`` int64."""
        return self._steps(STEP_STREAM)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @cached_property
    def modules(self) -> dict[str, ModuleInfo]:
        """Every module of the model by name, in ``named_modules()`` order."""
        return {m["name"]: ModuleInfo(**m) for m in self.meta.get("modules", [])}

    @cached_property
    def layers(self) -> list[str]:
        """Modules that own trainable parameters, in forward order where it was observed."""
        return list(self.meta.get("layers", []))

    @cached_property
    def forward_order(self) -> list[str]:
        """Leaf modules in the order the first forward pass called them."""
        return list(self.meta.get("forward_order", []))

    @property
    def params(self) -> list[str]:
        """Qualified names of the tracked (trainable) parameters."""
        return list(self.meta.get("params", []))

    @property
    def loss(self) -> np.ndarray:
        return self.scalar("loss")

    @property
    def grad_norm(self) -> np.ndarray:
        """Global L2 norm of all gradients at each step."""
        return self.scalar("global_grad_norm")

    @property
    def lr(self) -> np.ndarray:
        """Learning rate of the first param group (NaN when no optimizer was given)."""
        return self.scalar("lr.0") if "lr.0" in self._index else np.full(self.n_steps, np.nan)

    def scalar(self, metric: str) -> np.ndarray:
        """A run-level series aligned on :attr:`steps` (``"loss"``, ``"global_grad_norm"``, ``"lr.0"``, …), float64."""
        frame = self.metric(metric)
        return frame[RUN_LAYER].to_numpy(dtype=np.float64) if RUN_LAYER in frame else np.full(self.n_steps, np.nan)

    # ------------------------------------------------------------------ per-layer series

    @property
    def metrics(self) -> list[str]:
        """Names of every metric this run holds (plus the derived ``update_ratio``)."""
        names = list(self._index)
        if "update_norm" in self._index and "weight_norm" in self._index:
            names.append("update_ratio")
        return names

    def metric(self, metric: str, layers: Sequence[str] | None = None, rows: slice | None = None) -> pd.DataFrame:
        """A ``steps × layers`` frame of one metric (index: step, columns: layer names).

        Activation metrics (``act_*``) are indexed by the steps on which activations were sampled.
        ``update_ratio`` is derived as ``update_norm / weight_norm``. ``rows`` takes a slice of the
        rows, as in :meth:`metric_array`.
        """
        if metric == "update_ratio" and metric not in self._index and "update_norm" in self._index:
            derived = self._update_ratio(rows)
            if derived is not None:
                ratio, names = derived
                steps = self._steps(self._index["update_norm"][0])[rows or slice(None)]
                frame = pd.DataFrame(
                    ratio.astype(np.float64), index=pd.Index(steps, name="step"), columns=pd.Index(names, name="layer"), copy=False
                )
                return frame if layers is None or list(layers) == names else frame.reindex(columns=list(layers))
            upd_frame, par_frame = self.metric("update_norm", layers, rows), self.metric("weight_norm", layers, rows)
            with np.errstate(divide="ignore", invalid="ignore"):
                return upd_frame / par_frame.where(par_frame > 0)
        if metric not in self._index:
            from gradscope.errors import InvalidInputError

            raise InvalidInputError(f"expected one of the run's metrics ({', '.join(sorted(self.metrics))}) but got {metric!r}")
        values, names = self.metric_array(metric, rows)
        frame = pd.DataFrame(
            values.astype(np.float64),
            index=pd.Index(self._steps(self._index[metric][0])[rows or slice(None)], name="step"),
            columns=pd.Index(names, name="layer"),
            copy=False,  # the float64 array is already this frame's own: no second copy of a long run
        )
        if layers is not None and list(layers) != names:
            frame = frame.reindex(columns=list(layers))
        return frame

    def metric_array(self, metric: str, rows: slice | None = None) -> tuple[np.ndarray, list[str]]:
        """A stored metric as its raw ``steps × layers`` float32 array and the layer names, read-only:
        a view of the loaded run when its columns sit side by side (they do for runs the Monitor
        writes), or for a long run the array read from the file on first request and cached, so large
        runs can be scanned without a float64 copy of every series.
        The rows are the steps of :meth:`metric` (``activation_steps`` for ``act_*`` metrics);
        ``rows`` takes a slice of them (``slice(0, 1)``: the first step), which a long run reads from
        the part of the file that holds them.

        Raises:
            UnreadableRunError: a long run's file was removed, replaced or damaged since it was loaded.
        """
        if metric not in self._index:
            derived = self._update_ratio(rows) if metric == "update_ratio" and "update_norm" in self._index else None
            if derived is None:
                frame = self.metric(metric, rows=rows)  # update_ratio of unlike layers; any other name raises the error that lists the metrics
                return frame.to_numpy(dtype=np.float32), [str(c) for c in frame.columns]
            values, names = derived
        else:
            stream, cols, names = self._index[metric]
            values = self._values(stream, metric, cols, rows).view()
        values.flags.writeable = False
        return values, list(names)

    def _update_ratio(self, rows: slice | None) -> tuple[np.ndarray, list[str]] | None:
        """``update_norm / weight_norm`` computed on the float32 arrays (no float64 copy of either), when
        both hold the same layers, as the Monitor writes them; else None."""
        (upd, names), (par, par_names) = self.metric_array("update_norm", rows), self.metric_array("weight_norm", rows)
        if names != par_names:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return upd / np.where(par > 0, par, np.float32(np.nan)), names

    def _values(self, stream: str, metric: str, cols: list[int], rows: slice | None = None) -> np.ndarray:
        """``(rows, len(cols))`` float32 values of a metric: from memory, or read from the file."""
        values = self._streams[stream][1]
        if isinstance(values, db.Chunk):
            held = values.data[:, db.column_pick(cols)]
            return held if rows is None else held[rows]
        if set(cols) <= set(values.held_cols):
            held = values.held[:, db.column_pick([values.held_cols.index(col) for col in cols])]
            return held if rows is None else held[rows]
        if rows is not None and metric not in self._cache:
            picked = np.arange(len(values.steps))[rows]
            start, stop = (int(picked.min()), int(picked.max()) + 1) if picked.size else (0, 0)
            return self._read(values.rows.take(start, stop), cols, f"metric {metric!r}")[picked - start]
        cached = self._cache.pop(metric, None)
        if cached is None:
            cached = self._read(values.rows, cols, f"metric {metric!r}")
        self._cache[metric] = cached  # the most recently used last
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > CACHE_BYTES:
            self._cache.popitem(last=False)
        return cached if rows is None else cached[rows]

    def _whole_stream(self, stream: str) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
        """A stream's columns, steps and every value, ``(steps, columns)`` float32 (read from the file if not held)."""
        columns, values = self._streams[stream]
        if isinstance(values, db.Chunk):
            return columns, values.steps, values.data
        return columns, values.steps, self._read(values.rows, range(len(columns)), "every series")

    def _read(self, rows: db.StreamRows, cols: Sequence[int], what: str) -> np.ndarray:
        if self._file is None:
            raise RuntimeError(f"gradscope bug: {what} was not loaded, and the run has no file to read it from")
        return self._file.read(rows, cols, what)

    @property
    def activation_steps(self) -> np.ndarray:
        return self._steps(FORWARD_STREAM)

    @property
    def input_layer(self) -> str:
        """The pseudo-layer name under which statistics of the model's input batch are stored."""
        return INPUT_LAYER

    # ------------------------------------------------------------------ tidy export

    def to_pandas(self) -> pd.DataFrame:
        """Every recorded value as a tidy frame with columns ``step, layer, metric, value``.

        Run-level series (loss, global grad norm, learning rates) have ``layer == "(run)"``;
        statistics of the input batch have ``layer == "(input)"``; per-parameter series use the
        parameter's qualified name and metrics prefixed ``param_``.
        """
        parts = []
        for stream in self._streams:
            columns, steps, data = self._whole_stream(stream)
            if not len(steps):
                continue
            n_rows, n_cols = len(steps), len(columns)
            parts.append(
                pd.DataFrame(
                    {
                        "step": np.repeat(steps, n_cols),
                        "layer": np.tile(np.array([c[0] for c in columns], dtype=object), n_rows),
                        "metric": np.tile(np.array([c[1] for c in columns], dtype=object), n_rows),
                        "value": data.reshape(-1).astype(np.float64),
                    }
                )
            )
        if "update_ratio" in self.metrics and self.n_steps:
            ratio = self.metric("update_ratio")
            stacked: pd.Series = ratio.stack(future_stack=True)  # type: ignore[assignment]  # a Series: columns are one level
            long = stacked.rename("value").reset_index()
            long["metric"] = "update_ratio"
            parts.append(long[["step", "layer", "metric", "value"]])
        if not parts:
            return pd.DataFrame({"step": [], "layer": [], "metric": [], "value": []}).astype(
                {"step": "int64", "layer": object, "metric": object, "value": "float64"}
            )
        frame = pd.concat(parts, ignore_index=True)
        frame = frame.dropna(subset=["value"]).sort_values(["step", "metric", "layer"], kind="stable")
        return frame.reset_index(drop=True)

    def _steps(self, stream: str) -> np.ndarray:
        return self._streams[stream][1].steps if stream in self._streams else np.zeros(0, dtype=np.int64)

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"Run({where!r}, steps={self.n_steps}, layers={len(self.layers)}, status={self.status!r})"


@dataclass(frozen=True)
class _StoredStream:
    """A stream too large to load whole: its rows in the file, and the (run-level) columns read at load."""

    rows: db.StreamRows
    held_cols: list[int]
    held: np.ndarray  # (rows, len(held_cols)) float32

    @property
    def steps(self) -> np.ndarray:
        return self.rows.steps


class _RunFile:
    """Where a long run reads the metrics it did not load: its file, reopened for each read so that a
    Run holds no handle or lock on it, or, for a run kept in memory, the connection it came from."""

    def __init__(self, where: str, path: Path | None, conn: sqlite3.Connection, started_at: Any) -> None:
        self.where = where
        self.source: Path | sqlite3.Connection = path if path is not None else conn
        self.started_at = started_at  # tells the run apart from a new one written over it (overwrite=True)

    def read(self, rows: db.StreamRows, cols: Sequence[int], what: str) -> np.ndarray:
        try:
            if isinstance(self.source, sqlite3.Connection):
                return db.read_stream_columns(self.source, rows, cols)
            conn, _ = db.connect_for_reading(self.source)
            try:
                started_at = db.read_meta_value(conn, "started_at")
                if started_at != self.started_at:
                    raise ValueError(f"it now holds another run (started at {started_at}, not {self.started_at})")
                return db.read_stream_columns(conn, rows, cols)
            finally:
                conn.close()
        except RunNotFoundError:
            problem = "it no longer exists"
        except (GradscopeError, sqlite3.Error, ValueError) as e:
            problem = str(e)
        raise UnreadableRunError(
            f"cannot read {what} of run {self.where!r}: expected the file it was loaded from, unchanged, but {problem}; "
            "keep the run directory in place while using a Run of a long run, or load it again"
        )


def load(path: str | os.PathLike[str] | Run, *, since_step: int | None = None) -> Run:
    """Load a run from its directory (the ``log_dir`` given to :class:`gradscope.Monitor`).

    Works on a run still being written by another process and on one cut short by a crash
    (it then holds everything up to the last flush and :attr:`Run.is_partial` is true).
    A long run is read lazily: its per-layer metrics come from the file when first asked for
    (see :class:`Run`), so loading it takes a fraction of a second and little memory.
    ``since_step`` loads only the steps from that one on (for windowed live checks).

    Raises:
        RunNotFoundError: the path does not exist or holds no run.
        UnreadableRunError: the file is empty, corrupt, not a run, or from a newer gradscope.
    """
    if isinstance(path, Run):
        return path
    # A reader may arrive while a Monitor is creating the run (a live report started with the
    # training): give the writer a moment to commit its header rather than call the run broken.
    deadline = time.monotonic() + _CREATION_WAIT_S
    while True:
        try:
            return _load_once(path, since_step)
        except (db.IncompleteRunError, RunNotFoundError):  # no file yet: a Monitor may be creating it
            if time.monotonic() > deadline or not db.being_created(path):
                raise
            time.sleep(0.01)


_CREATION_WAIT_S = 2.0  # a Monitor's header takes milliseconds; a writer slower than this is stuck


def _load_once(path: str | os.PathLike[str], since_step: int | None) -> Run:
    conn, _ = db.connect_for_reading(path)
    try:
        run = Run._from_connection(conn, str(path), Path(path), since_step=since_step)
    finally:
        conn.close()
    if "modules" not in run.meta:
        raise db.IncompleteRunError(
            f"cannot read run {str(path)!r}: it holds no model description; the writer died before its first flush"
        )
    return run


def require_steps(run: Run, action: str = "diagnose") -> Run:
    """Return ``run`` if it holds at least one step; otherwise raise, saying why it holds none.

    A run with no step loads (a live reader may open it before the first flush), but checking or
    reporting it would pass as "healthy" while nothing was measured: ``gradscope check``,
    ``gradscope report`` and :func:`gradscope.assert_healthy` refuse it with this error.

    Raises:
        UnreadableRunError: the run holds no recorded step.
    """
    if run.n_steps:
        return run
    where = str(run.path) if run.path is not None else "the run"
    if run.status == "complete":
        why = "the Monitor was closed before any step() call; call monitor.step(loss) after each loss.backward()"
    elif run.status == "failed":
        why = "the training raised before its first step was recorded; fix the error and train again"
    else:
        config = run.meta.get("config")
        flush = config.get("flush_every") if isinstance(config, dict) else None
        every = f" (every {flush} steps)" if isinstance(flush, int) else ""
        why = (
            f"it is still being written or its process died before the first flush{every}; "
            "check again later, or pass a smaller flush_every to Monitor"
        )
    raise UnreadableRunError(f"cannot {action} run {where!r}: expected recorded steps but it holds none: {why}")
