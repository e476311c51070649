"""Measure gradscope's detectors on the scenario suite.

    python -m benchmarks.detection                      # every scenario, seeds 0 and 1, writes docs/detection-benchmark.md
    python -m benchmarks.detection --fast               # the fast subset (what CI runs); prints only
    python -m benchmarks.detection --only deep_sigmoid nan_in_batch --seeds 0 1 2

Every scenario trains under ``gradscope.Monitor(model, opt, log_dir=..., on_finding=None)`` in a worker
process, ``gradscope.diagnose(run)`` reads the run back, and the findings are scored against the
scenario's label (see :mod:`benchmarks.scoring`). It prints one row per scenario and seed, then
recall, false alarms, right first fix and the median delay from fault onset to detection.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

import gradscope
from benchmarks.scenarios import all_scenarios, get_scenario
from benchmarks.scenarios.core import Scenario
from benchmarks.scoring import RunOutcome, RunScore, Summary, render_markdown, render_text, score_run, summarize

__all__ = ["main", "run_benchmark", "run_one"]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "detection-benchmark.md"


def run_one(name: str, seed: int, workdir: str) -> RunOutcome:
    """Train one scenario under a Monitor in ``workdir/<name>-s<seed>`` and diagnose the run."""
    torch.set_num_threads(1)  # two workers on two cores; more threads per tiny model only contend
    scenario = get_scenario(name)
    log_dir = os.path.join(workdir, f"{name}-s{seed}")
    started, cpu_started = time.perf_counter(), time.process_time()
    error: str | None = None
    # The label the run is scored against is the one the run measured: some onsets are found while training.
    label = scenario.label
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            label = scenario.run(seed, log_dir=log_dir).label
        except Exception as e:  # a crash is a result to report, not a reason to lose the other runs
            error = f"training raised {type(e).__name__}: {e}"
    notes = sorted({str(w.message)[:200] for w in caught if str(w.message).startswith("gradscope:")})
    findings: tuple[gradscope.Finding, ...] = ()
    try:
        findings = tuple(gradscope.diagnose(log_dir))
    except Exception as e:
        error = (error + "; " if error else "") + f"diagnose raised {type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    return RunOutcome(
        name, seed, label, findings, time.perf_counter() - started, error, tuple(notes), time.process_time() - cpu_started
    )


def _worker(name: str, seed: int, workdir: str) -> dict[str, object]:
    return run_one(name, seed, workdir).to_dict()


def run_benchmark(
    scenarios: Sequence[Scenario], seeds: Sequence[int], *, jobs: int = 2, workdir: str | None = None
) -> list[RunOutcome]:
    """Run every scenario on every seed (``jobs`` worker processes) and return the outcomes in suite order."""
    keep = workdir is not None
    root = workdir if workdir is not None else tempfile.mkdtemp(prefix="gradscope-bench-")
    Path(root).mkdir(parents=True, exist_ok=True)
    work = [(s.name, seed) for s in scenarios for seed in seeds]
    try:
        if jobs <= 1:
            outcomes = [run_one(name, seed, root) for name, seed in work]
        else:
            # spawn: a forked child would inherit torch's thread pools in whatever state they were.
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = {pool.submit(_worker, name, seed, root): (name, seed) for name, seed in work}
                done = {futures[f]: RunOutcome.from_dict(f.result()) for f in cf.as_completed(futures)}
            outcomes = [done[item] for item in work]
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return outcomes


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}"


def _header(seeds: Sequence[int], n_scenarios: int, seconds: float, cpu: float, jobs: int, fast: bool) -> list[str]:
    detectors = sorted(gradscope.registered_detectors())
    subset = "the fast subset of " if fast else ""
    return [
        f"Measured {datetime.date.today().isoformat()} on {_machine()}; gradscope {gradscope.__version__}.",
        "",
        f"{subset}{n_scenarios} scenarios × {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) = "
        f"{n_scenarios * len(seeds)} runs in {jobs} worker process(es), "
        f"{seconds:.0f} s wall clock in total ({cpu:.0f} s of CPU time in the runs). "
        f"Detectors registered: {', '.join(detectors) or 'none'}.",
        "",
        "Regenerate this page with `python -m benchmarks.detection` (about 1 min of CPU time per seed; "
        "`--fast` runs the subset CI uses, `--only NAME …` a few scenarios, `--check` exits 1 when a target "
        "is missed). Each scenario (in `benchmarks/scenarios/`) trains a tiny model under "
        "`gradscope.Monitor(..., on_finding=None)`; `gradscope.diagnose` then reads the run. Every label is "
        "verified with plain torch by `tests/benchmarks/test_bench_labels.py`.",
        "",
        "A faulty run is *detected* when a finding with one of the expected codes is a warning or an error; "
        "the *first fix* is the first fix of that finding (the first such finding in diagnose order: most "
        "severe, then earliest), and it is *right* when its kind is one of the expected kinds; the *delay* is "
        "the step of the earliest such finding minus the step at which the fault sets in. A healthy run "
        "raises a *false alarm* with any warning or error; `info` findings are listed but never count.",
    ]


def _descriptions(scenarios: Sequence[Scenario]) -> list[tuple[str, ...]]:
    return [
        (s.name, "healthy" if s.healthy else "fault", s.description, s.label.fault or "—") for s in scenarios
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per scenario (default: 0 1)")
    parser.add_argument("--fast", action="store_true", help="only the fast subset of scenarios")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help="only these scenarios (see --list)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the Markdown table here (default: docs/detection-benchmark.md for a full run; subsets write only when given; "
        "'-' never writes)",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default: 2)")
    parser.add_argument("--keep-runs", metavar="DIR", help="keep the recorded runs in DIR instead of a temporary directory")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)

    scenarios = all_scenarios(fast_only=args.fast)
    if args.only:
        try:
            wanted = [get_scenario(name) for name in args.only]
        except KeyError as e:
            parser.error(str(e.args[0]))
        scenarios = wanted
    if args.list:
        for s in scenarios:
            kind = "healthy" if s.healthy else "fault  "
            print(f"{s.name:28s} {kind} {'fast' if s.fast else 'slow'}  {s.description}")
        return 0

    started = time.perf_counter()
    outcomes = run_benchmark(scenarios, args.seeds, jobs=args.jobs, workdir=args.keep_runs)
    seconds = time.perf_counter() - started
    scores: list[RunScore] = [score_run(o) for o in outcomes]
    summary: Summary = summarize(scores)
    print(render_text(scores, summary))
    for o in outcomes:
        for note in o.notes:
            print(f"note: {o.scenario}/{o.seed}: {note}")
    cpu = sum(o.cpu_seconds for o in outcomes)
    print(f"total runtime: {seconds:.1f} s wall clock for {len(outcomes)} runs ({args.jobs} worker process(es)); {cpu:.1f} s CPU in the runs")

    out = args.out
    subset = args.fast or bool(args.only)
    if out is None and not subset:
        out = DEFAULT_OUT
    if out is not None and str(out) != "-":
        header = _header(args.seeds, len(scenarios), seconds, cpu, args.jobs, args.fast)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(scores, summary, header=header, descriptions=_descriptions(scenarios)))
        print(f"wrote {out}")
    return 1 if args.check and not summary.meets_targets else 0


if __name__ == "__main__":
    sys.exit(main())
