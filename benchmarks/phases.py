"""Where each variant's per-step cost lands in the training loop: forward, backward, recording
(what runs between ``backward()`` and ``optimizer.step()``), and the optimizer step.

``benchmarks.overhead`` times whole steps; this splits them. It shows costs that a timing of
``Monitor.step()`` alone cannot: a forward hook's share of the forward, and the effect of what
gradscope keeps between steps on the *next* backward pass (it also counts the minor page faults
each backward takes). Copies of one workload's model train in interleaved blocks of 20 steps, in
rotating order, in one process; times are per step, median and mean over all steps after the
warm-up blocks (past the default's denser first 1,000 steps), and their difference from the bare
loop's.
Run:  python -m benchmarks.phases [--workload 0] [--blocks 150]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.overhead import WORKLOADS, _Loop, _quiet
from gradscope.collect.cadence import EARLY_STEPS

VARIANTS = ("bare", "floor", "default", "per_step_only")
PHASES = ("forward", "backward", "recording", "optimizer", "total")
STEPS_PER_BLOCK = 20
WARMUP_BLOCKS = EARLY_STEPS // STEPS_PER_BLOCK + 1


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(workload_index: int, blocks: int) -> dict[str, list[tuple[float, ...]]]:
    """Per variant, one tuple per step: the seconds of each phase, the total, and page faults."""
    workload = WORKLOADS[workload_index]
    samples: dict[str, list[tuple[float, ...]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, _quiet():  # live findings on synthetic data: not the point
        loops = {v: _Loop(workload, v, Path(tmp)) for v in VARIANTS}
        g = torch.Generator().manual_seed(0)
        batches = [workload.batch(g) for _ in range(50)]
        order = list(VARIANTS)
        clock = time.perf_counter
        for block in range(blocks):
            order = order[1:] + order[:1]  # no variant always runs right after the same one
            for variant in order:
                loop = loops[variant]
                for i in range(STEPS_PER_BLOCK):
                    x, y = batches[(block * STEPS_PER_BLOCK + i) % len(batches)]
                    t0 = clock()
                    loop.opt.zero_grad()
                    loss = nn.functional.cross_entropy(loop.model(x), y)
                    t1 = clock()
                    faults = _minor_faults()
                    loss.backward()
                    faults = _minor_faults() - faults
                    t2 = clock()
                    loop.record(loss)
                    t3 = clock()
                    loop.opt.step()
                    t4 = clock()
                    if block >= WARMUP_BLOCKS:
                        samples[variant].append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, float(faults)))
        for loop in loops.values():
            loop.close()
    return samples


def table(samples: dict[str, list[tuple[float, ...]]]) -> str:
    def stat(variant: str, j: int, how: str) -> float:
        values = [s[j] for s in samples[variant]]
        return statistics.median(values) if how == "median" else statistics.mean(values)

    head = "| variant | " + " | ".join(f"{p} µs (median / mean)" for p in PHASES) + " | page faults per backward (mean) |"
    lines = [head, "|" + "---|" * (len(PHASES) + 2)]
    for variant in VARIANTS:
        cells = []
        for j in range(len(PHASES)):
            med, mean = stat(variant, j, "median"), stat(variant, j, "mean")
            cell = f"{med * 1e6:.1f} / {mean * 1e6:.1f}"
            if variant != "bare":
                cell += f" ({(med - stat('bare', j, 'median')) * 1e6:+.1f} / {(mean - stat('bare', j, 'mean')) * 1e6:+.1f})"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {stat(variant, len(PHASES), 'mean'):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", type=int, default=0, choices=range(len(WORKLOADS)), help="index into benchmarks.overhead.WORKLOADS")
    parser.add_argument("--blocks", type=int, default=150, help="interleaved blocks per variant")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.blocks <= WARMUP_BLOCKS:
        parser.error(f"--blocks must be more than the {WARMUP_BLOCKS} warm-up blocks")
    torch.set_num_threads(args.threads)
    print(f"# phases of a training step: {WORKLOADS[args.workload].name}, {args.threads} thread(s), {args.blocks} blocks × {STEPS_PER_BLOCK} steps")
    print("(in brackets: the difference from the bare loop)")
    print(table(measure(args.workload, args.blocks)))


if __name__ == "__main__":
    main()
