"""How gradscope's memory, disk and analysis time grow with the length of a run.

1. Collector memory: a small model trains for many steps under a Monitor; the process RSS after
   warm-up and at the end must be within a few MB (nothing grows with steps).
2. Store size: bytes on disk per step per layer.
3. ``diagnose`` and ``report`` time and peak RSS on runs of 1k, 10k and 100k steps of a 50-layer model,
   each in a fresh process. The runs are written through the Monitor's own writer with realistic
   synthetic values (training 100k steps of a 50-layer model would take most of the benchmark).

Run:  python -m benchmarks.scale [--steps 1000 10000 100000] [--rss-steps 50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradscope
from gradscope.store import schema


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def collector_rss(steps: int, log_dir: Path) -> dict[str, float]:
    """RSS after warm-up vs at the end of a long monitored run of a small MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    warm = min(5000, steps // 5)
    samples = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.Monitor(model, opt, log_dir=log_dir, overwrite=True) as mon:
            for step in range(steps):
                idx = torch.randint(0, 256, (32,))
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                mon.step(loss)
                opt.step()
                if step + 1 == warm:
                    samples["rss_after_warmup_mb"] = rss_mb()
            samples["rss_at_end_mb"] = rss_mb()
    samples["steps"] = steps
    return samples


def write_long_run(path: Path, steps: int, n_layers: int = 50, chunk: int = 1000) -> int:
    """A ``steps``-long run of a ``n_layers``-Linear model, written through the Monitor's writer."""
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(4, 4), nn.ReLU()]
    model = nn.Sequential(*layers)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = gradscope.Monitor(model, log_dir=path, overwrite=True, on_finding=None)
        mon.step(torch.tensor(1.0))  # writes the header and forward order
        writer = mon._writer
        step_cols = _columns(writer.conn, schema.STEP_STREAM)
        n_step_cols = len(step_cols)
        n_fwd_cols = len(_columns(writer.conn, schema.FORWARD_STREAM))
        metric = np.array([m for _, m in step_cols])
        flags = np.isin(metric, list(_FLAGS))  # 0: a healthy run has no missing or non-finite values
        on_updates = np.isin(metric, list(_ON_UPDATES))  # measured on the update cadence's steps, NaN between
        decay = np.geomspace(2.3, 0.05, steps)
        for start in range(1, steps, chunk):
            stop = min(start + chunk, steps)
            n = stop - start
            data = rng.lognormal(-2, 0.3, size=(n, n_step_cols)).astype(np.float32)
            data[:, 0] = decay[start:stop] * rng.lognormal(0, 0.1, n)
            data[:, flags] = 0.0
            steps_here = np.arange(start, stop)
            data[np.ix_(~mon.update_cadence.due_steps(steps_here), on_updates)] = np.nan
            writer.append(schema.STEP_STREAM, np.arange(start, stop), data)
            act_steps = steps_here[mon.activation_cadence.due_steps(steps_here)]  # the default cadence
            writer.append(schema.FORWARD_STREAM, act_steps, rng.uniform(0, 1, size=(len(act_steps), n_fwd_cols)).astype(np.float32))
        mon._step = steps
        mon._base = steps
        mon.close()
    return n_layers


# Step-stream metrics that are 0/1 flags, and those measured only on the update cadence's steps.
_FLAGS = {"grad_nonfinite", "grad_missing", "param_grad_missing", "output_nonfinite", "optimizer_skipped"}
_ON_UPDATES = {"weight_norm", "update_norm", "param_weight_norm", "param_update_norm"}


def _columns(conn: object, stream: str) -> list[tuple[str, str]]:
    from gradscope.store.sqlite import read_columns

    return read_columns(conn, stream)  # type: ignore[arg-type]


_ANALYSE = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import gradscope
t0 = time.perf_counter(); run = gradscope.load(sys.argv[1]); t1 = time.perf_counter()
findings = gradscope.diagnose(run); t2 = time.perf_counter()
from gradscope.reporting import report
report(run, sys.argv[2], findings=findings); t3 = time.perf_counter()  # the findings above: no second diagnosis
# VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the parent from before exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": t1 - t0, "diagnose_s": t2 - t1, "report_s": t3 - t2, "peak_rss_mb": hwm / 1024}))
"""


def analyse(path: Path) -> dict[str, float]:
    out = path.parent / f"{path.name}.html"
    proc = subprocess.run([sys.executable, "-c", _ANALYSE, str(path), str(out)], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["report_mb"] = out.stat().st_size / 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--rss-steps", type=int, default=50000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        rss = collector_rss(args.rss_steps, root / "rss")
        print(f"collector RSS over {rss['steps']:,} steps: {rss['rss_after_warmup_mb']:.1f} MB after warm-up, "
              f"{rss['rss_at_end_mb']:.1f} MB at the end ({rss['rss_at_end_mb'] - rss['rss_after_warmup_mb']:+.1f} MB), "
              f"{time.perf_counter() - started:.0f} s")
        print("| steps | layers | run on disk | bytes/step/layer | load s | diagnose s | report s | peak RSS MB | report MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for steps in args.steps:
            path = root / f"run{steps}"
            layers = write_long_run(path, steps)
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            a = analyse(path)
            print(f"| {steps:,} | {layers} | {size / 1e6:.1f} MB | {size / steps / layers:.0f} | {a['load_s']:.2f} | "
                  f"{a['diagnose_s']:.2f} | {a['report_s']:.2f} | {a['peak_rss_mb']:.0f} | {a['report_mb']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
