"""What the store tests share: a small complete run written by a real Monitor (imported by name:
tests/detect/synth.py is used the same way)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradscope


def write_small_run(log_dir: Path, *, steps: int = 20, flush_every: int = 4, activation_every: int = 2) -> Path:
    """``steps`` steps of a 4-8-2 MLP, written every ``flush_every`` steps and closed, so that its
    write-ahead log is folded into run.sqlite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.Monitor(
        model, opt, log_dir=log_dir, flush_every=flush_every, activation_every=activation_every, on_finding=None
    ) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)
            opt.step()
    return log_dir
