"""The hooks gradscope puts on a user's model, made safe to copy with the model.

Training code copies models whole: ``copy.deepcopy`` for an EMA or a teacher,
``torch.optim.swa_utils.AveragedModel``, ``torch.save(model)``. A module's hooks are copied with
it, and a plain bound method would take its Monitor along: deep-copied, or pickled, with its
open run store, which fails (``TypeError: cannot pickle 'sqlite3.Connection' object``). A
:class:`CopySafeHook` is copied and pickled as an :class:`InertHook` instead, so the copy is a
plain, unmonitored model and the Monitor stays with the original.

The model's own call is watched by a :class:`CallWatch` where that is safe (see
:func:`watch_calls`): it costs a fraction of a forward hook, and copies leave it behind too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_globals

__all__ = ["CallWatch", "CopySafeHook", "InertHook", "has_pre_hooks", "watch_calls"]


class InertHook:
    """What a copied or unpickled model keeps of a gradscope hook: a hook that does nothing, and
    removes itself from its module the first time it runs, so that the copy's modules go back to
    PyTorch's fast call path (a module with any hook takes the slower one on every call).

    A model saved whole with ``torch.save(model)`` while monitored needs gradscope importable to
    load, as it would for any hook; ``torch.save(model.state_dict())`` holds no hook at all.
    """

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        module = args[0] if args else None
        if isinstance(module, nn.Module):
            with contextlib.suppress(Exception):  # a cleanup only: never fail the copy's forward
                _remove(self, module)
        return None

    def __repr__(self) -> str:
        return "InertHook()"


class CopySafeHook(functools.partial[None]):
    """``CopySafeHook(call)``: ``call`` as a module hook that copies (``copy.deepcopy``) and pickles
    as an :class:`InertHook`. A ``functools.partial``, whose call runs in C: a Python ``__call__``
    would add a frame to every forward."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:  # type: ignore[override]
        return (InertHook, ())


def _remove(hook: InertHook, module: nn.Module) -> None:
    """Take ``hook`` out of ``module``'s forward hooks. (PyTorch runs a module's hooks from a copy
    of its hook table, so this is safe while they run.)"""
    for key, registered in list(module._forward_hooks.items()):
        if registered is hook:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


# ---------------------------------------------------------------------------------------------------
# The model's own call, watched without a forward hook


def watch_calls(module: nn.Module, hook: Callable[[nn.Module, tuple[Any, ...], Any], None]) -> CallWatch | None:
    """Run ``hook(module, args, output)`` after each call of ``module``, as a forward hook would, but
    from the module's own entry point rather than PyTorch's hook machinery; None where that is not
    safe, and the caller registers a forward hook instead.

    Why: a module with any forward hook takes PyTorch's general call path on every call, which on
    the CPU costs ~4 µs more per call than the path of a module without one, nearly a point of a
    0.6 ms training step. ``Module.__call__`` first looks for a per-instance ``_compiled_call_impl``
    (what ``module.compile()`` sets); this puts a :class:`CallWatch` there, which calls the
    module's own ``_call_impl``, which takes the fast path while the module has no hook, then
    ``hook``.

    Not safe, so None:
    - a torch whose ``Module.__call__`` is not built that way, or a class that overrides
      ``__call__`` (``torch.compile``'s wrapper does);
    - a module already compiled in place (``module.compile()``);
    - a module with hooks of its own, or global module hooks: it takes PyTorch's general call path
      anyway, and a forward pre-hook may change the input a forward hook would see;
    - a machine with two accelerators or more: ``nn.DataParallel`` copies a module's attributes into
      its replicas, which would run the original module's call. (With one device it replicates
      nothing.)

    ``module.compile()`` replaces the watch, and ``torch.compile(module)`` calls ``forward`` around
    it for PyTorch's own module classes (a class of the user's it traces through the watch): the
    Monitor notices a step whose training forward the watch did not see and moves to a forward hook.
    Copies keep no watch (see :class:`CallWatch`).
    """
    if not _can_watch(module):
        return None
    return CallWatch(module, hook)


class CallWatch:
    """The watch :func:`watch_calls` puts in a module's ``_compiled_call_impl``, and its handle.

    Calling it calls the module's own ``_call_impl`` (PyTorch's fast path while the module has no
    hook), then ``hook``. ``remove()`` puts the module's call back as it was; ``active`` says
    whether the watch is still in place (``module.compile()`` replaces it).

    A copy of the module keeps no watch, however it is made: ``nn.Module.__getstate__`` leaves it
    out, and where a class copies its ``__dict__`` another way (``LightningModule.__getstate__``, a
    parametrized module's ``__deepcopy__``) the watch copies and pickles as ``None``, so the copy is
    a plain module rather than one that runs the original's call. A shallow copy (``copy.copy``) of
    such a class shares the original's submodules and parameters, and its watch too: its calls are
    the original's. (``nn.DataParallel``, whose replicas copy the ``__dict__`` as it is, is ruled
    out by :func:`watch_calls`.)
    """

    __slots__ = ("_call", "_hook", "_module")

    def __init__(self, module: nn.Module, hook: Callable[[nn.Module, tuple[Any, ...], Any], None]) -> None:
        self._call: Callable[..., Any] = module._call_impl
        self._hook: Callable[[nn.Module, tuple[Any, ...], Any], None] = hook
        self._module: nn.Module | None = module
        module.__dict__["_compiled_call_impl"] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._call(*args, **kwargs)
        self._hook(self._module, args, output)  # type: ignore[arg-type]
        return output

    def __copy__(self) -> None:
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[type[None], tuple[()]]:  # type: ignore[override]
        return (type(None), ())  # unpickles as None: the class's own, no watch

    @property
    def active(self) -> bool:
        return self._module is not None and self._module.__dict__.get("_compiled_call_impl") is self

    def remove(self) -> None:
        """Take the watch off its module, if it is still there, and let go of the hook (and so of
        the Monitor). Safe to call twice."""
        if self.active:
            assert self._module is not None
            del self._module.__dict__["_compiled_call_impl"]  # back to the class's None
        self._hook = _no_hook
        self._module = None


def _no_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    return None


def _can_watch(module: nn.Module) -> bool:
    module_call = getattr(nn.Module, "_wrapped_call_impl", None)
    if module_call is None or nn.Module.__call__ is not module_call or "_compiled_call_impl" not in vars(nn.Module):
        return False  # a torch that does not call modules through _compiled_call_impl
    if type(module).__call__ is not module_call or type(module)._wrapped_call_impl is not module_call:
        return False
    if module.__dict__.get("_compiled_call_impl") is not None:
        return False  # compiled in place
    if _has_hooks(module):
        return False  # PyTorch's general call path anyway, and a pre-hook may change the input the hook sees
    return _accelerator_count() < 2


def _accelerator_count() -> int:
    try:
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None:
            return int(accelerator.device_count())
        return int(torch.cuda.device_count())
    except Exception:  # a driver that cannot be asked: assume replicas are possible
        return 2


def has_pre_hooks(module: nn.Module) -> bool:
    """Whether a forward pre-hook, of ``module`` or of every module, runs before its forward: it may
    change the arguments, which a :class:`CallWatch` sees as they were passed."""
    return bool(module._forward_pre_hooks or module_globals._global_forward_pre_hooks)


def _has_hooks(module: nn.Module) -> bool:
    own = module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
    return bool(own or module_globals._global_forward_hooks or has_pre_hooks(module))
