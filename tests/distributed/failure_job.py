"""A 2-rank DDP job (gloo, CPU) for the failure paths of tests/distributed/test_ddp_failures.py.

Usage: torchrun --standalone --nproc_per_node=2 failure_job.py LOG_DIR MODE OUT_DIR
- ``raise_rank1``: rank 1 raises inside ``with Monitor(...)`` at step RAISE_STEP; rank 0 trains on.
- ``destroy_without_close``: the loop never closes its Monitor and destroys the process group
  before exiting, as many DDP scripts end.
- ``stop``: a framework-style ``on_finding="stop"`` policy on a run that diverges; each rank
  leaves its loop when the policy says so, then closes its Monitor.
Each rank writes the number of steps it trained to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradscope
from gradscope.integrations._common import FindingPolicy

RAISE_STEP = 7
STEPS = 12


def main() -> None:
    log_dir, mode, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=1e4 if mode == "stop" else 0.1)
    g = torch.Generator().manual_seed(100 + rank)
    warnings.simplefilter("ignore")
    policy = FindingPolicy("stop") if mode == "stop" else None
    mon = gradscope.Monitor(
        model, opt, log_dir=log_dir, flush_every=2 if mode == "stop" else 5, detect_every=1 if mode == "stop" else None,
        on_finding=policy.monitor_option() if policy is not None else None,
    )  # fmt: skip
    trained = 0

    def train(steps: int) -> None:
        nonlocal trained
        for step in range(steps):
            if mode == "raise_rank1" and rank == 1 and step == RAISE_STEP:
                raise ValueError("a bad sample on rank 1")
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            trained += 1
            if policy is not None and policy.should_stop:
                return

    def report() -> None:
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"trained": trained}, f)

    if mode == "raise_rank1":
        try:
            with mon:
                train(STEPS)
        finally:
            report()
        return
    train(60 if mode == "stop" else STEPS)
    report()
    if mode == "stop":
        mon.close()
    # Both ranks reach the end before either tears the group down: gloo can abort a rank whose peer
    # closed its connections first ("terminate called without an active exception", seen once in
    # CI), a teardown race of the job's own, not what these tests look at.
    dist.barrier()
    dist.destroy_process_group()  # destroy_without_close: the Monitor is closed at exit, after this


if __name__ == "__main__":
    main()
