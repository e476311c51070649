"""A training process killed with SIGKILL leaves a run that loads and holds every flushed step; a run
being written can be read by another process while the writer goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import gradscope

FLUSH_EVERY = 5

# Trains forever, printing "<step> <loss>" after each recorded step, until it is killed.
_TRAINER = textwrap.dedent(
    f"""
    import sys, time
    import torch
    from torch import nn
    import gradscope

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradscope.Monitor(model, opt, log_dir=sys.argv[1], flush_every={FLUSH_EVERY}, activation_every=2, on_finding=None)
    step = 0
    while True:
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
        opt.step()
        print(step, repr(float(loss)), flush=True)
        step += 1
        time.sleep(0.002)
    """
)


def _assert_prefix_of(run: gradscope.Run, losses: list[float]) -> None:
    """The run holds steps 0..n-1 for a whole number of flushes, with the losses the trainer printed."""
    n = run.n_steps
    assert n % FLUSH_EVERY == 0, f"{n} steps is not a whole number of flushes of {FLUSH_EVERY}"
    np.testing.assert_array_equal(run.steps, np.arange(n))
    np.testing.assert_allclose(run.loss, losses[:n], rtol=1e-6)
    assert run.layers == ["0", "2"]
    assert run.metric("grad_norm").notna().all().all()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_run_killed_with_sigkill_loads_with_every_flushed_step(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(log_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    losses: list[float] = []
    live_counts: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            step, loss = line.split()
            losses.append(float(loss))
            # read the run from this process while the trainer goes on: after 2 and after 4 flushes
            if int(step) in (2 * FLUSH_EVERY + 1, 4 * FLUSH_EVERY + 1):
                live = gradscope.load(log_dir)
                assert live.is_partial and live.status == "running"
                _assert_prefix_of(live, losses)
                live_counts.append(live.n_steps)
            if int(step) >= 4 * FLUSH_EVERY + 3:
                break
        assert proc.poll() is None, "the trainer was expected to be still running"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        losses += [float(line.split()[1]) for line in proc.stdout.read().splitlines() if line.strip()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr

    assert live_counts[0] >= 2 * FLUSH_EVERY and live_counts[1] >= 4 * FLUSH_EVERY  # the reader saw it grow
    run = gradscope.load(log_dir)
    assert run.is_partial and run.status == "running"
    assert run.n_steps >= 4 * FLUSH_EVERY  # at least four flushes made it
    _assert_prefix_of(run, losses)
    # activation statistics are written in the same transaction as their steps: all of them are there
    np.testing.assert_array_equal(run.activation_steps, np.arange(0, run.n_steps, 2))
    assert run.to_pandas()["step"].max() == run.n_steps - 1

    # the killed writer's lock died with it: a new Monitor may replace the run
    with gradscope.Monitor(nn.Linear(2, 2), log_dir=log_dir, overwrite=True, on_finding=None) as mon:
        mon.step(1.0)
    assert gradscope.load(log_dir).n_steps == 1
