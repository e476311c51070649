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
