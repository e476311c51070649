"""A long run is loaded lazily: its steps and run-level series at once, each other metric from the
file when first asked for. It must give exactly what a full read gives, keep the rows it saw at
load time while a writer appends, hold no lock on the file, and say clearly when the file it reads
from is gone, replaced or damaged."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope.store import run as run_module
from gradscope.store import schema
from gradscope.store.run import Run
from gradscope.store.sqlite import RunWriter

LAYERS = ["fc1", "fc2", "fc3"]
PARAMS = [f"{layer}.{kind}" for layer in LAYERS for kind in ("weight", "bias")]
STEP_COLUMNS = [
    (schema.RUN_LAYER, "loss"),
    (schema.RUN_LAYER, "global_grad_norm"),
    (schema.RUN_LAYER, "lr.0"),
    *[(layer, metric) for metric in schema.LAYER_METRICS for layer in LAYERS],
    *[(param, metric) for metric in schema.PARAM_METRICS for param in PARAMS],
    *[(name, schema.OUTPUT_NONFINITE) for name in [*LAYERS, schema.INPUT_LAYER]],
]
FORWARD_COLUMNS = [(name, metric) for metric in schema.ACTIVATION_METRICS for name in [*LAYERS, schema.INPUT_LAYER]]
FLUSH = 7  # rows per chunk: most reads cross chunk boundaries
ACTIVATION_EVERY = 3


def _values(rng: np.random.Generator, n: int, n_cols: int) -> np.ndarray:
    values = rng.lognormal(-2, 1, size=(n, n_cols)).astype(np.float32)
    values[rng.random((n, n_cols)) < 0.2] = np.nan  # as ‖θ‖ and ‖Δθ‖ on the steps they are not measured
    values[rng.random((n, n_cols)) < 0.01] = np.inf
    return values


class Writer:
    """A run written chunk by chunk through the Monitor's writer, remembering every value written."""

    def __init__(self, log_dir: Path | None, started_at: float = 1.0) -> None:
        self.rng = np.random.default_rng(0)
        self.path = log_dir or Path("(memory)")
        self.writer = RunWriter(log_dir)
        self.writer.set_meta(
            {
                "started_at": started_at,
                "modules": [{"name": layer, "type": "Linear", "n_params": 6, "n_trainable": 6, "is_leaf": True} for layer in LAYERS],
                "layers": LAYERS,
                "params": PARAMS,
                "forward_order": LAYERS,
            }
        )
        self.writer.define_stream(schema.STEP_STREAM, STEP_COLUMNS)
        self.writer.define_stream(schema.FORWARD_STREAM, FORWARD_COLUMNS)
        self.steps = np.zeros(0, dtype=np.int64)
        self.data = np.zeros((0, len(STEP_COLUMNS)), dtype=np.float32)
        self.act_steps = np.zeros(0, dtype=np.int64)
        self.act_data = np.zeros((0, len(FORWARD_COLUMNS)), dtype=np.float32)

    def append(self, n: int) -> None:
        end = len(self.steps) + n
        for start in range(len(self.steps), end, FLUSH):
            steps = np.arange(start, min(start + FLUSH, end))
            data = _values(self.rng, len(steps), len(STEP_COLUMNS))
            sampled = steps[steps % ACTIVATION_EVERY == 0]
            act = _values(self.rng, len(sampled), len(FORWARD_COLUMNS))
            self.writer.append_chunks([(schema.STEP_STREAM, steps, data), (schema.FORWARD_STREAM, sampled, act)])
            self.steps = np.concatenate([self.steps, steps])
            self.data = np.concatenate([self.data, data])
            self.act_steps = np.concatenate([self.act_steps, sampled])
            self.act_data = np.concatenate([self.act_data, act])

    def expected(self, metric: str, rows: int | None = None, act_rows: int | None = None) -> np.ndarray:
        """What was written for ``metric`` (the first ``rows`` steps): the full read to compare with."""
        columns, data = (STEP_COLUMNS, self.data[:rows]) if not metric.startswith("act_") else (FORWARD_COLUMNS, self.act_data[:act_rows])
        return data[:, [i for i, (_, m) in enumerate(columns) if m == metric]]


