"""The pieces every scenario shares: its label, the monitored training session, and plain-torch probes.

A scenario is a function ``fn(ctx: Context, **knobs) -> nn.Module`` that builds a tiny model in code,
trains it inside ``ctx.session(model, optimizer)`` for a bounded number of steps and returns the
trained model. The same function runs two ways:

- with a ``log_dir``: under ``gradscope.Monitor(model, optimizer, log_dir=..., on_finding=None)``,
  which is what the detection benchmark diagnoses;
- without one: in plain torch, no gradscope involved, which is what the label checks in
  ``tests/benchmarks/`` measure. Both record the same :class:`Probe` (loss per step, per-parameter
  gradient norms read straight from ``.grad``), so a label is verified on torch's own numbers.

``knobs`` are the scenario's keyword arguments (its learning rate, its depth, …). The label checks
use them to run the counterfactual: the same scenario with the fault removed must train well, which
shows that the injected change, and nothing else, is the fault.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import gradscope
from gradscope.datasets import load_digits
from gradscope.findings import FixKind

__all__ = [
    "Context",
    "EvalSet",
    "Label",
    "Probe",
    "Scenario",
    "ScenarioRun",
    "Session",
    "digits_split",
    "sample_batch",
]

TaskKind = Literal["classification", "binary", "regression"]


@dataclass(frozen=True)
class Label:
    """What a scenario is: healthy, or one injected fault with what the detectors should say about it.

    Attributes:
        fault: one sentence naming the injected fault; ``None`` for a healthy run.
        codes: detector codes that correctly describe the fault. A faulty run counts as detected when
            any finding with one of these codes has severity ``warning`` or ``error``.
        fix_kinds: first-fix kinds that are right for this fault. Most faults have exactly one; a
            second one is listed only where both are standard, equally direct remedies (said where).
        onset: the first step at which the fault is present (0 when it is there from the start).
    """

    fault: str | None = None
    codes: tuple[str, ...] = ()
    fix_kinds: tuple[str, ...] = ()
    onset: int | None = None

    def __post_init__(self) -> None:
        if self.fault is None:
            if self.codes or self.fix_kinds or self.onset is not None:
                raise ValueError("a healthy label takes no codes, fix kinds or onset")
            return
        if not self.codes or not self.fix_kinds:
            raise ValueError(f"the fault {self.fault!r} needs expected codes and fix kinds")
        for kind in self.fix_kinds:
            FixKind(kind)  # a typo in a label must fail loudly, not score as a miss

    @property
    def healthy(self) -> bool:
        return self.fault is None

    def to_dict(self) -> dict[str, Any]:
        return {"fault": self.fault, "codes": list(self.codes), "fix_kinds": list(self.fix_kinds), "onset": self.onset}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Label:
        return cls(data["fault"], tuple(data["codes"]), tuple(data["fix_kinds"]), data["onset"])


HEALTHY = Label()


@dataclass(frozen=True)
class EvalSet:
    """Held-out data the trained model is judged on: ``model(x)`` gives logits or predictions for ``y``.

    ``kind``: ``classification`` (``(N, C)`` logits, integer labels), ``binary`` (``(N, 1)`` logits,
    0/1 labels) or ``regression`` (``(N, 1)`` predictions).
    """

    x: torch.Tensor
    y: torch.Tensor
    kind: TaskKind = "classification"
    n_classes: int = 0


class Probe:
    """Plain-torch measurements taken during training, independent of any gradscope recording.

    ``losses[i]`` is the loss the training loop computed at step ``i``; ``grad_norms[step][name]`` is
    the L2 norm of ``param.grad`` right after backward (``None`` when the parameter got no gradient),
    sampled every ``grad_every`` steps and on the first three steps.
    """

    def __init__(self, model: nn.Module, grad_every: int) -> None:
        self.grad_every = grad_every
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.losses: list[float] = []
        self.grad_norms: dict[int, dict[str, float | None]] = {}
        self.lrs: list[float] = []

    def record(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss: torch.Tensor | float) -> None:
        step = len(self.losses)
        self.losses.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
        if optimizer is not None:
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        if step < 3 or step % self.grad_every == 0:
            with torch.no_grad():
                self.grad_norms[step] = {
                    n: (None if p.grad is None else float(p.grad.detach().float().norm()))
                    for n, p in model.named_parameters()
                    if p.requires_grad
                }

    @property
    def n_steps(self) -> int:
        return len(self.losses)

    def loss_array(self) -> np.ndarray:
        return np.asarray(self.losses, dtype=np.float64)

    def first_nonfinite_loss(self) -> int | None:
        bad = np.flatnonzero(~np.isfinite(self.loss_array()))
        return int(bad[0]) if len(bad) else None

    def grad_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, norms)`` of one parameter's gradient norm over the sampled steps (NaN: no gradient)."""
        steps = np.asarray(sorted(self.grad_norms), dtype=np.int64)
        norms = [self.grad_norms[s][name] for s in steps]
        return steps, np.asarray([math.nan if v is None else v for v in norms], dtype=np.float64)


