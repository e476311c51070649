"""Quickstart: monitor the classic 784-128-10 network learning handwritten digits.

The network has 784·128 + 128·10 = 101,632 weights. The digits ship with gradscope (8×8 images
upsampled to 28×28), so nothing is downloaded. Run:  python examples/quickstart.py [log_dir]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

import gradscope
from gradscope.datasets import load_digits


def main(log_dir: str | None = None, steps: int = 300) -> gradscope.Run:
    log_dir = log_dir or tempfile.mkdtemp(prefix="gradscope-quickstart-")
    torch.manual_seed(0)
    images, labels = load_digits(size=28)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()

    with gradscope.Monitor(model, optimizer, log_dir=log_dir, overwrite=True) as monitor:
        for _ in range(steps):
            batch = torch.randint(0, len(images), (64,))
            optimizer.zero_grad()
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            monitor.step(loss)
            optimizer.step()

    run = gradscope.load(log_dir)
    frame = run.to_pandas()
    print(f"recorded {run.n_steps} steps of {type(model).__name__} into {log_dir}")
    print(f"  layers: {', '.join(run.layers)}; {len(frame):,} values, {frame.metric.nunique()} metrics")
    print(f"  loss {run.loss[0]:.3f} -> {run.loss[-1]:.3f}; final gradient norm per layer:")
    for layer, value in run.metric("grad_norm").iloc[-1].items():
        print(f"    {layer:>4}  {value:.4f}")
    print(gradscope.diagnose(run).summary())
    return run


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
