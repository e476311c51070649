"""``close()`` and leaving the ``with`` block (normally or by an exception) leave the model and the
optimizer exactly as they were: no hook left anywhere, no attribute added, nothing keeping them alive."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradscope

_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _state(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[Any, Any]:
    """Every hook registry that could hold a Monitor hook, plus each module's attribute names."""
    import torch.nn.modules.module as module_globals
    import torch.optim.optimizer as optimizer_globals

    state: dict[Any, Any] = {}
    for name, module in model.named_modules():
        for attr in _MODULE_HOOK_DICTS:
            state[(name, attr)] = dict(getattr(module, attr, None) or {})
        state[(name, "__dict__")] = sorted(vars(module))
        state[(name, "training")] = module.training
    for name, p in model.named_parameters():
        state[(name, "tensor _backward_hooks")] = dict(p._backward_hooks or {})
        state[(name, "tensor _post_accumulate_grad_hooks")] = dict(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        state[(name, "requires_grad")] = p.requires_grad
    if opt is not None:
        for attr in _OPTIMIZER_HOOK_DICTS:
            state[("optimizer", attr)] = dict(getattr(opt, attr, None) or {})
    for attr in dir(module_globals):
        if attr.startswith("_global_") and attr.endswith("hooks"):
            state[("torch.nn global", attr)] = dict(getattr(module_globals, attr))
    for attr in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        state[("torch.optim global", attr)] = dict(getattr(optimizer_globals, attr))
    return state


def _differences(a: dict[Any, Any], b: dict[Any, Any]) -> list[Any]:
    return [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]


@pytest.fixture
def setup(cases: Any) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    case = cases["cnn"]  # buffers, several kinds of leaves
    model = case.model()
    calls: list[str] = []
    model[0].register_forward_hook(lambda m, a, o: calls.append("user hook"))  # a user's hook must survive
    model.user_calls = calls  # type: ignore[assignment]
    return case, model, torch.optim.SGD(model.parameters(), lr=0.05)


def test_leaving_the_with_block_removes_every_hook(setup: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    case, model, opt = setup
    before = _state(model, opt)
    with gradscope.Monitor(model, opt, log_dir=tmp_path / "run", activation_every=1, update_every=1, **quiet) as mon:
        case.train(model, opt, mon, 2)
        during = _differences(before, _state(model, opt))
    assert during, "the Monitor is expected to hook the model while it is open"
    assert {attr for _, attr in during} >= {"_forward_hooks", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"}
    assert _differences(before, _state(model, opt)) == []
    assert len(model.user_calls) == 2  # type: ignore[arg-type]
    model(case.batch(0)[0])
    assert len(model.user_calls) == 3  # type: ignore[arg-type]
    assert gradscope.load(tmp_path / "run").status == "complete"


def test_close_removes_every_hook_and_can_be_called_twice(setup: Any, quiet: dict[str, Any]) -> None:
    case, model, opt = setup
    before = _state(model, opt)
    mon = gradscope.Monitor(model, opt, update_every=1, **quiet)
    case.train(model, opt, mon, 2)
    mon.close()
    mon.close()
    assert _differences(before, _state(model, opt)) == []
    assert mon.run.status == "complete"
    assert mon.run.n_steps == 2


def test_an_exception_in_the_with_block_removes_hooks_and_keeps_what_was_collected(
    setup: Any, quiet: dict[str, Any], tmp_path: Path
) -> None:
    case, model, opt = setup
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match="boom"), gradscope.Monitor(model, opt, log_dir=tmp_path, flush_every=100, update_every=1, **quiet) as mon:
        case.train(model, opt, mon, 3)  # nothing flushed yet: flush_every=100
        raise RuntimeError("boom")
    assert _differences(before, _state(model, opt)) == []
    run = gradscope.load(tmp_path)
    assert run.status == "failed" and run.is_partial
    assert run.n_steps == 3
    assert [(e["kind"], e["type"], e["message"]) for e in run.events] == [("exception", "RuntimeError", "boom")]


def test_a_monitor_that_fails_to_start_leaves_no_hook(setup: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    case, model, opt = setup
    with gradscope.Monitor(model, opt, log_dir=tmp_path, update_every=1, **quiet) as mon:
        case.train(model, opt, mon, 1)
    before = _state(model, opt)
    with pytest.raises(gradscope.InvalidInputError, match="already holds a run"):
        gradscope.Monitor(model, opt, log_dir=tmp_path, update_every=1, **quiet)
    assert _differences(before, _state(model, opt)) == []


@pytest.mark.parametrize("how", ["close", "exception"])
def test_the_model_can_be_garbage_collected_after_close(how: str, cases: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    case = cases["mlp"]
    model = case.model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(model[0].weight)]
    mon = gradscope.Monitor(model, opt, log_dir=tmp_path, activation_every=1, update_every=1, **quiet)
    try:
        with mon:
            case.train(model, opt, mon, 3)
            if how == "exception":
                raise KeyError("stop")
    except KeyError:
        pass
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert mon.run.n_steps == 3  # the closed Monitor still gives its run, without the model
