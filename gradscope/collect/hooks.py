"""The hooks gradscope puts on a user's model, made safe to copy with the model.

Training code copies models whole: ``copy.deepcopy`` for an EMA or a teacher,
``torch.optim.swa_utils.AveragedModel``, ``torch.save(model)``. A module's hooks are copied with
it, and a plain bound method would take its Monitor along: deep-copied, or pickled, with its
open run store, which fails (``TypeError: cannot pickle 'sqlite3.Connection' object``). A
:class:`CopySafeHook` is copied and pickled as an :class:`InertHook` instead, so the copy is a
plain, unmonitored model and the Monitor stays with the original.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from torch import nn

__all__ = ["CopySafeHook", "InertHook"]


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
