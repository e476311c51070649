"""Synthetic data sets for the scenarios where the digits do not fit (sequences, regression).

Every generator takes a ``torch.Generator`` so that a scenario's data depends only on its seed.
"""

from __future__ import annotations

import math

import torch

__all__ = ["blobs", "channel_sum_sequences", "marker_tokens", "smooth_regression"]


def channel_sum_sequences(
    n: int, length: int, channels: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, length, channels)`` Gaussian sequences; the label is the channel with the largest sum over time.

    Solving it needs the whole sequence: no single step carries the answer.
    """
    x = torch.randn(n, length, channels, generator=gen)
    return x, x.sum(dim=1).argmax(dim=1)


def marker_tokens(
    n: int, length: int, vocab: int, n_classes: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences ``(n, length)`` over ``vocab`` symbols; the label is which of the first ``n_classes``
    symbols occurs most often (ties broken towards the lower symbol). Filler symbols are the rest."""
    x = torch.randint(0, vocab, (n, length), generator=gen)
    counts = torch.stack([(x == c).sum(dim=1) for c in range(n_classes)], dim=1)
    # Break ties deterministically so the label is a function of the sequence.
    y = (counts.float() - 1e-3 * torch.arange(n_classes)).argmax(dim=1)
    return x, y


def smooth_regression(
    n: int, features: int, gen: torch.Generator, noise: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, w)``: ``y = sin(x·w₁) + 0.5·cos(x·w₂)`` plus Gaussian noise, a smooth nonlinear target."""
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, 2, generator=gen) / math.sqrt(features)
    proj = x @ w
    y = torch.sin(2 * proj[:, 0]) + 0.5 * torch.cos(2 * proj[:, 1]) + noise * torch.randn(n, generator=gen)
    return x, y[:, None], w


def blobs(n: int, features: int, n_classes: int, gen: torch.Generator, spread: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian blobs: any linear model fits them in a few dozen steps."""
    centres = spread * torch.randn(n_classes, features, generator=gen) / math.sqrt(features)
    y = torch.randint(0, n_classes, (n,), generator=gen)
    return centres[y] + 0.3 * torch.randn(n, features, generator=gen), y
