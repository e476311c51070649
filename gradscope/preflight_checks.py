"""Pre-flight checks: catch the bugs that waste a long training run in a few seconds, before it starts.

::

    def test_model_trains():
        gradscope.preflight(model, F.cross_entropy, (x, y), n_classes=10).assert_ok()

:func:`preflight` runs fast checks on a model, its loss and one real batch, and returns a
:class:`PreflightResult` whose findings have the same form as a run's diagnosis (:class:`Finding` with
ranked :class:`Fix`\\es). Every check runs on a deep copy of the model: the model passed in, its
gradients, its BatchNorm statistics and the global random state are left exactly as they were.

The checks, in the order they run (their codes):

- ``data_nonfinite``: NaN/Inf in the inputs or the targets.
- ``data_unnormalized``: floating-point inputs far from zero mean and unit scale, or features
  whose scales differ by orders of magnitude.
- ``label_range``: integer class labels outside ``[0, C)`` for the model's ``C`` outputs.
- ``initial_loss``: the classification loss at initialisation far from ``ln C``, the loss of a
  model that has not learnt anything yet.
- ``missing_gradient``: a parameter that requires grad gets no gradient, or an all-zero one, from a
  real batch (also ``nonfinite_gradient``: a NaN/Inf gradient).
- ``batch_dependence``: the output of one example depends on the inputs of the others (a
  ``view``/``permute`` across the batch dimension, ``batch_first`` forgotten, normalisation over
  the batch in evaluation).
- ``overfit_batch``: the model cannot drive the loss near zero on a handful of examples.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from gradscope.detect.registry import parse_codes
from gradscope.errors import GradscopeError, InvalidInputError, UnsupportedSetupError, expect_int
from gradscope.findings import Finding, Fix, FixKind, Severity, json_number, sort_findings

__all__ = ["CHECKS", "PreflightResult", "main", "preflight"]

CHECKS = (
    "data_nonfinite",
    "data_unnormalized",
    "label_range",
    "initial_loss",
    "missing_gradient",
    "batch_dependence",
    "overfit_batch",
)

# Thresholds, each with why.
# Inputs standardised to mean 0 and std 1 are what default initialisations (Kaiming/Xavier) assume;
# a mean beyond ±3 std-units or a scale beyond 10 (raw pixels in 0..255, raw prices) pushes the first
# layer's pre-activations far out of that range.
MAX_ABS_MEAN = 3.0
MAX_STD = 10.0
MIN_STD = 1e-3  # smaller and the inputs are nearly constant: the first layer sees no signal
# A first-layer weight's gradient scales with its input feature: a feature 100× larger than the
# typical one gets gradients 100× larger, and no single learning rate suits both. Measured as the
# largest feature's RMS over the median feature's, so that rarely-inked border pixels of an image
# (tiny but harmless) do not count.
MAX_FEATURE_SCALE_RATIO = 100.0
# A classifier that has learnt nothing predicts about uniformly, so its cross-entropy is ln C. Default
# initialisations give logits of std < 1 and a loss within ~10% of it; 1.5× means confidently wrong
# predictions before the first step (too large an init or unnormalised inputs), under 0.5× means the
# model "knows" the labels before training (labels leaking into the inputs, or a loss over few items).
INITIAL_LOSS_HIGH = 1.5
INITIAL_LOSS_LOW = 0.5
IGNORE_INDEX = -100  # the ignore_index of F.cross_entropy / nn.CrossEntropyLoss, skipped in labels
# Overfitting a handful of examples: the loss must fall to 5% of where it started (0.12 for 10
# classes) — a working model memorises 8 examples in tens of Adam steps.
OVERFIT_TARGET = 0.05
# Gradient leaking to other examples relative to the example's own: exact zeros when independent
# (autograd multiplies zero upstream gradients), so anything above rounding is a real dependence.
LEAK_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------- result


@dataclass
class PreflightResult:
    """What :func:`preflight` found.

    Attributes:
        findings: problems found, most severe first (``step`` is ``None``: not tied to training).
        passed: codes of the checks that ran and found nothing.
        skipped: codes of the checks that could not run on this model or batch, with the reason.
        measurements: the numbers behind the verdicts, also when they pass (``initial_loss``,
            ``expected_initial_loss``, ``overfit_final_loss``, ``overfit_steps``, …).
    """

    findings: list[Finding] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)

    def failing(self, fail_on: str | Severity = Severity.WARNING) -> list[Finding]:
        """The findings at or above ``fail_on`` (``"info"``, ``"warning"`` or ``"error"``)."""
        level = Severity.parse(fail_on).rank
        return [f for f in self.findings if f.severity.rank >= level]

    @property
    def ok(self) -> bool:
        """True when no finding is a warning or an error."""
        return not self.failing(Severity.WARNING)

    def assert_ok(self, fail_on: str | Severity = Severity.WARNING) -> PreflightResult:
        """Raise ``AssertionError`` listing every finding at or above ``fail_on``; return ``self`` otherwise.

        Meant for tests: ``gradscope.preflight(model, loss_fn, batch).assert_ok()``.
        """
        bad = self.failing(fail_on)
        if bad:
            level = Severity.parse(fail_on).value
            lines = [f"gradscope preflight: {len(bad)} problem{'s' if len(bad) != 1 else ''} at or above {level}:"]
            for finding in bad:
                lines.append(f"  {_line(finding)}")
                lines.extend(f"    fix ({fix.kind.value}): {fix.action}" for fix in finding.fixes)
            raise AssertionError("\n".join(lines))
        return self

    def summary(self) -> str:
        """A short plain-text report: a verdict line, one line per finding with its first fix, what was skipped."""
        counts = {s: sum(1 for f in self.findings if f.severity is s) for s in Severity}
        if not self.findings:
            verdict = f"preflight passed: {len(self.passed)} checks"
        else:
            parts = [f"{counts[s]} {s.value}{'s' if counts[s] != 1 else ''}" for s in reversed(list(Severity)) if counts[s]]
            verdict = "preflight found problems: " + ", ".join(parts)
        lines = [verdict]
        for finding in self.findings:
            lines.append(f"  {_line(finding)}")
            if finding.fixes:
                lines.append(f"    fix ({finding.fixes[0].kind.value}): {finding.fixes[0].action}")
        lines.extend(f"  skipped {code}: {reason}" for code, reason in self.skipped.items())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become the strings ``"nan"``/``"inf"``)."""
        return {
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "passed": list(self.passed),
            "skipped": dict(self.skipped),
            "measurements": {k: json_number(float(v)) for k, v in self.measurements.items()},  # counts as floats too
        }

    def __str__(self) -> str:
        return self.summary()


