"""A short run of the overhead benchmark, to catch gross regressions in CI.

The published figures come from ``python -m benchmarks.overhead`` on a quiet machine
(docs/performance.md). Here the bounds are ratios measured in the same process, and generous:
CI machines are shared and a single short run moves by tens of percent. What they catch is a
change of kind — a host sync or a per-parameter Python loop per step, hooks left attached — which
costs multiples, not percent.
"""

from __future__ import annotations

import itertools
import random
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import overhead, peers
from gradscope.collect.cadence import EARLY_STEPS


def test_the_default_and_everything_settings_stay_near_a_bare_loop() -> None:
    mlp = overhead.WORKLOADS[0]  # the fastest step: where any fixed per-step cost shows most
    result = overhead.measure(mlp, blocks=8, steps_per_block=25, warmup=25)
    default, everything = result.ratios["default"][0], result.ratios["everything"][0]
    assert default < 1.6, f"default costs {default:.2f}× a bare loop (published: ~1.2×)"
    assert everything < 2.5, f"activation statistics every step cost {everything:.2f}× (published: ~1.5×)"
    assert default < everything + 0.1  # sampling every 50 steps is cheaper than every step


def test_the_hand_written_references_are_timed_and_shown_beside_gradscope() -> None:
    variants = overhead.VARIANTS + overhead.REFERENCES
    result = overhead.measure(overhead.WORKLOADS[0], blocks=2, steps_per_block=5, warmup=5, variants=variants)
    assert set(result.ratios) == set(variants[1:])
    assert all(median > 0 and lo <= median <= hi for median, lo, hi in result.ratios.values())
    table = overhead.render([result]).splitlines()
    header = table[0]
    assert header.count("|") == len(variants) + 2
    assert "histogram of every gradient" in header and "norm + .item() per parameter" in header
    assert set(result.totals) == set(variants[1:]) and all(total > 0 for total in result.totals.values())
    totals_row = table[table.index("Total time over all blocks, against the bare loop's:") + 4]  # counts the rare slow blocks too
    assert totals_row.startswith(f"| {result.workload} |") and totals_row.count("×") == len(variants) - 1


def test_the_gap_to_the_floor_is_given_per_round_with_a_confidence_interval() -> None:
    result = overhead.measure(overhead.WORKLOADS[0], blocks=8, steps_per_block=5, warmup=5)
    assert set(result.above_floor) == {"default", "default_copy", "default_early", "everything"}  # all but the floor
    for median, lo, hi in result.above_floor.values():
        assert lo <= median <= hi
    table = overhead.render([result])
    assert "Percentage points above the hand-written floor" in table
    assert table.splitlines()[-1].startswith(f"| {result.workload} | ") and table.count(" [") >= 2
    without_floor = overhead.measure(overhead.WORKLOADS[0], blocks=2, steps_per_block=2, warmup=2, variants=("bare", "default"))
    assert without_floor.above_floor == {} and "above the hand-written floor" not in overhead.render([without_floor])


def test_the_what_if_variants_each_take_one_part_off_the_default() -> None:
    variants = ("bare", "floor", *overhead.WHAT_IF)
    with tempfile.TemporaryDirectory() as tmp:
        loops = {v: overhead._Loop(overhead.WORKLOADS[0], v, Path(tmp)) for v in overhead.WHAT_IF}
        monitors = {v: loop.monitor for v, loop in loops.items()}
        assert all(m is not None for m in monitors.values())
        assert monitors["without_live_detection"]._detects_live is False  # type: ignore[union-attr]
        for loop in loops.values():
            loop.close()
    result = overhead.measure(overhead.WORKLOADS[0], blocks=2, steps_per_block=3, warmup=3, variants=variants)
    assert set(result.above_floor) == set(overhead.WHAT_IF)


def test_a_copy_writes_by_its_own_training_time_not_the_other_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved, the wall clock would count the other copies' blocks as a copy's own training:
    its timed writes would come as often as the number of copies makes them. The time between a
    copy's blocks does not count."""
    with tempfile.TemporaryDirectory() as tmp:
        loop = overhead._Loop(overhead.WORKLOADS[0], "default", Path(tmp))
        monitor = loop.monitor
        assert monitor is not None
        g = torch.Generator().manual_seed(0)
        loop.run(3, g)  # step 0 writes nothing; the next write is due by the clock in flush_seconds
        monitor.flush_seconds = 0.3
        monitor._flush_deadline = time.perf_counter() + 0.3
        time.sleep(0.4)  # the other copies' blocks
        loop.run(3, g)
        assert monitor._base == 0, "the time between blocks counted as training: a timed write happened"
        time.sleep(0.4)
        loop.paused_at = None  # without the pause the same wait makes the next block write
        loop.run(3, g)
        assert monitor._base > 0
        loop.close()


