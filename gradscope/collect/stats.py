"""Statistics computed on the device, batched, with no host synchronisation.

Every function here returns tensors; nothing calls ``.item()``. The Monitor copies results to the
host once per flush.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

__all__ = ["N_ACT_PARTS", "Bounded", "activation_parts", "bounded_kind", "first_tensor", "units_alive"]

# A unit within 1% of its activation's range from a bound passes back under ~4% of the gradient it
# would pass at the centre (sigmoid'(x) = s(1-s) ≤ 0.0099 when s > 0.99, vs 0.25 at s = 0.5).
SATURATION_TOLERANCE = 0.01


class Bounded(enum.Enum):
    NONE = 0
    UNIT = 1  # outputs in [0, 1]: sigmoid family
    SYMMETRIC = 2  # outputs in [-1, 1]: tanh family
    SOFTMAX = 3  # rows summing to 1: saturated when one entry takes nearly all the mass


_UNIT = (nn.Sigmoid, nn.Hardsigmoid)
_SYMMETRIC = (nn.Tanh, nn.Softsign, nn.Hardtanh)
_SOFTMAX = (nn.Softmax, nn.Softmax2d)


def bounded_kind(module: nn.Module) -> Bounded:
    if isinstance(module, _UNIT):
        return Bounded.UNIT
    if isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) != (-1.0, 1.0):
        return Bounded.NONE  # ReLU6 and custom clamps: not a saturating nonlinearity in the tanh sense
    if isinstance(module, _SYMMETRIC):
        return Bounded.SYMMETRIC
    if isinstance(module, _SOFTMAX):
        return Bounded.SOFTMAX
    return Bounded.NONE


def first_tensor(output: object) -> torch.Tensor | None:
    """The tensor a module's output stands for: itself, or the first tensor of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def is_measurable(x: torch.Tensor) -> bool:
    return (
        x.is_floating_point()
        and x.numel() > 0
        and x.layout == torch.strided
        and x.device.type != "meta"
    )


# activation_parts returns, for one micro-batch: (N_ACT_PARTS,) float32 =
#   [count, sum, sum of squares, zeros, saturated, saturation denominator, max |x|, non-finite]
# so that micro-batches of one optimizer step add up (max |x| combines by max).
N_ACT_PARTS = 8
MAX_ABS_PART = 6


def activation_parts(x: torch.Tensor, kind: Bounded) -> torch.Tensor:
    x = x.detach().float()
    n = x.numel()
    var, mean = torch.var_mean(x, correction=0)
    zeros = (x == 0).sum()
    nonfinite = n - torch.isfinite(x).sum()
    max_abs = x.abs().amax()
    if kind is Bounded.NONE:
        saturated = torch.zeros((), device=x.device)
        denominator = 0
    elif kind is Bounded.SOFTMAX:
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 0 else x.reshape(1, 1)
        saturated = (rows.amax(dim=-1) > 1 - SATURATION_TOLERANCE).sum()
        denominator = rows.shape[0]
    else:
        low, high = (0.0, 1.0) if kind is Bounded.UNIT else (-1.0, 1.0)
        margin = SATURATION_TOLERANCE * (high - low)
        saturated = ((x <= low + margin) | (x >= high - margin)).sum()
        denominator = n
    return torch.stack(
        [
            torch.full((), float(n), device=x.device),
            mean * n,
            (var + mean * mean) * n,
            zeros.float(),
            saturated.float(),
            torch.full((), float(denominator), device=x.device),
            max_abs,
            nonfinite.float(),
        ]
    )


def unit_dim(x: torch.Tensor) -> int:
    """The axis that indexes units: channels for images (N, C, H, W), features otherwise (last axis)."""
    return 1 if x.ndim >= 4 else x.ndim - 1


def units_alive(x: torch.Tensor) -> torch.Tensor:
    """(units,) bool: which units were non-zero somewhere in the batch."""
    if x.ndim == 0:
        return (x != 0).reshape(1)
    dim = unit_dim(x)
    other = [d for d in range(x.ndim) if d != dim]
    nonzero = x.detach() != 0
    return nonzero.amax(dim=other) if other else nonzero


def finish_activation(parts: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor:
    """Micro-batch parts summed over one step → the stored activation metrics (see schema.ACTIVATION_METRICS)."""
    n = parts[0]
    mean = parts[1] / n
    var = torch.clamp(parts[2] / n - mean * mean, min=0)
    dead = 1 - alive.float().mean() if alive is not None else torch.full((), float("nan"), device=parts.device)
    saturated = parts[4] / parts[5]  # 0/0 = NaN for unbounded activations: not applicable
    return torch.stack([mean, var.sqrt(), parts[3] / n, dead, saturated, parts[MAX_ABS_PART], parts[7]])