def _line(finding: Finding) -> str:
    """``error: batch_dependence [fc]: message`` — a finding of preflight, which has no step."""
    layers = f" [{', '.join(finding.layers[:4])}{', …' if len(finding.layers) > 4 else ''}]" if finding.layers else ""
    return f"{finding.severity.value}: {finding.code}{layers}: {finding.message}"


# ---------------------------------------------------------------------------------------------- entry point


def preflight(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Sequence[Any],
    *,
    n_classes: int | None = None,
    overfit_steps: int = 200,
    overfit_examples: int = 8,
    overfit_lr: float = 1e-2,
    overfit_target: float = OVERFIT_TARGET,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    seed: int = 0,
) -> PreflightResult:
    """Check a model, its loss and one real batch for the bugs that make a training run fail.

    Args:
        model: the ``nn.Module`` to check. It is deep-copied; the original is never run or changed.
        loss_fn: ``loss_fn(model_output, targets) -> scalar tensor``, as in the training loop
            (``F.cross_entropy``, or ``lambda out, y: out.loss`` for a model that computes its own).
        batch: ``(inputs, targets)``. ``inputs`` is a tensor (``model(x)``), a tuple/list of tensors
            (``model(*inputs)``) or a dict (``model(**inputs)``); tensors share the batch size as
            their first dimension. Use a real batch of the training data, of at least 2 examples.
        n_classes: the number of classes of a classifier. Without it, classification is recognised
            from integer targets and the output's class dimension (``(N, C)``, ``(N, C, …)`` or the
            last dimension of ``(N, T, C)`` with targets ``(N, T)``).
        overfit_steps: Adam steps allowed to overfit ``overfit_examples`` examples.
        overfit_lr: learning rate of those steps.
        overfit_target: the loss must fall to this fraction of its starting value.
        select, ignore: check codes to run or skip (see :data:`CHECKS`), as a list or one string ``"a,b"``.
        seed: seeds the random state of the checks (dropout); the caller's random state is restored.

    Returns:
        A :class:`PreflightResult`; call :meth:`PreflightResult.assert_ok` in a test.

    Raises:
        InvalidInputError: the model, batch or options are not usable.
        UnsupportedSetupError: the model cannot be deep-copied.
        Exception: whatever the model's forward or ``loss_fn`` raises on the batch, unchanged.
    """
    if not isinstance(model, nn.Module):
        hint = " (a class was given: instantiate it)" if isinstance(model, type) else ""
        raise InvalidInputError(f"expected model to be a torch.nn.Module but got {type(model).__name__}{hint}")
    if not callable(loss_fn):
        raise InvalidInputError(f"expected loss_fn to be a callable (output, targets) -> loss but got {type(loss_fn).__name__}")
    inputs, targets = _split_batch(batch)
    size = _batch_size(inputs)
    chosen = _choose(select, ignore)
    _check_options(n_classes, overfit_steps, overfit_examples, overfit_lr, overfit_target)

    ctx = _Context(model, loss_fn, inputs, targets, size, n_classes)
    result = PreflightResult()
    steps: list[tuple[str, Callable[[_Context], list[Finding]]]] = [
        ("data_nonfinite", _check_data_nonfinite),
        ("data_unnormalized", _check_data_unnormalized),
        ("label_range", _check_label_range),
        ("initial_loss", _check_initial_loss),
        ("missing_gradient", _check_gradients),
        ("batch_dependence", _check_batch_dependence),
        (
            "overfit_batch",
            lambda c: _check_overfit(c, steps=overfit_steps, examples=overfit_examples, lr=overfit_lr, target=overfit_target),
        ),
    ]
    with _isolated_random_state(model, seed):
        for code, check in steps:
            if code not in chosen:
                continue
            reason = ctx.blocked_by(code)
            if reason is not None:
                result.skipped[code] = reason
                continue
            try:
                found = check(ctx)
            except _Skip as skip:
                result.skipped[code] = str(skip)
                continue
            if found:
                result.findings.extend(found)
                ctx.failed.add(code)
            else:
                result.passed.append(code)
    result.findings = sort_findings(result.findings)
    result.measurements = dict(ctx.measurements)
    return result


# ---------------------------------------------------------------------------------------------- context


class _Skip(Exception):
    """A check cannot run on this model or batch; the message says why."""


class _Context:
    """The inputs of the checks and what earlier checks learnt (the output, the class count)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        inputs: Any,
        targets: Any,
        size: int,
        n_classes: int | None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.size = size
        self.n_classes = n_classes
        self.failed: set[str] = set()
        self.measurements: dict[str, float] = {}
        self._eval_output: Any = None
        self._has_eval_output = False

    def copy(self, *, train: bool) -> nn.Module:
        """A deep copy of the model in train or eval mode, with no gradients."""
        try:
            clone = copy.deepcopy(self.model)
        except Exception as e:
            raise UnsupportedSetupError(
                f"expected a model that copy.deepcopy can copy (preflight never runs your model itself) but copying "
                f"{type(self.model).__name__} failed: {type(e).__name__}: {e}; run preflight on a model built by the "
                "same code before attaching anything (hooks, monitors) to it"
            ) from e
        clone.train(train)
        for p in clone.parameters():
            p.grad = None
        return clone

    @property
    def eval_output(self) -> Any:
        """The model's output on the batch, in eval mode and without autograd (computed once)."""
        if not self._has_eval_output:
            with torch.no_grad():
                self._eval_output = _call(self.copy(train=False), self.inputs)
            self._has_eval_output = True
        return self._eval_output

    def classes(self) -> int | None:
        """C of a classifier: ``n_classes``, or read from integer targets and the output's class dimension."""
        if self.n_classes is not None:
            return self.n_classes
        layout = _class_layout(_main_tensor(self.eval_output, self.size), self.targets)
        return layout[0] if layout is not None else None

    def blocked_by(self, code: str) -> str | None:
        """Why ``code`` cannot run given earlier failures (bad data makes the loss checks meaningless)."""
        if code in ("initial_loss", "missing_gradient", "batch_dependence", "overfit_batch") and "data_nonfinite" in self.failed:
            return "the batch holds NaN/Inf values (data_nonfinite); fix the data first"
        if code in ("initial_loss", "missing_gradient", "overfit_batch") and "label_range" in self.failed:
            return "labels are out of range for the model's outputs (label_range); fix them first"
        return None


