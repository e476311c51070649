"""trace_step: one step walked through a copy of the model, the model and optimizer left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.trace import trace_step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_trace_reports_prediction_loss_and_gradients_like_torch() -> None:
    model = _model()
    x, y = torch.randn(1, 6), torch.tensor([2])
    trace = trace_step(model, nn.functional.cross_entropy, x, y)

    logits = model(x)
    expected_loss = nn.functional.cross_entropy(logits, y)
    expected_loss.backward()
    probs = logits.detach().softmax(-1)[0]
    assert trace.loss == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    assert trace.prediction == int(probs.argmax())
    assert trace.confidence == pytest.approx(float(probs.max()), rel=1e-6)
    assert trace.target == 2
    # backward order: the last layer first
    assert [g.layer for g in trace.gradients] == ["2", "0"]
    last = torch.cat([model[2].weight.grad.reshape(-1), model[2].bias.grad])
    assert trace.gradients[0].grad_norm == pytest.approx(float(last.norm()), rel=1e-5)


def test_trace_shows_the_optimizer_step_and_changes_nothing() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # give the optimizer momentum state to copy
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    rng_before = torch.get_rng_state()

    trace = trace_step(model, nn.functional.cross_entropy, x, y, opt, top_k=3)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state_before[k], v["momentum_buffer"]) for k, v in opt.state.items())
    assert torch.equal(rng_before, torch.get_rng_state())
    assert len(trace.moved) == 3
    biggest = trace.moved[0]
    # replay the step by hand: the traced before/after values are those of the real update
    shadow = _model()
    shadow.load_state_dict(before)
    shadow_opt = torch.optim.SGD(shadow.parameters(), lr=0.5, momentum=0.9)
    shadow_opt.load_state_dict(opt.state_dict())
    nn.functional.cross_entropy(shadow(x), y).backward()
    shadow_opt.step()
    param = dict(shadow.named_parameters())[biggest.param]
    assert biggest.before == pytest.approx(float(before[biggest.param][biggest.index]))
    assert biggest.after == pytest.approx(float(param.detach()[biggest.index]), rel=1e-5)
    assert abs(biggest.delta) >= abs(trace.moved[-1].delta)
    assert "SGD, lr=0.5" in str(trace)


def test_trace_rejects_a_non_module() -> None:
    with pytest.raises(gradscope.InvalidInputError, match=r"expected model to be a torch\.nn\.Module"):
        trace_step("model", nn.functional.cross_entropy, torch.randn(1, 6), torch.tensor([0]))  # type: ignore[arg-type]
