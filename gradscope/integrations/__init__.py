"""Drop gradscope into the training loops people already use, in one line.

- :mod:`gradscope.integrations.lightning`: ``GradscopeCallback`` for ``lightning.pytorch.Trainer``
  (install with ``pip install "gradscope[lightning]"``).
- :mod:`gradscope.integrations.transformers`: ``GradscopeCallback`` for ``transformers.Trainer``
  (install with ``pip install "gradscope[transformers]"``).

Each module imports its framework when it is imported; without the framework installed the import
raises :class:`MissingDependencyError` (an ``ImportError``) naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gradscope.errors import GradscopeError

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(GradscopeError, ImportError):
    """An optional dependency of a gradscope integration is not installed.

    ``extra`` is the name of the extra that installs it (``pip install "gradscope[<extra>]"``).
    """

    def __init__(self, message: str, *, name: str, extra: str) -> None:
        super().__init__(message, name=name)
        self.extra = extra


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` telling how to install it.

    Only the absence of ``module`` itself (or of its top-level package) becomes the install hint;
    an ``ImportError`` raised from inside an installed framework (a broken install, a version
    clash) propagates unchanged, because installing the extra again would not fix it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".", 1)[0]
        if e.name is not None and e.name not in (module, top):
            raise
        raise MissingDependencyError(
            f"expected the {top!r} package for {feature} but it is not installed; "
            f'do pip install "gradscope[{extra}]"',
            name=top,
            extra=extra,
        ) from e
