from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from gs_cli_support import make_run, register, sample_findings, unregister

from gradscope.findings import Finding
from gradscope.testing import save_run


@pytest.fixture
def fake_detector() -> Iterator[None]:
    register()
    try:
        yield
    finally:
        unregister()


@pytest.fixture
def write_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Write a run holding the given fake findings to ``<tmp>/<name>`` and return the relative path.

    The working directory moves to ``tmp_path`` so that outputs show a stable ``run`` path.
    """
    monkeypatch.chdir(tmp_path)

    def write(findings: Sequence[Finding] | None = None, *, name: str = "run", status: str = "complete") -> str:
        save_run(make_run(sample_findings() if findings is None else findings, status=status), tmp_path / name)
        return name

    return write
