"""Most steps on the CPU take the short path of step() (``Monitor._record_plain_step``). These tests
pin that a run recorded with it stores exactly what the full path stores, through every kind of
step a loop can throw at it inside a stretch of plain steps, and that it is really taken."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope.collect.cadence import Cadence

STEPS = 130  # past the early spacing's samples at 0, 25, 50, 75, 100 and 125, with writes every 16


class _Branchy(nn.Module):
    """An MLP with a side branch that some steps leave out, so that its parameters get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.side = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, side: bool = True) -> torch.Tensor:
        y = self.body(x)
        return y + self.side(x) if side else y


def _state(mon: gradscope.Monitor) -> dict[str, Any]:
    """The Monitor's flags, counters and row lists between two steps (not its clock readings)."""
    state = {k: v for k, v in vars(mon).items() if type(v) in (bool, int) and k != "_plain_end"}
    state |= {k: list(v) for k, v in vars(mon).items() if type(v) is list and all(type(i) is int for i in v)}
    state["steps timed"] = len(mon._step_clock)
    state["forward kept"] = mon._held_forward is not None
    return state


def _train(mon_options: dict[str, Any], log_dir: Any, states: list[dict[str, Any]]) -> tuple[gradscope.Run, Cadence, Cadence]:
    """A loop with something unusual at many steps that fall between the samples and writes; the run,
    and the Monitor's cadences of activation statistics and updates. The Monitor's state after each
    step goes into ``states``."""
    torch.manual_seed(0)
    model = _Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.99)  # a new lr every step
    data = torch.Generator().manual_seed(1)
    with gradscope.Monitor(model, opt, log_dir=log_dir, **mon_options) as mon:
        for step in range(STEPS):
            x = torch.randn(16, 4, generator=data)
            if step in (5, 60):
                x[0, 0] = math.nan  # a NaN batch: a NaN loss, so its input and output are checked
            if step == 40:
                model.register_forward_pre_hook(lambda module, args: None)  # the watch hands over to a hook
            opt.zero_grad()
            if step == 14:
                model.eval()
                model(x)  # an evaluation forward with autograd on: summed at once, not kept
                model.train()
            if step == 12:  # gradient accumulation: two forwards in one step
                loss = sum(model(half).pow(2).mean() for half in x.chunk(2))
                assert isinstance(loss, torch.Tensor)
                loss.backward()
            elif step == 58:
                loss = model(x=x).pow(2).mean()  # the input by keyword alone: not seen by the check
                loss.backward()
            else:
                loss = model(x, side=step != 19).pow(2).mean()  # step 19: the side branch gets no gradient
                loss.backward()
            given: Any = loss
            if step == 8:
                given = None
            elif step == 10:
                given = loss.item()
            elif step == 18:
                given = loss.double()
            elif step == 22:
                given = loss.detach().reshape(1)
            mon.step(given)
            states.append(_state(mon))
            if step not in (5, 60):  # the NaN gradients are not applied, as a GradScaler would skip them
                opt.step()
            scheduler.step()
        return mon.run, mon.activation_cadence, mon.update_cadence


@pytest.mark.parametrize("cadences", [{}, {"activation_every": 7, "update_every": 0}], ids=["default", "every_7th"])
def test_a_run_with_plain_steps_stores_what_the_full_path_stores(
    cadences: dict[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Any, quiet: dict[str, Any]
) -> None:
    options = {"flush_every": 16, "flush_seconds": None, **cadences, **quiet}
    plain = gradscope.Monitor._record_plain_step
    taken: list[int] = []
    plain_states: list[dict[str, Any]] = []
    full_states: list[dict[str, Any]] = []

    def counted(self: gradscope.Monitor, loss: Any) -> bool:
        step = self._step
        recorded = plain(self, loss)
        if recorded:
            taken.append(step)
        return recorded

    with monkeypatch.context() as patch:
        patch.setattr(gradscope.Monitor, "_record_plain_step", counted)
        with_plain, activations, updates = _train(options, tmp_path / "plain", plain_states)
    with monkeypatch.context() as patch:
        patch.setattr(gradscope.Monitor, "_plain_steps_end", lambda self, step: step)  # every step on the full path
        full, *_ = _train(options, tmp_path / "full", full_states)

    # Taken on most steps, and on none of those that need the full path.
    assert len(taken) > STEPS // 2
    # A NaN batch, no loss, two forwards, an evaluation forward, a missing gradient, a new pre-hook.
    # (Steps 10, 18 and 22 give a number, a float64 and a (1,) tensor: finite losses, read as numbers.)
    unusual = {5, 8, 12, 14, 19, 40, 60}
    assert not unusual & set(taken)
    # Sampled steps and the steps before them, the steps that write, and the first.
    sampled = {t for t in range(STEPS) if activations.due(t) or activations.due(t + 1) or updates.due(t)}
    assert not (sampled | set(range(0, STEPS, 16))) & set(taken)

    pd.testing.assert_frame_equal(with_plain.to_pandas(), full.to_pandas())
    for step, (plain_state, full_state) in enumerate(zip(plain_states, full_states, strict=True)):
        assert plain_state == full_state, f"the Monitor's state differs after step {step}"
    assert with_plain.n_steps == full.n_steps == STEPS
    # and what it stores is right, not only the same: the NaN batches were checked, the finite ones not
    flags = with_plain.metric("output_nonfinite")[["(input)", "(output)"]]
    assert flags.loc[5].tolist() == flags.loc[60].tolist() == [1.0, 1.0]
    assert flags.loc[[4, 6, 30, 61]].isna().all().all()
    assert math.isnan(with_plain.loss[8]) and with_plain.scalar("loss_missing")[8]
    assert with_plain.lr[30] == pytest.approx(0.05 * 0.99**30)


def test_a_write_due_by_the_clock_happens_on_a_plain_step(tmp_path: Any, quiet: dict[str, Any]) -> None:
    """``flush_seconds`` after the last write, the next step() writes, plain or not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=10_000, flush_seconds=0.5, **quiet) as mon:
        for step in range(12):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            if step == 10:
                assert mon._plain_end > 10  # step 10 would take the short path ...
                time.sleep(0.6)
            mon.step(loss)
            opt.step()
            if step == 10:
                assert gradscope.load(tmp_path).n_steps == 10  # ... and it wrote the steps before it


def test_an_interrupt_midway_through_a_plain_step_leaves_nothing_of_it(quiet: dict[str, Any]) -> None:
    """A KeyboardInterrupt that lands inside the short path, caught by the loop, which calls step()
    again: the step is recorded once, and every later step keeps its own learning rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    given: list[float] = []
    with gradscope.Monitor(model, opt, flush_every=16, flush_seconds=None, **quiet) as mon:
        for step in range(40):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            if step == 30:
                assert step < mon._plain_end  # a plain step

                class Interrupted(list):  # the interrupt lands right after the step's lr is kept
                    def append(self, value: Any) -> None:
                        mon._host_lr = [*self, value]  # once
                        raise KeyboardInterrupt

                mon._host_lr = Interrupted(mon._host_lr)
                with pytest.raises(KeyboardInterrupt):
                    mon.step(loss)
            mon.step(loss)
            given.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        run = mon.run
    assert run.n_steps == 40
    np.testing.assert_allclose(run.lr, given)
    assert len(mon._step_clock) <= 1 + 40 - 32  # the steps since the last write, and the one before
