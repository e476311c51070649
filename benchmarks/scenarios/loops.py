"""The plain training loop most scenarios share, written the way a user would write it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.scenarios.core import Context, sample_batch

__all__ = ["epoch_batches", "fit"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fit(
    ctx: Context,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    loss_fn: LossFn = F.cross_entropy,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    corrupt: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    zero_grad: bool = True,
    shuffle: bool | None = None,
) -> None:
    """Minibatch training: sample, forward, backward, ``session.step(loss)``, ``optimizer.step()``.

    ``corrupt(step, x_batch)`` lets a fault scenario tamper with one batch on its way in;
    ``zero_grad=False`` is the loop that forgets ``optimizer.zero_grad()``. Batches are drawn at random
    by default; ``shuffle`` draws them epoch after epoch as ``DataLoader(..., shuffle=shuffle)`` does:
    in a new random order each epoch, or (``False``) in the order of ``x``.
    """
    model.train()
    epochs = None if shuffle is None else epoch_batches(ctx, len(x), batch_size, shuffle=shuffle)
    with ctx.session(model, optimizer) as session:
        for step in range(steps):
            if epochs is None:
                xb, yb = sample_batch(ctx, x, y, batch_size)
            else:
                index = next(epochs)
                xb, yb = x[index], y[index]
            if corrupt is not None:
                xb = corrupt(step, xb)
            if zero_grad:
                optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            session.step(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    model.eval()


def epoch_batches(ctx: Context, n: int, batch_size: int, *, shuffle: bool) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` examples, epoch after epoch, the last batch of an epoch possibly short
    (a DataLoader's ``drop_last=False``): shuffled anew each epoch, or in storage order."""
    while True:
        order = torch.randperm(n, generator=ctx.gen) if shuffle else torch.arange(n)
        yield from order.split(batch_size)
