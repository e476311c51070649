"""The phase split of a training step (``python -m benchmarks.phases``) runs and puts each cost
in its phase. Bounds are comparisons within one run, with margins of multiples."""

from __future__ import annotations

import statistics

from benchmarks import phases


def test_each_variant_is_timed_phase_by_phase_and_the_recording_lands_in_its_phase() -> None:
    samples = phases.measure(workload_index=0, blocks=phases.WARMUP_BLOCKS + 3)
    assert set(samples) == set(phases.VARIANTS)
    assert all(len(rows) == 3 * phases.STEPS_PER_BLOCK for rows in samples.values())

    def recording(variant: str) -> float:
        return statistics.median(row[phases.PHASES.index("recording")] for row in samples[variant])

    # the bare loop records nothing; the floor and gradscope each make at least one batched norm
    assert recording("floor") > 3 * recording("bare") and recording("default") > 3 * recording("bare")
    for rows in samples.values():  # the phases add up to the step
        assert all(abs(sum(row[:4]) - row[4]) < 1e-9 for row in rows)
    table = phases.table(samples).splitlines()
    assert len(table) == 2 + len(phases.VARIANTS) and all(f"| {v} |" in "\n".join(table) for v in phases.VARIANTS)
