"""Turn what a run knows into concrete fixes.

:class:`RunFacts` reads, once per run, the facts fixes are written from: the optimizer and its
learning rate, momentum and schedule, module names and types (activations, normalisation, recurrent
and attention layers), how the input batch is scaled, the healthy gradient norm, how far each layer
moves per step. :func:`likely_causes` ranks the explanations of a failing run from those facts, so
that every detector that sees the same run puts the same most likely fix first.

The ``*_fix`` helpers write one :class:`~gradscope.Fix` each, with the run's own numbers in it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from gradscope.detect import functional as F
from gradscope.findings import Fix, FixKind
from gradscope.store.run import Run

__all__ = [
    "ATTENTION_TYPES",
    "DEAD_CAPABLE_TYPES",
    "EMBEDDING_TYPES",
    "NORM_TYPES",
    "RNN_TYPES",
    "SATURATING_TYPES",
    "Cause",
    "LossView",
    "RunFacts",
    "describe_modules",
    "facts",
    "likely_causes",
    "loss_view",
    "nice_number",
    "ranked_fixes",
]

NORM_TYPES = frozenset(
    {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d",
        "LazyBatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d", "RMSNorm", "LocalResponseNorm",
    }
)  # fmt: skip
# Activations whose output is exactly 0 on a whole half-line, so a unit can die (never fire again).
DEAD_CAPABLE_TYPES = frozenset({"ReLU", "ReLU6", "Threshold"})
# Bounded activations: their derivative vanishes at the bounds.
SATURATING_TYPES = frozenset({"Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "Softmax", "Softmax2d"})
RNN_TYPES = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"})
ATTENTION_TYPES = frozenset(
    {"MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
     "TransformerDecoder", "Transformer"}
)  # fmt: skip
EMBEDDING_TYPES = frozenset({"Embedding", "EmbeddingBag"})

# ----------------------------------------------------------------------------------------------
# Thresholds behind the shared cause analysis. Detectors have their own (configurable) thresholds
# for their verdicts; these only rank the fixes, so that every finding on a run agrees on the cause.

# An update moving a layer's weights by 1% of their norm per step is on the fast side of healthy;
# the learning rate proposed for a diverged run aims there.
TARGET_UPDATE_RATIO_HIGH = 1e-2
# A stalled run is given a learning rate that moves weights by ~1e-3 of their norm per step: the common
# rule of thumb, and a cautious aim, just under the slowest healthy run measured (HEALTHY_UPDATE_RATIO).
TARGET_UPDATE_RATIO_LOW = 1e-3
# Below 1e-4 per step a layer needs >10,000 steps to change by its own size: the lr is too low. Read on
# the fastest layer's median over the run's first quarter, the detection benchmark's 32 healthy runs
# measured 3.4e-3 to 4.3e-2 and its lr-too-low runs 1.8e-6 to 6.2e-6: 1e-4 sits 1.2-1.5 decades from
# both. (Over their last tenth, decayed schedules took healthy runs down to 2e-5: hence the first quarter.)
LOW_UPDATE_RATIO = 1e-4
# The healthy range quoted to users next to the threshold, from the measurement above (rounded).
HEALTHY_UPDATE_RATIO = (3e-3, 4e-2)
# At ≥ 0.3 of its norm per step in the first steps, a layer is being thrown around rather than
# trained (healthy runs measured ≤ 0.14; lr 10-100× too high measured 0.2-1).
HIGH_UPDATE_RATIO = 0.3
# Inputs are "unnormalised" when their spread is two orders of magnitude away from unit scale.
INPUT_STD_RANGE = (1e-2, 10.0)
INPUT_MAX_ABS_LIMIT = 100.0  # raw pixel values (0-255) and physical units exceed this
# A ReLU-family layer with ≥ 90% of its units dead has effectively stopped learning.
DEAD_CAUSE_FRACTION = 0.9
# A bounded activation with ≥ 50% of its outputs at the bounds passes back under ~half its gradient.
SATURATED_CAUSE_FRACTION = 0.5
# The loss standing 1 decade (10×) above its healthy level for 2 steps is a blow-up (the
# exploding_loss default); for losses that can be ≤ 0, 5 robust spreads.
DIVERGENCE_DECADES = 1.0
DIVERGENCE_SPREADS = 5.0
# Units that died right after updates moving weights by ≥ 10% of their norm were killed by the
# learning rate (healthy first updates measured 0.001-0.14, killing ones 0.16-1).
KILLING_UPDATE_RATIO = 0.1
# 2.5 decades (~300×) of gradient lost between early and late layers explains a stall (the
# vanishing_gradients default; healthy deep nets measured ≤ 1 decade).
VANISHING_CAUSE_DECADES = 2.5
# Linear/Conv layers that scale their input's std by ≥ 5× (or ≤ 1/5) at the first step, in the
# median, are mis-initialised: default init measured 0.5-0.8× (-0.3 to -0.1 decades), He ~1×,
# std=1 weights ~10× (+1), std=1e-3 weights ~0.01× (-2).
INIT_GAIN_DECADES = 0.7
# A single step whose gradient norm is ≥ 100× its neighbours' level (healthy runs measured ≤ 1.5
# decades, LSTMs included).
GRAD_SPIKE_DECADES = 2.0
# Weight norms whose median over layers fell ≥ 3× over the run, with weight decay on: the decay is
# winning (healthy runs with decay measured a median change from -0.3 to +0.05 decades, weights
# mostly grow; wd=0.5 with SGD +8.8, wd=50 with AdamW +0.5).
WEIGHT_SHRINK_DECADES = math.log10(3.0)
# A learning rate at ≤ 1% of its peak within the first half of the run has collapsed (see
# RunFacts.lr_collapse): step decays by 10 or 100 on epochs reach it late, cosine and linear decay
# at the end.
LR_COLLAPSE_FRACTION = 0.01


def nice_number(value: float) -> str:
    """A round number near ``value`` (1, 2, 3 or 5 times a power of ten), as text: 0.0834 → "0.1"."""
    if not np.isfinite(value) or value <= 0:
        return F.format_number(value)
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent
    choices = (1.0, 2.0, 3.0, 5.0, 10.0)
    best = min(choices, key=lambda c: abs(math.log10(c) - math.log10(mantissa)))
    return F.format_number(best * 10**exponent, 1)


def describe_modules(names: Sequence[str], types: dict[str, str], *, limit: int = 4) -> str:
    """``net.1``, ``net.3`` … as readable text with their types: "`net.1`…`net.17` (9 Sigmoid)"."""
    names = [n for n in names]
    if not names:
        return "(none)"
    kinds = sorted({types.get(n, "?") for n in names})
    kind_text = kinds[0] if len(kinds) == 1 else "/".join(kinds)
    label = [f"`{n or '(model)'}`" for n in names]
    if len(names) == 1:
        return f"{label[0]} ({kind_text})"
    if len(names) <= limit:
        return f"{', '.join(label)} ({kind_text})"
    return f"{label[0]}…{label[-1]} ({len(names)} {kind_text})"


@dataclass(frozen=True)
class Cause:
    """One explanation of a failing run, with the fix it calls for."""

    name: str  # stable: "lr_too_high", "lr_too_low", "dead_units", "vanishing", …
    fix: Fix
    evidence: float = math.nan


# Shared outcome thresholds (the detectors' own thresholds live in their Config).

# A run that has lost ≥ 50% of its progress (in log space) since its best is getting worse.
WORSE_REGRESS = 0.5
# … and by at least 0.3 decades (2×), so a converged run's noise near its floor does not count.
WORSE_MIN_DECADES = 0.3
# Under 0.3 decades (2×) below its starting level, a flat loss has learned little: the outcome
# suffers. Healthy runs measured ≥ 0.7 decades of gain over a few hundred steps.
STUCK_GAIN_DECADES = 0.3
# A loss still within 0.3 decades of its start after 200 steps suffers even if it creeps down
# (healthy runs gained ≥ 0.7 decades in 300 steps, label-noise and noise-floor tasks 0.1-0.3 with
# no other symptom).
SLOW_AFTER_STEPS = 200
# A loss whose batch-to-batch spread is ≥ 0.2 decades (±60%) while it loses its progress is
# swinging, not climbing: oscillating_loss reports it and exploding_loss's slow-climb rule defers.
# Healthy noisy runs (batches of 4, dropout) measured 0.1-0.4, but they do not lose progress.
ERRATIC_SWING_DECADES = 0.2
# A loss whose batch-to-batch spread is under 0.02 decades (±5%) is the same on every batch: the
# model's output no longer depends on its input. Healthy runs measured ≥ 0.05 (a full-batch run
# converged to 1e-3 reached 0, hence the gain limit below); dead or saturated networks 0.0004-0.014.
FLATLINE_NOISE = 0.02
# Only a loss that has gained under 1.5 decades (30×) counts as flatlined: runs converged near zero
# are flat too (healthy ones measured ≥ 2 decades).
FLATLINE_MAX_GAIN = 1.5
# The smallest improvement over one window that counts as "still improving" (5%), raised with
# the noise of the curve (see LossView.improving).
IMPROVING_MIN_DECADES = 0.02
# Whole-run scans of per-layer series go this many rows at a time: the float64 temporaries of a block
# stay a few MB, where those of a whole 100,000-step run would be the peak memory of the diagnosis.
BLOCK_ROWS = 8192


class LossView:
    """The loss curve of a run, transformed once (log10 for positive losses) and summarised."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.raw = np.asarray(run.loss, dtype=np.float64)
        self.values, self.is_log = F.transform_loss(self.raw)
        self.finite = np.isfinite(self.values)
        self.finite_rows = np.flatnonzero(self.finite)
        # Steps whose step() got a loss. The others hold a NaN placeholder, not a NaN loss. Runs
        # from before the loss_missing column count every step as given.
        missing = run.scalar("loss_missing") if "loss_missing" in run.metrics else np.zeros(self.raw.size)
        self.given = ~(missing > 0)

    @cached_property
    def recorded(self) -> bool:
        """False when the loss was never given to the Monitor.

        Runs record ``loss_given`` in their metadata; an all-NaN loss is then a real NaN loss. Older
        or synthetic runs without it fall back to the values (all NaN and no Inf: never given).
        """
        if self.run.meta.get("loss_given"):
            return True
        return bool(np.isfinite(self.raw).any() or np.isinf(self.raw).any())

    @cached_property
    def progress(self) -> F.LossProgress:
        return F.loss_progress(self.raw)

    @cached_property
    def smooth(self) -> np.ndarray:
        """Rolling median of the finite transformed values over the progress window, aligned on ``finite_rows``."""
        return F.rolling_median(self.values[self.finite_rows], self.progress.window, min_periods=1)

    @cached_property
    def change_threshold(self) -> float:
        """The smallest change of level between two windows that is more than noise."""
        p = self.progress
        # The difference of two window medians has a standard error of ~1.8·σ/√w; require 2 of them.
        noise = p.noise if np.isfinite(p.noise) else 0.0
        return max(IMPROVING_MIN_DECADES, 2 * 1.8 * noise / math.sqrt(max(p.window, 1)))

    @cached_property
    def improving(self) -> bool:
        """The level over the last window is lower than over the window before it by more than noise."""
        p = self.progress
        if not np.isfinite(p.recent_change):
            return True  # too short to tell: give it the benefit of the doubt
        return bool(p.recent_change < -self.change_threshold)

    @cached_property
    def rising(self) -> bool:
        """The level over the last window is higher than over the window before it by more than noise."""
        p = self.progress
        return bool(np.isfinite(p.recent_change) and p.recent_change > self.change_threshold)

    @cached_property
    def worse(self) -> bool:
        """The loss has lost a large part of the progress it made (getting worse)."""
        p = self.progress
        return bool(
            np.isfinite(p.regress)
            and p.regress >= WORSE_REGRESS
            and p.recent - p.best >= (WORSE_MIN_DECADES if self.is_log else 1.0)
        )

    @cached_property
    def stuck(self) -> bool:
        """Flat and still close to where it started."""
        p = self.progress
        if p.n < 20 or not np.isfinite(p.gain):
            return False
        limit = STUCK_GAIN_DECADES if self.is_log else 1.0
        return bool(p.gain < limit and not self.improving)

    @cached_property
    def recent_noise(self) -> float:
        """Robust spread (decades, or robust units) of the recent losses around their 9-step rolling
        median: how much the loss varies from batch to batch now."""
        y = self.values[self.finite_rows]
        if y.size < 20:
            return math.nan
        w = F.window_length(y.size, 0.25, 20, 2000)
        seg = y[-w:]
        return float(F.robust_center_scale(seg - F.rolling_median(seg, 9, center=True))[1])

    @cached_property
    def flatlined(self) -> bool:
        """The loss has stopped moving altogether: not improving, and the same on every batch
        (spread under ``FLATLINE_NOISE``), while it has gained under ``FLATLINE_MAX_GAIN``. A model
        whose predictions no longer depend on its input (dead or saturated everywhere) gives exactly
        this, whatever level its loss started from."""
        p = self.progress
        return bool(
            self.is_log
            and p.n >= 50
            and not self.improving
            and np.isfinite(self.recent_noise)
            and self.recent_noise <= FLATLINE_NOISE
            and np.isfinite(p.gain)
            and p.gain < FLATLINE_MAX_GAIN
        )

    @cached_property
    def worsening_onset_row(self) -> int:
        """The row where a worsening loss began climbing: the first point after its best where the
        smoothed loss stood halfway between its best and its current level."""
        p = self.progress
        if not self.finite_rows.size:
            return 0
        best_pos = int(np.searchsorted(self.finite_rows, p.best_index))
        rising = np.flatnonzero(self.smooth[best_pos:] > p.best + 0.5 * (p.recent - p.best))
        onset = best_pos + (int(rising[0]) if rising.size else 0)
        return int(self.finite_rows[min(onset, self.finite_rows.size - 1)])

    @cached_property
    def slow(self) -> bool:
        """After ``SLOW_AFTER_STEPS`` steps the loss has still gained under ``STUCK_GAIN_DECADES``,
        even if it is creeping down."""
        p = self.progress
        return bool(self.is_log and p.n >= SLOW_AFTER_STEPS and np.isfinite(p.gain) and p.gain < STUCK_GAIN_DECADES)

    @cached_property
    def nonfinite_now(self) -> bool:
        """The loss is NaN/Inf at the last recorded step."""
        given = self.raw[self.given]
        return bool(self.recorded and given.size and not np.isfinite(given[-1]))

    @cached_property
    def suffers(self) -> bool:
        """The outcome already suffers: non-finite now, getting worse, stuck near its start, creeping
        so slowly that it is still near its start after many steps, or flatlined."""
        return self.nonfinite_now or self.worse or self.stuck or self.slow or self.flatlined


