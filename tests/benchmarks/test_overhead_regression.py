"""A short run of the overhead benchmark, to catch gross regressions in CI.

The published figures come from ``python -m benchmarks.overhead`` on a quiet machine
(docs/performance.md). Here the bounds are ratios measured in the same process, and generous:
CI machines are shared and a single short run moves by tens of percent. What they catch is a
change of kind — a host sync or a per-parameter Python loop per step, hooks left attached — which
costs multiples, not percent.
"""

from __future__ import annotations

from benchmarks import overhead


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
    totals_row = table[-1]  # the ratio of total times, which counts the rare slow blocks too
    assert totals_row.startswith(f"| {result.workload} |") and totals_row.count("×") == len(variants) - 1
