"""The same run gives the same findings, in the same order, and the same report bytes apart from the
generation timestamp: in one process, across processes with different hash seeds (no set or dict
order may leak into the output), and for two recordings of the same seeded training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reliability_support import batch
from report_support import strip_timestamp
from torch import nn

import gradscope

STEPS = 60


def _record(log_dir: Path) -> Path:
    """A sigmoid stack trained with a learning rate far too high: several findings to order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=40.0)
    with gradscope.Monitor(model, opt, log_dir=log_dir, flush_every=10, activation_every=2, update_every=2, on_finding=None) as mon:
        for step in range(STEPS):
            x, y = batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
    return log_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("det") / "run")


def _findings(path: Path) -> list[dict[str, object]]:
    return [f.to_dict() for f in gradscope.diagnose(gradscope.load(path))]


def test_the_same_run_gives_the_same_findings_and_report(run_dir: Path, tmp_path: Path) -> None:
    first = _findings(run_dir)
    assert len({f["code"] for f in first}) >= 2, first  # something to order
    assert _findings(run_dir) == first  # the same findings in the same order
    a = gradscope.report(run_dir, tmp_path / "a.html").read_text(encoding="utf-8")
    b = gradscope.report(run_dir, tmp_path / "b.html").read_text(encoding="utf-8")
    assert strip_timestamp(a) == strip_timestamp(b)


_IN_A_FRESH_PROCESS = (
    "import sys; from gradscope.cli import main; "
    "main(['check', sys.argv[1], '--format', 'json']); main(['report', sys.argv[1], '-o', sys.argv[2]])"
)


def test_other_processes_with_other_hash_seeds_give_the_same_bytes(run_dir: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _IN_A_FRESH_PROCESS, str(run_dir), str(tmp_path / f"{seed}.html")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONWARNINGS": "ignore"},
        )
        for seed in (1, 2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    checks = [out.split("\nwrote ")[0] for out in outputs]  # the check's JSON, before "wrote <path>"
    assert checks[0] == checks[1]
    checked = json.loads(checks[0])
    assert checked["findings"] == _findings(run_dir)  # and the same as in this process
    pages = [strip_timestamp((tmp_path / f"{seed}.html").read_text(encoding="utf-8")) for seed in (1, 2)]
    assert pages[0] == pages[1]
    here = strip_timestamp(gradscope.report(run_dir, tmp_path / "here.html").read_text(encoding="utf-8"))
    assert pages[0] == here


def test_two_recordings_of_the_same_training_hold_the_same_values_and_findings(run_dir: Path, tmp_path: Path) -> None:
    again = _record(tmp_path / "again")
    a, b = gradscope.load(run_dir), gradscope.load(again)
    assert a.to_pandas().equals(b.to_pandas())
    assert _findings(run_dir) == _findings(again)
