"""The tools people use today to watch gradients, set up as their documentation shows, for
``python -m benchmarks.overhead --peers``. Each runs only where it is installed (they are not
gradscope's dependencies: ``pip install -e ".[peers]"``, best in a virtualenv of its own, see
docs/performance.md):

- ``wandb``: ``wandb.watch(model, log="gradients", log_freq=1)`` in offline mode, and the loss
  logged every step (``watch`` computes its histograms in backward hooks and sends them with
  the next ``wandb.log``);
- ``tensorboard``: a histogram of every gradient and the loss, every step, with
  ``torch.utils.tensorboard.SummaryWriter``;
- ``torchmortem``: ``Autopsy(model, optimizer)`` with its default sampling, ``step(loss=...)``
  after each optimizer step;
- ``cockpit``: Cockpit's "economy" configuration, on a BackPACK-extended model and loss (it runs
  the backward pass inside its context). BackPACK supports none of the transformer's modules.

Each peer trains its own copy of the workload's model through :meth:`Peer.step`, one whole
training step, so that those whose loop differs (Cockpit's backward) are set up as documented.
"""

from __future__ import annotations

__all__ = ["HEADERS", "PEERS", "Peer", "describe_failure", "installed", "make", "quiet"]

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

PEERS = ("wandb", "tensorboard", "torchmortem", "cockpit")
HEADERS = {
    "wandb": 'wandb.watch(log="gradients", log_freq=1)',
    "tensorboard": "TensorBoard histograms of every gradient",
    "torchmortem": "torchmortem (default)",
    "cockpit": 'Cockpit "economy"',
}
_MODULES = {"wandb": "wandb", "tensorboard": "tensorboard", "torchmortem": "torchmortem", "cockpit": "cockpit"}


def installed() -> list[str]:
    """The peers importable here, in table order."""
    return [name for name in PEERS if importlib.util.find_spec(_MODULES[name]) is not None]


class Peer:
    """One peer watching one model: a whole training step with the peer's work in it."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model = model
        self.opt = opt

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.record(loss)
        self.opt.step()
        self.after_step(loss)

    def record(self, loss: torch.Tensor) -> None:
        """The peer's work between ``backward()`` and ``optimizer.step()``."""

    def after_step(self, loss: torch.Tensor) -> None:
        """The peer's work after ``optimizer.step()``."""

    def close(self) -> None:
        """End the peer's run (its own analysis or writes, not timed)."""


class _Wandb(Peer):
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, log_root: Path) -> None:
        super().__init__(model, opt)
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # the global run: wandb's gradient hooks log to wandb.run
        self.run = wandb.init(mode="offline", dir=str(log_root), project="gradscope-overhead")
        wandb.watch(model, log="gradients", log_freq=1)

    def record(self, loss: torch.Tensor) -> None:
        self.run.log({"loss": loss.item()})

    def close(self) -> None:
        import wandb

        wandb.unwatch(self.model)
        self.run.finish()


class _TensorBoard(Peer):
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, log_root: Path) -> None:
        super().__init__(model, opt)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_root / "tensorboard"))
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.global_step = 0

    def record(self, loss: torch.Tensor) -> None:
        self.writer.add_scalar("loss", loss.item(), self.global_step)
        for name, p in self.named:
            if p.grad is not None:
                self.writer.add_histogram(f"grad/{name}", p.grad, self.global_step)
        self.global_step += 1

    def close(self) -> None:
        self.writer.close()


class _Torchmortem(Peer):
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, log_root: Path) -> None:
        super().__init__(model, opt)
        from torchmortem import Autopsy

        self.autopsy = Autopsy(model, optimizer=opt)
        self.autopsy.attach()

    def after_step(self, loss: torch.Tensor) -> None:
        self.autopsy.step(loss=loss.item())

    def close(self) -> None:
        self.autopsy.detach()


class _Cockpit(Peer):
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, log_root: Path) -> None:
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration

        super().__init__(extend(model), opt)
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
        self.cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
        self.global_step = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        out = self.model(x)
        loss = self.loss_fn(out, y)
        info = {"batch_size": x.shape[0], "individual_losses": self.individual_loss_fn(out, y), "loss": loss, "optimizer": self.opt}
        with self.cockpit(self.global_step, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(self.global_step))
        self.opt.step()
        self.global_step += 1


_MAKERS: dict[str, Callable[[nn.Module, torch.optim.Optimizer, Path], Peer]] = {
    "wandb": _Wandb,
    "tensorboard": _TensorBoard,
    "torchmortem": _Torchmortem,
    "cockpit": _Cockpit,
}


def make(name: str, model: nn.Module, opt: torch.optim.Optimizer, log_root: Path) -> Peer:
    """The peer ``name`` watching ``model``, its logs under ``log_root``."""
    log_root.mkdir(parents=True, exist_ok=True)
    with quiet():
        return _MAKERS[name](model, opt, log_root)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The peers' own warnings and log lines (deprecations, offline notices) are not the point."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def describe_failure(error: BaseException) -> str:
    """One line for the table when a peer cannot watch a workload (Cockpit on a transformer)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:80]}"