@contextmanager
def _isolated_random_state(model: nn.Module, seed: int) -> Iterator[None]:
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- data checks


def _check_data_nonfinite(ctx: _Context) -> list[Finding]:
    findings = []
    for role, structure in (("inputs", ctx.inputs), ("targets", ctx.targets)):
        for where, tensor in _floating_tensors(structure, role):
            bad = ~torch.isfinite(tensor.detach())
            n_bad = int(bad.sum())
            if not n_bad:
                continue
            n_nan = int(torch.isnan(tensor.detach()).sum())
            examples = _examples_with(bad, ctx.size)
            shown = ", ".join(str(i) for i in examples[:5]) + (", …" if len(examples) > 5 else "")
            findings.append(
                Finding(
                    code="data_nonfinite",
                    severity=Severity.ERROR,
                    step=None,
                    layers=(where,),
                    message=f"{where} holds {n_nan} NaN and {n_bad - n_nan} Inf values (examples {shown}): one such "
                    "value turns the loss and every gradient into NaN",
                    evidence={"nan": n_nan, "inf": n_bad - n_nan, "examples": len(examples)},
                    fixes=(
                        Fix(
                            FixKind.DATA,
                            f"Find where the NaN/Inf in {where} come from (missing values, a division by zero or a "
                            "log of 0 in preprocessing) and clean or drop those examples; assert "
                            "torch.isfinite(x).all() in the dataset.",
                        ),
                    ),
                )
            )
    return findings


def _check_data_unnormalized(ctx: _Context) -> list[Finding]:
    tensors = list(_floating_tensors(ctx.inputs, "inputs"))
    if not tensors:
        raise _Skip("no floating-point inputs (token ids and other integer inputs have no scale to check)")
    findings = []
    for where, tensor in tensors:
        x = tensor.detach().double()
        finite = x[torch.isfinite(x)]
        if finite.numel() < 2:
            continue
        mean, std = float(finite.mean()), float(finite.std())
        ctx.measurements[f"{where}_mean"] = mean
        ctx.measurements[f"{where}_std"] = std
        problems = []
        if std > MAX_STD:
            problems.append(f"their std is {std:.3g} (beyond {MAX_STD:g})")
        elif std < MIN_STD:
            problems.append(f"they are nearly constant (std {std:.3g})")
        if abs(mean) > MAX_ABS_MEAN * max(std, 1.0):
            problems.append(f"their mean is {mean:.3g}")
        ratio = _feature_scale_ratio(x) if x.ndim == 2 and x.shape[1] > 1 else None
        if ratio is not None:
            ctx.measurements[f"{where}_feature_scale_ratio"] = ratio
            if ratio > MAX_FEATURE_SCALE_RATIO:
                problems.append(f"their largest feature is {ratio:.3g}× the scale of the typical one")
        if not problems:
            continue
        low, high = float(finite.min()), float(finite.max())
        image_like = x.ndim == 4 and low >= 0 and high > 1 and high <= 255
        action = (
            "Scale the images to [0, 1] (x / 255) and standardise each channel with the training set's mean and std."
            if image_like
            else f"Standardise {where}: x = (x - mean) / std with the training set's statistics "
            + ("per feature (sklearn's StandardScaler does it)." if ratio is not None else f"(here mean={mean:.3g}, std={std:.3g}).")
        )
        findings.append(
            Finding(
                code="data_unnormalized",
                severity=Severity.WARNING,
                step=None,
                layers=(where,),
                message=f"{where} are far from normalised: {'; '.join(problems)}, range [{low:.3g}, {high:.3g}]; "
                "initialisations and learning rates assume inputs of mean ≈ 0 and std ≈ 1",
                evidence={"mean": mean, "std": std, "min": low, "max": high, **({"feature_scale_ratio": ratio} if ratio else {})},
                fixes=(
                    Fix(FixKind.DATA, action),
                    Fix(FixKind.NORMALIZATION, "Or normalise inside the model: a BatchNorm/LayerNorm on the input."),
                ),
            )
        )
    return findings


def _feature_scale_ratio(x: torch.Tensor) -> float | None:
    """Largest over median per-feature RMS of an ``(N, F)`` batch, over features that are not all zero."""
    rms = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).pow(2).mean(dim=0).sqrt()
    nonzero = rms[rms > 0]
    if nonzero.numel() < 2:
        return None
    return float(nonzero.max() / nonzero.median())


