"""Two real processes under torchrun (gloo, CPU): ranks combine once per flush, rank 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from torchrun import run_two_ranks

import gradscope

JOB = Path(__file__).resolve().parents[2] / "examples" / "ddp_example.py"


def _run_job(tmp_path: Path, mode: str) -> tuple[gradscope.Run, list[dict[str, list]]]:
    log_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    proc = run_two_ranks(JOB, str(log_dir), mode, str(out_dir), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return gradscope.load(log_dir), ranks


def test_healthy_ddp_run_is_written_once_with_rank_combined_statistics(tmp_path: Path) -> None:
    run, ranks = _run_job(tmp_path, "healthy")
    assert run.n_steps == 12 and run.status == "complete"
    assert run.meta["world_size"] == 2
    assert sorted(p.name for p in tmp_path.rglob("run.sqlite")) == ["run.sqlite"]  # only rank 0 wrote
    per_rank = np.array([r["losses"] for r in ranks])  # (2, steps)
    np.testing.assert_allclose(run.loss, per_rank.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(run.scalar("loss_rank.1"), per_rank[1], rtol=1e-5)
    # DDP averages gradients across ranks: the recorded norms are those every rank saw, not 2x them
    expected = np.array(ranks[0]["grad_norms"])
    np.testing.assert_allclose(run.metric("param_grad_norm").to_numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(np.array(ranks[1]["grad_norms"]), expected, rtol=1e-5)
    assert np.isnan(run.scalar("nonfinite_rank")).all()
    assert run.metric("act_mean").notna().any().any()


def test_a_nan_on_one_rank_is_recorded_with_that_rank(tmp_path: Path) -> None:
    run, ranks = _run_job(tmp_path, "nan_rank1")
    nan_step = 6
    assert math.isnan(ranks[1]["losses"][nan_step]) and math.isfinite(ranks[0]["losses"][nan_step])
    assert math.isnan(run.loss[nan_step])
    assert math.isfinite(run.scalar("loss_rank.0")[nan_step])
    assert run.scalar("nonfinite_rank")[nan_step] == 1.0
    assert np.isnan(run.scalar("nonfinite_rank")[:nan_step]).all()
    assert run.metric("output_nonfinite").loc[nan_step, "(input)"] == 1.0
    finding = next(f for f in gradscope.diagnose(run) if f.code == "nonfinite")
    assert finding.step == nan_step
    assert finding.evidence["rank"] == 1
    assert "rank 1" in finding.message
    assert finding.layers[0] == "(input)"


def test_a_loss_passed_on_rank_0_only_is_the_steps_loss_and_no_rank_went_non_finite(tmp_path: Path) -> None:
    run, ranks = _run_job(tmp_path, "loss_on_rank0")
    np.testing.assert_allclose(run.loss, ranks[0]["losses"], rtol=1e-5)
    assert not run.scalar("loss_missing").any()
    assert np.isnan(run.scalar("loss_rank.1")).all()
    assert np.isnan(run.scalar("nonfinite_rank")).all()
    assert "nonfinite" not in {f.code for f in gradscope.diagnose(run)}
