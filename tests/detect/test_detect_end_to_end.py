"""Tiny real trainings with one injected fault each, recorded by a Monitor and diagnosed: the right
code, step, layers and first fix come out, and a healthy run stays quiet."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradscope
from gradscope import Finding, Severity, TrainingFailure
from gradscope.collect.monitor import OnFinding
from gradscope.datasets import load_digits

X, Y = load_digits(size=8)


def mlp(*sizes: int, act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes[:-1]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    nan_at: int | None = None,
    on_finding: OnFinding = None,
) -> gradscope.Run:
    generator = torch.Generator().manual_seed(0)
    with gradscope.Monitor(model, optimizer, on_finding=on_finding, flush_every=25) as monitor:
        for step in range(steps):
            batch = torch.randint(0, len(X), (64,), generator=generator)
            x = X[batch].clone()
            if step == nan_at:
                x[0, 5] = float("nan")  # one corrupt sample
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), Y[batch])
            loss.backward()
            monitor.step(loss)
            optimizer.step()
        return monitor.run


def first(findings: list[Finding], code: str) -> Finding:
    found = [f for f in findings if f.code == code]
    assert found, f"no {code} in {[str(f) for f in findings]}"
    return found[0]


def test_healthy_mlp_on_the_digits_has_no_alarm() -> None:
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    findings = gradscope.diagnose(train(model, torch.optim.SGD(model.parameters(), lr=0.1), 200))
    assert findings.by_severity("warning") == [], findings.summary()


def test_learning_rate_far_too_high_is_an_error_whose_first_fix_lowers_it() -> None:
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    findings = gradscope.diagnose(train(model, torch.optim.SGD(model.parameters(), lr=10.0), 100))
    top = findings[0]
    assert top.severity is Severity.ERROR and top.code in {"exploding_loss", "nonfinite", "exploding_gradients"}
    assert top.step is not None and top.step <= 5
    assert top.fixes[0].kind.value == "learning_rate" and "lr=10 with SGD" in top.fixes[0].action


def test_deep_sigmoid_stack_has_vanishing_gradients_with_an_activation_fix() -> None:
    torch.manual_seed(0)
    model = mlp(64, *[64] * 8, 10, act=nn.Sigmoid)
    findings = gradscope.diagnose(train(model, torch.optim.SGD(model.parameters(), lr=0.1), 150))
    f = first(findings, "vanishing_gradients")
    assert f.severity is Severity.WARNING
    assert f.layers[0] == "0"  # the first Linear gets the least gradient
    assert f.evidence["decades_lost"] > 4
    assert f.fixes[0].kind.value == "activation" and "Sigmoid" in f.fixes[0].action


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.aux = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.main(x), self.aux(x).detach()], dim=1))  # the bug: .detach()


def test_detached_branch_has_no_gradient_with_a_code_fix() -> None:
    torch.manual_seed(0)
    model = TwoTowers()
    findings = gradscope.diagnose(train(model, torch.optim.Adam(model.parameters(), lr=1e-3), 60))
    f = first(findings, "no_gradient")
    assert f.severity is Severity.WARNING and f.layers == ("aux.0",)
    assert f.fixes[0].kind.value == "code"


def test_nan_in_one_batch_is_traced_to_the_input_with_a_data_fix() -> None:
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    findings = gradscope.diagnose(train(model, torch.optim.SGD(model.parameters(), lr=0.1), 60, nan_at=40))
    f = first(findings, "nonfinite")
    assert f.severity is Severity.ERROR and f.step == 40 and f.layers[0] == "(input)"
    assert f.fixes[0].kind.value == "data"


def test_live_detection_reports_the_divergence_while_training() -> None:
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    seen: list[Finding] = []
    train(model, torch.optim.SGD(model.parameters(), lr=10.0), 100, on_finding=seen.append)
    assert any(f.severity is Severity.ERROR for f in seen)


def test_live_detection_can_stop_training_on_the_first_error() -> None:
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    with pytest.raises(TrainingFailure) as failure:
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), 100, nan_at=10, on_finding="raise")
    assert failure.value.finding.code == "nonfinite"  # type: ignore[attr-defined]
