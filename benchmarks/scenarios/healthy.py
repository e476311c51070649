"""Healthy scenarios: training that works, in the many shapes healthy training takes.

Each of these must produce no warning or error. They cover what a detector tuned on one clean curve
would mistake for a problem: noisy small-batch losses, a run that converged early and sits flat,
warmup and schedules, gradient accumulation, dropout, frozen layers, recurrent and attention models,
deep normalised residual stacks, regression, and AMP's occasional inf-skipped step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.scenarios import synth
from benchmarks.scenarios.core import Context, EvalSet, digits_split, sample_batch, scenario
from benchmarks.scenarios.loops import fit


def _mlp(inputs: int = 64, hidden: int = 128, classes: int = 10, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor



@scenario()
def mlp_digits(ctx: Context, lr: float = 0.1, steps: int = 300) -> nn.Module:
    """ReLU MLP 64-128-128-10 on the digits, plain SGD."""
    x, y, xt, yt = digits_split()
    model = _mlp()
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


class SmallCNN(nn.Module):
    """Two 3×3 convolutions and a linear head on 8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.view(-1, 1, 8, 8))  # (B, 32, 4, 4)
        logits: torch.Tensor = self.head(h.flatten(1))
        return logits


@scenario()
def cnn_digits(ctx: Context, lr: float = 0.05, steps: int = 250) -> nn.Module:
    """Small CNN on the 8×8 digits, SGD with momentum 0.9."""
    x, y, xt, yt = digits_split()
    model = SmallCNN()
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def noisy_small_batch(ctx: Context, lr: float = 0.03, steps: int = 600) -> nn.Module:
    """Batches of 4: every step's loss is a noisy estimate, swinging widely while the trend goes down."""
    x, y, xt, yt = digits_split()
    model = _mlp(hidden=64)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps, batch_size=4)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def converged_flat(ctx: Context, steps: int = 400) -> nn.Module:
    """An easy problem (separable blobs) solved within ~50 steps, then 350 flat steps near zero loss."""
    x, y = synth.blobs(2048, 16, 4, ctx.gen)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-2), x[:1536], y[:1536], steps=steps, batch_size=32)
    ctx.eval = EvalSet(x[1536:], y[1536:], n_classes=4)
    return model


@scenario()
def warmup_cosine(ctx: Context, steps: int = 400) -> nn.Module:
    """AdamW with 40 steps of linear warmup, then cosine decay to zero."""
    x, y, xt, yt = digits_split()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(40, steps))
    fit(ctx, model, opt, x, y, steps=steps, scheduler=sched)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def step_decay(ctx: Context, steps: int = 450) -> nn.Module:
    """SGD with momentum, learning rate divided by 10 every 150 steps: the loss drops in stairs."""
    x, y, xt, yt = digits_split()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.1)
    fit(ctx, model, opt, x, y, steps=steps, scheduler=sched)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def grad_accumulation(ctx: Context, steps: int = 200, micro: int = 4) -> nn.Module:
    """Four micro-batches of 16 accumulated into each optimizer step (``loss / 4`` per micro-batch)."""
    x, y, xt, yt = digits_split()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with ctx.session(model, opt) as session:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(micro):
                xb, yb = sample_batch(ctx, x, y, 16)
                loss = F.cross_entropy(model(xb), yb) / micro
                loss.backward()
                total += loss.item()
            session.step(total)
            opt.step()
    model.eval()
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def dropout_mlp(ctx: Context, steps: int = 400) -> nn.Module:
    """MLP with dropout 0.5 after each hidden layer: a noisier, higher training loss that is still healthy."""
    x, y, xt, yt = digits_split()
    model = _mlp(dropout=0.5)
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def frozen_body_finetune(ctx: Context, steps: int = 250) -> nn.Module:
    """Fine-tune only a new head: a body pretrained on digits 0-4 is frozen (``requires_grad=False``)."""
    x, y, xt, yt = digits_split()
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    # Pretraining, unmonitored: the body learns features from the first five classes only.
    pre_head = nn.Linear(64, 5)
    pre_opt = torch.optim.Adam([*body.parameters(), *pre_head.parameters()], lr=1e-3)
    keep = y < 5
    xp, yp = x[keep], y[keep]
    for _ in range(200):
        xb, yb = sample_batch(ctx, xp, yp, 64)
        pre_opt.zero_grad()
        F.cross_entropy(pre_head(body(xb)), yb).backward()
        pre_opt.step()
    pre_opt.zero_grad(set_to_none=True)
    for p in body.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(body, nn.Linear(64, 10))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    fit(ctx, model, opt, x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


class SequenceLSTM(nn.Module):
    def __init__(self, channels: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (B, T, H)
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


@scenario()
def lstm_sequence(ctx: Context, steps: int = 300) -> nn.Module:
    """LSTM reading 20-step sequences: which of 4 channels has the largest sum over time."""
    x, y = synth.channel_sum_sequences(3000, 20, 4, ctx.gen)
    model = SequenceLSTM(4, 32, 4)
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-2), x[:2500], y[:2500], steps=steps)
    ctx.eval = EvalSet(x[2500:], y[2500:], n_classes=4)
    return model


