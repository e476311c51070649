"""The plain training loop most scenarios share, written the way a user would write it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.scenarios.core import Context, sample_batch

__all__ = ["fit"]

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
) -> None:
    """Minibatch training: sample, forward, backward, ``session.step(loss)``, ``optimizer.step()``.

    ``corrupt(step, x_batch)`` lets a fault scenario tamper with one batch on its way in;
    ``zero_grad=False`` is the loop that forgets ``optimizer.zero_grad()``.
    """
    model.train()
    with ctx.session(model, optimizer) as session:
        for step in range(steps):
            xb, yb = sample_batch(ctx, x, y, batch_size)
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
