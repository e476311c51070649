"""Shared fixtures: tiny deterministic models, a training loop that records what really happened, and
reference statistics computed directly with torch to compare the Monitor's numbers against.

Every model here trains in milliseconds on the CPU. ``Case.train`` runs the same loop a user writes
and keeps, per optimizer step, the loss, a copy of every gradient, the parameters before and after
``optimizer.step()``, the learning rates and (on request) the outputs of chosen modules captured by
the test's own forward hooks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradscope.collect.monitor import Monitor
from gradscope.store.schema import ACTIVATION_METRICS

# --------------------------------------------------------------------------- tiny models


class LSTMNet(nn.Module):
    """An LSTM over a short sequence, classified from its last output. ``nn.LSTM`` returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (B, T, 8)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """Two ``nn.TransformerEncoder`` layers (no dropout, so runs repeat exactly) over a short sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))  # (B, T, 16) → (B, 3)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _saturating_mlp() -> nn.Module:
    # Large weights push the bounded activations into their flat regions, so saturation is non-zero.
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3), nn.Softmax(dim=-1)
    )
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(6.0)
        model[4].weight.mul_(4.0)  # confident logits: most softmax rows put > 99% on one class
    return model


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def _vector_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _image_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _sequence_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 5, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _cross_entropy(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, y)


def _nll_of_probabilities(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(torch.log(output + 1e-6), y)


# --------------------------------------------------------------------------- training with a trace


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module's output stands for: itself, or the first tensor found in a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def watched_modules(model: nn.Module) -> list[str]:
    """Modules whose outputs a Monitor watches: leaves and modules owning parameters (not the root)."""
    names = []
    for name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        owns = next(module.parameters(recurse=False), None) is not None
        if (is_leaf or owns) and (module is not model or is_leaf):
            names.append(name)
    return names


@dataclass
class StepTrace:
    """What one optimizer step really did, copied out of the model with plain torch."""

    loss: float
    grads: dict[str, torch.Tensor | None]  # param name → gradient at mon.step() time (None: no grad)
    before: dict[str, torch.Tensor]  # parameters just before optimizer.step()
    after: dict[str, torch.Tensor]  # parameters just after it
    lrs: list[float]  # per param group
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # module → output per micro-batch


@dataclass
class Case:
    """A tiny model with its data and loss; ``build`` is called under a fixed seed."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def batch(self, step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of a given step: the same on every call, so two runs can be compared exactly."""
        return self.make_batch(torch.Generator().manual_seed(1000 + step), n)

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        monitor: Any,
        steps: int,
        *,
        order: str = "before",
        micro_batches: int = 1,
        capture: tuple[str, ...] = (),
        lr: float = 0.05,
        between: Callable[[int], None] | None = None,
    ) -> list[StepTrace]:
        """Train ``steps`` optimizer steps and return what each did.

        ``order="before"`` calls ``monitor.step(loss)`` before ``optimizer.step()``, ``"after"`` just
        after it. Without an optimizer the parameters are updated by hand (plain SGD with ``lr``)
        after ``monitor.step``. ``capture`` names modules whose outputs are copied by a forward
        hook of the test's own (only under grad mode, like the Monitor). ``between(step)`` runs
        after each step (evaluation passes, checks).
        """
        modules = dict(model.named_modules())
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        outputs: dict[str, list[torch.Tensor]] = {}
        handles = []
        for name in capture:

            def hook(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
                out = first_tensor(output)
                if torch.is_grad_enabled() and out is not None and out.is_floating_point():
                    outputs.setdefault(name, []).append(out.detach().clone())

            handles.append(modules[name].register_forward_hook(hook))
        trace: list[StepTrace] = []
        try:
            for step in range(steps):
                outputs.clear()
                if optimizer is not None:
                    optimizer.zero_grad()
                else:
                    model.zero_grad()
                total = 0.0
                loss = torch.zeros(())
                for micro in range(micro_batches):
                    x, y = self.batch(step * micro_batches + micro)
                    loss = self.loss_fn(model(x), y) / micro_batches
                    loss.backward()
                    total += float(loss.detach())
                step_loss = torch.tensor(total) if micro_batches > 1 else loss
                grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in zip(names, params, strict=True)}
                before = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
                lrs = [float(g["lr"]) for g in optimizer.param_groups] if optimizer is not None else []
                if order == "before" and monitor is not None:
                    monitor.step(step_loss)
                if optimizer is not None:
                    optimizer.step()
                else:
                    with torch.no_grad():
                        for p in params:
                            if p.grad is not None:
                                p.sub_(lr * p.grad)
                after = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
                if order == "after" and monitor is not None:
                    monitor.step(step_loss)
                trace.append(
                    StepTrace(
                        float(step_loss.detach()),
                        grads,
                        before,
                        after,
                        lrs,
                        {k: list(v) for k, v in outputs.items()},
                    )
                )
                if between is not None:
                    between(step)
        finally:
            for handle in handles:
                handle.remove()
        return trace


