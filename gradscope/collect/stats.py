"""Statistics computed on the device, batched, with no host synchronisation.

Every function here returns tensors; nothing calls ``.item()``. The Monitor copies results to the
host once per flush.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
import torch
from torch import nn

__all__ = ["N_ACT_PARTS", "Bounded", "Observed", "bounded_kind", "combine", "finish_on_host", "first_tensor", "observe", "units_alive"]

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


# Activation statistics of one module on one step are kept as raw device "parts", and every
# division by a count the host already knows (elements, units, rows) is left to the flush, so a
# sampled step costs a few cheap reductions per module and no host transfer. Sums rather than
# var_mean: on CPU var_mean is ~20× slower than a sum plus a dot product, and the cancellation in
# E[x²] − E[x]² only matters when |mean| > 1000·std, far outside what the detectors read.
#   [sum, sum of squares, nonzero count, saturated count, min, max, non-finite count, alive units]
PART_SUM, PART_SUMSQ, PART_NONZERO, PART_SATURATED, PART_MIN, PART_MAX, PART_NONFINITE, PART_ALIVE = range(8)
N_ACT_PARTS = 8


@dataclasses.dataclass
class Observed:
    """One module's activation parts for the current step, with the host-known counts."""

    parts: torch.Tensor  # (N_ACT_PARTS,) float32
    alive: torch.Tensor  # (units,) bool
    n: int  # elements
    units: int
    saturation_denominator: int  # elements or softmax rows; 0 when the activation is unbounded


def observe(x: torch.Tensor, kind: Bounded, *, units: bool = True) -> Observed:
    """Raw statistics of one module output (or, with ``units=False``, of the input batch, whose
    per-unit liveness is not computed: it is the largest tensor and "dead inputs" are not a fault)."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()  # statistics in float32 whatever the activation dtype (bf16/fp16 overflow early)
    flat = x.reshape(-1)
    low, high = torch.aminmax(flat)  # NaN propagates: a NaN activation shows as NaN min/max
    alive = units_alive(x) if units else torch.ones(0, dtype=torch.bool, device=x.device)
    saturated, denominator = _saturated(x, kind)
    parts = torch.stack(
        [
            flat.sum(),
            torch.dot(flat, flat),
            torch.count_nonzero(flat).float(),
            saturated,
            low,
            high,
            torch.count_nonzero(flat - flat).float(),  # x − x is 0 where finite, NaN elsewhere
            torch.count_nonzero(alive).float(),
        ]
    )
    return Observed(parts, alive, x.numel(), int(alive.numel()) if units else 0, denominator)


def _saturated(x: torch.Tensor, kind: Bounded) -> tuple[torch.Tensor, int]:
    if kind is Bounded.NONE:
        return torch.zeros((), device=x.device), 0
    if kind is Bounded.SOFTMAX:
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 0 else x.reshape(1, 1)
        return (rows.amax(dim=-1) > 1 - SATURATION_TOLERANCE).sum().float(), rows.shape[0]
    low, high = (0.0, 1.0) if kind is Bounded.UNIT else (-1.0, 1.0)
    margin = SATURATION_TOLERANCE * (high - low)
    return ((x <= low + margin) | (x >= high - margin)).sum().float(), x.numel()


def combine(a: Observed, b: Observed) -> Observed:
    """Two micro-batches of one optimizer step as one (rare path: gradient accumulation)."""
    same_units = a.alive.shape == b.alive.shape
    alive = a.alive | b.alive if same_units else a.alive
    additive = a.parts + b.parts
    parts = torch.stack(
        [
            additive[PART_SUM],
            additive[PART_SUMSQ],
            additive[PART_NONZERO],
            additive[PART_SATURATED],
            torch.minimum(a.parts[PART_MIN], b.parts[PART_MIN]),
            torch.maximum(a.parts[PART_MAX], b.parts[PART_MAX]),
            additive[PART_NONFINITE],
            torch.count_nonzero(alive).float() if same_units else torch.full((), math.nan, device=alive.device),
        ]
    )
    return Observed(parts, alive, a.n + b.n, a.units, a.saturation_denominator + b.saturation_denominator)


def finish_on_host(parts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Raw parts ``(..., N_ACT_PARTS)`` and counts ``(..., 3)`` = [elements, units, saturation
    denominator] → the stored metrics ``(..., len(ACTIVATION_METRICS))`` in schema order."""
    n, units, denominator = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mean = parts[..., PART_SUM] / n
        var = parts[..., PART_SUMSQ] / n - mean * mean
        return np.stack(
            [
                mean,
                np.sqrt(np.maximum(var, 0)),
                1 - parts[..., PART_NONZERO] / n,
                1 - parts[..., PART_ALIVE] / units,
                np.where(denominator > 0, parts[..., PART_SATURATED] / denominator, np.nan),
                np.maximum(np.abs(parts[..., PART_MIN]), np.abs(parts[..., PART_MAX])),  # NaN propagates
                parts[..., PART_NONFINITE],
            ],
            axis=-1,
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
    # |x| max over the other axes > 0: one reduction, several times faster than (x != 0).any(dims)
    # (== 0 negated, not > 0, so a NaN unit counts as alive: it is broken, not dead)
    return ~(x.abs().amax(dim=other) == 0) if other else x != 0
