"""Hugging Face Trainer: diagnose ``trainer.train()`` with one callback.

A 2-layer GPT-2 built from a config (nothing downloads) learns synthetic token sequences.
``GradscopeCallback`` records the real loss of every optimizer step — NaN included, which the
Trainer's own logs replace by an average — and the gradients the optimizer applies, then diagnoses
the run at the end. Try a learning rate far too high:

    python examples/transformers_example.py              # healthy
    python examples/transformers_example.py --lr 3       # the loss explodes: an exploding_loss error

Needs ``pip install "gradscope[transformers]"``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradscope.integrations.transformers import GradscopeCallback

VOCAB, LENGTH = 64, 16


class Sequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Arithmetic progressions of token ids (modulo VOCAB) with a random start and stride: learnable."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(log_dir: str | None = None, *, lr: float = 1e-2, max_steps: int = 60) -> GradscopeCallback:
    log_dir = log_dir or tempfile.mkdtemp(prefix="gradscope-transformers-")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gradscope-hf-out-"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        max_grad_norm=0.0,  # record the gradients unclipped (the Trainer clips before callbacks see them)
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    callback = GradscopeCallback(log_dir=log_dir, overwrite=True)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Sequences(64), callbacks=[callback])
    trainer.train()

    run = callback.run
    print(f"recorded {run.n_steps} optimizer steps into {log_dir}; loss {run.loss[0]:.3f} -> {run.loss[-1]:.3f}")
    print(callback.findings.summary())  # a verdict line, then each finding with its first fix
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", nargs="?", help="where to write the run (default: a new temporary directory)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    main(args.log_dir, lr=args.lr, max_steps=args.steps)
