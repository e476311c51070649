"""A monitored model can be copied and saved whole, as training code does: ``copy.deepcopy`` (an
EMA or teacher copy), ``torch.optim.swa_utils.AveragedModel`` and ``torch.save(model)``. The copy
carries inert hooks, which remove themselves at its first forward, and no watch on its call (which
``Module.__getstate__`` leaves out): it is not monitored, and the
Monitor with its open run store is neither copied nor pickled. The original goes on recording as
before."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradscope


def _deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _averaged(model: nn.Module) -> nn.Module:
    return torch.optim.swa_utils.AveragedModel(model).module


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.load(buffer, weights_only=False)
    return loaded


def _train(model: nn.Module, opt: torch.optim.Optimizer, mon: gradscope.Monitor, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
        opt.step()


@pytest.mark.parametrize("make_copy", [_deepcopy, _averaged, _saved_and_loaded], ids=["deepcopy", "AveragedModel", "torch.save"])
@pytest.mark.parametrize("at_step", [0, 3], ids=["module-hooks-attached", "model-hook-only"])
def test_a_copy_of_a_monitored_model_is_a_plain_model(
    make_copy: Callable[[nn.Module], nn.Module], at_step: int, tmp_path: Path, quiet: dict[str, Any]
) -> None:
    """At step 0 the per-module hooks are attached too (it gives the forward order); at step 3
    (activation_every=5) only the watch on the model's own call is (a CallWatch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.Monitor(model, opt, log_dir=tmp_path / "run", activation_every=5, update_every=1, **quiet) as mon:
        _train(model, opt, mon, at_step, seed=0)
        twin = make_copy(model)
        assert twin is not model
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()

        # The copy trains on its own, with grad enabled, and the Monitor sees none of it.
        held = mon._held_forward
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        out = twin(torch.full((16, 4), float("nan")))  # a NaN batch the Monitor would flag
        out.sum().backward()
        twin_opt.step()
        assert mon._held_forward is held
        assert mon.steps_recorded == at_step
        # its inert hooks removed themselves in that forward: a plain model takes the fast call path
        assert not any(m._forward_hooks for m in twin.modules())
        # and the watch on the model's own call (from step 1 on) is not copied at all
        assert all(m._compiled_call_impl is None for m in twin.modules())
        if at_step == 0:
            assert model._forward_hooks and model._compiled_call_impl is None  # step 0: the model's hook
        else:
            assert not model._forward_hooks and model._compiled_call_impl is mon._call_watch is not None  # then the watch

        _train(model, opt, mon, 7, seed=1)
    run = gradscope.load(tmp_path / "run")
    assert run.n_steps == at_step + 7
    assert not (run.metric("output_nonfinite").to_numpy() == 1).any()  # the copy's NaN batch was not seen
    assert run.metric("update_norm").notna().all().all()
    assert run.metric("act_std").notna().any(axis=1).sum() == len(range(0, at_step + 7, 5))
