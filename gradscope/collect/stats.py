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

__all__ = ["N_ACT_PARTS", "Bounded", "Observed", "Scratch", "bounded_kind", "combine", "finish_on_host", "first_tensor", "observe", "unit_sum_of_squares"]

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
    """The tensor a module's output stands for: itself, or the first tensor of a tuple, list, dict
    or dataclass (in field order)."""
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
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        for field in dataclasses.fields(output):
            found = first_tensor(getattr(output, field.name, None))  # a field(init=False) may be unset
            if found is not None:
                return found
    return None


def is_measurable(x: torch.Tensor) -> bool:
    return (
        x.is_floating_point()
        and x.numel() > 0
        and x.layout == torch.strided
        and not x.is_meta  # a property: x.device builds an object, ~3× the cost, on every sampled module
    )


# Activation statistics of one module on one step are kept as raw device "parts", and every
# division by a count the host already knows (elements, units, rows) is left to the flush, so a
# sampled step costs a few cheap reductions per module and no host transfer. The reductions are the
# ones that run at memory speed on both CPU and GPU: sums, dot products and ``aminmax``. Measured on
# CPU for a (64, 16, 28, 28) ReLU output: ``count_nonzero`` takes ~3.5 ms (it branches on every
# element), ``sign`` then a dot product ~0.15 ms; ``var_mean`` is ~20× slower than a sum plus a dot
# product, and the cancellation in E[x²] − E[x]² only matters when |mean| > 1000·std, far outside
# what the detectors read.
#   [sum, sum of squares, nonzero count, saturated count, min, max, alive units]
# NaN/Inf needs no part of its own: min and max are non-finite exactly when some value is.
PART_SUM, PART_SUMSQ, PART_NONZERO, PART_SATURATED, PART_MIN, PART_MAX, PART_ALIVE = range(7)
N_ACT_PARTS = 7


@dataclasses.dataclass
class Observed:
    """One module's activation parts for the current step, with the host-known counts."""

    # N_ACT_PARTS 0-d float32 tensors, stacked once per step for all modules. For a module with
    # units, PART_SUMSQ and PART_ALIVE are None until finish_units() fills them from unit_sumsq.
    parts: list[torch.Tensor | None]
    unit_sumsq: torch.Tensor  # (units,) float32 sum of squares per unit: 0 for a unit that never fired
    n: int  # elements
    units: int
    saturation_denominator: int  # elements or softmax rows; 0 when the activation is unbounded

    @property
    def total(self) -> torch.Tensor:
        """Σx: non-finite exactly when a value was (up to overflow), so it is the module's NaN sentinel."""
        return _part(self.parts, PART_SUM)

    def finished(self) -> list[torch.Tensor]:
        """The parts in order, once :func:`finish_units` has filled them in."""
        for part in self.parts:  # a plain loop: a generator in any() costs more than the check
            if part is None:
                raise RuntimeError("activation parts are not computed yet: call finish_units() first")
        return self.parts  # type: ignore[return-value]  # no None left, checked above


class Scratch:
    """One reusable float32 work buffer for the x-sized temporaries of :func:`observe` on CPU.

    A fresh multi-megabyte CPU tensor comes from ``mmap`` and page-faults on first touch: two such
    temporaries per module made a (64, 16, 28, 28) activation cost ~2.9 ms instead of ~0.4 ms.
    The buffer grows to the largest activation observed and is kept until :meth:`release`. On
    other devices it is not used: their caching allocators already reuse memory.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._views: dict[torch.Size, tuple[torch.Tensor, torch.Tensor]] = {}  # shape -> (shaped, flat) views

    def like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float32 views of the buffer shaped like ``x`` and flat (contents undefined), or None off
        the CPU and inside a graph being compiled (torch.compile: writes into a buffer from outside
        the graph are mutations inductor refuses, and the compiler plans its own temporaries). The
        views are made once per shape: making them costs more than some reductions."""
        if not x.is_cpu or torch.compiler.is_compiling():  # is_cpu: a flag, where x.device builds an object
            return None
        views = self._views.get(x.shape)
        if views is None:
            n = x.numel()
            if self._buffer is None or self._buffer.numel() < n:
                self._buffer = torch.empty(n, dtype=torch.float32)
                self._views.clear()
            elif len(self._views) >= 256:  # shapes that vary (sequence lengths): keep the cache small
                self._views.clear()
            flat = self._buffer[:n]
            views = self._views[x.shape] = (flat.view(x.shape), flat)
        return views

    def release(self) -> None:
        self._buffer = None
        self._views.clear()


