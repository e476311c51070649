"""Per-step device values held until the flush, stacked in batches rather than one stack per step.

A step's gradient norms on an accelerator (and, when they are device values, its loss and the sums
that check its input batch and output) are 0-d tensors. Stacking them into a row every step is a
device op of its own: a kernel launch on an accelerator, ~12 µs of a 0.6 ms MLP step on CPU, where
every extra op runs cold after the backward pass. Held as they are and stacked many steps at a time,
they cost about half a microsecond each. (On the CPU the Monitor reads gradient norms at once
instead: there, hundreds of small tensors kept across steps slow the next backward pass.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["STACK_BATCH", "HeldValues"]

# The most values held before they are stacked (a step with more is stacked on its own): ~128 steps
# of a model with 4 parameter tensors, ~10 of one with 52. More does not pay, as a held value costs
# the stack more once it has left the cache: on the CPU, holding 4096 made step() ~60 µs slower on
# the 52-tensor MLP of the overhead benchmark than a stack per step. (That was measured with step()
# times alone, which miss what held values cost the next backward pass on the CPU; the Monitor no
# longer holds gradient norms there. No accelerator was at hand to measure the batch size on.)
STACK_BATCH = 512


class HeldValues:
    """``width`` 0-d values per step, held by buffer row until :meth:`write_into`.

    ``stack`` stacks a list of 0-d values into a vector (moving them to one device if needed).
    Should a stack or a write fail, the steps it held are lost and ``on_lost(rows, error)`` is told
    which, so they can be stored as missing rather than as the NaN placeholders of the buffer.
    Nothing else is raised here (unless ``on_lost`` raises: the Monitor's ``strict`` mode), so the
    step being recorded and the other held values are not disturbed.
    """

    def __init__(
        self,
        width: int,
        stack: Callable[[list[torch.Tensor]], torch.Tensor],
        on_lost: Callable[[list[int], Exception], None],
    ) -> None:
        self.width = width
        self._stack = stack
        self._on_lost = on_lost
        self._values: list[torch.Tensor] = []  # not stacked yet: `width` per row of _rows
        self._rows: list[int] = []
        self._stacked: list[torch.Tensor] = []  # (rows, width) each
        self._stacked_rows: list[int] = []

    def hold(self, row: int, values: list[torch.Tensor]) -> None:
        """Keep one step's values (``width`` of them) for the buffer row ``row``."""
        if len(self._values) + len(values) > STACK_BATCH:
            self._stack_held()  # the earlier steps only
        self._values += values
        self._rows.append(row)

    def forget(self, row: int) -> None:
        """Let go of the values just held for ``row``, if any: its step was not recorded after all
        (its ``step()`` failed midway), and the next step is recorded on that row."""
        if self._rows and self._rows[-1] == row:  # still unstacked: a hold stacks only earlier steps
            self._rows.pop()
            del self._values[len(self._values) - self.width :]

    def write_into(self, out: torch.Tensor) -> None:
        """Write every held step into its row of ``out`` (buffer rows × ``width`` columns), and let
        the values go. Values of any dtype or device are converted to ``out``'s."""
        self._stack_held()
        if not self._stacked:
            return
        batches, rows = self._stacked, self._stacked_rows
        self._stacked, self._stacked_rows = [], []
        try:
            values = torch.cat([b.to(device=out.device, dtype=out.dtype) for b in batches])
            first = rows[0]
            if rows[-1] - first == len(rows) - 1:  # rows only grow: consecutive, the usual case
                out[first : first + len(rows)].copy_(values)
            else:  # gaps: steps that hold nothing here (a loss read on the host, an unchecked output)
                out.index_copy_(0, torch.tensor(rows, device=out.device), values)
        except Exception as e:
            self._on_lost(rows, e)

    def _stack_held(self) -> None:
        values, rows = self._values, self._rows
        if not values:
            return
        self._values, self._rows = [], []
        try:
            self._stacked.append(self._stack(values).view(len(rows), self.width))
        except Exception as e:
            self._on_lost(rows, e)
            return
        self._stacked_rows += rows
