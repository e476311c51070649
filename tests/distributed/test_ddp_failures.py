"""torch.distributed jobs that end badly: a rank that raises, a process group destroyed before the
Monitor closes, and a stop decided by rank 0's live detection. None may hang, and rank 0 writes
what it recorded (tests/distributed/failure_job.py runs them under torchrun, 2 ranks, gloo)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from torchrun import run_two_ranks

import gradscope

JOB = Path(__file__).resolve().parent / "failure_job.py"


def _run_job(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    log_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    # A hang is the failure these tests look for: the timeout turns it into one.
    proc = run_two_ranks(JOB, str(log_dir), mode, str(out_dir), timeout=120)
    return proc, log_dir, out_dir


def _trained(out_dir: Path, rank: int) -> int:
    return int(json.loads((out_dir / f"rank{rank}.json").read_text())["trained"])


def test_a_rank_that_raises_exits_with_its_own_error_and_rank_0_keeps_its_steps(tmp_path: Path) -> None:
    """Closing on an exception does no collective: the rank that raised exits with its error, which
    torchrun then names, instead of waiting for ranks that never come (a hang, or a gloo abort
    blamed on a healthy rank)."""
    proc, log_dir, out_dir = _run_job(tmp_path, "raise_rank1")
    assert proc.returncode != 0
    assert "ValueError: a bad sample on rank 1" in proc.stderr
    assert _trained(out_dir, 1) == 7
    run = gradscope.load(log_dir)
    assert run.n_steps >= 5  # at least the first write's steps; rank 0 may write more on its way out
    assert run.status in {"failed", "running"}


def test_a_process_group_destroyed_before_the_monitor_closes_loses_no_step(tmp_path: Path) -> None:
    proc, log_dir, out_dir = _run_job(tmp_path, "destroy_without_close")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = gradscope.load(log_dir)
    assert run.n_steps == _trained(out_dir, 0) == 12  # the last 2 steps were never combined: rank 0's own
    assert run.status == "failed"  # closed at interpreter exit, as any Monitor left open


def test_a_stop_decided_on_rank_0_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    proc, log_dir, out_dir = _run_job(tmp_path, "stop")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [_trained(out_dir, r) for r in range(2)]
    assert trained[0] == trained[1] < 60, trained
    run = gradscope.load(log_dir)
    assert run.n_steps == trained[0] and run.status == "complete"
    assert any(f.severity.rank >= 2 for f in gradscope.diagnose(run))