def _check_label_range(ctx: _Context) -> list[Finding]:
    if not isinstance(ctx.targets, torch.Tensor) or ctx.targets.is_floating_point() or ctx.targets.dtype == torch.bool:
        raise _Skip("targets are not integer class labels")
    output = _main_tensor(ctx.eval_output, ctx.size)
    layout = _class_layout(output, ctx.targets)
    if ctx.n_classes is None and layout is None:
        raise _Skip(
            f"cannot tell the class dimension of an output of shape {_shape(output)} for targets of shape "
            f"{tuple(ctx.targets.shape)}; pass n_classes"
        )
    labels = ctx.targets[ctx.targets != IGNORE_INDEX]
    if labels.numel() == 0:
        raise _Skip(f"every label is the ignore index {IGNORE_INDEX}")
    n_classes = ctx.n_classes if ctx.n_classes is not None else layout[0]  # type: ignore[index]
    low, high = int(labels.min()), int(labels.max())
    ctx.measurements.update({"label_min": low, "label_max": high, "n_classes": n_classes})
    findings = []
    if layout is not None and ctx.n_classes is not None and layout[0] != ctx.n_classes:
        findings.append(
            Finding(
                code="label_range",
                severity=Severity.ERROR,
                step=None,
                layers=(),
                message=f"the model outputs {layout[0]} classes (dimension {layout[1]} of its output {_shape(output)}) "
                f"but n_classes={ctx.n_classes}",
                evidence={"outputs": layout[0], "n_classes": ctx.n_classes},
                fixes=(Fix(FixKind.ARCHITECTURE, f"Make the last layer output {ctx.n_classes} values per example."),),
            )
        )
    if low < 0 or high >= n_classes:
        one_based = low >= 1 and high == n_classes
        fixes = []
        if one_based:
            fixes.append(Fix(FixKind.DATA, "The labels look 1-based (1…C): subtract 1 so that they run over 0…C-1."))
        if high >= n_classes:
            fixes.append(
                Fix(FixKind.ARCHITECTURE, f"Or, if there really are {high + 1} classes, make the last layer output {high + 1} values.")
            )
        if low < 0:
            fixes.append(
                Fix(FixKind.DATA, f"Negative labels (min {low}) are invalid; use {IGNORE_INDEX} for positions to ignore.")
            )
        findings.append(
            Finding(
                code="label_range",
                severity=Severity.ERROR,
                step=None,
                layers=(),
                message=f"labels range over [{low}, {high}] but the model has {n_classes} classes (0…{n_classes - 1}): "
                "cross-entropy fails on them, or on a GPU reads out of bounds",
                evidence={"label_min": low, "label_max": high, "n_classes": n_classes},
                fixes=tuple(fixes),
            )
        )
    return findings


# ---------------------------------------------------------------------------------------------- loss and gradients


def _check_initial_loss(ctx: _Context) -> list[Finding]:
    n_classes = ctx.classes()
    if n_classes is None or n_classes < 2:
        raise _Skip("not a classification batch (integer targets and a class dimension), so there is no expected loss; pass n_classes")
    loss = _loss_value(ctx.loss_fn(ctx.eval_output, ctx.targets))
    expected = math.log(n_classes)
    ctx.measurements.update({"initial_loss": loss, "expected_initial_loss": expected})
    ratio = loss / expected
    if math.isfinite(loss) and INITIAL_LOSS_LOW <= ratio <= INITIAL_LOSS_HIGH:
        return []
    if not math.isfinite(loss):
        message = f"the loss at initialisation is {loss} on a finite batch: the loss computation is unstable"
        fixes: tuple[Fix, ...] = (
            Fix(
                FixKind.CODE,
                "Compute the loss in a stable form: F.cross_entropy on logits (not log of softmax probabilities), "
                "binary_cross_entropy_with_logits, a clamped log.",
            ),
        )
        severity = Severity.ERROR
    elif ratio > INITIAL_LOSS_HIGH:
        message = (
            f"the loss at initialisation is {loss:.3g}, {ratio:.2g}× the ln({n_classes}) = {expected:.3g} of a model that has "
            "learnt nothing: it starts out confidently wrong"
        )
        fixes = (
            Fix(
                FixKind.INITIALIZATION,
                "Start from small logits: scale the last layer's initial weights down (e.g. multiply by 0.1, or "
                "nn.init.zeros_ on it) so that the first predictions are near uniform.",
            ),
            Fix(FixKind.DATA, "Normalise the inputs: large inputs make large initial logits."),
        )
        severity = Severity.WARNING
    else:
        message = (
            f"the loss at initialisation is {loss:.3g}, only {ratio:.2g}× the ln({n_classes}) = {expected:.3g} of a model "
            "that has learnt nothing: it predicts the labels before training"
        )
        fixes = (
            Fix(
                FixKind.DATA,
                "Check that the labels do not leak into the inputs, and that the loss averages over the examples "
                "(not over a few kept ones, nor already divided by something).",
            ),
        )
        severity = Severity.WARNING
    return [
        Finding(
            code="initial_loss",
            severity=severity,
            step=None,
            message=message,
            evidence={"initial_loss": loss, "expected": expected, "ratio": ratio, "n_classes": n_classes},
            fixes=fixes,
        )
    ]


def _check_gradients(ctx: _Context) -> list[Finding]:
    clone = ctx.copy(train=True)
    named = [(n, p) for n, p in clone.named_parameters() if p.requires_grad]
    if not named:
        raise _Skip("the model has no parameter that requires grad")
    loss = ctx.loss_fn(_call(clone, ctx.inputs), ctx.targets)
    _require_scalar(loss)
    if not loss.requires_grad:
        owners = sorted({_owner(n) for n, _ in named})
        return [_missing_finding(owners, [n for n, _ in named], zero=False, detached_loss=True)]
    loss.backward()
    missing = [n for n, p in named if p.grad is None]
    nonfinite = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    zero = [n for n, p in named if p.grad is not None and n not in nonfinite and not bool(p.grad.any())]
    ctx.measurements["params_checked"] = len(named)
    findings = []
    if missing:
        findings.append(_missing_finding(_owners(missing), missing, zero=False))
    if zero:
        findings.append(_missing_finding(_owners(zero), zero, zero=True))
    if nonfinite:
        findings.append(
            Finding(
                code="nonfinite_gradient",
                severity=Severity.ERROR,
                step=None,
                layers=tuple(_owners(nonfinite)),
                message=f"{_names(nonfinite)} got NaN/Inf gradients from a finite batch and a finite loss of {_loss_value(loss):.3g}",
                evidence={"params": len(nonfinite), "loss": _loss_value(loss)},
                fixes=(
                    Fix(
                        FixKind.CODE,
                        "Look for an operation with an unbounded derivative on this batch: sqrt or pow of 0, log of 0, "
                        "division by a norm that can be 0 (add an epsilon).",
                    ),
                ),
            )
        )
    return findings


