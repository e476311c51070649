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
