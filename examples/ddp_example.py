"""gradscope under torch.distributed: a 2-rank DistributedDataParallel job on the CPU (gloo backend).

Every rank creates the same Monitor; ranks combine their statistics once per flush and rank 0
writes the run. Run it, then diagnose:

    torchrun --standalone --nproc_per_node=2 examples/ddp_example.py runs/ddp healthy /tmp
    gradscope check runs/ddp

Usage: torchrun --standalone --nproc_per_node=2 ddp_example.py LOG_DIR MODE OUT_DIR
MODE "healthy" trains normally; "nan_rank1" puts a NaN into rank 1's batch at step NAN_STEP;
"loss_on_rank0" passes the loss to step() on rank 0 only, as a loop that logs there might.
Each rank writes what it saw (its losses, and on rank 0 the averaged gradient norms) to OUT_DIR.
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

NAN_STEP = 6
STEPS = 12


def main() -> None:
    log_dir, mode, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    losses, grad_norms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.Monitor(model, opt, log_dir=log_dir, flush_every=4, activation_every=2, on_finding=None) as mon:
            for step in range(STEPS):
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                if mode == "nan_rank1" and rank == 1 and step == NAN_STEP:
                    x[0, 0] = float("nan")
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                losses.append(float(loss))
                grad_norms.append([float(p.grad.norm()) for p in model.parameters()])  # type: ignore[union-attr]
                mon.step(loss if mode != "loss_on_rank0" or rank == 0 else None)
                opt.step()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"losses": losses, "grad_norms": grad_norms}, f)
    dist.barrier()  # leave together: a rank tearing gloo down while the other still talks can abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