def _missing_finding(owners: list[str], params: list[str], *, zero: bool, detached_loss: bool = False) -> Finding:
    if detached_loss:
        message = "the loss does not require grad: it is detached from every parameter, so backward() would fail"
        fix = Fix(
            FixKind.CODE,
            "The loss is computed from a detached tensor: remove the .detach()/.item()/.numpy()/torch.no_grad() "
            "between the model's output and the loss.",
        )
    elif zero:
        message = (
            f"{_names(params)} got an all-zero gradient on a real batch: "
            "nothing between them and the loss passes a gradient"
        )
        fix = Fix(
            FixKind.CODE,
            "Look for what blocks the gradient: ReLUs dead on the whole batch, a mask or multiplication by 0, a layer "
            "after them initialised to zero (then expected at step 0 only), or an argmax/round in the path.",
        )
    else:
        message = (
            f"{_names(params)} require grad but got no gradient from the loss: they are not in its graph "
            "(a detached branch, a torch.no_grad() block, or a module that is never called)"
        )
        fix = Fix(
            FixKind.CODE,
            "Find the .detach()/torch.no_grad()/.data between these parameters and the loss, or the unused module; "
            "if they are not meant to train, freeze them explicitly (requires_grad_(False)).",
        )
    return Finding(
        code="missing_gradient",
        severity=Severity.WARNING if zero else Severity.ERROR,
        step=None,
        layers=tuple(owners),
        message=message,
        evidence={"params": len(params), "zero": int(zero)},
        fixes=(fix,),
    )


# ---------------------------------------------------------------------------------------------- batch independence


def _check_batch_dependence(ctx: _Context) -> list[Finding]:
    if ctx.size < 2:
        raise _Skip("the batch has a single example; batch independence needs at least 2")
    clone = ctx.copy(train=False)  # BatchNorm in train mode mixes the batch by design; eval mode must not
    recorder = _OutputRecorder(clone, ctx.size)
    probes = [0, ctx.size - 1]
    try:
        floats = [t for _, t in _floating_tensors(ctx.inputs, "inputs") if t.ndim >= 1 and t.shape[0] == ctx.size]
        if floats:
            leaks = _gradient_leaks(clone, ctx, recorder, probes)
        else:
            leaks = _perturbation_leaks(clone, ctx, recorder, probes)
    finally:
        recorder.remove()
    if leaks is None:
        return []
    example, leak, own, culprit, method = leaks
    ctx.measurements["batch_leak"] = leak
    where = f"`{culprit[0]}` ({culprit[1]})" if culprit else "the model"
    fixes = [
        Fix(
            FixKind.CODE,
            f"Look at what happens to the tensor just before {where}: a view/reshape that moves the batch dimension "
            "(x.view(-1, B) instead of x.view(B, -1)), a permute/transpose that swaps batch and another dimension, a "
            "reduction over dim 0.",
        )
    ]
    if culprit and culprit[1] in ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer", "TransformerEncoder", "TransformerDecoder", "RNN", "LSTM", "GRU"):
        fixes.insert(
            0,
            Fix(
                FixKind.CODE,
                f"{culprit[1]} reads (sequence, batch, features) unless it is built with batch_first=True: pass "
                "batch_first=True or transpose the input.",
            ),
        )
    return [
        Finding(
            code="batch_dependence",
            severity=Severity.ERROR,
            step=None,
            layers=(culprit[0],) if culprit else (),
            message=f"the output of example {example} depends on the inputs of other examples in the batch "
            f"(in eval mode; found by {method}); the first module whose output mixes examples is {where}",
            evidence={"example": example, "leak": leak, "own": own},
            fixes=tuple(fixes),
        )
    ]


