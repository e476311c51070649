"""Per-step overhead of gradscope against a bare training loop, measured side by side in one process.

For each workload, identical copies of the model train in interleaved blocks of steps — bare, the
hand-written floor (one batched ``torch._foreach_norm`` of all gradients and one host copy per step),
gradscope's default configuration (twice, on two copies), and gradscope collecting everything
every step — so machine drift cancels. The order of the variants rotates from round to round, so
that none runs right after itself with a warm cache. The two copies of the default differ only in
where their tensors sit in memory: the gap between them is how finely the benchmark can tell two
configurations apart (up to a point on the 0.6 ms MLP).

Each monitored copy's write clock (``flush_seconds``) is paused while the other copies train, so
that it writes as often as a run on its own would.

gradscope's default samples activations and updates four times as often in a run's first 1,000
steps as after them (``gradscope.collect.cadence``). Every copy first trains past those steps
(``--warmup``), so "default" is what a run pays from then on; "default, first 1,000 steps" keeps
the early spacing throughout, which is what a run pays before.

The samples come every 200 steps, so the tables are read per period of 200 steps (five rounds of
40-step blocks), each holding one of every sample; a median over single blocks would leave them
out of most. The first table gives the median ratio of per-step time to the bare loop's, with its
min–max over periods. The second gives each variant's total time over all blocks against the bare
loop's, which also counts the rare slow periods the median leaves out (a write every 500 steps, a
live detection). The third gives each variant's percentage points above the floor: the median of
the per-period differences, with a 95% confidence interval, which says whether a gap to the floor
is more than the machine's noise.

Options:
- ``--references``: two common hand-written ways of watching gradients, for comparison (a norm and
  an ``.item()`` per parameter per step; a 64-bin histogram of every gradient per step copied to
  the host, the computation of histogram logging without its writes).
- ``--breakdown``: gradscope recording only what it records every step (no activation statistics,
  no update measurements, no live detection), which splits the default's cost into the per-step
  part and the sampled part.
- ``--what-if``: the default without live detection (``on_finding=None``).
- ``--peers``: the tools people use today, where installed (wandb, TensorBoard, torchmortem,
  Cockpit: see ``benchmarks/peers.py``), each in a run of its own.

Run:  python -m benchmarks.overhead [--blocks 100] [--warmup 1040] [--workloads 0,1,2,3] [--quick]
      [--references] [--breakdown] [--what-if] [--peers]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import gradscope
from benchmarks import peers
from gradscope.collect.cadence import DEFAULT_ACTIVATIONS, DEFAULT_UPDATES, EARLY_STEPS

# The default's longest spacing after its first 1,000 steps: every span of this many steps holds
# one of each of its samples, so the medians are taken over such spans, never over blocks shorter
# than them (a median of 40-step blocks would leave the samples out of most of them).
PERIOD = DEFAULT_ACTIVATIONS.every


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip


def _deep_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(784, 256), nn.ReLU()]
    for _ in range(24):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))  # 26 Linear layers


class _TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))[:, -1]


def _images(flat: bool) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 784 if flat else 1, *(() if flat else (28, 28)), generator=g)
        return x, torch.randint(0, 10, (64,), generator=g)

    return batch


def _tokens(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 64, (32, 32), generator=g)
    return x, x[:, 0]


WORKLOADS = (
    Workload("784-128-10 MLP, batch 64", _mlp, _images(flat=True)),
    Workload("small CNN on 28×28, batch 64", _cnn, _images(flat=False)),
    Workload("26-layer MLP, width 256", _deep_mlp, _images(flat=True)),
    Workload("2-layer transformer, d=64, seq 32", _TinyTransformer, _tokens),
)


class _Loop:
    """One copy of the workload's model with its optimizer, and what it does around each step."""

    def __init__(self, workload: Workload, variant: str, log_root: Path) -> None:
        torch.manual_seed(0)
        self.model = workload.build()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.batch = workload.batch
        self.variant = variant
        self.monitor: gradscope.Monitor | None = None
        if variant in ("default", "default_copy"):
            # default_copy: the same configuration on a second copy of the model. How far it lands from
            # "default" is the benchmark's resolution: each copy's tensors sit at their own addresses,
            # and that alone moves a copy's time by up to a point on the 0.6 ms MLP.
            self.monitor = gradscope.Monitor(self.model, self.opt, log_dir=log_root / variant)
        elif variant == "everything":
            self.monitor = gradscope.Monitor(self.model, self.opt, log_dir=log_root / "everything", activation_every=1)
        elif variant == "without_live_detection":
            self.monitor = gradscope.Monitor(self.model, self.opt, log_dir=log_root / variant, on_finding=None)
        elif variant == "default_early":
            # the default's spacing in a run's first 1,000 steps, kept throughout
            self.monitor = gradscope.Monitor(
                self.model,
                self.opt,
                log_dir=log_root / variant,
                activation_every=DEFAULT_ACTIVATIONS.early_every,
                update_every=DEFAULT_UPDATES.early_every,
            )
        elif variant == "per_step_only":
            self.monitor = gradscope.Monitor(
                self.model, self.opt, log_dir=log_root / "per_step_only", activation_every=0, update_every=0, on_finding=None
            )
        self.peer = peers.make(variant, self.model, self.opt, log_root / variant) if variant in peers.PEERS else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sink = 0.0
        self.paused_at: float | None = None  # when this copy's last block ended

    def run(self, steps: int, g: torch.Generator) -> float:
        batches = [self.batch(g) for _ in range(steps)]
        self._resume_write_clock()
        start = time.perf_counter()
        if self.peer is not None:
            with peers.quiet():
                for x, y in batches:
                    self.peer.step(x, y)
        else:
            for x, y in batches:
                self.opt.zero_grad()
                loss = nn.functional.cross_entropy(self.model(x), y)
                loss.backward()
                self.record(loss)
                self.opt.step()
        self.paused_at = end = time.perf_counter()
        return (end - start) / steps

    def _resume_write_clock(self) -> None:
        """Move the Monitor's next timed write on by the time the other copies trained since this
        copy's last block. A run on its own writes every ``flush_every`` steps or ``flush_seconds``
        of its training, whichever comes first; interleaved with ten other copies, the wall clock
        would count their time as this copy's and make it write twice as often as it would alone
        (every ~280 steps instead of 500 on the MLP, ~0.5 points of its median)."""
        if self.monitor is not None and self.paused_at is not None:
            self.monitor._flush_deadline += time.perf_counter() - self.paused_at

    def record(self, loss: torch.Tensor) -> None:
        """What the variant does between ``backward()`` and ``optimizer.step()``."""
        if self.monitor is not None:
            self.monitor.step(loss)
        elif self.variant == "floor":
            norms = torch.stack(torch._foreach_norm([p.grad for p in self.params if p.grad is not None]))
            self.sink += float(norms.sum())  # the one host sync per step
        elif self.variant == "per_param_item":
            self.sink += sum(p.grad.norm().item() for p in self.params if p.grad is not None)
        elif self.variant == "histograms":
            for p in self.params:
                if p.grad is not None:
                    self.sink += float(torch.histc(p.grad, bins=64).cpu()[0])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        if self.peer is not None:
            with peers.quiet():
                self.peer.close()


