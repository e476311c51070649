"""Pre-flight checks as tests: seconds in CI catch the bugs that would waste a long training run.

``gradscope.preflight`` checks the data, the initial loss, that every parameter gets a gradient, that
examples do not leak into each other through the batch, and that the model can overfit a few examples.
Each test below fails with the findings and their fixes. Run:

    python -m pytest examples/test_preflight_example.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.datasets import load_digits


class Classifier(nn.Module):
    """The model under test: 28×28 digits → 10 classes. ``flatten_bug`` is the mistake a refactor made."""

    def __init__(self, *, flatten_bug: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.head = nn.Linear(8 * 7 * 7, 10)
        self.flatten_bug = flatten_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x.view(-1, 1, 28, 28))))  # (B, 8, 7, 7)
        # view(-1, B).t() has the right shape but mixes examples; view(B, -1) is right.
        h = h.view(-1, len(x)).t() if self.flatten_bug else h.view(len(x), -1)
        return self.head(h)


def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(size=28)  # bundled with gradscope, standardised
    return images[:32], labels[:32]


def test_model_trains() -> None:
    torch.manual_seed(0)
    gradscope.preflight(Classifier(), F.cross_entropy, real_batch(), n_classes=10).assert_ok()


def test_preflight_catches_a_flatten_that_mixes_the_batch() -> None:
    torch.manual_seed(0)
    result = gradscope.preflight(Classifier(flatten_bug=True), F.cross_entropy, real_batch(), n_classes=10)
    with pytest.raises(AssertionError, match=r"batch_dependence \[head\]"):
        result.assert_ok()