def observe(x: torch.Tensor, kind: Bounded, *, units: bool = True, scratch: Scratch | None = None) -> Observed:
    """Raw statistics of one module output (or, with ``units=False``, of the input batch, whose
    per-unit liveness and share of zeros are not computed: it is often the largest tensor, and
    "dead" or sparse inputs are not a fault)."""
    if x.dtype != torch.float32:
        x = x.float()  # statistics in float32 whatever the activation dtype (bf16/fp16 overflow early)
    work = scratch.like(x) if scratch is not None else None
    low, high = torch.aminmax(x)  # NaN propagates: a NaN activation shows as NaN min/max
    zero = _zeros(x.device)
    sumsq: torch.Tensor | None
    alive: torch.Tensor | None
    if units:
        # 0 at zeros, ±1 elsewhere (NaN at NaN): its dot with itself counts the nonzeros
        if work is not None:
            torch.sign(x, out=work[0])
            signs = work[1]  # the same values, flat: no reshape of x needed
        else:
            signs = x.reshape(-1).sign()
        nonzero = torch.dot(signs, signs)  # before the work buffer is reused below
        unit_sumsq = unit_sum_of_squares(x, work[0] if work is not None else None)
        sumsq = alive = None  # from unit_sumsq, for every module of the step at once (finish_units)
    else:
        # The input batch's share of zeros is a property of the data, which no detector reads, and
        # counting it is two more passes over what is often the largest tensor (~4% of a 0.6 ms
        # step with statistics on every step): it is stored as NaN, "not measured".
        nonzero = _nan(x.device)
        unit_sumsq = _zeros(x.device, 0)
        flat = x.reshape(-1)
        sumsq = torch.dot(flat, flat)
        alive = zero
    saturated, denominator = _saturated(x, kind) if kind is not Bounded.NONE else (zero, 0)
    parts = [x.sum(), sumsq, nonzero, saturated, low, high, alive]
    return Observed(parts, unit_sumsq, x.numel(), int(unit_sumsq.numel()), denominator)


_CONSTANTS: dict[tuple[torch.device, str, int | None], torch.Tensor] = {}


def _constant(device: torch.device, fill: float, size: int | None = None) -> torch.Tensor:
    """A cached tensor of ``fill`` on ``device`` (read only): 0-d, or a vector of ``size``. Constants
    stand in for parts a module does not have, without an allocation per module."""
    key = (device, repr(fill), size)  # repr: NaN never equals itself as a key
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = torch.full(() if size is None else (size,), fill, device=device)
    return value


def _zeros(device: torch.device, size: int | None = None) -> torch.Tensor:
    """A cached 0-d zero, or an empty vector for ``size=0``: a part a module does not have."""
    return _constant(device, 0.0, size)


def _nan(device: torch.device) -> torch.Tensor:
    """A cached 0-d NaN: a part that is not measured."""
    return _constant(device, math.nan)


def _saturated(x: torch.Tensor, kind: Bounded) -> tuple[torch.Tensor, int]:
    if kind is Bounded.SOFTMAX:
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 0 else x.reshape(1, 1)
        return (rows.amax(dim=-1) > 1 - SATURATION_TOLERANCE).sum().float(), rows.shape[0]
    low, high = (0.0, 1.0) if kind is Bounded.UNIT else (-1.0, 1.0)
    margin = SATURATION_TOLERANCE * (high - low)
    return ((x <= low + margin) | (x >= high - margin)).sum().float(), x.numel()


