"""``gradscope demo``: the main job in one command, with nothing to download.

Trains the classic 784-128-10 network on the handwritten digits that ship with gradscope in four
configurations — healthy, learning rate far too high, a deep sigmoid stack, learning rate far too
low — prints each diagnosis, traces one step of the healthy model, and writes every run with its
HTML report into an output folder.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from gradscope.collect.monitor import Monitor
from gradscope.datasets import load_digits
from gradscope.detect.registry import Findings, diagnose
from gradscope.trace import trace_step

__all__ = ["DEMO_CONFIGS", "DemoConfig", "main", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    name: str
    title: str
    build: Callable[[], nn.Module]
    lr: float


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _deep_sigmoid() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(784, 128), nn.Sigmoid()]
    for _ in range(8):
        layers += [nn.Linear(128, 128), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


DEMO_CONFIGS = (
    DemoConfig("healthy", "784-128-10 ReLU network, SGD lr=0.1", _mlp, 0.1),
    DemoConfig("lr-too-high", "the same network with lr=10 (100× too high)", _mlp, 10.0),
    DemoConfig("deep-sigmoid", "ten sigmoid layers deep, SGD lr=0.1", _deep_sigmoid, 0.1),
    DemoConfig("lr-too-low", "the same network with lr=1e-5 (10,000× too low)", _mlp, 1e-5),
)


def run_demo(
    out: Path, *, steps: int = 400, batch_size: int = 64, seed: int = 0, stream: TextIO = sys.stdout, progress: TextIO | None = None
) -> dict[str, Findings]:
    """Train every demo configuration into ``out/<name>/run`` and write ``out/<name>/report.html``."""
    from gradscope.reporting import report

    torch.manual_seed(seed)
    images, labels = load_digits(size=28)
    results: dict[str, Findings] = {}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for config in DEMO_CONFIGS:
        torch.manual_seed(seed)
        model = config.build()
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        run_dir = out / config.name / "run"
        generator = torch.Generator().manual_seed(seed)
        with Monitor(model, optimizer, log_dir=run_dir, overwrite=True, on_finding=None) as monitor:
            for step in range(steps):
                batch = torch.randint(0, len(images), (batch_size,), generator=generator)
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                monitor.step(loss)
                optimizer.step()
                if progress is not None and ((step + 1) % 10 == 0 or step + 1 == steps):
                    _progress_bar(progress, config.name, step + 1, steps)
        findings = diagnose(run_dir)
        report_path = report(run_dir, out / config.name / "report.html")
        results[config.name] = findings
        print(f"\n== {config.name}: {config.title}", file=stream)
        print(findings.summary(), file=stream)
        print(f"   run: {run_dir}   report: {report_path}", file=stream)
        if config.name == "healthy":
            with torch.no_grad():
                wrong = (model(images).argmax(dim=1) != labels).nonzero().flatten()
            i = int(wrong[0]) if len(wrong) else 0  # a digit the network still gets wrong teaches most
            print(f"\n== one step of the healthy network, traced on training example {i}:", file=stream)
            print(trace_step(model, nn.functional.cross_entropy, images[i : i + 1], labels[i : i + 1], optimizer), file=stream)
    print(f"\nfinished in {time.perf_counter() - started:.0f} s; open {out / 'healthy' / 'report.html'} and the others in a browser", file=stream)
    return results


def _progress_bar(stream: TextIO, name: str, done: int, total: int, width: int = 30) -> None:
    if not stream.isatty():  # a log file gets one line per configuration, not 40 overwritten ones
        if done == total:
            stream.write(f"  trained {name} for {total} steps\n")
            stream.flush()
        return
    filled = width * done // total
    stream.write(f"\r  training {name:<14} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        stream.write("\n")
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    from gradscope.cli import OneLineParser  # usage errors in one line, as every gradscope command

    parser = OneLineParser(prog="gradscope demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-o", "--out", type=Path, default=Path("gradscope-demo"), help="output folder (default: ./gradscope-demo)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per configuration (default: 400)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches drawn (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    run_demo(args.out, steps=args.steps, seed=args.seed, progress=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
