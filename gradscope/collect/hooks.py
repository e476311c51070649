"""The hooks gradscope puts on a user's model, made safe to copy with the model.

Training code copies models whole: ``copy.deepcopy`` for an EMA or a teacher,
``torch.optim.swa_utils.AveragedModel``, ``torch.save(model)``. A module's hooks are copied with
it, and a plain bound method would take its Monitor along: deep-copied, or pickled, with its
open run store, which fails (``TypeError: cannot pickle 'sqlite3.Connection' object``). A
:class:`CopySafeHook` is copied and pickled as an :class:`InertHook` instead, so the copy is a
plain, unmonitored model and the Monitor stays with the original.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["CopySafeHook", "InertHook"]


class InertHook:
    """What a copied or unpickled model keeps of a gradscope hook: a hook that does nothing.

    A model saved whole with ``torch.save(model)`` while monitored needs gradscope importable to
    load, as it would for any hook; ``torch.save(model.state_dict())`` holds no hook at all.
    """

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
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