def combine(a: Observed, b: Observed) -> Observed:
    """Two forwards of one module in one optimizer step as one (rare path: gradient accumulation,
    or a module called more than once per forward)."""
    pa, pb = a.parts, b.parts
    parts: list[torch.Tensor | None] = [
        _part(pa, PART_SUM) + _part(pb, PART_SUM),
        None,
        _part(pa, PART_NONZERO) + _part(pb, PART_NONZERO),
        _part(pa, PART_SATURATED) + _part(pb, PART_SATURATED),
        torch.minimum(_part(pa, PART_MIN), _part(pb, PART_MIN)),
        torch.maximum(_part(pa, PART_MAX), _part(pb, PART_MAX)),
        None,
    ]
    same_units = a.unit_sumsq.shape == b.unit_sumsq.shape
    deferred = pa[PART_SUMSQ] is None and pb[PART_SUMSQ] is None
    if same_units and deferred:
        unit_sumsq = a.unit_sumsq + b.unit_sumsq  # Σx² per unit adds up; finish_units reads the total
    else:
        unit_sumsq = a.unit_sumsq
        parts[PART_SUMSQ] = _sumsq(a) + _sumsq(b)
        if not a.units and not b.units:  # the input batch: no units, nothing to count
            parts[PART_ALIVE] = _part(pa, PART_ALIVE) + _part(pb, PART_ALIVE)
        else:  # the unit axis changed size within the step: which units fired is unknown
            parts[PART_ALIVE] = torch.full((), math.nan, device=a.unit_sumsq.device)
    return Observed(parts, unit_sumsq, a.n + b.n, a.units, a.saturation_denominator + b.saturation_denominator)


def _sumsq(o: Observed) -> torch.Tensor:
    total = o.parts[PART_SUMSQ]
    return o.unit_sumsq.sum() if total is None else total


def _part(parts: list[torch.Tensor | None], i: int) -> torch.Tensor:
    value = parts[i]
    if value is None:
        raise RuntimeError(f"activation part {i} is not computed yet: call finish_units() first")
    return value


def finish_units(observed: list[Observed]) -> None:
    """Fill in Σx² and the count of live units of every module with units, from their per-unit
    sums of squares: two batched norms for the whole step (L1 of the non-negative sums is their
    total; L0 counts the nonzero ones, a NaN unit as alive) instead of three small ops per module."""
    pending = [o for o in observed if o.parts[PART_SUMSQ] is None]
    if not pending:
        return
    vectors = [o.unit_sumsq for o in pending]
    totals = torch._foreach_norm(vectors, 1)
    alive = torch._foreach_norm(vectors, 0)
    for o, total, count in zip(pending, totals, alive, strict=True):
        o.parts[PART_SUMSQ] = total
        o.parts[PART_ALIVE] = count


def finish_on_host(parts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Raw parts ``(..., N_ACT_PARTS)`` and counts ``(..., 3)`` = [elements, units, saturation
    denominator] → the stored metrics ``(..., len(ACTIVATION_METRICS))`` in schema order."""
    n, units, denominator = counts[..., 0], counts[..., 1], counts[..., 2]
    low, high = parts[..., PART_MIN], parts[..., PART_MAX]
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
                np.maximum(np.abs(low), np.abs(high)),  # NaN propagates
                np.where(np.isnan(n), np.nan, (~np.isfinite(low) | ~np.isfinite(high)).astype(np.float64)),
            ],
            axis=-1,
        )


def _other_dims(ndim: int) -> tuple[int, ...]:
    """The axes reduced over to get per-unit values. Units are channels for images (N, C, H, W),
    features (the last axis) otherwise."""
    unit = 1 if ndim >= 4 else ndim - 1
    return tuple(d for d in range(ndim) if d != unit)


_OTHER_DIMS = [_other_dims(ndim) if ndim >= 2 else () for ndim in range(8)]


def unit_sum_of_squares(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """(units,) float32: each unit's sum of x² over the batch (and positions). Zero for a unit that
    never fired (and for one whose values all stay under ~1e-22 in magnitude, whose squares round to
    0 in float32: dead for any practical purpose); NaN for a unit that saw NaN (broken, not dead).
    Their total is Σx². ``work``, a float32 buffer shaped like ``x``, holds the squares on CPU."""
    if x.ndim <= 1:
        return (x * x).reshape(-1)
    other = _OTHER_DIMS[x.ndim] if x.ndim < len(_OTHER_DIMS) else _other_dims(x.ndim)
    if x.is_cpu:  # on CPU a product and a sum are ~6× faster than vector_norm along dimensions
        squares = torch.mul(x, x, out=work) if work is not None else x * x
        return squares.sum(dim=other)
    norms: torch.Tensor = torch.linalg.vector_norm(x, 2, dim=other)  # one fused pass, no x-sized temporary
    return norms.square()