VARIANTS = ("bare", "floor", "default", "default_copy", "default_early", "everything")
REFERENCES = ("per_param_item", "histograms")  # hand-written alternatives, with --references
BREAKDOWN = ("per_step_only",)  # the default's per-step part alone, with --breakdown
WHAT_IF = ("without_live_detection",)  # the default without one of its parts, with --what-if
_HEADERS = {
    "floor": "hand-written floor",
    "default": "gradscope default",
    "default_copy": "gradscope default, a second copy",
    "default_early": "gradscope default, first 1,000 steps",
    "everything": "gradscope everything",
    "per_step_only": "gradscope per-step part only",
    "without_live_detection": "default without live detection",
    "per_param_item": "norm + .item() per parameter",
    "histograms": "histogram of every gradient",
    **peers.HEADERS,
}


@dataclass(frozen=True)
class Result:
    workload: str
    bare_ms: float
    ratios: dict[str, tuple[float, float, float]]  # variant -> (median, min, max) of the per-period ratios
    totals: dict[str, float]  # variant -> its total time over all blocks / the bare loop's
    # variant -> (median, 95% CI low, high) of (variant − floor) / bare per period, in
    # percentage points; empty when the floor was not measured
    above_floor: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def measure(
    workload: Workload,
    *,
    blocks: int,
    steps_per_block: int,
    warmup: int,
    variants: tuple[str, ...] = VARIANTS,
    period: int = PERIOD,
) -> Result:
    """Time the variants in interleaved blocks. The medians and the gap to the floor are taken per
    *period*: consecutive rounds of blocks spanning a whole number of ``period`` steps (the least
    common multiple of the two lengths, or all the blocks when there are fewer), each variant's time
    over those rounds against the bare loop's over the same rounds. Blocks after the last whole period count only in the total times."""
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        loops = {v: _Loop(workload, v, Path(tmp)) for v in variants}
        g = torch.Generator().manual_seed(0)
        for loop in loops.values():
            for _ in range(math.ceil(warmup / steps_per_block)):  # block by block: the batches are made up front
                loop.run(steps_per_block, g)
        times: dict[str, list[float]] = {v: [] for v in variants}
        order = list(variants)
        for _ in range(blocks):
            # Rotated each round: every variant runs in every position, and never right after itself.
            # (Alternately reversed, the first and last variants each ran twice in a row every other
            # round, their first step warm from the block before, which favoured the bare loop.)
            order = order[1:] + order[:1]
            for v in order:
                times[v].append(loops[v].run(steps_per_block, g))
        for loop in loops.values():
            loop.close()
    totals = {v: sum(times[v]) / sum(times["bare"]) for v in variants[1:]}
    # rounds per period: whole periods, so that every span holds as many samples as the next
    rounds = min(blocks, math.lcm(steps_per_block, period) // steps_per_block)
    spans = {v: [sum(ts[i : i + rounds]) for i in range(0, len(ts) - rounds + 1, rounds)] for v, ts in times.items()}
    ratios = {}
    for v in variants[1:]:
        per_period = [t / b for t, b in zip(spans[v], spans["bare"], strict=True)]
        ratios[v] = (statistics.median(per_period), min(per_period), max(per_period))
    above_floor = {}
    if "floor" in times:
        # Paired by period: the variants' blocks of a period ran interleaved, round by round, so
        # the difference cancels the machine's drift that the two medians of ratios each carry.
        for v in variants[1:]:
            if v != "floor":
                points = [100 * (t - f) / b for t, f, b in zip(spans[v], spans["floor"], spans["bare"], strict=True)]
                above_floor[v] = (statistics.median(points), *median_interval(points))
    return Result(workload.name, statistics.median(times["bare"]) * 1e3, ratios, totals, above_floor)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values``: the order statistics
    x₍ₗ₎ and x₍ₙ₋ₗ₊₁₎ whose binomial coverage is at least ``level`` (no assumption on the shape of
    the noise, which on a shared machine has long tails). The whole range when there are too few
    values for that coverage (fewer than 6 at 95%)."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2
    below = 0.0  # P(Binomial(n, ½) ≤ k − 1): the chance the median lies below x₍ₖ₎
    k = 0
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2**n
        if nxt > tail:
            break
        below, k = nxt, k + 1
    if k == 0:
        return (x[0], x[-1])
    return (x[k - 1], x[n - k])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def render(results: list[Result]) -> str:
    variants = list(results[0].ratios) if results else []
    lines = [
        "| workload | bare ms/step | " + " | ".join(_HEADERS[v] for v in variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for r in results:
        cells = [f"{m:.3f}× ({lo:.2f}–{hi:.2f})" for m, lo, hi in (r.ratios[v] for v in variants)]
        lines.append(f"| {r.workload} | {r.bare_ms:.2f} | " + " | ".join(cells) + " |")
    # The median period leaves out the rare slow ones (a write every 500 steps, a live detection):
    # the ratio of total times counts everything a run pays.
    lines += _table(
        "Total time over all blocks, against the bare loop's:", results, variants, lambda r, v: f"{r.totals[v]:.3f}×"
    )
    # The targets are also read against the floor, in points of the bare loop's time: a paired
    # difference per period, with a confidence interval, says whether a gap is more than noise.
    above = [v for v in variants if results and v in results[0].above_floor]
    if above:
        lines += _table(
            "Percentage points above the hand-written floor (median of the per-period differences, 95% confidence interval):",
            results,
            above,
            lambda r, v: "{:+.1f} [{:+.1f}, {:+.1f}]".format(*r.above_floor[v]),
        )
    return "\n".join(lines)


def _table(title: str, results: list[Result], variants: list[str], cell: Callable[[Result, str], str]) -> list[str]:
    """A titled table after a blank line: a row per workload, a column per variant."""
    lines = ["", title, "", "| workload | " + " | ".join(_HEADERS[v] for v in variants) + " |", "|---|" + "---|" * len(variants)]
    return lines + [f"| {r.workload} | " + " | ".join(cell(r, v) for v in variants) + " |" for r in results]


def _indices(text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected workload indices like 0,2 but got {text!r}") from None
    if not all(0 <= i < len(WORKLOADS) for i in indices):
        raise argparse.ArgumentTypeError(f"workload indices run from 0 to {len(WORKLOADS) - 1}; got {text!r}")
    return indices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--blocks", type=int, default=100, help="interleaved blocks per variant (five make a 200-step period)")
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    parser.add_argument(
        "--warmup",
        type=int,
        default=EARLY_STEPS + 40,
        help="steps each copy trains before the timed blocks; by default past the default's denser first 1,000 steps",
    )
    parser.add_argument(
        "--workloads", type=_indices, default=None, help="which workloads to time, as indices: 0,2 (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="a short run for regression checks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--references", action="store_true", help="also time two common hand-written gradient monitors")
    parser.add_argument("--breakdown", action="store_true", help="also time gradscope's per-step recording alone")
    parser.add_argument(
        "--what-if", action="store_true", help="also time the default without live detection: what it costs"
    )
    parser.add_argument("--peers", action="store_true", help="also time the peer tools that are installed (benchmarks/peers.py)")
    parser.add_argument("--peer-blocks", type=int, default=8, help="interleaved blocks per variant in each peer's run")
    parser.add_argument("--peer-steps", type=int, default=20, help="steps per block in each peer's run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    variants = VARIANTS + (BREAKDOWN if args.breakdown else ()) + (WHAT_IF if args.what_if else ()) + (REFERENCES if args.references else ())
    torch.set_num_threads(args.threads)
    blocks, steps, warmup = (6, 20, 20) if args.quick else (args.blocks, args.steps, args.warmup)
    print(f"# gradscope overhead — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {warmup} warm-up steps, {blocks} blocks × {steps} steps, {time.strftime('%Y-%m-%d')}")
    results = []
    for workload in WORKLOADS if args.workloads is None else [WORKLOADS[i] for i in args.workloads]:
        results.append(measure(workload, blocks=blocks, steps_per_block=steps, warmup=warmup, variants=variants))
        print(f"  measured {workload.name}", flush=True)
    print(render(results))
    if args.peers:
        print()
        print(render_peers(measure_peers(args.peer_blocks, args.peer_steps)))
    return 0


def measure_peers(blocks: int, steps: int) -> list[tuple[str, float, dict[str, str], list[str]]]:
    """Each installed peer against the bare loop, with gradscope's default alongside, one workload
    and one peer per measurement: a peer's own processes (wandb's service) then slow only the loops
    measured with it. Per workload: its name, the bare ms/step, a cell per peer, and gradscope's
    default ratio from each of those measurements."""
    names = peers.installed()
    rows = []
    for workload in WORKLOADS:
        cells: dict[str, str] = {}
        defaults: list[str] = []
        bare_ms: list[float] = []
        for name in names:
            try:
                # short runs, for the slowest peers: per block, and gradscope at its first 1,000 steps' spacing
                r = measure(
                    workload, blocks=blocks, steps_per_block=steps, warmup=steps, variants=("bare", "default", name), period=steps
                )
            except Exception as e:  # a peer that cannot watch this model (BackPACK and a transformer)
                cells[name] = f"fails: {peers.describe_failure(e)}"
                continue
            m, lo, hi = r.ratios[name]
            cells[name] = f"{m:.2f}× ({lo:.2f}–{hi:.2f})"
            defaults.append(f"{r.ratios['default'][0]:.3f}×")
            bare_ms.append(r.bare_ms)
        rows.append((workload.name, statistics.median(bare_ms) if bare_ms else math.nan, cells, defaults))
        print(f"  measured the peers on {workload.name}", flush=True)
    return rows


def render_peers(rows: list[tuple[str, float, dict[str, str], list[str]]]) -> str:
    names = list(rows[0][2]) if rows else []  # the peers measure_peers found installed, in its order
    if not names:
        return "No peer is installed (pip install -e \".[peers]\"): none measured."
    lines = [
        "Peers, each measured against the bare loop in a run of its own (median per-block ratio, min–max),",
        "with gradscope's default measured alongside in each of those runs:",
        "",
        "| workload | bare ms/step | " + " | ".join(peers.HEADERS[n] for n in names) + " | gradscope default (first 1,000 steps), same runs |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for workload, bare_ms, cells, defaults in rows:
        lines.append(
            f"| {workload} | {bare_ms:.2f} | " + " | ".join(cells.get(n, "not run") for n in names) + f" | {' / '.join(defaults)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
