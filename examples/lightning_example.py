"""Lightning: diagnose a ``Trainer.fit`` with one callback.

A small LightningModule learns the handwritten digits bundled with gradscope (nothing downloads).
``GradscopeCallback`` records every optimizer step and, at the end of ``fit``, diagnoses the run.
Try a learning rate far too high to see a finding stop the fit:

    python examples/lightning_example.py                 # healthy
    python examples/lightning_example.py --lr 50         # diverges; on_finding="stop" ends the fit early

Needs ``pip install "gradscope[lightning]"``.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from gradscope.datasets import load_digits
from gradscope.integrations.lightning import GradscopeCallback


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(log_dir: str | None = None, *, lr: float = 0.05, max_epochs: int = 3) -> GradscopeCallback:
    log_dir = log_dir or tempfile.mkdtemp(prefix="gradscope-lightning-")
    torch.manual_seed(0)
    images, labels = load_digits(size=8)  # (1797, 64) standardised, labels 0-9
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64, shuffle=True)

    # Live findings come after each write to the run; this 87-step example writes every 20 steps
    # rather than the default 500 (or 2 s), so a diverging fit is stopped within its first epoch.
    callback = GradscopeCallback(log_dir=log_dir, on_finding="stop", overwrite=True, flush_every=20)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(DigitsClassifier(lr), loader)

    run = callback.run
    print(f"recorded {run.n_steps} optimizer steps into {log_dir}; loss {run.loss[0]:.3f} -> {run.loss[-1]:.3f}")
    print(callback.findings.summary())  # a verdict line, then each finding with its first fix
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", nargs="?", help="where to write the run (default: a new temporary directory)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.log_dir, lr=args.lr, max_epochs=args.epochs)
