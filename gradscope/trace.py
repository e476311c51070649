"""``trace_step``: walk one batch (or one example) through a model and one optimizer step.

The classic explanation of backpropagation follows a single example: the network predicts "3" with
92% confidence, the answer is "8", the loss is computed, gradients flow back layer by layer, and each
weight moves a little (0.47 → 0.46). ``trace_step`` gives that view of your own model without
changing it: the step is taken on a copy, and the random-number state is restored afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradscope.errors import InvalidInputError

__all__ = ["LayerGradient", "StepTrace", "WeightChange", "trace_step"]


@dataclass(frozen=True)
class LayerGradient:
    layer: str
    type: str
    grad_norm: float
    weight_norm: float


@dataclass(frozen=True)
class WeightChange:
    param: str
    index: tuple[int, ...]
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass(frozen=True)
class StepTrace:
    """What one training step does to a model.

    Attributes:
        loss: the loss on the batch.
        prediction, confidence, target: for classification outputs (a class per row), those of the
            first example; ``None`` otherwise.
        gradients: per layer (modules owning parameters), in backward order (last layer first).
        moved: the individual weights that changed most in one optimizer step, with before/after values.
        optimizer: a description of the step taken (class and learning rate).
    """

    loss: float
    prediction: int | None
    confidence: float | None
    target: int | None
    gradients: list[LayerGradient] = field(default_factory=list)
    moved: list[WeightChange] = field(default_factory=list)
    optimizer: str = ""

    def __str__(self) -> str:
        lines = []
        if self.prediction is not None and self.confidence is not None:
            verdict = "right" if self.prediction == self.target else "wrong"
            target = f", the answer is {self.target} ({verdict})" if self.target is not None else ""
            lines.append(f"predicts {self.prediction} with {self.confidence:.0%} confidence{target}; loss {self.loss:.4g}")
        else:
            lines.append(f"loss {self.loss:.4g}")
        lines.append("gradient norm per layer, in backward order:")
        for g in self.gradients:
            lines.append(f"  {g.layer or '(model)':<24} {g.type:<14} grad {g.grad_norm:.3e}   weight {g.weight_norm:.3e}")
        lines.append(f"weights that moved most in one step ({self.optimizer}):")
        for w in self.moved:
            index = ", ".join(str(i) for i in w.index)
            lines.append(f"  {w.param}[{index}]".ljust(30) + f" {w.before:+.4f} → {w.after:+.4f}   (Δ {w.delta:+.2e})")
        return "\n".join(lines)


def trace_step(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    top_k: int = 5,
    lr: float = 0.1,
) -> StepTrace:
    """Trace one forward pass, backward pass and optimizer step on ``(x, y)`` without changing anything.

    Args:
        model: the model; it is copied, so its weights, gradients and buffers stay as they are.
        loss_fn: ``loss_fn(model(x), y)`` gives a scalar loss.
        x, y: one batch, or one example (add the batch dimension: ``x[:1]``, ``y[:1]``).
        optimizer: the optimizer whose step to show; its state (momentum, Adam moments) is copied too.
            Without one, plain SGD with ``lr`` is shown.
        top_k: how many of the most-moved weights to list.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"expected model to be a torch.nn.Module but got {type(model).__name__}")
    if not callable(loss_fn):
        raise InvalidInputError(f"expected loss_fn to be callable (output, target) -> loss but got {type(loss_fn).__name__}")
    with torch.random.fork_rng(devices=[]):
        shadow = copy.deepcopy(model)
        shadow.train(model.training)
        shadow_opt = _copy_optimizer(optimizer, model, shadow, lr)
        shadow.zero_grad(set_to_none=True)
        order: list[str] = []
        handles = [
            m.register_forward_hook(lambda mod, a, out, name=name: order.append(name))
            for name, m in shadow.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        try:
            output = shadow(x)
        finally:
            for h in handles:
                h.remove()
        loss = loss_fn(output, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InvalidInputError("expected loss_fn to return a scalar tensor; reduce the loss (e.g. mean) first")
        loss.backward()
        before = {n: p.detach().clone() for n, p in shadow.named_parameters() if p.requires_grad}
        gradients = _layer_gradients(shadow, order)
        shadow_opt.step()
        moved = _most_moved(shadow, before, top_k)
    prediction, confidence, target = _classification(output, y)
    group = shadow_opt.param_groups[0]
    return StepTrace(
        loss=float(loss.detach()),
        prediction=prediction,
        confidence=confidence,
        target=target,
        gradients=gradients,
        moved=moved,
        optimizer=f"{type(shadow_opt).__name__}, lr={group['lr']:g}" + ("" if optimizer is not None else " (no optimizer given)"),
    )


def _copy_optimizer(
    optimizer: torch.optim.Optimizer | None, model: nn.Module, shadow: nn.Module, lr: float
) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.SGD([p for p in shadow.parameters() if p.requires_grad], lr=lr)
    mapping = {id(p): q for p, q in zip(model.parameters(), shadow.parameters(), strict=True)}
    groups = []
    for group in optimizer.param_groups:
        params = [mapping[id(p)] for p in group["params"] if id(p) in mapping]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    shadow_opt = type(optimizer)(groups, **optimizer.defaults)
    shadow_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return shadow_opt


def _layer_gradients(model: nn.Module, forward_order: list[str]) -> list[LayerGradient]:
    modules = dict(model.named_modules())
    seen = list(dict.fromkeys(forward_order))
    seen += [n for n, m in modules.items() if n not in seen and any(True for _ in m.parameters(recurse=False))]
    result = []
    for name in reversed(seen):
        params = [p for p in modules[name].parameters(recurse=False) if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        grad = math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads)) if grads else 0.0
        weight = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))
        result.append(LayerGradient(name, type(modules[name]).__name__, grad, weight))
    return result


def _most_moved(model: nn.Module, before: dict[str, torch.Tensor], top_k: int) -> list[WeightChange]:
    candidates: list[WeightChange] = []
    for name, p in model.named_parameters():
        if name not in before:
            continue
        delta = (p.detach() - before[name]).abs().reshape(-1)
        k = min(top_k, delta.numel())
        _, flat = torch.topk(delta.float(), k)
        for flat_index in flat.tolist():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), p.shape))
            candidates.append(WeightChange(name, index, float(before[name][index]), float(p.detach()[index])))
    candidates.sort(key=lambda w: -abs(w.delta))
    return candidates[:top_k]


def _classification(output: object, y: torch.Tensor) -> tuple[int | None, float | None, int | None]:
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[1] < 2:
        return None, None, None
    probs = output[0].detach().float().softmax(-1)
    confidence, prediction = probs.max(-1)
    target = int(y.reshape(-1)[0]) if y.dtype in (torch.int64, torch.int32) and y.numel() == output.shape[0] else None
    return int(prediction), float(confidence), target
