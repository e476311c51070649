"""Gradient accumulation gives one row per optimizer step with forward statistics over all its
micro-batches; evaluation forwards (grad disabled) never enter the training statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import gradscope
from gradscope.store.schema import ACTIVATION_METRICS

MICRO = 3


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_forward_statistics_aggregate_over_micro_batches(
    name: str, cases: Any, quiet: dict[str, Any], reference: Any, close: Any
) -> None:
    case = cases[name]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watched = [n for n, m in model.named_modules() if n and next(m.children(), None) is None]
    with gradscope.Monitor(model, opt, activation_every=1, flush_every=2, update_every=1, **quiet) as mon:
        trace = case.train(model, opt, mon, 4, micro_batches=MICRO, capture=tuple(watched))
        run = mon.run

    np.testing.assert_array_equal(run.steps, np.arange(4))  # one row per optimizer step
    np.testing.assert_array_equal(run.activation_steps, np.arange(4))
    close(run.loss, [t.loss for t in trace])
    close(run.grad_norm, [reference.norm(list(t.grads.values())) for t in trace])
    module_types = {n: type(m).__name__ for n, m in model.named_modules()}
    for module in watched:
        for step, t in enumerate(trace):
            assert len(t.outputs[module]) == MICRO
            bounded = "tanh" if module_types[module] == "Tanh" else None
            expected = reference.activation(t.outputs[module], bounded)
            for metric, value in expected.items():
                close(run.metric(metric)[module].iloc[step], value, rtol=2e-4, atol=2e-6, what=f"{metric} {module} {step}")
            # and it is not the statistic of the last micro-batch alone (BatchNorm normalises each
            # micro-batch to mean 0 and std 1, so there the two legitimately agree)
            if module_types[module] == "BatchNorm2d":
                continue
            last_only = reference.activation(t.outputs[module][-1:], bounded)
            differs = [abs(run.metric(m)[module].iloc[step] - last_only[m]) > 1e-5 for m in ("act_mean", "act_std", "act_max_abs")]
            assert any(differs), module


def test_dead_units_need_to_be_dead_in_every_micro_batch(quiet: dict[str, Any]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    with gradscope.Monitor(model, activation_every=1, update_every=1, **quiet) as mon:
        model(torch.tensor([[1.0, -1.0]])).sum().backward()  # unit 1 is zero here ...
        model(torch.tensor([[-1.0, 1.0]])).sum().backward()  # ... and unit 0 here: neither is dead
        mon.step(0.0)
        model(torch.tensor([[1.0, -1.0]])).sum().backward()
        model(torch.tensor([[2.0, -3.0]])).sum().backward()  # unit 1 is zero in both: half dead
        mon.step(0.0)
        run = mon.run
    np.testing.assert_allclose(run.metric("act_dead_frac")["1"].to_numpy(), [0.0, 0.5])
    np.testing.assert_allclose(run.metric("act_zero_frac")["1"].to_numpy(), [0.5, 0.5])


def _run_with(between: Any, cases: Any, quiet: dict[str, Any]) -> gradscope.Run:
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.Monitor(model, opt, activation_every=1, flush_every=3, update_every=1, **quiet) as mon:
        case.train(model, opt, mon, 5, between=lambda step: between(model))
        return mon.run


def _evaluate(model: torch.nn.Module) -> None:
    huge = torch.full((32, 6), 1e4)  # would dominate act_max_abs and the means if it were counted
    model.eval()
    with torch.no_grad():
        model(huge)
    with torch.inference_mode():
        model(-huge)
    model.train()


def test_evaluation_forwards_are_not_training_statistics(cases: Any, quiet: dict[str, Any]) -> None:
    plain = _run_with(lambda model: None, cases, quiet)
    with_eval = _run_with(_evaluate, cases, quiet)
    np.testing.assert_array_equal(with_eval.steps, plain.steps)
    for metric in (*ACTIVATION_METRICS, "output_nonfinite", "grad_norm", "update_norm", "loss"):
        np.testing.assert_array_equal(with_eval.metric(metric).to_numpy(), plain.metric(metric).to_numpy(), err_msg=metric)
    assert with_eval.metric("act_max_abs").max().max() < 100


class _SharedActivation(torch.nn.Module):
    """One ReLU module called three times per forward, at widths 64, 32 and 64."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(16, 64), torch.nn.Linear(64, 32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 1))
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.act(self.c(self.act(self.b(self.act(self.a(x)))))))


def test_a_module_called_at_changing_widths_keeps_every_call_in_its_statistics(quiet: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = _SharedActivation()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    outputs: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    with gradscope.Monitor(model, opt, activation_every=1, **quiet) as mon:
        loss = model(torch.randn(32, 16)).pow(2).mean()
        loss.backward()
        mon.step(loss)
        run = mon.run
    values = torch.cat([o.reshape(-1) for o in outputs]).double()
    assert run.metric("act_std")["act"].iloc[0] == pytest.approx(float(values.std(correction=0)), rel=1e-4)
    assert run.metric("act_mean")["act"].iloc[0] == pytest.approx(float(values.mean()), rel=1e-4)
    assert np.isnan(run.metric("act_dead_frac")["act"].iloc[0])  # units changed size: liveness unknown


@pytest.mark.parametrize("options", [{"check_outputs": True}, {"activation_every": 1}], ids=["check_outputs", "sampled"])
def test_a_step_without_a_training_forward_reads_as_not_checked(options: dict[str, Any], quiet: dict[str, Any]) -> None:
    """step() after an evaluation-only forward: the modules were not checked, which is not NaN/Inf."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, **options, **quiet) as mon:
        for step in range(4):
            opt.zero_grad()
            if step == 2:
                with torch.no_grad():
                    loss = model(torch.randn(16, 4)).pow(2).mean()
            else:
                loss = model(torch.randn(16, 4)).pow(2).mean()
                loss.backward()
            mon.step(loss)
            opt.step()
        run = mon.run
    flags = run.metric("output_nonfinite")[["0", "1", "2"]]
    assert flags.loc[2].isna().all()
    assert (flags.drop(index=2) == 0).all().all()
    assert [f for f in gradscope.diagnose(run) if f.code == "nonfinite"] == []