class _OutputRecorder:
    """Keeps each module's output of the latest forward whose first dimension is the batch (forward order)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        self.size = size
        self.outputs: list[tuple[str, str, torch.Tensor]] = []
        self.handles = [
            module.register_forward_hook(self._hook(name, type(module).__name__))
            for name, module in model.named_modules()
            if name
        ]

    def _hook(self, name: str, kind: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _main_tensor(output, self.size)
            if tensor is not None:
                self.outputs.append((name, kind, tensor))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _gradient_leaks(
    clone: nn.Module, ctx: _Context, recorder: _OutputRecorder, probes: list[int]
) -> tuple[int, float, float, tuple[str, str] | None, str] | None:
    inputs = _map_tensors(ctx.inputs, lambda t: t.detach().clone().requires_grad_(True) if _is_batched_float(t, ctx.size) else t)
    leaves = [t for t in _iter_tensors(inputs) if t.requires_grad]
    recorder.outputs.clear()
    output = _main_tensor(_call(clone, inputs), ctx.size)
    if output is None or not output.requires_grad:
        raise _Skip("the model's output has no floating-point tensor with the batch as its first dimension that depends on the inputs")
    layers = [(n, k, t) for n, k, t in recorder.outputs if t.requires_grad]

    def leak_of(tensor: torch.Tensor, example: int) -> tuple[float, float]:
        grads = torch.autograd.grad(tensor[example].sum(), leaves, retain_graph=True, allow_unused=True)
        leak = own = 0.0
        for g in grads:
            if g is None:
                continue
            g = g.detach().abs()
            own = max(own, float(g[example].max()))
            others = torch.cat([g[:example], g[example + 1 :]])
            leak = max(leak, float(others.max()) if others.numel() else 0.0)
        return leak, own

    for example in probes:
        leak, own = leak_of(output, example)
        if not math.isfinite(leak) or not math.isfinite(own):
            raise _Skip("the gradients with respect to the inputs are not finite")
        if leak > LEAK_TOLERANCE * own:
            culprit = _first_mixing(layers, lambda t, e=example: leak_of(t, e))  # type: ignore[misc]
            return example, leak, own, culprit, "gradients with respect to the inputs"
    return None


def _perturbation_leaks(
    clone: nn.Module, ctx: _Context, recorder: _OutputRecorder, probes: list[int]
) -> tuple[int, float, float, tuple[str, str] | None, str] | None:
    with torch.no_grad():
        recorder.outputs.clear()
        base = _main_tensor(_call(clone, ctx.inputs), ctx.size)
        if base is None:
            raise _Skip("the model's output has no floating-point tensor with the batch as its first dimension")
        base_layers = list(recorder.outputs)
        for example in probes:
            changed = _map_tensors(ctx.inputs, lambda t, e=example: _perturb_others(t, e, ctx.size))  # type: ignore[misc]
            recorder.outputs.clear()
            output = _main_tensor(_call(clone, changed), ctx.size)
            assert output is not None  # the same model and shapes as the base forward
            leak = float((output[example] - base[example]).abs().max())
            own = float(base[example].abs().max())
            if leak > LEAK_TOLERANCE * max(own, 1e-12):
                culprit = None
                # Not strict: a forward that took another path on the changed inputs records other modules.
                for (name, kind, before), (_, _, after) in zip(base_layers, recorder.outputs, strict=False):
                    if before.shape == after.shape and not torch.equal(before[example], after[example]):
                        culprit = (name, kind)
                        break
                return example, leak, own, culprit, "changing the other examples' inputs"
    return None


def _perturb_others(tensor: torch.Tensor, example: int, size: int) -> torch.Tensor:
    """Every example but ``example`` changed: integer ids shifted by one within their range, floats negated plus one."""
    if tensor.ndim == 0 or tensor.shape[0] != size or tensor.dtype == torch.bool:
        return tensor
    if tensor.is_floating_point():
        changed = 1.0 - tensor
    else:
        top = int(tensor.max()) + 1
        changed = (tensor + 1) % max(top, 1)
    keep = torch.zeros(size, dtype=torch.bool, device=tensor.device)
    keep[example] = True
    return torch.where(keep.view(-1, *([1] * (tensor.ndim - 1))), tensor, changed)


def _first_mixing(
    layers: list[tuple[str, str, torch.Tensor]], leak_of: Callable[[torch.Tensor], tuple[float, float]]
) -> tuple[str, str] | None:
    """The first module (in forward order) whose output already mixes examples, by bisection: once the
    examples are mixed, every later output that carries the signal is mixed too."""
    mixes = [False] * len(layers)

    def mixed(i: int) -> bool:
        leak, own = leak_of(layers[i][2])
        mixes[i] = leak > LEAK_TOLERANCE * own
        return mixes[i]

    low, high = 0, len(layers) - 1
    found: int | None = None
    while low <= high:
        middle = (low + high) // 2
        if mixed(middle):
            found, high = middle, middle - 1
        else:
            low = middle + 1
    return (layers[found][0], layers[found][1]) if found is not None else None


# ---------------------------------------------------------------------------------------------- overfitting


def _check_overfit(ctx: _Context, *, steps: int, examples: int, lr: float, target: float) -> list[Finding]:
    clone = ctx.copy(train=True)
    params = [p for p in clone.parameters() if p.requires_grad]
    if not params:
        raise _Skip("the model has no parameter that requires grad")
    n = min(examples, ctx.size)
    index = torch.arange(n)
    inputs = _map_tensors(ctx.inputs, lambda t: t[index.to(t.device)] if _is_batched(t, ctx.size) else t)
    targets = _map_tensors(ctx.targets, lambda t: t[index.to(t.device)] if _is_batched(t, ctx.size) else t)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    start = math.nan
    reached = False
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = ctx.loss_fn(_call(clone, inputs), targets)
        _require_scalar(loss)
        value = _loss_value(loss)
        losses.append(value)
        if step == 0:
            start = value
        if not math.isfinite(value):
            break
        if value <= target * start:
            reached = True
            break
        if not loss.requires_grad:
            break
        loss.backward()
        optimizer.step()
    final = losses[-1]
    if not reached and math.isfinite(final):
        # Dropout and BatchNorm's batch statistics make the train-mode loss noisy; judge the memorised
        # examples as the model would be used.
        clone.eval()
        with torch.no_grad():
            final = _loss_value(ctx.loss_fn(_call(clone, inputs), targets))
        reached = final <= target * start
    ctx.measurements.update({"overfit_start_loss": start, "overfit_final_loss": final, "overfit_steps": len(losses)})
    if reached:
        return []
    taken = len(losses)
    if not math.isfinite(final):
        message = f"the loss became {final} at step {taken - 1} while overfitting {n} examples with Adam lr={lr:g}"
        fixes: tuple[Fix, ...] = (
            Fix(FixKind.LEARNING_RATE, f"If the loss grew before turning NaN, retry with overfit_lr={lr / 10:g}; "
                "if it stays NaN at small learning rates, the model's numerics are unstable."),
            Fix(FixKind.CODE, "Look for an unstable operation in the forward or the loss (log of 0, division by a small norm)."),
        )
    else:
        fallen = 1 - final / start if start else 0.0
        message = (
            f"the model cannot overfit {n} examples: the loss went from {start:.3g} to {final:.3g} "
            f"({fallen:.0%} lower) in {taken} Adam steps at lr={lr:g}, short of {target:.0%} of its start; "
            "a model that trains memorises a handful of examples"
        )
        code_fix = Fix(
            FixKind.CODE,
            "Check the path from the inputs to the loss: the loss is computed on this model's outputs for the "
            "matching targets, nothing is detached or frozen, no softmax before nn.CrossEntropyLoss (it expects "
            "logits), no output layer that is constant or bounded wrongly for the targets (a sigmoid for labels "
            "outside [0, 1]).",
        )
        slow = Fix(
            FixKind.LEARNING_RATE,
            f"The loss is falling but slowly: raise overfit_steps or try overfit_lr={lr * 3:g} to tell a slow model "
            "from a broken one.",
        )
        fixes = (slow, code_fix) if fallen > 0.5 else (code_fix, slow)
    return [
        Finding(
            code="overfit_batch",
            severity=Severity.ERROR,
            step=None,
            message=message,
            evidence={"start_loss": start, "final_loss": final, "steps": taken, "examples": n, "lr": lr},
            fixes=fixes,
        )
    ]


# ---------------------------------------------------------------------------------------------- helpers


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    shape = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise InvalidInputError(
        f"expected batch to be (inputs, targets) but got {shape}; pass ((x1, x2), y) for a model of several inputs, "
        "or (dict_of_inputs, y) for model(**inputs)"
    )


def _batch_size(inputs: Any) -> int:
    for tensor in _iter_tensors(inputs):
        if tensor.ndim >= 1:
            return int(tensor.shape[0])
    raise InvalidInputError(
        f"expected inputs holding at least one tensor with a batch dimension but got {type(inputs).__name__}"
    )


def _choose(select: str | Iterable[str] | None, ignore: str | Iterable[str] | None) -> set[str]:
    picked, left_out = parse_codes(select), parse_codes(ignore)  # "a,b" too, as on the command line
    chosen = picked if picked is not None else list(CHECKS)
    skipped = set(left_out or ())
    unknown = sorted((set(chosen) | skipped) - set(CHECKS))
    if unknown:
        raise InvalidInputError(f"expected preflight check codes among {', '.join(CHECKS)} but got {', '.join(unknown)}")
    return {c for c in chosen if c not in skipped}


def _check_options(n_classes: int | None, steps: int, examples: int, lr: float, target: float) -> None:
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2):
        raise InvalidInputError(f"expected n_classes to be an integer ≥ 2 or None but got {n_classes!r}")
    expect_int("overfit_steps", steps, at_least=1)
    expect_int("overfit_examples", examples, at_least=1)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise InvalidInputError(f"expected overfit_lr to be a positive number but got {lr!r}")
    if not (isinstance(target, (int, float)) and 0 < target < 1):
        raise InvalidInputError(f"expected overfit_target to be a fraction between 0 and 1 but got {target!r}")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _iter_tensors(structure: Any) -> Iterator[torch.Tensor]:
    if isinstance(structure, torch.Tensor):
        yield structure
    elif isinstance(structure, Mapping):
        for value in structure.values():
            yield from _iter_tensors(value)
    elif isinstance(structure, (tuple, list)):
        for value in structure:
            yield from _iter_tensors(value)


def _floating_tensors(structure: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every floating-point tensor: ``inputs``, ``inputs[1]``, ``inputs['pixel_values']``."""
    if isinstance(structure, torch.Tensor):
        if structure.is_floating_point() or structure.is_complex():
            yield prefix, structure
    elif isinstance(structure, Mapping):
        for key, value in structure.items():
            yield from _floating_tensors(value, f"{prefix}[{key!r}]")
    elif isinstance(structure, (tuple, list)):
        for i, value in enumerate(structure):
            yield from _floating_tensors(value, f"{prefix}[{i}]")