CASES: dict[str, Case] = {
    "mlp": Case("mlp", _mlp, _vector_batch),
    "saturating_mlp": Case("saturating_mlp", _saturating_mlp, _vector_batch, _nll_of_probabilities),
    "cnn": Case("cnn", _cnn, _image_batch),
    "lstm": Case("lstm", LSTMNet, _sequence_batch),
    "transformer": Case("transformer", TinyTransformer, _sequence_batch),
}
REAL_MODELS = ("mlp", "cnn", "lstm", "transformer")


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Every test starts from the same seed, single-threaded (tiny models run fastest that way), and
    with gradscope's own RuntimeWarnings (a hook or internal failure) turned into errors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"gradscope: (internal error|statistics of)", category=RuntimeWarning)
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def cases() -> dict[str, Case]:
    return CASES


@pytest.fixture
def make_case() -> type[Case]:
    """``make_case(name, build, make_batch, loss_fn=cross_entropy)`` for a test's own tiny model."""
    return Case


@pytest.fixture(params=REAL_MODELS)
def case(request: pytest.FixtureRequest) -> Case:
    """Each of the four tiny real models: MLP, CNN (with BatchNorm), LSTM, TransformerEncoder."""
    return CASES[request.param]


class DeviceLoss(torch.Tensor):
    """A loss as ``step()`` gets it on an accelerator: not a plain CPU tensor, so the Monitor holds
    it on its device instead of reading it (this machine has no accelerator to put one on)."""


@pytest.fixture
def device_loss() -> Callable[[torch.Tensor], torch.Tensor]:
    """``device_loss(t)``: ``t`` (sharing its data and graph) as a loss on an accelerator."""
    return lambda t: t.as_subclass(DeviceLoss)


def _hold_gradients_on_device(monitor: Monitor) -> Monitor:
    monitor._grads_read_into = None
    return monitor


@pytest.fixture
def device_gradients() -> Callable[[Monitor], Monitor]:
    """``device_gradients(mon)``: ``mon`` holding each step's gradient norms on their device until a
    write, as on an accelerator (on the CPU it reads them at once, as that waits for nothing)."""
    return _hold_gradients_on_device


@pytest.fixture
def quiet() -> dict[str, Any]:
    """Monitor options that keep live detection out of tests of collection and storage."""
    return {"on_finding": None}


# --------------------------------------------------------------------------- reference statistics

SATURATION_TOLERANCE = 0.01  # the documented tolerance: within 1% of the activation's range from a bound


def reference_activation(outputs: list[torch.Tensor], bounded: str | None = None) -> dict[str, float]:
    """The ``act_*`` metrics of one step, computed directly in float64 from the module's outputs
    (one tensor per micro-batch). Units are channels for (N, C, H, W) outputs, the last axis otherwise."""
    flat = torch.cat([o.double().reshape(-1) for o in outputs])
    finite = torch.isfinite(flat)
    result = {
        "act_mean": flat.mean().item(),
        "act_std": flat.std(correction=0).item(),
        "act_zero_frac": (flat == 0).double().mean().item(),
        "act_max_abs": flat.abs().max().item(),
        "act_nonfinite": float((~finite).any().item()),
    }
    alive = None
    for o in outputs:
        dim = 1 if o.ndim >= 4 else o.ndim - 1
        moved = o.movedim(dim, -1).reshape(-1, o.shape[dim])
        unit_alive = (moved != 0).any(dim=0)
        alive = unit_alive if alive is None else alive | unit_alive
    assert alive is not None
    result["act_dead_frac"] = 1.0 - alive.double().mean().item()
    if bounded is None:
        result["act_saturated_frac"] = math.nan
    elif bounded == "softmax":
        rows = torch.cat([o.double().reshape(-1, o.shape[-1]) for o in outputs])
        result["act_saturated_frac"] = (rows.max(dim=-1).values > 1 - SATURATION_TOLERANCE).double().mean().item()
    else:
        low, high = (0.0, 1.0) if bounded == "sigmoid" else (-1.0, 1.0)
        margin = SATURATION_TOLERANCE * (high - low)
        result["act_saturated_frac"] = ((flat <= low + margin) | (flat >= high - margin)).double().mean().item()
    return result


