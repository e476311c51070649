"""The per-flush exchange between ranks, without processes: the collective is replaced in-process."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

from gradscope.collect import distributed
from gradscope.collect.distributed import DistributedContext


class _FinishedWork:
    """What an async collective returns, already finished."""

    def wait(self) -> bool:
        return True


def _fake_all_gather(
    handed: list[weakref.ref[_FinishedWork]], tensors: list[torch.Tensor] | None = None
) -> Callable[..., _FinishedWork]:
    """An all_gather for two ranks where the other rank sent twice this rank's values. It notes
    (weakly) each collective it returns in ``handed``, and the tensors it was given in ``tensors``."""

    def all_gather(outputs: list[torch.Tensor], flat: torch.Tensor, async_op: bool = False) -> _FinishedWork:
        outputs[0].copy_(flat)
        outputs[1].copy_(2 * flat)
        if tensors is not None:
            tensors.extend([flat, *outputs])
        work = _FinishedWork()
        handed.append(weakref.ref(work))
        return work

    return all_gather


def test_gather_gives_every_ranks_values_in_the_callers_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.dist, "all_gather", _fake_all_gather([]))
    rows, col = torch.arange(6.0).reshape(3, 2), torch.tensor([7, 8], dtype=torch.int64)
    got_rows, got_col = DistributedContext(rank=0, world_size=2).gather([rows, col])
    assert got_rows.shape == (2, 3, 2) and got_col.shape == (2, 2)
    torch.testing.assert_close(got_rows, torch.stack([rows, 2 * rows]))
    torch.testing.assert_close(got_col, torch.tensor([[7.0, 8.0], [14.0, 16.0]]))


def test_the_last_collective_is_released_by_python_not_by_the_backends_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo's worker thread lets go of a finished all_gather after gather() returns. Had that been
    the last reference, the thread would free the tensors, which takes the GIL, and at interpreter
    exit the process aborts. gradscope keeps the collective until the next exchange."""
    handed: list[weakref.ref[_FinishedWork]] = []
    monkeypatch.setattr(distributed.dist, "all_gather", _fake_all_gather(handed))
    monkeypatch.setattr(distributed, "_last_exchange", [], raising=False)
    context = DistributedContext(rank=0, world_size=2)

    context.gather([torch.ones(4)])
    gc.collect()
    assert handed[0]() is not None

    context.gather([torch.ones(4)])  # the next exchange lets the previous one go
    gc.collect()
    assert handed[0]() is None and handed[1]() is not None


def test_the_kept_collective_keeps_no_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """What gradscope keeps of an exchange (the collective) holds no values: at 256 ranks one
    flush's exchange of a large model would be hundreds of MB."""
    handed: list[torch.Tensor] = []
    monkeypatch.setattr(distributed.dist, "all_gather", _fake_all_gather([], handed))
    monkeypatch.setattr(distributed, "_last_exchange", [], raising=False)
    values = torch.arange(1000.0)
    (got,) = DistributedContext(rank=0, world_size=2).gather([values])
    torch.testing.assert_close(got, torch.stack([values, 2 * values]))
    assert len(handed) == 3 and all(t.untyped_storage().nbytes() == 0 for t in handed)