def test_the_default_is_timed_past_its_denser_first_steps_and_beside_them() -> None:
    """The default samples four times as often in a run's first 1,000 steps: the benchmark warms
    every copy up past them by default, and times that early spacing as a variant of its own."""
    assert overhead._parser().parse_args([]).warmup > EARLY_STEPS
    with tempfile.TemporaryDirectory() as tmp:
        early = overhead._Loop(overhead.WORKLOADS[0], "default_early", Path(tmp))
        default = overhead._Loop(overhead.WORKLOADS[0], "default", Path(tmp))
        try:
            assert early.monitor is not None and default.monitor is not None
            assert early.monitor.activation_cadence.every == default.monitor.activation_cadence.early_every == 50
            assert early.monitor.update_cadence.every == default.monitor.update_cadence.early_every == 25
        finally:
            early.close()
            default.close()
    assert "default_early" in overhead.VARIANTS
    steps = []
    real_run = overhead._Loop.run

    def counting_run(self: overhead._Loop, n: int, g: torch.Generator) -> float:
        steps.append(n)
        return real_run(self, n, g)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(overhead._Loop, "run", counting_run)
        overhead.measure(overhead.WORKLOADS[0], blocks=1, steps_per_block=4, warmup=10, variants=("bare", "default"))
    assert steps == [4, 4, 4] * 2 + [4, 4], "each copy warms up block by block, then trains the timed block"


def test_medians_are_taken_over_periods_that_hold_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cost paid once every 200 steps is in every period of 200 steps, and in only one 40-step
    block of five: a median over blocks would not see it at all."""

    def run(self: overhead._Loop, steps: int, g: torch.Generator) -> float:
        self.blocks_run = getattr(self, "blocks_run", 0) + 1
        sampled = self.variant == "default" and self.blocks_run % 5 == 0
        return 1.0 + 0.05 * (self.variant == "floor") + (0.5 if sampled else 0.0)

    monkeypatch.setattr(overhead._Loop, "run", run)
    result = overhead.measure(overhead.WORKLOADS[0], blocks=20, steps_per_block=40, warmup=0, variants=("bare", "floor", "default"))
    assert overhead.PERIOD == 200
    assert result.ratios["default"] == pytest.approx((1.1, 1.1, 1.1))  # (4 × 1 + 1.5) / 5 in each of the 4 periods
    assert result.ratios["floor"][0] == pytest.approx(1.05)
    assert result.above_floor["default"][0] == pytest.approx(5.0)
    assert result.totals["default"] == pytest.approx(1.1)
    # blocks that do not divide the period: whole periods still, each with as many samples (30-step
    # blocks: 600 steps, three samples, in each of two periods)
    uneven = overhead.measure(overhead.WORKLOADS[0], blocks=40, steps_per_block=30, warmup=0, variants=("bare", "default"))
    assert uneven.ratios["default"][1] == uneven.ratios["default"][2]


def test_the_variants_rotate_so_that_none_runs_right_after_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant that runs twice in a row starts its second block with a warm cache: alternately
    reversed, the bare loop did so every other round."""
    sequence: list[str] = []

    def run(self: overhead._Loop, steps: int, g: torch.Generator) -> float:
        sequence.append(self.variant)
        return 1.0

    monkeypatch.setattr(overhead._Loop, "run", run)
    variants = ("bare", "floor", "default", "everything")
    overhead.measure(overhead.WORKLOADS[0], blocks=8, steps_per_block=5, warmup=0, variants=variants)
    assert all(a != b for a, b in itertools.pairwise(sequence)), sequence
    rounds = [sequence[i : i + 4] for i in range(0, 32, 4)]
    assert all(sorted(r) == sorted(variants) for r in rounds)
    for position in range(4):  # each variant in each position equally often
        assert sorted(r[position] for r in rounds) == sorted(variants * 2)


def test_the_median_interval_is_the_order_statistics_of_the_binomial_table() -> None:
    # n = 40 at 95%: the 14th and 27th smallest values (the textbook table); too few values: the range
    assert overhead.median_interval([float(v) for v in range(40)]) == (13.0, 26.0)
    assert overhead.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    # its coverage holds for long-tailed noise like a shared machine's (lognormal, true median 1)
    rng = random.Random(0)
    trials = 2000
    covered = sum(lo <= 1.0 <= hi for lo, hi in (overhead.median_interval([rng.lognormvariate(0, 1) for _ in range(40)]) for _ in range(trials)))
    assert covered / trials >= 0.94


def test_peers_that_are_not_installed_are_said_to_be_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "installed", lambda: [])
    assert "No peer is installed" in overhead.render_peers(overhead.measure_peers(blocks=1, steps=1))


class _FailingPeer(peers.Peer):
    def __init__(self, *args: object) -> None:
        raise RuntimeError("this model's modules are not supported\nsecond line")


class _CountingPeer(peers.Peer):
    steps = 0

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, log_root: Path) -> None:
        super().__init__(model, opt)

    def record(self, loss: torch.Tensor) -> None:
        _CountingPeer.steps += 1


def test_an_installed_peer_is_timed_beside_gradscope_and_one_that_fails_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer trains its own copy through whole steps; one that cannot watch a model (Cockpit on a
    transformer) fails in its cell, and the others are still measured."""
    _CountingPeer.steps = 0
    monkeypatch.setattr(peers, "installed", lambda: ["wandb", "cockpit"])
    monkeypatch.setitem(peers._MAKERS, "wandb", _CountingPeer)
    monkeypatch.setitem(peers._MAKERS, "cockpit", _FailingPeer)
    monkeypatch.setattr(overhead, "WORKLOADS", overhead.WORKLOADS[:1])
    rows = overhead.measure_peers(blocks=2, steps=3)
    assert _CountingPeer.steps == 3 + 2 * 3  # the warm-up block, then two blocks
    table = overhead.render_peers(rows).splitlines()
    row = table[-1]
    assert row.startswith(f"| {overhead.WORKLOADS[0].name} |")
    assert "fails: RuntimeError: this model's modules are not supported |" in row
    assert row.count("×") == 2  # the peer's ratio, and gradscope's default measured beside it