def _map_tensors(structure: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(structure, torch.Tensor):
        return fn(structure)
    if isinstance(structure, Mapping):
        return {key: _map_tensors(value, fn) for key, value in structure.items()}
    if isinstance(structure, (tuple, list)):
        return type(structure)(_map_tensors(value, fn) for value in structure)
    return structure


def _is_batched(tensor: torch.Tensor, size: int) -> bool:
    return tensor.ndim >= 1 and tensor.shape[0] == size


def _is_batched_float(tensor: torch.Tensor, size: int) -> bool:
    return _is_batched(tensor, size) and tensor.is_floating_point()


def _main_tensor(output: Any, size: int) -> torch.Tensor | None:
    """The floating-point tensor an output stands for (the logits of a dict/ModelOutput), batch first."""
    for tensor in _iter_tensors(output):
        if tensor.is_floating_point() and tensor.ndim >= 1 and tensor.shape[0] == size:
            return tensor
    return None


def _class_layout(output: torch.Tensor | None, targets: Any) -> tuple[int, int] | None:
    """``(C, dim)`` when integer ``targets`` label a class dimension of ``output``, else None."""
    if output is None or not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        return None
    if output.ndim == targets.ndim + 1:
        if output.shape[:-1] == targets.shape and output.ndim >= 3:
            return int(output.shape[-1]), output.ndim - 1  # (N, T, C) with targets (N, T): language models
        if output.shape[0] == targets.shape[0] and output.shape[2:] == targets.shape[1:]:
            return int(output.shape[1]), 1  # (N, C, ...) with targets (N, ...): what cross_entropy takes
    return None


def _examples_with(mask: torch.Tensor, size: int) -> list[int]:
    if mask.ndim >= 1 and mask.shape[0] == size:
        return [int(i) for i in torch.nonzero(mask.reshape(size, -1).any(dim=1)).flatten()]
    return []


def _require_scalar(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InvalidInputError(f"expected loss_fn to return a scalar tensor but got {got}; reduce it (loss.mean())")


def _loss_value(loss: Any) -> float:
    _require_scalar(loss)
    return float(loss.detach().float())


def _shape(tensor: torch.Tensor | None) -> str:
    return str(tuple(tensor.shape)) if tensor is not None else "(no tensor)"


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def _owners(params: list[str]) -> list[str]:
    return list(dict.fromkeys(_owner(p) for p in params))


def _names(params: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{p}`" for p in params[:limit])
    more = f" and {len(params) - limit} more" if len(params) > limit else ""
    return f"{len(params)} parameter{'s' if len(params) != 1 else ''} ({shown}{more})"


# ---------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None, *, stream: TextIO | None = None) -> int:
    """``gradscope preflight TARGET``: run the checks on what ``TARGET`` builds; return the exit status.

    ``TARGET`` is ``path/to/file.py:function`` or ``package.module:function``; the function takes no
    argument and returns the keyword arguments of :func:`preflight` as a dict (at least ``model``,
    ``loss_fn`` and ``batch``). Exit status: 0 when no finding reaches ``--fail-on``, 1 when one does,
    2 when the target cannot be loaded or is not usable (its file does not compile, importing it or
    calling the function raises, the function is missing or returns something else), for bad options,
    and for a ``--select``/``--ignore`` that leaves no check to run; with a one-line reason on stderr.
    An exception raised by the model's forward or the loss while the checks run is not caught: its
    traceback points at the line to fix.
    """
    from gradscope.cli import OneLineParser  # imported here: the command line sits downstream of the checks

    out = stream if stream is not None else sys.stdout
    parser = OneLineParser(
        prog="gradscope preflight",
        description="Check a model, its loss and a batch before training: the data, the initial loss, gradients, "
        "batch independence, overfitting a few examples.",
    )
    parser.add_argument("target", metavar="TARGET", help="file.py:function or module:function returning preflight's keyword arguments")
    parser.add_argument("--fail-on", choices=["info", "warning", "error"], default="warning", help="exit 1 at or above this severity (default: warning)")
    parser.add_argument("--format", dest="output", choices=["text", "json"], default="text")
    parser.add_argument("--select", action="append", metavar="CODES", help="only these checks (comma-separated, repeatable)")
    parser.add_argument("--ignore", action="append", metavar="CODES", help="skip these checks (comma-separated, repeatable)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        select, ignore = parse_codes(args.select), parse_codes(args.ignore)
        if select == []:
            raise InvalidInputError("expected check codes after --select but got none; omit --select to run every check")
        kwargs = _load_target(args.target)
        if select is not None:
            kwargs["select"] = select
        if ignore is not None:
            kwargs["ignore"] = ignore
        _require_a_check(kwargs.get("select"), kwargs.get("ignore"))
        result = preflight(**kwargs)
    except GradscopeError as e:
        print(f"gradscope: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.output == "json":
        out.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        out.write(result.summary() + "\n")
    return 1 if result.failing(args.fail_on) else 0


def _require_a_check(given_select: str | Iterable[str] | None, given_ignore: str | Iterable[str] | None) -> None:
    # Running no check finds nothing, which would print "preflight passed: 0 checks" and exit 0.
    select, ignore = parse_codes(given_select), parse_codes(given_ignore)
    if not _choose(select, ignore):
        # select may come from the target's dict rather than --select, so the codes are named without the flag.
        given = ([f"select {','.join(select)}"] if select is not None else []) + [f"ignore {','.join(ignore or ())}"]
        raise InvalidInputError(
            f"expected --select/--ignore to leave at least one preflight check to run but they leave none "
            f"({', '.join(given)}); select more codes or ignore fewer"
        )


# What loading the user's file may raise: any Exception, and SystemExit too, since a script that calls
# sys.exit() (an argparse at module level reading gradscope's own arguments) must not end gradscope with its status.
_LOAD_ERRORS = (Exception, SystemExit)


def _load_target(target: str) -> dict[str, Any]:
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise InvalidInputError(f"expected TARGET as file.py:function or module:function but got {target!r}")
    from_file = where.endswith(".py") or os.sep in where
    source: str | None = None  # the target's file, to point at the line that failed
    if from_file:
        path = Path(where)
        if not path.is_file():
            raise InvalidInputError(f"expected a Python file but {str(path)!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_gradscope_preflight_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise InvalidInputError(f"expected a Python file but cannot load {str(path)!r}")
        source = str(path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except _LOAD_ERRORS as e:
            raise InvalidInputError(f"could not load {target}: {_describe(e, source, name_source=not from_file)}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise InvalidInputError(f"expected an importable module but cannot import {where!r}: {e}") from None
        except _LOAD_ERRORS as e:
            raise InvalidInputError(f"could not load {target}: {_describe(e, None, name_source=not from_file)}") from e
        source = getattr(module, "__file__", None)
    if not hasattr(module, name):
        raise InvalidInputError(f"expected a function {name!r} in {where!r} but {where!r} defines no {name!r}")
    factory = getattr(module, name)
    if not callable(factory):
        raise InvalidInputError(f"expected a function {name!r} in {where!r} but found {type(factory).__name__}")
    try:
        kwargs = factory()
    except _LOAD_ERRORS as e:
        raise InvalidInputError(f"could not load {target}: {_describe(e, source, name_source=not from_file)}") from e
    if not isinstance(kwargs, Mapping) or not {"model", "loss_fn", "batch"} <= set(kwargs):
        raise InvalidInputError(
            f"expected {name}() to return a dict with model, loss_fn and batch (preflight's arguments) but got "
            f"{type(kwargs).__name__}"
        )
    accepted = inspect.signature(preflight).parameters
    unknown = sorted(str(key) for key in kwargs if key not in accepted)
    if unknown:
        # Caught here rather than as preflight()'s TypeError, which would read as a crash of gradscope.
        raise InvalidInputError(
            f"expected {name}() to return preflight's keyword arguments ({', '.join(accepted)}) but got "
            f"{', '.join(unknown)}; remove {'them' if len(unknown) > 1 else 'it'} from the dict"
        )
    return dict(kwargs)


def _describe(error: BaseException, source: str | None, *, name_source: bool) -> str:
    """``SyntaxError: invalid syntax (line 3)``: the error, and the line of the target's file it came from.

    ``source`` is that file (``None``: the module whose import failed, found in the traceback); its last
    line in the traceback is the user's line behind a failure deep in a library. ``name_source`` adds
    the file's name, for a target given as a module; a syntax error in another file is always named.
    """
    if isinstance(error, SystemExit):
        text = f"it called sys.exit({error.code!r})"
    else:
        message = error.msg if isinstance(error, SyntaxError) else str(error)
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        file, line = error.filename, error.lineno
    else:
        frames = traceback.extract_tb(error.__traceback__)
        if source is None:
            source = next((f.filename for f in frames if f.name == "<module>"), None)
        own = [f for f in frames if _same_file(f.filename, source)]
        if not own or own[-1].lineno is None:
            return text
        file, line = own[-1].filename, own[-1].lineno
    if name_source or not _same_file(file, source):
        return f"{text} ({Path(file).name}, line {line})"
    return f"{text} (line {line})"


def _same_file(file: str, source: str | None) -> bool:
    return source is not None and os.path.abspath(file) == os.path.abspath(source)