@pytest.fixture
def lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stream read per metric, and a cache so small that each request evicts the others."""
    monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 0)
    monkeypatch.setattr(run_module, "CACHE_BYTES", 1)


@pytest.fixture
def written(tmp_path: Path) -> Iterator[Writer]:
    w = Writer(tmp_path / "run")
    w.append(40)
    w.writer.close("complete")
    yield w


def _stored_metrics() -> list[str]:
    return sorted({m for _, m in STEP_COLUMNS} | {m for _, m in FORWARD_COLUMNS})


def _assert_same_run(load_lazily: Callable[[], Run], full: Run) -> None:
    lazy_run = load_lazily()
    assert lazy_run.metrics == full.metrics
    np.testing.assert_array_equal(lazy_run.steps, full.steps)
    np.testing.assert_array_equal(lazy_run.activation_steps, full.activation_steps)
    for metric in full.metrics:
        for _ in range(2):  # a second request comes from the cache, or from the file again once evicted
            values, names = lazy_run.metric_array(metric)
            expected, expected_names = full.metric_array(metric)
            assert names == expected_names
            np.testing.assert_array_equal(values, expected, err_msg=metric, strict=True)
            assert not values.flags.writeable
        pd.testing.assert_frame_equal(lazy_run.metric(metric), full.metric(metric), check_exact=True, obj=metric)
        for rows in (slice(0, 1), slice(5, 23), slice(-4, None), slice(None, None, 5), slice(30, 2, -3), slice(8, 8)):
            fresh = load_lazily()  # nothing cached: only the chunks holding these rows are read
            np.testing.assert_array_equal(fresh.metric_array(metric, rows=rows)[0], expected[rows], err_msg=f"{metric} {rows}", strict=True)
            pd.testing.assert_frame_equal(fresh.metric(metric, rows=rows), full.metric(metric).iloc[rows], check_exact=True)
    for name in ("loss", "global_grad_norm", "lr.0"):
        np.testing.assert_array_equal(lazy_run.scalar(name), full.scalar(name), strict=True)
    pd.testing.assert_frame_equal(lazy_run.to_pandas(), full.to_pandas(), check_exact=True)


def test_a_lazily_loaded_run_gives_exactly_what_a_full_read_gives(written: Writer, lazy: None) -> None:
    run = gradscope.load(written.path)
    assert isinstance(run._streams[schema.STEP_STREAM][1], run_module._StoredStream)  # really lazy
    for metric in _stored_metrics():
        values, _ = run.metric_array(metric)
        np.testing.assert_array_equal(values, written.expected(metric), err_msg=metric, strict=True)
    np.testing.assert_array_equal(run.steps, written.steps)
    np.testing.assert_array_equal(run.activation_steps, written.act_steps)


def test_a_lazily_loaded_run_matches_a_run_loaded_whole(written: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    full = gradscope.load(written.path)
    assert not isinstance(full._streams[schema.STEP_STREAM][1], run_module._StoredStream)  # small runs load whole
    monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 0)
    monkeypatch.setattr(run_module, "CACHE_BYTES", 1)
    _assert_same_run(lambda: gradscope.load(written.path), full)
    # windows of it, as load(since_step=...) and the Monitor's live checks (first and last steps) read them
    for since_step, head_steps in ((17, 0), (25, 9), (0, 0), (39, 40), (41, 3)):
        monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 64 << 20)
        conn = sqlite3.connect(written.path / "run.sqlite")
        whole = Run._from_connection(conn, "window", since_step=since_step, head_steps=head_steps)
        monkeypatch.setattr(run_module, "EAGER_STREAM_BYTES", 0)
        window = Run._from_connection(conn, "window", since_step=since_step, head_steps=head_steps)
        keep = (written.steps >= since_step) | (written.steps < head_steps)
        np.testing.assert_array_equal(window.steps, written.steps[keep])
        np.testing.assert_array_equal(window.metric_array("grad_norm")[0], written.expected("grad_norm")[keep], strict=True)
        _assert_same_run(partial(Run._from_connection, conn, "window", since_step=since_step, head_steps=head_steps), whole)
        conn.close()


def test_a_run_loaded_while_the_writer_appends_keeps_the_rows_it_saw(tmp_path: Path, lazy: None) -> None:
    w = Writer(tmp_path / "live")
    w.append(30)
    run = gradscope.load(tmp_path / "live")
    w.append(50)  # the writer goes on after the load, before any metric was read
    assert run.n_steps == 30 and run.is_partial
    for metric in _stored_metrics():
        values, _ = run.metric_array(metric)
        np.testing.assert_array_equal(values, w.expected(metric, 30, len(w.act_steps[w.act_steps < 30])), err_msg=metric, strict=True)
    w.writer.close("complete")
    assert gradscope.load(tmp_path / "live").n_steps == 80


def test_a_run_kept_in_memory_reads_from_its_connection_and_keeps_its_snapshot(lazy: None) -> None:
    w = Writer(None)
    w.append(30)
    window = Run._from_connection(w.writer.conn, "memory", since_step=20, head_steps=5)
    w.append(20)
    keep = (w.steps[:30] >= 20) | (w.steps[:30] < 5)
    np.testing.assert_array_equal(window.steps, w.steps[:30][keep])
    for metric in ("grad_norm", "param_grad_missing", schema.OUTPUT_NONFINITE):
        np.testing.assert_array_equal(window.metric_array(metric)[0], w.expected(metric, 30)[keep], err_msg=metric, strict=True)


def test_a_monitor_kept_in_memory_gives_runs_that_read_lazily_before_and_after_close(lazy: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(mon: gradscope.Monitor, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            loss = model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)
            opt.step()

    mon = gradscope.Monitor(model, opt, log_dir=None, flush_every=4, on_finding=None)
    train(mon, 10)
    early = mon.run
    early_grad = early.metric_array("grad_norm")[0].copy()
    train(mon, 10)
    mon.close()
    final = mon.run
    assert early.n_steps == 10 and final.n_steps == 20
    np.testing.assert_array_equal(early.metric_array("grad_norm")[0], early_grad, strict=True)
    np.testing.assert_array_equal(final.metric_array("grad_norm")[0][:10], early_grad, strict=True)
    assert final.status == "complete"


def test_a_lazily_loaded_run_holds_no_handle_or_lock_on_its_file(written: Writer, lazy: None) -> None:
    db = written.path / "run.sqlite"
    run = gradscope.load(db.parent)
    run.metric("grad_norm")

    def open_on_db() -> list[str]:
        fds = Path("/proc/self/fd")
        return [str(fd) for fd in fds.iterdir() if os.path.realpath(fd).startswith(str(db))] if fds.exists() else []

    assert open_on_db() == []
    # a writer can take the file over (an exclusive lock succeeds at once) and the Run goes on reading
    with sqlite3.connect(db, timeout=0) as conn:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("INSERT INTO meta (key, value) VALUES ('note', '1')")
        conn.execute("COMMIT")
    np.testing.assert_array_equal(run.metric_array("weight_norm")[0], written.expected("weight_norm"), strict=True)


def test_reading_a_metric_after_the_run_file_is_removed(written: Writer, lazy: None) -> None:
    run = gradscope.load(written.path)
    (written.path / "run.sqlite").unlink()
    with pytest.raises(
        gradscope.UnreadableRunError,
        match=r"cannot read metric 'grad_norm' of run '.*run': expected the file it was loaded from, unchanged, but it no longer "
        r"exists; keep the run directory in place while using a Run of a long run, or load it again",
    ):
        run.metric("grad_norm")
    assert run.n_steps == 40 and np.isfinite(run.loss).any()  # what was loaded stays usable


def test_reading_a_metric_after_the_run_file_is_damaged(written: Writer, lazy: None) -> None:
    run = gradscope.load(written.path)
    db = written.path / "run.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE chunks SET data = x'0102' WHERE id = 3")  # 2 bytes where a float32 matrix belongs
    with pytest.raises(gradscope.UnreadableRunError, match=r"cannot read metric 'update_norm' of run .*: expected the file .* but a chunk of stream 'step' holds 2 bytes"):
        run.metric_array("update_norm")
    db.write_text("not a run any more")
    with pytest.raises(gradscope.UnreadableRunError, match=r"cannot read every series of run .*: expected the file .* but .*it is not a gradscope run database"):
        run.to_pandas()


def test_reading_a_metric_after_the_run_was_overwritten_by_another(written: Writer, lazy: None) -> None:
    run = gradscope.load(written.path)
    (written.path / "run.sqlite").unlink()
    again = Writer(written.path, started_at=2.0)  # a new run in the same directory, same shape
    again.append(40)
    again.writer.close("complete")
    with pytest.raises(gradscope.UnreadableRunError, match=r"but it now holds another run \(started at 2\.0, not 1\.0\)"):
        run.metric("grad_norm")