class TokenTransformer(nn.Module):
    """Embedding + learned positions, a post-LN ``nn.TransformerEncoder``, mean pooling, linear head."""

    def __init__(self, vocab: int, length: int, classes: int, d_model: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x) + self.pos)  # (B, T, D)
        logits: torch.Tensor = self.head(h.mean(dim=1))
        return logits


@scenario(fast=False)
def transformer_warmup(ctx: Context, steps: int = 300, lr: float = 1e-3, warmup: int = 50) -> nn.Module:
    """Two-layer transformer encoder on token sequences, Adam with 50 warmup steps then cosine decay."""
    x, y = synth.marker_tokens(3000, 16, 8, 4, ctx.gen)
    model = TokenTransformer(8, 16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(warmup, steps))
    fit(ctx, model, opt, x[:2500], y[:2500], steps=steps, scheduler=sched)
    ctx.eval = EvalSet(x[2500:], y[2500:], n_classes=4)
    return model


class PreNormResidualMLP(nn.Module):
    """``depth`` blocks of ``x + Linear(GELU(Linear(LayerNorm(x))))``: deep, but every block has a skip."""

    def __init__(self, inputs: int, width: int, depth: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits


@scenario(fast=False)
def deep_residual_layernorm(ctx: Context, steps: int = 300, depth: int = 16) -> nn.Module:
    """A 16-block pre-LayerNorm residual MLP (34 linear layers deep) on the digits, Adam."""
    x, y, xt, yt = digits_split()
    model = PreNormResidualMLP(64, 64, depth, 10)
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


class ResidualBNBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return out


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 16, blocks: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBNBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x.view(-1, 1, 8, 8)))  # (B, C, 8, 8)
        logits: torch.Tensor = self.head(h.mean(dim=(2, 3)))
        return logits


@scenario(fast=False)
def deep_resnet_batchnorm(ctx: Context, steps: int = 200) -> nn.Module:
    """A 13-convolution ResNet with BatchNorm on the 8×8 digits, SGD with momentum."""
    x, y, xt, yt = digits_split()
    model = SmallResNet()
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), x, y, steps=steps, batch_size=32)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def regression_synthetic(ctx: Context, steps: int = 600) -> nn.Module:
    """GELU MLP regressing a smooth nonlinear function of 8 inputs, MSE loss, Adam."""
    x, y, _ = synth.smooth_regression(3000, 8, ctx.gen)
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-2), x[:2500], y[:2500], steps=steps, loss_fn=F.mse_loss)
    ctx.eval = EvalSet(x[2500:], y[2500:], kind="regression")
    return model


@scenario()
def adam_mlp_28px(ctx: Context, steps: int = 300) -> nn.Module:
    """The classic 784-128-10 network on the digits upsampled to 28×28, Adam lr 1e-3."""
    x, y, xt, yt = digits_split(size=28)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario()
def amp_gradscaler(ctx: Context, steps: int = 400, init_scale: float = 2.0**24, growth_interval: int = 50) -> nn.Module:
    """float16 autocast on the CPU with ``torch.amp.GradScaler("cpu")``: it skips the steps whose scaled
    gradients overflow (the first ones, then one after each scale growth), as mixed precision does."""
    x, y, xt, yt = digits_split()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    skipped = 0
    with ctx.session(model, opt) as session:
        for _ in range(steps):
            xb, yb = sample_batch(ctx, x, y, 64)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the recorded gradients are the true (unscaled) ones, inf on overflow
            session.step(loss)
            scale = scaler.get_scale()
            scaler.step(opt)  # skipped when a gradient is inf/NaN
            scaler.update()
            skipped += scaler.get_scale() < scale
    model.eval()
    ctx.measured["skipped_steps"] = float(skipped)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model
