"""Test configuration of the detection benchmark's tests.

The scenario label checks train real (tiny) models. By default only the fast subset runs; the rest is
marked ``slow`` and runs with ``-m slow`` (only those) or with ``GRADSCOPE_BENCH_FULL=1`` (everything)::

    python -m pytest tests/benchmarks -q                          # fast subset
    GRADSCOPE_BENCH_FULL=1 python -m pytest tests/benchmarks -q   # every scenario, both seeds
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# `benchmarks` is a top-level package of the repository, not of the installed distribution.
_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

_HERE = Path(__file__).resolve().parent
FULL = os.environ.get("GRADSCOPE_BENCH_FULL", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: trains the longer benchmark scenarios; run with -m slow or GRADSCOPE_BENCH_FULL=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow benchmark check: run with -m slow or GRADSCOPE_BENCH_FULL=1")
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents and item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The scenarios are tiny; one thread is faster and keeps results independent of the core count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
