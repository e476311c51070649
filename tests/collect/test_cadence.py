"""Which steps the sampled measurements land on: by default four times as often in the first
1,000 steps as after them; a spacing given to the Monitor is kept from step 0."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.collect.cadence import DEFAULT_ACTIVATIONS, DEFAULT_UPDATES, EARLY_STEPS, Cadence


def _due(cadence: Cadence, steps: range) -> list[int]:
    return [s for s in steps if cadence.due(s)]


def test_the_default_cadences_sample_more_often_in_the_first_1000_steps_then_on_the_same_steps() -> None:
    activations, updates = DEFAULT_ACTIVATIONS, DEFAULT_UPDATES
    assert _due(activations, range(1500)) == [*range(0, 1000, 50), 1000, 1200, 1400]
    assert _due(updates, range(1500)) == [*range(0, 1000, 25), 1000, 1200, 1400]
    assert EARLY_STEPS % 200 == 0, "the later spacing must line up at the switch"
    assert (activations.densest, updates.densest) == (50, 25)


@pytest.mark.parametrize("every", [0, 1, 7, 50])
def test_a_given_spacing_is_kept_from_step_0(every: int) -> None:
    cadence = Cadence.fixed(every)
    expected = [s for s in range(3000) if every and s % every == 0]
    assert _due(cadence, range(3000)) == expected
    assert cadence.densest == every
    assert cadence.describe() == every


@pytest.mark.parametrize("cadence", [DEFAULT_ACTIVATIONS, DEFAULT_UPDATES, Cadence.fixed(3), Cadence.fixed(0)])
def test_the_array_form_agrees_with_the_step_form(cadence: Cadence) -> None:
    steps = np.arange(2500)
    assert cadence.due_steps(steps).tolist() == [cadence.due(int(s)) for s in steps]


@pytest.mark.parametrize(
    "cadence",
    [DEFAULT_ACTIVATIONS, DEFAULT_UPDATES, Cadence.fixed(1), Cadence.fixed(7), Cadence.fixed(0), Cadence(0, 30, 900)],
    ids=["activations", "updates", "every_step", "every_7th", "never", "early_only"],
)
def test_the_next_sampled_step_is_the_first_due_from_a_step_on(cadence: Cadence) -> None:
    due = _due(cadence, range(2700))
    for step in range(2500):
        assert cadence.next_due(step) == next((d for d in due if d >= step), None), step


def test_a_switch_off_a_sampled_step_is_refused() -> None:
    with pytest.raises(ValueError, match="must fall on a sampled step"):
        Cadence(every=300, early_every=50, early_steps=1000)


def _train(monitor_options: dict[str, Any], steps: int) -> gradscope.Run:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with gradscope.Monitor(model, opt, on_finding=None, **monitor_options) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
    return mon.run


def test_a_default_monitor_samples_on_the_default_cadences_across_writes() -> None:
    run = _train({"flush_every": 300}, 1450)  # writes at 300, 600, 900, 1200: one spans the switch
    assert run.activation_steps.tolist() == [*range(0, 1000, 50), 1000, 1200, 1400]
    update = run.metric("update_norm").iloc[:, 0]
    assert update.index[update.notna()].tolist() == [*range(0, 1000, 25), 1000, 1200, 1400]
    skipped = run.scalar("optimizer_skipped")  # known (0: it stepped) exactly where the update is measured
    assert np.flatnonzero(~np.isnan(skipped)).tolist() == update.index[update.notna()].tolist()
    assert np.nansum(skipped) == 0
    config = run.meta["config"]
    assert config["activation_every"] == "every 50 steps until step 1000, then every 200"
    assert config["update_every"] == "every 25 steps until step 1000, then every 200"


def test_a_given_spacing_is_stored_and_kept_past_step_1000() -> None:
    run = _train({"activation_every": 300, "update_every": 250}, 1210)
    assert run.activation_steps.tolist() == [0, 300, 600, 900, 1200]
    update = run.metric("update_norm").iloc[:, 0]
    assert update.index[update.notna()].tolist() == [0, 250, 500, 750, 1000]
    assert (run.meta["config"]["activation_every"], run.meta["config"]["update_every"]) == (300, 250)
