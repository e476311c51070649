"""‖Δθ‖ belongs to the step whose gradients made it, whether ``mon.step(loss)`` comes before or just
after ``optimizer.step()``, across flush boundaries, and without an optimizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import gradscope

STEPS = 7  # crosses two flushes at flush_every=3, so the carried-over row is exercised


def _expected_updates(trace: list[Any], layer_params: dict[str, list[str]], reference: Any) -> dict[str, list[float]]:
    return {
        layer: [reference.norm([t.after[p] - t.before[p] for p in ps]) for t in trace] for layer, ps in layer_params.items()
    }


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=0.01),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_step_before_or_after_optimizer_step_records_the_same_updates(
    make_optimizer: Any, cases: Any, quiet: dict[str, Any], reference: Any, close: Any
) -> None:
    case = cases["mlp"]
    runs = {}
    traces = {}
    for order in ("before", "after"):
        model = case.model()
        opt = make_optimizer(model.parameters())
        with gradscope.Monitor(model, opt, flush_every=3, update_every=1, **quiet) as mon:
            traces[order] = case.train(model, opt, mon, STEPS, order=order)
            runs[order] = mon.run
        layers = reference.layer_params(model)
    # the two orders train identically, so the recorded series must be identical too
    for metric in ("update_norm", "weight_norm", "grad_norm", "param_update_norm"):
        before, after = runs["before"].metric(metric), runs["after"].metric(metric)
        assert not before.isna().any().any(), f"{metric} has a hole"
        close(after.to_numpy(), before.to_numpy(), rtol=1e-6, what=metric)
    close(runs["after"].loss, runs["before"].loss, rtol=1e-6)
    # ... and step k holds the update optimizer.step() made from step k's gradients
    expected = _expected_updates(traces["before"], layers, reference)
    for layer, values in expected.items():
        close(runs["before"].metric("update_norm")[layer].to_numpy(), values, what=layer)
    assert all(v > 0 for vs in expected.values() for v in vs)


@pytest.mark.parametrize("order", ["before", "after"])
def test_update_every_k_steps_lands_on_the_same_steps_in_either_order(
    order: str, cases: Any, quiet: dict[str, Any], reference: Any, close: Any
) -> None:
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.Monitor(model, opt, flush_every=4, update_every=3, **quiet) as mon:
        trace = case.train(model, opt, mon, 10, order=order)
        run = mon.run
    update = run.metric("update_norm")["0"]
    measured = update.index[update.notna()].tolist()
    assert measured == [0, 3, 6, 9]
    expected = _expected_updates(trace, reference.layer_params(model), reference)["0"]
    close(update.loc[measured].to_numpy(), [expected[s] for s in measured])


def test_without_an_optimizer_gradients_are_recorded_and_updates_attributed_to_the_earlier_step(
    cases: Any, quiet: dict[str, Any], reference: Any, close: Any
) -> None:
    """Without an optimizer there are no step hooks: ‖Δθ‖ is the change of the parameters between
    one ``step()`` call and the next (or ``close()``), recorded under the earlier step. With the usual
    loop — backward, ``mon.step(loss)``, update by hand — that is exactly the update made from that
    step's gradients. No learning rate is recorded."""
    case = cases["mlp"]
    model = case.model()
    with gradscope.Monitor(model, flush_every=3, update_every=1, **quiet) as mon:
        trace = case.train(model, None, mon, 5, order="before", lr=0.1)
    run = mon.run  # after close(), which measures the last step's update
    layers = reference.layer_params(model)
    for layer, ps in layers.items():
        close(run.metric("grad_norm")[layer].to_numpy(), [reference.norm([t.grads[p] for p in ps]) for t in trace])
    expected = _expected_updates(trace, layers, reference)
    for layer, values in expected.items():
        close(run.metric("update_norm")[layer].to_numpy(), values, what=layer)
    assert np.isnan(run.lr).all()
    assert run.meta["optimizer"] is None


@pytest.mark.parametrize("where", ["inside_closure", "after_closure"])
def test_updates_of_an_optimizer_step_with_a_closure(where: str, cases: Any, quiet: dict[str, Any], reference: Any, close: Any) -> None:
    """``optimizer.step(closure)`` computes the gradients inside the step: ``mon.step`` may be called
    in the closure after backward (as Lightning's ``on_before_optimizer_step`` does) or after
    ``optimizer.step`` returns the loss. Either way step k holds the update made from step k's gradients."""
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = dict(model.named_parameters())
    expected: list[float] = []
    with gradscope.Monitor(model, opt, flush_every=3, update_every=1, **quiet) as mon:
        for step in range(STEPS):
            x, y = case.batch(step)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = case.loss_fn(model(x), y)
                loss.backward()
                if where == "inside_closure":
                    mon.step(loss)
                return loss

            before = {n: p.detach().clone() for n, p in params.items()}
            loss = opt.step(closure)
            if where == "after_closure":
                mon.step(loss)
            expected.append(reference.norm([params[n].detach() - before[n] for n in ("0.weight", "0.bias")]))
        run = mon.run
    assert run.n_steps == STEPS
    close(run.metric("update_norm")["0"].to_numpy(), expected)
