"""Fixtures of the framework tests: nothing here imports Lightning or transformers, so a test module
that skips (framework not installed) costs nothing."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def without_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``without_module("lightning")`` makes ``import lightning`` (and its submodules) fail as if the
    package were not installed, for the rest of the test; the modules imported before come back after."""

    def hide(top: str) -> None:
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, top, None)

    yield hide