class Session:
    """The training-loop side of a scenario: ``step(loss)`` once per optimizer step, after backward.

    Under the benchmark it forwards to a ``gradscope.Monitor``; in plain-torch mode it only probes.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, log_dir: str | None, grad_every: int
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.probe = Probe(model, grad_every)
        self.monitor = (
            gradscope.Monitor(model, optimizer, log_dir=log_dir, on_finding=None) if log_dir is not None else None
        )

    def step(self, loss: torch.Tensor | float) -> None:
        if self.monitor is not None:
            self.monitor.step(loss)
        self.probe.record(self.model, self.optimizer, loss)

    def close(self, failed: bool = False) -> None:
        if self.monitor is not None:
            self.monitor.close(status="failed" if failed else "complete")


@dataclass
class ScenarioRun:
    """One run of a scenario: where it was recorded, what it is, and what plain torch measured."""

    name: str
    seed: int
    label: Label
    path: str | None
    probe: Probe
    model: nn.Module
    eval: EvalSet | None
    measured: dict[str, float] = field(default_factory=dict)


class Context:
    """What a scenario function gets: its seed, a seeded generator for data order, and the session."""

    def __init__(self, seed: int, log_dir: str | None, grad_every: int = 10) -> None:
        self.seed = seed
        self.log_dir = log_dir
        self.grad_every = grad_every
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.eval: EvalSet | None = None
        self.onset: int | None = None
        self.measured: dict[str, float] = {}
        self._session: Session | None = None

    @contextmanager
    def session(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[Session]:
        if self._session is not None:
            raise RuntimeError("a scenario trains under one session")
        self._session = session = Session(model, optimizer, self.log_dir, self.grad_every)
        try:
            yield session
        except BaseException:
            session.close(failed=True)
            raise
        session.close()

    @property
    def probe(self) -> Probe:
        if self._session is None:
            raise RuntimeError("the scenario never opened ctx.session(...)")
        return self._session.probe


ScenarioFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class Scenario:
    """A registered scenario: its function, its label, and whether it belongs to the fast subset."""

    name: str
    fn: ScenarioFn
    label: Label
    fast: bool
    description: str

    @property
    def healthy(self) -> bool:
        return self.label.healthy

    def run(self, seed: int = 0, log_dir: str | None = None, **knobs: Any) -> ScenarioRun:
        """Train the scenario once. With ``log_dir`` it is monitored by gradscope; without, plain torch."""
        seed_everything(seed)
        ctx = Context(seed, log_dir)
        model = self.fn(ctx, **knobs)
        label = self.label
        if ctx.onset is not None and not label.healthy:
            label = replace(label, onset=ctx.onset)
        return ScenarioRun(self.name, seed, label, log_dir, ctx.probe, model, ctx.eval, dict(ctx.measured))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- data

_DIGITS_CACHE: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
N_DIGITS_TRAIN = 1500  # of 1,797; the remaining 297 are held out


def digits_split(size: int = 8, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled digits as ``(x_train, y_train, x_test, y_test)``, flattened; the split is fixed across seeds."""
    key = (size, normalize)
    if key not in _DIGITS_CACHE:
        x, y = load_digits(size=size, normalize=normalize)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        _DIGITS_CACHE[key] = (x[order], y[order])
    x, y = _DIGITS_CACHE[key]
    n = N_DIGITS_TRAIN
    return x[:n].clone(), y[:n].clone(), x[n:].clone(), y[n:].clone()


def sample_batch(ctx: Context, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(0, len(x), (batch_size,), generator=ctx.gen)
    return x[index], y[index]


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Scenario] = {}


def scenario(
    *, label: Label = HEALTHY, fast: bool = True
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under its name; its docstring's first paragraph describes it.

    ``fast`` puts it in the subset the default test run and ``--fast`` use (a few seconds at most).
    """

    def register(fn: ScenarioFn) -> ScenarioFn:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"scenario {name!r} is registered twice")
        paragraph = (fn.__doc__ or name).strip().split("\n\n")[0]
        description = " ".join(line.strip() for line in paragraph.splitlines()).replace("``", "`")
        _REGISTRY[name] = Scenario(name, fn, label, fast, description)
        return fn

    return register


def registered() -> dict[str, Scenario]:
    return dict(_REGISTRY)
