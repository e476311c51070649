"""Sharded parameters would give per-rank partial norms: gradscope refuses them with a clear error."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    import gradscope
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model)
    try:
        gradscope.Monitor(model)
    except gradscope.UnsupportedSetupError as e:
        print("refused:", e)
    dist.destroy_process_group()
    """
)


def test_fully_sharded_model_is_refused_not_measured_wrong() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("refused:"))
    assert "expected unsharded parameters" in line and "DistributedDataParallel" in line
