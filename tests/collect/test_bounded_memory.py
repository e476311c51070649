"""The Monitor's memory does not grow with the number of steps: everything it holds is bounded by
``flush_every`` and the model's size, whatever the length of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradscope


def _footprint(obj: Any, seen: set[int] | None = None, path: str = "mon") -> dict[str, int]:
    """Size of every container, tensor and array reachable from the Monitor's own state, by path.
    The user's model and optimizer are not the Monitor's memory and are not followed."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (nn.Module, torch.optim.Optimizer)):
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {path: obj.numel()}
    if isinstance(obj, np.ndarray):
        return {path: obj.size}
    sizes: dict[str, int] = {}
    if isinstance(obj, dict):
        sizes[path] = len(obj)
        for key, value in obj.items():
            sizes |= _footprint(value, seen, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        sizes[path] = len(obj)
        for i, value in enumerate(obj):
            sizes |= _footprint(value, seen, f"{path}[{i}]")
    elif type(obj).__module__.startswith("gradscope") and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            sizes |= _footprint(value, seen, f"{path}.{key}")
    return sizes


def test_buffers_do_not_grow_with_the_number_of_steps(cases: Any, tmp_path: Path) -> None:
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = case.batch(0, n=4)
    sizes = {}
    with gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=50, activation_every=5, on_finding=None) as mon:
        for step in range(1010):
            opt.zero_grad()
            loss = case.loss_fn(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            if step + 1 in (10, 1010):  # the same phase of the flush cycle: buffers should be identical
                sizes[step + 1] = _footprint(mon)
    grown = {k: (sizes[10].get(k), v) for k, v in sizes[1010].items() if v != sizes[10].get(k)}
    assert grown == {}, f"sizes that changed between step 10 and step 1010: {grown}"
    assert sum(sizes[10].values()) > 100  # the walk does see the buffers
    assert gradscope.load(tmp_path).n_steps == 1010