def grad_norm(tensors: list[torch.Tensor | None]) -> float:
    """L2 norm over several tensors in float64 (None counts as zero)."""
    present = [t.double().reshape(-1) for t in tensors if t is not None]
    return torch.cat(present).norm().item() if present else 0.0


def layer_params(model: nn.Module) -> dict[str, list[str]]:
    """Module name → qualified names of the trainable parameters it owns directly. A tied parameter
    belongs to the first module (in ``named_modules()`` order) that owns it."""
    qualified = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name)
    layers: dict[str, list[str]] = {}
    for pid, pname in qualified.items():
        layers.setdefault(owner[pid], []).append(pname)
    return layers


def bounded_kind(module: nn.Module) -> str | None:
    return {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax"}.get(type(module))


def assert_run_matches(run: Any, model: nn.Module, trace: list[StepTrace], *, activations: bool = True) -> None:
    """Every gradient, weight and update norm (per parameter, per layer, global), the loss and, with
    ``activations``, every activation statistic of a run recorded with ``activation_every=1`` equal
    the direct computation from the trace (captured with ``capture=watched_modules(model)``)."""
    steps = len(trace)
    layers = layer_params(model)
    np.testing.assert_array_equal(run.steps, np.arange(steps))
    assert set(run.layers) == set(layers)
    assert_close(run.loss, [t.loss for t in trace], what="loss")
    assert_close(run.grad_norm, [grad_norm(list(t.grads.values())) for t in trace], what="global grad norm")
    per_param = {
        "param_grad_norm": lambda t, p: grad_norm([t.grads[p]]),
        "param_weight_norm": lambda t, p: grad_norm([t.after[p]]),
        "param_update_norm": lambda t, p: grad_norm([t.after[p] - t.before[p]]),
        "param_grad_missing": lambda t, p: float(t.grads[p] is None),
    }
    for metric, of in per_param.items():
        frame = run.metric(metric)
        assert set(frame.columns) == {p for ps in layers.values() for p in ps}
        for p in frame.columns:
            assert_close(frame[p].to_numpy(), [of(t, p) for t in trace], what=f"{metric} of {p}")
    per_layer = {
        "grad_norm": lambda t, ps: grad_norm([t.grads[p] for p in ps]),
        "weight_norm": lambda t, ps: grad_norm([t.after[p] for p in ps]),
        "update_norm": lambda t, ps: grad_norm([t.after[p] - t.before[p] for p in ps]),
        "grad_missing": lambda t, ps: float(sum(t.grads[p] is None for p in ps)),
    }
    for metric, of in per_layer.items():
        frame = run.metric(metric)
        for layer, ps in layers.items():
            assert_close(frame[layer].to_numpy(), [of(t, ps) for t in trace], what=f"{metric} of layer {layer!r}")
    if not activations:
        return
    modules = dict(model.named_modules())
    np.testing.assert_array_equal(run.activation_steps, np.arange(steps))
    assert run.meta["watched"] == watched_modules(model)
    for name in run.meta["watched"]:
        frames = {metric: run.metric(metric)[name].to_numpy() for metric in ACTIVATION_METRICS}
        for step, t in enumerate(trace):
            outs = t.outputs.get(name)
            if not outs:  # never called as a module, or its output holds no floating tensor
                assert all(np.isnan(frames[m][step]) for m in ACTIVATION_METRICS), name
                continue
            for metric, value in reference_activation(outs, bounded_kind(modules[name])).items():
                assert_close(frames[metric][step], value, rtol=2e-4, atol=2e-6, what=f"{metric} of {name!r} at step {step}")


@pytest.fixture
def reference() -> Any:
    """Direct torch computations of what the Monitor records (float64)."""

    class Reference:
        activation = staticmethod(reference_activation)
        norm = staticmethod(grad_norm)
        layer_params = staticmethod(layer_params)
        watched = staticmethod(watched_modules)
        check_run = staticmethod(assert_run_matches)

    return Reference


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-4, atol: float = 1e-6, what: str = "") -> None:
    """float32 against float64: relative 1e-4 with a small absolute floor for values near zero."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol, err_msg=what)


@pytest.fixture
def close() -> Callable[..., None]:
    return assert_close
