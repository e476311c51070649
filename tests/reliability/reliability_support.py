"""Shared pieces of the reliability suite: a tiny training loop, gradscope-warning capture, a disk
that fills up on demand, and the forking trainer that dies in chosen ways."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.detect.registry import DETECTOR_ERROR

HERE = Path(__file__).resolve().parent
FORKING_TRAINER = HERE / "forking_trainer.py"


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step: the same on every call, so two runs can be compared value for value."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    mon: Any,
    steps: int,
    *,
    first: int = 0,
    make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> list[float]:
    """Plain training steps ``first .. first+steps-1``; returns the losses the loop saw."""
    losses = []
    for step in range(first, first + steps):
        x, y = make_batch(step)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()
        losses.append(loss.item())
    return losses


@contextlib.contextmanager
def gradscope_warnings() -> Iterator[list[str]]:
    """Record every warning gradscope emits (the suite's autouse fixture otherwise turns them into errors)."""
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield caught
    caught.extend(str(w.message) for w in records if str(w.message).startswith("gradscope:"))


def detector_errors(findings: Any) -> list[str]:
    return [f.message for f in findings if f.code == DETECTOR_ERROR]


class FullDisk:
    """Stands in for the writer's SQLite connection and fails every write transaction while ``full``
    with the error SQLite gives on a full disk; reads and everything else go through."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.full = False
        self.refused = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full and sql.strip().upper().startswith("BEGIN"):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def start_forked(cases: list[dict[str, Any]], work: Path) -> subprocess.Popen[str]:
    """Start the forking trainer on ``cases`` in the background (see ``forking_trainer.py``)."""
    spec = work / "cases.json"
    spec.write_text(json.dumps(cases), encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(FORKING_TRAINER), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish_forked(proc: subprocess.Popen[str], *, timeout: float = 120) -> tuple[list[dict[str, Any]], str]:
    """Wait for the forking trainer; returns per-case ``{"exit": code, "signal": signal}`` and its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def run_forked(cases: list[dict[str, Any]], work: Path, *, timeout: float = 120) -> tuple[list[dict[str, Any]], str]:
    """Run the cases in forked children of one trainer process and wait for all of them."""
    return finish_forked(start_forked(cases, work), timeout=timeout)


def logged_losses(path: Path) -> list[float]:
    """The ``"<step> <loss>"`` lines a forked trainer wrote, checked to be steps 0, 1, 2, … in order.

    Only whole lines count: the trainer may be writing the next one while it is read.
    """
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [int(r[0]) for r in rows] == list(range(len(rows)))
    return [float(r[1]) for r in rows]


def assert_prefix(run: gradscope.Run, losses: list[float], n: int) -> None:
    """The run holds exactly steps 0..n-1, with the losses the training loop saw."""
    np.testing.assert_array_equal(run.steps, np.arange(n))
    np.testing.assert_array_equal(run.loss, np.asarray(losses[:n], dtype=np.float32))
