"""torch.distributed support: every rank collects, ranks combine their statistics once per flush
with one packed collective (in the same order on every rank), and only rank 0 writes the run.

gradscope never starts processes or process groups: it rides the user's ``torch.distributed``
setup (``torchrun`` + DistributedDataParallel). Under DDP the gradients are already averaged
across ranks by the time they are read, so gradient, weight and update norms are combined by a
mean (never a sum, which would inflate them by the world size); losses and activation statistics
differ per rank and are combined so that a NaN on any one rank stays visible, and each rank's loss
is kept so the rank that went wrong can be named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gradscope.errors import UnsupportedSetupError

__all__ = ["DistributedContext", "refuse_sharded_parameters"]

# Per-rank loss columns are kept up to this world size; beyond it only the combined loss and the
# first non-finite rank are stored (a column per rank per step would dominate the run's size).
MAX_RANK_COLUMNS = 256

# The last exchange's collective stays referenced here until the next one. gloo's worker thread
# lets go of a finished all_gather a moment after it returns (a later barrier() can hold it even
# longer), and if that was the last reference, the thread frees the tensors, which takes the GIL.
# At interpreter exit it cannot, and the process aborts ("terminate called without an active
# exception"). Held here, the collective is freed by Python, on its own thread.
_last_exchange: list[dist.Work] = []


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int

    @classmethod
    def detect(cls) -> DistributedContext | None:
        """The current process group when one is initialised with more than one rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size()
        return cls(dist.get_rank(), world) if world > 1 else None

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def keeps_rank_losses(self) -> bool:
        return self.world_size <= MAX_RANK_COLUMNS

    @property
    def connected(self) -> bool:
        """Whether the process group still exists (a script may destroy it before the Monitor closes)."""
        return dist.is_available() and dist.is_initialized()

    def broadcast_flag(self, value: bool, device: torch.device) -> bool:
        """Rank 0's ``value``, on every rank (one collective; every rank must call it)."""
        flag = torch.tensor([1.0 if value else 0.0], device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def gather(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's copy of ``tensors``, each with a leading world dimension, in one collective."""
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, flat, async_op=True)
        assert work is not None
        work.wait()
        _last_exchange[:] = [work]
        stacked = torch.stack(gathered)  # (world, total)
        for t in (flat, *gathered):
            t.untyped_storage().resize_(0)  # the kept collective keeps these tensors (_last_exchange), not their memory
        out, offset = [], 0
        for t in tensors:
            out.append(stacked[:, offset : offset + t.numel()].reshape(self.world_size, *t.shape))
            offset += t.numel()
        return out


def refuse_sharded_parameters(model: nn.Module) -> None:
    """Sharded parameters would make every per-rank norm a partial one; refuse rather than be wrong."""
    for module in model.modules():
        if type(module).__name__ in {"FullyShardedDataParallel", "FSDPModule"} or type(module).__name__.startswith("FSDP"):
            raise UnsupportedSetupError(
                f"expected unsharded parameters but {type(module).__name__} shards them; gradscope does not yet combine "
                "sharded gradient norms across ranks, so it refuses rather than record partial norms. Monitor a "
                "DistributedDataParallel model instead"
            )
    for name, param in model.named_parameters():
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            raise UnsupportedSetupError(
                f"expected unsharded parameters but {name!r} is a DTensor (FSDP2 / tensor parallel); gradscope does not "
                "yet combine sharded gradient norms across ranks, so it refuses rather than record partial norms"
            )
