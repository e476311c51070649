"""``mon.step()`` and the hooks never force a device-to-host copy between flushes.

On a GPU each ``.item()``/``.tolist()``/``.cpu()``/``bool(tensor)`` waits for the device to finish:
one per parameter per step can halve throughput. The CPU cannot show the stall, so this test counts
the calls instead: every conversion of a tensor to host values goes through one of the counted
methods.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import gradscope
from gradscope.collect import held
from gradscope.collect.monitor import Monitor

_SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


@contextmanager
def _count_host_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    with monkeypatch.context() as m:
        for name in _SYNCING:
            original = getattr(torch.Tensor, name)

            def counting(self: torch.Tensor, *args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counting)
        yield counts


def _train(
    case: Any,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    mon: Monitor | None,
    steps: int,
    start: int = 0,
    *,
    as_loss: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        x, y = case.batch(step)
        loss = case.loss_fn(model(x), y)
        loss.backward()
        if mon is not None:
            mon.step(as_loss(loss))
        opt.step()


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm"])
def test_no_host_copy_between_flushes(
    name: str, cases: Any, device_loss: Any, device_gradients: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss is given, and the gradient norms held, as on an accelerator: on the CPU both are
    read on purpose (the last test)."""
    case = cases[name]

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = case.model()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    # the same loop without a Monitor: whatever torch itself converts (if anything) is the baseline
    model, opt = fresh()
    _train(case, model, opt, None, 1)  # warm-up outside the count (lazy state creation)
    with _count_host_copies(monkeypatch) as baseline:
        _train(case, model, opt, None, 40, start=1)

    model, opt = fresh()
    # every collection path on every step: activations, updates, output checks, all on each step,
    # and held values stacked every few steps
    monkeypatch.setattr(held, "STACK_BATCH", 8)
    mon = gradscope.Monitor(model, opt, flush_every=10_000, flush_seconds=None, activation_every=1, update_every=1, check_outputs=True, on_finding=None)
    device_gradients(mon)
    _train(case, model, opt, mon, 1)
    inside_step: Counter[str] = Counter()
    original_step = mon.step

    def counted_step(loss: torch.Tensor) -> None:
        before = sum(copies.values())
        original_step(loss)
        inside_step["any"] += sum(copies.values()) - before

    mon.step = counted_step  # type: ignore[method-assign]
    with _count_host_copies(monkeypatch) as copies:
        _train(case, model, opt, mon, 40, start=1, as_loss=device_loss)
    assert inside_step["any"] == 0, f"mon.step() copied to the host: {dict(copies)}"
    assert copies == baseline, f"the Monitor's hooks copied to the host: {dict(copies - baseline)}"
    mon.close()
    assert mon.run.n_steps == 41  # and nothing was lost by not copying


def test_the_counter_catches_a_deliberate_item(
    cases: Any, device_loss: Any, device_gradients: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: a per-step ``.item()`` slipped into step() is counted."""
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = device_gradients(gradscope.Monitor(model, opt, flush_every=10_000, flush_seconds=None, check_outputs=True, on_finding=None))
    original = Monitor._record_step

    def leaky(self: Monitor, loss: Any) -> None:
        self._params[0].grad.norm().item()  # the anti-pattern: a per-step read of a value
        original(self, loss)

    monkeypatch.setattr(Monitor, "_record_step", leaky)
    with _count_host_copies(monkeypatch) as copies:
        _train(case, model, opt, mon, 5, as_loss=device_loss)
    mon.close()
    assert copies["item"] == 5
    with _count_host_copies(monkeypatch) as copies:
        bool(torch.ones(()) > 0), float(torch.ones(())), torch.ones(2).tolist(), torch.ones(1).cpu()
    assert copies == {"__bool__": 1, "__float__": 1, "tolist": 1, "cpu": 1}


@pytest.mark.parametrize("check_outputs", [False, True])
def test_on_the_cpu_the_loss_and_gradient_norms_are_read_once_per_step(
    check_outputs: bool, cases: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU loss is read in step(): that waits for nothing (CPU ops run synchronously), costs no
    device op, and tells the default whether to check the input batch and the output. Each gradient
    is read once too, as a numpy view whose norm goes straight into the step's row: holding norms
    until a write would slow the next backward pass. On an accelerator both are held on the device
    instead (the tests above)."""
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"check_outputs": check_outputs, "activation_every": 0, "on_finding": None}
    mon = gradscope.Monitor(model, opt, flush_every=10_000, flush_seconds=None, **options)
    assert mon._io_on_demand is not check_outputs  # on demand: decided from the parameters' device
    _train(case, model, opt, mon, 1)
    with _count_host_copies(monkeypatch) as copies:
        _train(case, model, opt, mon, 5, start=1)
    mon.close()
    assert copies == {"item": 5, "numpy": 5 * len(list(model.parameters()))}