class RunFacts:
    """The facts of one run that fixes are written from; computed lazily, once (see :func:`facts`).
    The per-step frames (:meth:`log_grad`, :meth:`update_ratio`) are computed for the rows asked for
    each time instead, so that a long run's are never held whole."""

    def __init__(self, run: Run) -> None:
        self.run = run

    # ------------------------------------------------------------------ loss

    @cached_property
    def loss(self) -> LossView:
        return loss_view(self.run)

    @cached_property
    def excursions(self) -> list[F.LossExcursion]:
        """Stretches where the loss stood ≥ 1 decade (or 4σ of its noise) above its healthy level,
        with the same defaults as the ``exploding_loss`` detector."""
        lv = self.loss
        y = lv.values[lv.finite_rows]
        if y.size < 3:
            return []
        p = lv.progress
        noise = p.noise if np.isfinite(p.noise) else 0.0
        threshold = max(DIVERGENCE_DECADES if lv.is_log else DIVERGENCE_SPREADS, 4.0 * noise)
        return F.loss_excursions(y, window=p.window, threshold=threshold, min_points=2)

    @cached_property
    def loss_blew_up(self) -> bool:
        """The loss jumped far above its healthy level at some point (a learning rate too high, typically)."""
        return bool(self.excursions)

    # ------------------------------------------------------------------ model

    @cached_property
    def types(self) -> dict[str, str]:
        return {name: info.type for name, info in self.run.modules.items()}

    @cached_property
    def order(self) -> list[str]:
        """Watched modules in forward order (those never seen in a forward last)."""
        seen = list(self.run.forward_order)
        rest = [n for n in self.run.meta.get("watched", []) if n not in set(seen)]
        return seen + rest

    def modules_of(self, kinds: Iterable[str]) -> list[str]:
        wanted = set(kinds)
        return [n for n in self.order if self.types.get(n) in wanted]

    @cached_property
    def norm_layers(self) -> list[str]:
        return [n for n, t in self.types.items() if t in NORM_TYPES]

    @cached_property
    def has_norm(self) -> bool:
        return bool(self.norm_layers)

    @cached_property
    def rnn_modules(self) -> list[str]:
        return [n for n, t in self.types.items() if t in RNN_TYPES]

    @cached_property
    def has_attention(self) -> bool:
        return any(t in ATTENTION_TYPES for t in self.types.values())

    @cached_property
    def saturating_modules(self) -> list[str]:
        return self.modules_of(SATURATING_TYPES)

    @cached_property
    def dead_capable_modules(self) -> list[str]:
        return self.modules_of(DEAD_CAPABLE_TYPES)

    @cached_property
    def activation_kinds(self) -> list[str]:
        """Distinct activation types used, in order of appearance."""
        known = SATURATING_TYPES | DEAD_CAPABLE_TYPES | {"LeakyReLU", "GELU", "SiLU", "ELU", "SELU", "Mish", "PReLU", "CELU"}
        kinds: list[str] = []
        for n in self.order:
            t = self.types.get(n, "")
            if t in known and t not in kinds:
                kinds.append(t)
        return kinds

    @cached_property
    def weight_layers(self) -> list[str]:
        """Layers owning parameters, in forward order, without normalisation and embedding layers
        (their gradients live on another scale and say nothing about depth)."""
        seen = set(self.run.forward_order)
        return [
            layer
            for layer in self.run.layers
            if self.types.get(layer) not in NORM_TYPES | EMBEDDING_TYPES and (not seen or layer in seen)
        ]

    # ------------------------------------------------------------------ optimizer

    @cached_property
    def optimizer(self) -> dict[str, Any]:
        opt = self.run.meta.get("optimizer")
        return opt if isinstance(opt, dict) else {}

    @cached_property
    def optimizer_class(self) -> str:
        return str(self.optimizer.get("class") or "the optimizer")

    @cached_property
    def group0(self) -> dict[str, Any]:
        groups = self.optimizer.get("param_groups") or [{}]
        first = groups[0] if groups else {}
        return first if isinstance(first, dict) else {}

    @cached_property
    def momentum(self) -> float:
        value = self.group0.get("momentum")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        betas = self.group0.get("betas")
        if isinstance(betas, (list, tuple)) and betas and isinstance(betas[0], (int, float)):
            return float(betas[0])
        return math.nan

    @cached_property
    def weight_decay(self) -> float:
        value = self.group0.get("weight_decay")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    @cached_property
    def is_adaptive(self) -> bool:
        return any(k in self.optimizer_class for k in ("Adam", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "Lion", "NAdam", "RAdam"))

    @cached_property
    def class_run_period(self) -> int | None:
        """The period in steps of a loss that saws with the class runs of data never shuffled (the
        ``unshuffled_data`` rule at its default thresholds), or None."""
        from gradscope.detect.rules.unshuffled_data import UnshuffledData  # the rules import this module

        found = UnshuffledData().class_runs(self.run)
        return found[0].period if found is not None else None

    @cached_property
    def lr_series(self) -> np.ndarray:
        return np.asarray(self.run.lr, dtype=np.float64)

    def lr_at(self, index: int | None = None) -> float:
        """The learning rate at a row of the run (the last finite one when ``index`` is None)."""
        lr = self.lr_series
        if index is not None and 0 <= index < lr.size and np.isfinite(lr[index]):
            return float(lr[index])
        finite = lr[np.isfinite(lr)]
        if finite.size:
            return float(finite[-1])
        value = self.group0.get("lr")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    @cached_property
    def lr_max(self) -> float:
        finite = self.lr_series[np.isfinite(self.lr_series)]
        return float(finite.max()) if finite.size else self.lr_at()

    @cached_property
    def lr_collapse(self) -> tuple[int, int] | None:
        """(row of the peak, first row at ≤ 1% of it) when the learning rate fell to a hundredth of
        its peak within the first half of the run, else None. Schedules that decay to ~0 (cosine,
        linear) get there at the very end; this early, it is a scheduler stepped every batch where
        it was written for epochs, or a decay far too steep, and training stops learning with it."""
        lr = self.lr_series
        finite = np.flatnonzero(np.isfinite(lr))
        if finite.size < 10 or not (lr[finite] > 0).any():
            return None
        peak = int(finite[np.argmax(lr[finite])])
        low = np.flatnonzero(np.isfinite(lr) & (lr <= LR_COLLAPSE_FRACTION * lr[peak]) & (np.arange(lr.size) > peak))
        if not low.size or low[0] >= lr.size // 2:
            return None
        return peak, int(low[0])

    @cached_property
    def has_warmup(self) -> bool:
        """The learning rate rose by ≥ 2× from its first value: a warmup (or a ramp) is in place."""
        finite = self.lr_series[np.isfinite(self.lr_series)]
        return bool(finite.size >= 2 and finite[0] > 0 and finite.max() >= 2 * finite[0]) or bool(
            finite.size >= 2 and finite[0] == 0 and finite.max() > 0
        )

    def lr_settled_rows(self, min_rows: int) -> bool:
        """The learning rate has stopped ramping up and stood at ≥ 2/3 of its current value for at least
        ``min_rows`` rows: a plateau before that may just be a warmup."""
        lr = self.lr_series
        if not lr.size or not np.isfinite(lr).any():
            return True  # no schedule recorded: nothing to wait for
        finite_rows = np.flatnonzero(np.isfinite(lr))
        now = lr[finite_rows[-1]]
        recent = lr[finite_rows[-min(len(finite_rows), min_rows) :]]
        if recent.size >= 2 and recent[-1] > 1.05 * recent[0]:
            return False  # still rising
        low = np.flatnonzero(np.isfinite(lr) & (lr < (2 / 3) * now))
        arrived = int(low[-1]) + 1 if low.size else 0
        return bool(lr.size - arrived >= min_rows)

    def lr_text(self, index: int | None = None) -> str:
        lr = self.lr_at(index)
        text = f"lr={F.format_number(lr, 3)}" if np.isfinite(lr) else "the learning rate"
        mom = self.momentum
        extra = ""
        if np.isfinite(mom) and mom >= 0.95 and not self.is_adaptive:
            extra = f", momentum={F.format_number(mom, 3)}"
        return f"{text}{extra} with {self.optimizer_class}"

    # ------------------------------------------------------------------ recorded statistics

    @cached_property
    def layer_of(self) -> dict[str, str]:
        """Each tracked parameter's layer (the module that owns it), by parameter name."""
        return dict(zip(self.run.meta.get("params", []), self.run.meta.get("param_layers", []), strict=False))

    @cached_property
    def layers_outside_the_optimizer(self) -> set[str]:
        """Layers all of whose parameters the Monitor found outside the optimizer."""
        outside = set(self.run.meta.get("params_not_in_optimizer") or [])
        params_of: dict[str, list[str]] = {}
        for param, layer in self.layer_of.items():
            params_of.setdefault(str(layer), []).append(str(param))
        return {layer for layer, params in params_of.items() if outside and all(p in outside for p in params)}

    @cached_property
    def zero_weight_layers(self) -> list[str]:
        """Layers whose weight matrix (a ``*.weight`` parameter) is exactly zero after the first step:
        initialised to zero, so no gradient can pass through them (an exact-zero test is right here)."""
        if "param_weight_norm" not in self.run.metrics or not self.run.n_steps:
            return []
        values, params = self.run.metric_array("param_weight_norm", rows=slice(0, 1))  # not every step of every parameter
        zero = []
        for param, value in zip(params, values[0], strict=True):
            layer = self.layer_of.get(str(param))
            if str(param).endswith("weight") and value == 0 and layer in set(self.weight_layers) and layer not in zero:
                zero.append(layer)
        return zero

    def update_ratio(self, rows: slice = slice(None)) -> pd.DataFrame:
        """rows × weight layers: ‖Δθ‖/‖θ‖ per step (empty when updates were not measured). Layers
        initialised to zero are left out: any update is infinitely large relative to nothing.
        Computed for the rows asked for, not kept: a long run's whole frame is hundreds of MB."""
        if "update_norm" not in self.run.metrics or "weight_norm" not in self.run.metrics:
            return pd.DataFrame()
        frame = self.run.metric("update_ratio", rows=rows)
        skip = set(self.zero_weight_layers)
        cols = [c for c in frame.columns if c in set(self.weight_layers) and c not in skip]
        if not cols:
            cols = [c for c in frame.columns if c not in skip]
        return frame[cols]

    @cached_property
    def has_update_ratio(self) -> bool:
        """Whether :meth:`update_ratio` holds any value (its columns do not depend on the rows: the first one tells)."""
        return not self.update_ratio(slice(0, 1)).empty

    def update_ratio_of(self, layer: str) -> np.ndarray:
        """‖Δθ‖/‖θ‖ of one layer of :meth:`update_ratio` at every step, computed in blocks of rows."""
        blocks = [self.update_ratio(slice(start, start + BLOCK_ROWS))[layer].to_numpy() for start in range(0, self.run.n_steps, BLOCK_ROWS)]
        return np.concatenate(blocks) if blocks else np.zeros(0)

    def update_ratio_reached(self, threshold: float, upto_step: int) -> bool:
        """Whether a layer's ‖Δθ‖/‖θ‖ reached ``threshold`` (finite) on a step up to ``upto_step``."""
        steps = self.run.steps
        for start in range(0, len(steps), BLOCK_ROWS):
            block = self.update_ratio(slice(start, start + BLOCK_ROWS)).to_numpy(dtype=np.float64)
            block = block[steps[start : start + BLOCK_ROWS] <= upto_step]
            if (np.isfinite(block) & (block >= threshold)).any():
                return True
        return False

    @cached_property
    def early_update_ratio(self) -> float:
        """Largest per-layer median ‖Δθ‖/‖θ‖ over the first steps: how hard the first updates hit."""
        ur = self.update_ratio(slice(0, 10))
        if ur.empty:
            return math.nan
        med = ur.median(skipna=True)
        return float(med.max()) if med.notna().any() else math.nan

    @cached_property
    def first_update_ratio(self) -> float:
        """Largest ‖Δθ‖/‖θ‖ over layers in the first three steps, before any divergence distorts it."""
        ur = self.update_ratio(slice(0, 3))
        if ur.empty:
            return math.nan
        vals = ur.to_numpy(dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        return float(np.median(vals.reshape(-1))) if vals.size else math.nan

    def typical_update_ratio(self, rows: slice) -> float:
        """Largest per-layer median ‖Δθ‖/‖θ‖ over these rows: how fast the fastest layer learns."""
        if not self.has_update_ratio:
            return math.nan
        med = self.update_ratio(rows).median(skipna=True)
        med = med[med > 0]
        return float(med.max()) if med.notna().any() and len(med) else math.nan

    def act(self, metric: str) -> pd.DataFrame:
        if metric not in self.run.metrics:
            return pd.DataFrame()
        return self.run.metric(metric)

    @cached_property
    def input_std(self) -> float:
        frame = self.act("act_std")
        return F.nan_median(frame[self.run.input_layer].to_numpy()) if self.run.input_layer in frame else math.nan

    @cached_property
    def input_max_abs(self) -> float:
        frame = self.act("act_max_abs")
        return F.nan_median(frame[self.run.input_layer].to_numpy()) if self.run.input_layer in frame else math.nan

    @cached_property
    def input_mean(self) -> float:
        frame = self.act("act_mean")
        return F.nan_median(frame[self.run.input_layer].to_numpy()) if self.run.input_layer in frame else math.nan

    @cached_property
    def input_unnormalised(self) -> bool:
        lo, hi = INPUT_STD_RANGE
        std, mx = self.input_std, self.input_max_abs
        return bool((np.isfinite(std) and not lo <= std <= hi) or (np.isfinite(mx) and mx > INPUT_MAX_ABS_LIMIT))

    def input_text(self) -> str:
        parts = []
        if np.isfinite(self.input_mean):
            parts.append(f"mean {F.format_number(self.input_mean)}")
        if np.isfinite(self.input_std):
            parts.append(f"std {F.format_number(self.input_std)}")
        if np.isfinite(self.input_max_abs):
            parts.append(f"max |x| {F.format_number(self.input_max_abs)}")
        return ", ".join(parts)

    def recent_act(self, metric: str, modules: Sequence[str], fraction: float = 0.25) -> dict[str, float]:
        """Median of an activation metric per module over the last ``fraction`` of sampled steps."""
        frame = self.act(metric)
        cols = [m for m in modules if m in frame.columns]
        if frame.empty or not cols:
            return {}
        rows = F.window_length(len(frame), fraction, 1, 1000)
        return {m: v for m, v in F.column_medians(frame[cols], slice(len(frame) - rows, None)).items() if np.isfinite(v)}

    @cached_property
    def dead_fractions(self) -> dict[str, float]:
        return self.recent_act("act_dead_frac", self.dead_capable_modules)

    @cached_property
    def dead_killed_by_updates(self) -> list[str]:
        """Dead ReLU-family modules that were alive at the start and died right after large updates."""
        frame = self.act("act_dead_frac")
        dead = [m for m, v in self.dead_fractions.items() if v >= DEAD_CAUSE_FRACTION and m in frame.columns]
        if not dead or frame.empty:
            return []
        killed = []
        for m in dead:
            series = frame[m].to_numpy(dtype=np.float64)
            ok = np.isfinite(series)
            if not ok.any() or series[ok][0] >= 0.5:
                continue  # dead from the first sample: the initialisation, not the updates
            onset_row = int(np.flatnonzero(ok & (series >= DEAD_CAUSE_FRACTION))[0]) if (ok & (series >= DEAD_CAUSE_FRACTION)).any() else -1
            if onset_row < 0:
                continue
            onset_step = int(frame.index[onset_row])
            if self.has_update_ratio and self.update_ratio_reached(KILLING_UPDATE_RATIO, onset_step):
                killed.append(m)
        return killed

    @cached_property
    def saturated_fractions(self) -> dict[str, float]:
        hidden = [m for m in self.saturating_modules if m != self.output_module]
        return self.recent_act("act_saturated_frac", hidden)

    @cached_property
    def output_module(self) -> str | None:
        """The last module of the forward pass: its activation is the prediction, not a hidden layer."""
        return self.order[-1] if self.order else None

    @cached_property
    def grad_rows(self) -> int:
        """Rows of :meth:`log_grad` (0 when no per-layer gradient norm was recorded)."""
        return self.run.n_steps if "grad_norm" in self.run.metrics else 0

    def log_grad(self, rows: slice = slice(None)) -> pd.DataFrame:
        """rows × weight layers: log10 of the gradient norm (NaN where zero, missing or non-finite).
        Computed for the rows asked for, not kept: a long run's whole frame is hundreds of MB."""
        if "grad_norm" not in self.run.metrics:
            return pd.DataFrame()
        grad, layers = self.run.metric_array("grad_norm", rows=rows)
        position = {layer: i for i, layer in enumerate(layers)}
        cols = [c for c in self.weight_layers if c in position]
        picked = [position[c] for c in cols]
        values = np.empty((len(grad), len(cols)))
        for start in range(0, len(grad), BLOCK_ROWS):
            block = grad[start : start + BLOCK_ROWS, picked]
            values[start : start + len(block)] = F.log10_positive(block).reshape(block.shape)
        return pd.DataFrame(values, index=pd.Index(self.run.steps[rows], name="step"), columns=cols, copy=False)

    def vanishing_profile(self, rows: slice) -> tuple[list[str], np.ndarray]:
        """(layers, decades lost before each layer's best-fed successor) over these rows."""
        if not self.grad_rows:
            return [], np.zeros(0)
        return vanishing_profile_of(self.log_grad(rows))

    @cached_property
    def recent_vanishing_profile(self) -> tuple[list[str], np.ndarray]:
        """:meth:`vanishing_profile` over the last quarter of the run (5 to 2,000 steps), computed once:
        the decades and the likely causes both read it, and a long run reads its gradients from file."""
        n = self.grad_rows
        if not n:
            return [], np.zeros(0)
        return self.vanishing_profile(slice(max(0, n - F.window_length(n, 0.25, 5, 2000)), None))

    @cached_property
    def vanishing_decades(self) -> float:
        if not self.grad_rows:
            return math.nan
        _, deficit = self.recent_vanishing_profile
        return float(np.nanmax(deficit)) if deficit.size and np.isfinite(deficit).any() else math.nan

    @cached_property
    def init_gains(self) -> dict[str, float]:
        """Per Linear/Conv layer, log10(output std / input rms) at the first sampled step: how much the
        layer scales the signal at initialisation. The input is the output of the module called just
        before (or the batch); layers followed directly by a normalisation layer are left out (it
        resets the scale). Empty when the first sample is not from the first steps."""
        std, mean = self.act("act_std"), self.act("act_mean")
        if std.empty or mean.empty or int(std.index[0]) > 10:
            return {}
        first_std, first_mean = std.iloc[0], mean.iloc[0]
        order = self.run.forward_order
        gains: dict[str, float] = {}
        for i, module in enumerate(order):
            kind = self.types.get(module, "")
            if not (kind.endswith("Linear") or kind.startswith("Conv")):
                continue
            if i + 1 < len(order) and self.types.get(order[i + 1], "") in NORM_TYPES:
                continue
            source = order[i - 1] if i > 0 else self.run.input_layer
            # A layer scales the root-mean-square of its input (a sigmoid's output has std 0.07 but
            # mean 0.5: its rms is what the next layer sees).
            in_rms = math.hypot(float(first_std.get(source, math.nan)), float(first_mean.get(source, math.nan)))
            gain = F.decades(float(first_std.get(module, math.nan)), in_rms)
            if np.isfinite(gain):
                gains[module] = gain
        return gains

    @cached_property
    def init_gain(self) -> float:
        """Median of :attr:`init_gains` (NaN under two layers): ≈ -0.24 decades for PyTorch's default
        init (a gain of 1/√3), ≈ 0 for He/Xavier; > 0 the signal grows with depth, < 0 it shrinks."""
        gains = list(self.init_gains.values())
        return float(np.median(gains)) if len(gains) >= 2 else math.nan

    @cached_property
    def grad_spike(self) -> tuple[float, int]:
        """(decades, row) of the largest jump of the global gradient norm above its neighbours' level."""
        lg = F.log10_positive(self.run.grad_norm)
        if lg.size < 3 or not np.isfinite(lg).any():
            return math.nan, -1
        jump = F.centered_jump(lg, 10, min_periods=3)
        if not np.isfinite(jump).any():
            return math.nan, -1
        row = int(np.nanargmax(jump))
        return float(jump[row]), row

    def grad_rise_layers(self, row: int, half_window: int = 10) -> list[str]:
        """Layers ranked by how far their own gradient at ``row`` rose above their level just before
        (just after, for the first row); only those that rose by more than 0.5 decades (3×)."""
        if not 0 <= row < self.grad_rows:
            return []
        first = max(0, row - half_window)
        lg = self.log_grad(slice(first, row + 1 + half_window))
        if lg.shape[1] == 0:
            return []
        at = lg.iloc[row - first].to_numpy(dtype=np.float64)
        before = lg.iloc[: row - first] if row > 0 else lg.iloc[1:]
        base = before.median(skipna=True).to_numpy(dtype=np.float64) if len(before) else np.full(at.shape, np.nan)
        rise = at - base
        order = np.argsort(-np.nan_to_num(rise, nan=-np.inf))
        return [str(lg.columns[i]) for i in order if np.isfinite(rise[i]) and rise[i] > 0.5]

    @cached_property
    def implicated_layers(self) -> list[str]:
        """Modules the cause analysis points at, most implicated first: all-zero weights, dead and
        saturated units, layers starved of gradient, layers outside the optimizer."""
        out: list[str] = list(self.zero_weight_layers)
        out += sorted((m for m, v in self.dead_fractions.items() if v >= DEAD_CAUSE_FRACTION), key=lambda m: -self.dead_fractions[m])
        out += sorted(
            (m for m, v in self.saturated_fractions.items() if v >= SATURATED_CAUSE_FRACTION),
            key=lambda m: -self.saturated_fractions[m],
        )
        if self.grad_rows:
            layers, deficit = self.recent_vanishing_profile
            starved = [(d, layer) for layer, d in zip(layers, deficit, strict=True) if np.isfinite(d) and d >= VANISHING_CAUSE_DECADES]
            out += [layer for _, layer in sorted(starved, reverse=True)]
        out += [self.layer_of.get(p, p) for p in self.run.meta.get("params_not_in_optimizer") or []]
        return list(dict.fromkeys(out))  # each once, first mention kept

    @cached_property
    def weight_shrink_decades(self) -> float:
        """How far the layers' weight norms fell over the run, in decades: the median over layers of
        log10(first / last measured ‖θ‖). NaN when no layer was measured twice."""
        if "weight_norm" not in self.run.metrics:
            return math.nan
        values, _ = self.run.metric_array("weight_norm")
        drops = []
        for column in np.asarray(values, dtype=np.float64).T:
            measured = column[np.isfinite(column) & (column > 0)]
            if measured.size >= 2:
                drops.append(math.log10(measured[0] / measured[-1]))
        return float(np.median(drops)) if drops else math.nan

    @cached_property
    def weights_rms_per_layer(self) -> dict[str, float]:
        if "weight_norm" not in self.run.metrics:
            return {}
        values, layers = self.run.metric_array("weight_norm", rows=slice(0, 1))
        first = dict(zip(layers, values[0], strict=True)) if len(values) else {}
        out = {}
        for layer in self.weight_layers:
            info = self.run.modules.get(layer)
            if info is None or not info.n_trainable or layer not in first:
                continue
            out[layer] = float(first[layer]) / math.sqrt(info.n_trainable)
        return out

    def healthy_grad_norm(self, before: int | None = None, q: float = 90.0) -> float:
        """The ``q``-th percentile of the global gradient norm over healthy steps: those before
        ``before`` (a row index; NaN when it is under 3), else every step that is not a spike."""
        g = np.asarray(self.run.grad_norm, dtype=np.float64)
        lg = F.log10_positive(g)
        if before is not None and before < 3:
            return math.nan  # the blow-up began in the first steps: nothing healthy to calibrate on
        if before is not None:
            pick = lg[:before]
            pick = pick[np.isfinite(pick)]
            # A gradient often starts growing steps before the loss or a spike shows it: a norm
            # already 100× past the lowest before it (a spike, by GRAD_SPIKE_DECADES) was blowing
            # up, not healthy (1e15 made the "healthy" percentile of one lr=50 run). Fewer than 3
            # left: nothing to calibrate on.
            pick = pick[pick <= pick.min() + GRAD_SPIKE_DECADES] if pick.size else pick
            if pick.size < 3:
                return math.nan
        else:
            center, scale = F.robust_center_scale(lg, min_scale=0.1)
            # Steps within 3 robust sigmas of the run's usual level; spikes and explosions are left out.
            pick = lg[np.abs(lg - center) <= 3 * scale] if np.isfinite(center) else lg
        value = F.nan_percentile(pick, q)
        return float(10**value) if np.isfinite(value) else math.nan


def vanishing_profile_of(log_grad: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(layers, decades lost before each layer's best-fed successor) of a ``rows × layers`` frame of
    :meth:`RunFacts.log_grad`, from each layer's median."""
    if log_grad.shape[1] == 0:
        return [], np.zeros(0)
    profile = log_grad.median(skipna=True).to_numpy(dtype=np.float64)
    return list(log_grad.columns), F.depth_deficit(profile)


def loss_view(run: Run) -> LossView:
    """The :class:`LossView` of ``run``, computed once per run (kept on the run, freed with it)."""
    view: LossView | None = getattr(run, "_gradscope_loss_view", None)
    if view is None:
        view = LossView(run)
        run._gradscope_loss_view = view  # type: ignore[attr-defined]
    return view


def facts(run: Run) -> RunFacts:
    """The :class:`RunFacts` of ``run``, computed once and shared by every detector.

    Kept on the run itself, so it is freed with the run: live detection builds a new Run at every
    check, and a registry keyed by run would keep each of them alive (the facts refer to their run).
    """
    found: RunFacts | None = getattr(run, "_gradscope_facts", None)
    if found is None:
        found = RunFacts(run)
        run._gradscope_facts = found  # type: ignore[attr-defined]
    return found


# ----------------------------------------------------------------------------------------------
# Fix writers


def lower_lr_fix(f: RunFacts, step: int | None, *, what: str = "diverged", index: int | None = None) -> Fix:
    """A lower learning rate, proposed from the one in effect at ``index`` (a row), else at ``step``
    (the step the failure began: under a schedule that decays, the last lr is not the one that failed),
    else the last one."""
    if index is None and step is not None:
        at = int(np.searchsorted(f.run.steps, step))
        index = at if at < f.run.n_steps and int(f.run.steps[at]) == step else None
    lr = f.lr_at(index)
    ratio = f.first_update_ratio
    # The first updates moved the weights by ``ratio`` under the first lr: the lr that moves them by
    # ~1% is that lr × 1%/ratio, whatever a schedule did to the lr since; never above a third of the
    # lr that failed (nor under a thousandth of it).
    first_lr = f.lr_at(0)
    measured = np.isfinite(ratio) and ratio > 0 and np.isfinite(first_lr) and first_lr > 0
    where = f" from step {step}" if step is not None else ""
    if np.isfinite(lr) and lr > 0:
        aim = first_lr * TARGET_UPDATE_RATIO_HIGH / ratio if measured else 0.1 * lr
        proposal = nice_number(float(np.clip(aim, 1e-3 * lr, lr / 3)))
        hint = ""
        if np.isfinite(ratio):
            under = f" under lr={F.format_number(first_lr, 3)}" if measured and abs(first_lr - lr) > 0.1 * lr else ""
            hint = f" (the first updates moved weights by {F.format_number(ratio * 100)}% of their norm per step{under}; ~1% is the fast end of healthy)"
        action = f"{f.lr_text(index)} {what}{where}; try lr={proposal}{hint}."
    else:
        action = f"The run {what}{where}: lower the learning rate 10×."
    mom = f.momentum
    if np.isfinite(mom) and mom >= 0.95 and not f.is_adaptive:
        action += f" Or lower momentum={F.format_number(mom, 3)} to 0.9: with high momentum the effective step is lr/(1-momentum)."
    if f.has_attention and not f.has_warmup:
        action += " Transformers also need a learning-rate warmup (linear over the first ~5% of steps)."
    return Fix(FixKind.LEARNING_RATE, action)


def warmup_fix(f: RunFacts, step: int | None) -> Fix:
    lr = f.lr_at()
    target = nice_number(lr / 3) if np.isfinite(lr) and lr > 0 else "a lower value"
    return Fix(
        FixKind.LEARNING_RATE,
        f"{f.lr_text()} starts at full size with no warmup; attention layers are unstable under large early "
        f"updates. Add a linear warmup over the first ~5-10% of steps "
        f"(`torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup_steps))`) and try a peak lr={target}.",
    )


def lr_schedule_fix(f: RunFacts, peak: int, low: int) -> Fix:
    steps = f.run.steps
    return Fix(
        FixKind.LEARNING_RATE,
        f"The learning rate fell from {F.format_number(f.lr_series[peak])} at step {steps[peak]} to "
        f"{F.format_number(f.lr_at())} (a hundredth of it by step {steps[low]}), in the first half of the run: check "
        "where `scheduler.step()` is called (an epoch-based scheduler such as StepLR or ExponentialLR stepped "
        "every batch decays that fast) and its settings (`step_size`, `gamma`, `T_max`).",
    )


def softmax_output_fix(f: RunFacts) -> Fix:
    return Fix(
        FixKind.CODE,
        f"The model ends in a Softmax (`{f.output_module}`). `nn.CrossEntropyLoss` / `F.cross_entropy` apply "
        "log-softmax themselves: given probabilities, the loss treats them as logits, squashes its gradients and "
        "stalls above its floor. Return the logits (remove the Softmax, apply it only for predictions), or use "
        "`nn.NLLLoss` on `log_softmax`.",
    )


_CLIPPING_OUTPUTS = frozenset({"ReLU", "ReLU6"})


def relu_output_fix(f: RunFacts) -> Fix:
    kind = f.types.get(f.output_module or "", "ReLU")
    return Fix(
        FixKind.CODE,
        f"The model ends in a {kind} (`{f.output_module}`): if its outputs are logits, every negative one is cut to 0, "
        "where no gradient passes, so the classes cannot be pulled apart. Return the last Linear's output; keep the "
        f"{kind} only if the targets themselves are bounded that way.",
    )


def weight_decay_fix(f: RunFacts, shrink: float) -> Fix:
    decoupled = "AdamW" in f.optimizer_class  # decay applied to the weights directly, scaled by lr
    typical, proposed = ("0.01-0.1", 0.01) if decoupled else ("1e-4 to 5e-4", 5e-4)
    lower = f" Try weight_decay={nice_number(proposed)}" if f.weight_decay > proposed else " Lower it"
    return Fix(
        FixKind.OPTIMIZER,
        f"weight_decay={nice_number(f.weight_decay)} with {f.optimizer_class} shrank the weights {F.format_number(10**shrink)}× "
        f"over the run (median over layers), faster than the gradients could hold them up.{lower} (typical: "
        f"{typical} with {f.optimizer_class}), or leave biases and normalisation weights out of the decay.",
    )


def raise_lr_fix(f: RunFacts, update_ratio: float) -> Fix:
    lr = f.lr_at()
    if np.isfinite(lr) and lr > 0:
        factor = TARGET_UPDATE_RATIO_LOW / update_ratio if np.isfinite(update_ratio) and update_ratio > 0 else 10.0
        factor = float(np.clip(factor, 3.0, 1000.0))
        # The numbers quoted are the threshold the cause is named at and the range healthy runs measured,
        # so that the reader can place the run between them.
        healthy_lo, healthy_hi = (F.format_number(v) for v in HEALTHY_UPDATE_RATIO)
        moved = (
            f"; the fastest layer moves by only {F.format_number(update_ratio)} of its norm per step (too low is under "
            f"{F.format_number(LOW_UPDATE_RATIO)}; healthy runs measured {healthy_lo}-{healthy_hi})"
            if np.isfinite(update_ratio)
            else ""
        )
        # ~TARGET_UPDATE_RATIO_LOW, unless the factor was clipped to 3-1000×.
        aimed = update_ratio * factor
        aim = f", to move it by ~{F.format_number(aimed, 1)} per step" if np.isfinite(aimed) and aimed > 0 else ""
        return Fix(FixKind.LEARNING_RATE, f"{f.lr_text()} is too low{moved}. Try lr={nice_number(lr * factor)}{aim}.")
    return Fix(FixKind.LEARNING_RATE, "The learning rate looks too low: raise it 10× and compare the loss after a few hundred steps.")


def clip_fix(f: RunFacts, before: int | None = None) -> Fix:
    p90 = f.healthy_grad_norm(before)
    if np.isfinite(p90):
        value, why = nice_number(p90), "the 90th percentile of the healthy gradient norm"
    else:
        value, why = "1.0", "a common default: the run has no healthy steps to calibrate it on"
    where = f"; `{'`, `'.join(f.rnn_modules[:3])}` ({f.types.get(f.rnn_modules[0], '')}) is recurrent" if f.rnn_modules else ""
    return Fix(
        FixKind.GRADIENT_CLIPPING,
        f"Clip the gradient norm after backward(): `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={value})` "
        f"({why}){where}.",
    )


def data_input_fix(f: RunFacts) -> Fix:
    return Fix(
        FixKind.DATA,
        f"The input batch is far from unit scale ({f.input_text()}): standardise the inputs "
        "(subtract the training-set mean and divide by its std per feature, e.g. `transforms.Normalize` or "
        "`(x - mean) / std`), so the first layer starts in its working range.",
    )


def shuffle_fixes(period: int) -> tuple[Fix, ...]:
    """What to do about training data that comes in runs of one class, ~``period`` batches each."""
    return (
        Fix(
            FixKind.DATA,
            f"Shuffle the training data: `DataLoader(train_set, batch_size=..., shuffle=True)`, or a random sampler "
            "(`DistributedSampler(train_set, shuffle=True)` and `sampler.set_epoch(epoch)` at each epoch). Each run of "
            f"~{period} batches holds one class: the model learns to predict it, forgets the others, and ends up "
            "predicting mostly the last classes it saw. Check that the dataset is not stored sorted by label "
            "(`ImageFolder`, concatenated per-class files, a dataframe sorted by its label column).",
        ),
        Fix(
            FixKind.DATA,
            "If the order is deliberate (a curriculum, a stream), mix the classes within each batch instead, e.g. "
            "`WeightedRandomSampler` or a class-balanced batch sampler.",
        ),
    )


def activation_fix(f: RunFacts, modules: Sequence[str], why: str) -> Fix:
    names = describe_modules(modules, f.types)
    return Fix(
        FixKind.ACTIVATION,
        f"{names}: {why}. Replace them with ReLU/GELU (or LeakyReLU), which pass gradient through unchanged where active.",
    )


def normalization_fix(f: RunFacts, after: str = "each Linear/Conv layer") -> Fix:
    if f.has_norm:
        return Fix(
            FixKind.NORMALIZATION,
            f"Add normalisation where it is missing (after {after}), or residual connections around the deep "
            "stack, so the signal keeps its scale through depth.",
        )
    return Fix(
        FixKind.NORMALIZATION,
        f"The model has no normalisation layers: add BatchNorm/LayerNorm after {after}, or residual "
        "connections, so activations and gradients keep their scale through depth.",
    )


def init_fix(f: RunFacts, direction: str) -> Fix:
    acts = f.activation_kinds
    scheme = (
        "`nn.init.kaiming_normal_(w, nonlinearity='relu')` (He init)"
        if any(a in DEAD_CAPABLE_TYPES | {"LeakyReLU", "GELU", "SiLU", "ELU"} for a in acts) or not acts
        else "`nn.init.xavier_uniform_(w)` (Glorot init)"
    )
    gain = f.init_gain
    gain_text = (
        f" (at the first step the activation scale changes by {F.format_number(10**gain)}× per layer)"
        if np.isfinite(gain)
        else ""
    )
    return Fix(
        FixKind.INITIALIZATION,
        f"The initial weights look too {direction}{gain_text}: initialise with {scheme} and zero biases, "
        "so each layer keeps the scale of its input.",
    )


def dead_relu_fix(f: RunFacts, modules: Sequence[str]) -> Fix:
    return Fix(
        FixKind.ACTIVATION,
        f"{describe_modules(modules, f.types)} output zero for every example: use LeakyReLU(0.01) or GELU, "
        "which keep a gradient for negative inputs, so dead units can recover.",
    )


# ----------------------------------------------------------------------------------------------
# The shared cause analysis


def likely_causes(
    f: RunFacts,
    *,
    step: int | None = None,
    diverged: bool = False,
    explosion_before: int | None = None,
) -> list[Cause]:
    """Explanations of a failing run, most likely first, each with the fix it calls for.

    ``diverged`` says the loss or gradients blew up (the symptom), ``explosion_before`` the row
    before which the gradient was healthy (for the clipping threshold). The order encodes how
    directly each piece of evidence points at its cause: the input scale and the initial weights are
    measured before any update; a blow-up of a recurrent net calls for clipping, of an attention
    model for warmup, of anything else for a lower learning rate; then dead units, vanishing
    gradients, saturation; a learning rate too low last, as it is what the other causes also look like.
    A loss that saws with the class runs of unshuffled data comes before all of them.
    """
    causes: list[Cause] = []
    if f.class_run_period is not None:
        # The loss saws with runs of one class: the jump at each switch is what blows up the gradients,
        # kills units or flattens the loss, and shuffling removes it. Read off the loss itself: first.
        causes.append(Cause("unshuffled_data", shuffle_fixes(f.class_run_period)[0]))
    dead = {m: v for m, v in f.dead_fractions.items() if v >= DEAD_CAUSE_FRACTION}
    saturated = {m: v for m, v in f.saturated_fractions.items() if v >= SATURATED_CAUSE_FRACTION}
    vanishing = f.vanishing_decades
    early_ratio = f.early_update_ratio
    n = f.run.n_steps
    typical_ratio = f.typical_update_ratio(slice(0, max(1, F.window_length(n, 0.25, 10, 2000))))
    killed = f.dead_killed_by_updates
    spike, spike_row = f.grad_spike
    spiked = bool(np.isfinite(spike) and spike >= GRAD_SPIKE_DECADES)
    gain = f.init_gain
    init_large = bool(np.isfinite(gain) and gain >= INIT_GAIN_DECADES)
    init_small = bool(np.isfinite(gain) and gain <= -INIT_GAIN_DECADES)
    blew_up = bool(diverged or f.loss_blew_up)
    big_steps = bool(np.isfinite(early_ratio) and early_ratio >= HIGH_UPDATE_RATIO)
    lr_high = bool(blew_up or killed or big_steps or spiked) and not (init_small or f.zero_weight_layers)

    if f.zero_weight_layers:
        names = describe_modules(f.zero_weight_layers, f.types)
        causes.append(
            Cause(
                "init_zero",
                Fix(
                    FixKind.INITIALIZATION,
                    f"{names} start with all-zero weights: every unit computes the same thing and no gradient passes "
                    "through them. Initialise weights randomly (`nn.init.kaiming_normal_` for ReLU nets, "
                    "`nn.init.xavier_uniform_` for tanh/sigmoid); only biases may start at zero.",
                ),
            )
        )
    last = f.types.get(f.output_module or "")
    if last == "Softmax":
        # The model's last module is a Softmax: with nn.CrossEntropyLoss (which applies log-softmax
        # itself) the loss sees probabilities as logits, its gradients shrink, and it stalls above its
        # floor. Read from the model's structure, so it comes first.
        causes.append(Cause("softmax_before_loss", softmax_output_fix(f)))
    elif last in _CLIPPING_OUTPUTS:
        # A ReLU-like last module zeroes every negative output: as logits, a class can never be scored
        # below the others by more than the positive ones allow, and the zeroed outputs pass no
        # gradient. (A regression of non-negative targets may mean it: the fix says when it applies.)
        causes.append(Cause("activation_on_logits", relu_output_fix(f)))
    if f.input_unnormalised and (blew_up or saturated or dead or big_steps or spiked):
        causes.append(Cause("inputs_unnormalised", data_input_fix(f), f.input_std))
    if init_large:
        causes.append(Cause("init_too_large", init_fix(f, "large"), gain))
    if init_small:
        causes.append(Cause("init_too_small", init_fix(f, "small"), gain))
    # A recurrent net's gradient explodes through its recurrence: clipping is the fix under SGD,
    # whose step grows with the gradient. An adaptive optimizer (Adam) divides the gradient by its
    # own running scale, so clipping barely changes its steps: there the learning rate comes first
    # (a GRU under Adam at lr=0.3, clipped at its healthy norm, still failed).
    recurrent_blow_up = bool(f.rnn_modules and (blew_up or spiked))
    clip_recurrence = Cause(
        "exploding_recurrence",
        clip_fix(f, explosion_before if explosion_before is not None else (spike_row if spiked else None)),
    )
    if recurrent_blow_up and not f.is_adaptive:
        causes.append(clip_recurrence)
    if f.has_attention and not f.has_warmup and (lr_high or (np.isfinite(early_ratio) and early_ratio >= 0.03)):
        # Post-norm transformers without warmup collapse under the first large Adam steps
        # (measured: early update ratio 0.1 without warmup vs 0.001-0.01 with it).
        causes.append(Cause("no_warmup", warmup_fix(f, step), early_ratio))
    if lr_high:
        what = (
            "diverged"
            if blew_up
            else f"killed the units of {describe_modules(killed, f.types)}"
            if killed
            else f"made the gradient norm jump {F.format_number(10**spike)}× at step {f.run.steps[spike_row]}"
            if spiked
            else "moves the weights too far per step"
        )
        causes.append(Cause("lr_too_high", lower_lr_fix(f, step if blew_up else None, what=what), early_ratio))
        if spiked and not f.rnn_modules:
            causes.append(Cause("gradient_spike", clip_fix(f, spike_row)))
    if recurrent_blow_up and f.is_adaptive:
        causes.append(clip_recurrence)
    shrink = f.weight_shrink_decades
    if not blew_up and f.weight_decay > 0 and np.isfinite(shrink) and shrink >= WEIGHT_SHRINK_DECADES:
        # Before dead units and vanishing gradients, which weights decayed towards zero also give.
        causes.append(Cause("weight_decay_too_high", weight_decay_fix(f, shrink), shrink))
    if dead:
        causes.append(Cause("dead_units", dead_relu_fix(f, list(dead)), max(dead.values())))
        if not killed:
            causes.append(
                Cause(
                    "dead_init",
                    Fix(
                        FixKind.INITIALIZATION,
                        "The units were dead from the first step: check the biases feeding them (a negative bias "
                        "init keeps every pre-activation below 0) and use He init (`nn.init.kaiming_normal_`) with zero biases.",
                    ),
                )
            )
    if np.isfinite(vanishing) and vanishing >= VANISHING_CAUSE_DECADES:
        sat_kinds = [m for m in f.saturating_modules if m != f.output_module]
        if sat_kinds:
            top = f.types.get(sat_kinds[0], "")
            bound = "0.25" if top in {"Sigmoid", "Hardsigmoid"} else "1 and far less off-centre"
            causes.append(
                Cause(
                    "saturating_activations",
                    activation_fix(
                        f,
                        sat_kinds,
                        f"their derivative is at most {bound}, so the gradient shrinks at every layer and loses "
                        f"{F.format_number(vanishing)} decades on its way to the first layer",
                    ),
                    vanishing,
                )
            )
        causes.append(Cause("no_normalization", normalization_fix(f), vanishing))
    if saturated:
        if f.input_unnormalised:
            causes.append(Cause("inputs_unnormalised", data_input_fix(f), f.input_std))
        causes.append(
            Cause(
                "saturating_activations",
                activation_fix(f, list(saturated), "most outputs sit at the bounds, where the derivative is ~0"),
                max(saturated.values()),
            )
        )
        causes.append(Cause("no_normalization", normalization_fix(f, "each Linear/Conv layer, before the activation"), 0.0))
    collapse = f.lr_collapse
    if collapse is not None and not blew_up:
        # Before "too low": the learning rate was fine and a schedule took it away.
        causes.append(Cause("lr_schedule_collapsed", lr_schedule_fix(f, *collapse)))
    elif np.isfinite(typical_ratio) and typical_ratio < LOW_UPDATE_RATIO and not lr_high:
        causes.append(Cause("lr_too_low", raise_lr_fix(f, typical_ratio), typical_ratio))
    if f.input_unnormalised:
        causes.append(Cause("inputs_unnormalised", data_input_fix(f), f.input_std))
    return _dedupe(causes)


def _dedupe(causes: list[Cause]) -> list[Cause]:
    seen: set[str] = set()
    out = []
    for c in causes:
        if c.name in seen:
            continue
        seen.add(c.name)
        out.append(c)
    return out


def ranked_fixes(*groups: Iterable[Fix | None], limit: int = 5) -> tuple[Fix, ...]:
    """Fixes in the given order, each action once and each kind once (but learning-rate and code fixes), at most ``limit``."""
    out: list[Fix] = []
    seen: set[str] = set()
    kinds: set[FixKind] = set()
    for group in groups:
        for fix in group:
            if fix is None or fix.action in seen:
                continue
            # One fix per kind, except learning rate and code, where two different actions can both apply
            # (a warmup and a lower peak; a data guard and a loss rewrite).
            if fix.kind in kinds and fix.kind not in (FixKind.LEARNING_RATE, FixKind.CODE):
                continue
            seen.add(fix.action)
            kinds.add(fix.kind)
            out.append(fix)
    return tuple(out[:limit])
