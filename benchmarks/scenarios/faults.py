"""Fault scenarios: one injected fault each, labelled with the codes and the first fix that describe it.

Every fault is a knob of its scenario function (a learning rate, an init scale, a ``.detach()``);
``tests/benchmarks/test_bench_labels.py`` turns the knob back and checks that the same run then
trains well, and measures the symptom with plain torch, so no label is taken on trust.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.scenarios import synth
from benchmarks.scenarios.core import Context, EvalSet, Label, digits_split, sample_batch, scenario
from benchmarks.scenarios.healthy import SequenceLSTM, SmallCNN, TokenTransformer, _warmup_cosine
from benchmarks.scenarios.loops import fit

# What divergence looks like to the detectors: the loss blows up, goes non-finite, or the gradients do.
DIVERGED = ("exploding_loss", "nonfinite", "exploding_gradients")


def _mlp(depth: int, width: int, act: type[nn.Module], inputs: int = 64, classes: int = 10) -> nn.Sequential:
    """``depth`` hidden Linear+activation pairs, then a linear classifier."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), act()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- learning rate


@scenario(label=Label("SGD learning rate 100x too high: the loss diverges", DIVERGED, ("learning_rate",), 0))
def lr_too_high_sgd(ctx: Context, lr: float = 10.0, steps: int = 200) -> nn.Module:
    """ReLU MLP on the digits with SGD at lr=10 (it trains at 0.1)."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, nn.ReLU)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(
    label=Label(
        "Adam learning rate 300x too high: the loss blows up, then every ReLU dies and it never recovers",
        (*DIVERGED, "dead_units"),
        ("learning_rate",),
        0,
    )
)
def lr_too_high_adam(ctx: Context, lr: float = 0.3, steps: int = 200) -> nn.Module:
    """ReLU MLP on the digits with Adam at lr=0.3 (it trains at 1e-3)."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, nn.ReLU)
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=lr), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(label=Label("SGD learning rate ~10,000x too low: the loss barely moves", ("stalled_training",), ("learning_rate",), 0))
def lr_too_low(ctx: Context, lr: float = 1e-5, steps: int = 400) -> nn.Module:
    """ReLU MLP on the digits with SGD at lr=1e-5 (it trains at 0.1)."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, nn.ReLU)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


# ---------------------------------------------------------------------------- activations and depth


@scenario(
    label=Label(
        "10 stacked sigmoid layers: the gradient dies on its way back to the first layers",
        ("vanishing_gradients", "saturated_activations"),
        ("activation",),
        0,
    )
)
def deep_sigmoid(ctx: Context, act: type[nn.Module] = nn.Sigmoid, depth: int = 10, steps: int = 300) -> nn.Module:
    """A 10-hidden-layer sigmoid MLP on the digits, He-initialised, SGD lr=0.1, no normalisation or skips."""
    x, y, xt, yt = digits_split()
    model = _mlp(depth, 64, act)
    # He init, as for a ReLU net: the same network with ReLU in place of Sigmoid trains well.
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(
    label=Label(
        "10 stacked tanh layers initialised N(0, 1): the units saturate at ±1 and the gradient dies",
        ("saturated_activations", "vanishing_gradients"),
        ("initialization",),
        0,
    )
)
def deep_tanh_saturated(ctx: Context, std: float | None = 1.0, depth: int = 10, steps: int = 300) -> nn.Module:
    """A 10-hidden-layer tanh MLP (width 64) on the digits, weights N(0, 1) (``nn.init.normal_``), SGD lr=0.05.

    ``std=None`` is the counterfactual: Xavier init with the tanh gain, as ``nn.init`` recommends.
    """
    x, y, xt, yt = digits_split()
    model = _mlp(depth, 64, nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if std is None:
                nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            else:
                nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.05), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


# ---------------------------------------------------------------------------- initialisation


def _init_normal(model: nn.Module, std: float | None) -> None:
    """Weights ~ N(0, std²) and zero biases; ``std=None`` is the fix: He init, made for ReLU nets."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if std is None:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


@scenario(
    label=Label(
        "weights initialised at std 0.01 in a 6-layer ReLU net: activations and gradients shrink to nothing",
        ("vanishing_gradients", "stalled_training"),
        ("initialization",),
        0,
    )
)
def init_too_small(ctx: Context, std: float | None = 0.01, steps: int = 300) -> nn.Module:
    """6-hidden-layer ReLU MLP on the digits with N(0, 0.01²) weights, SGD lr=0.1."""
    x, y, xt, yt = digits_split()
    model = _mlp(6, 64, nn.ReLU)
    _init_normal(model, std)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(
    label=Label(
        "weights initialised at std 1 (N(0,1)) in a 4-layer ReLU net: activations and gradients blow up",
        DIVERGED,
        ("initialization",),
        0,
    )
)
def init_too_large(ctx: Context, std: float | None = 1.0, steps: int = 200) -> nn.Module:
    """4-hidden-layer ReLU MLP on the digits with N(0, 1) weights, SGD lr=0.01."""
    x, y, xt, yt = digits_split()
    model = _mlp(4, 128, nn.ReLU)
    _init_normal(model, std)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.01), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(
    label=Label(
        "first-layer biases initialised at -1.5: three quarters of its ReLU units never fire",
        ("dead_units",),
        # Both restore training (checked): biases at zero (initialization), or ELU (activation),
        # which passes a gradient below zero so the units can come back.
        ("initialization", "activation"),
        0,
    )
)
def dying_relu(ctx: Context, bias: float | None = -1.5, act: type[nn.Module] = nn.ReLU, steps: int = 300) -> nn.Module:
    """ReLU MLP 64-128-128-10 on the digits whose first-layer biases start at -1.5, SGD lr=0.05."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, act)
    first = model[0]
    assert isinstance(first, nn.Linear)
    if bias is not None:
        nn.init.constant_(first.bias, bias)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.05), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


# ---------------------------------------------------------------------------- data


@scenario(
    label=Label(
        "raw pixel values 0-255 fed without normalisation: first-layer pre-activations are huge",
        (*DIVERGED, "dead_units", "stalled_training"),
        ("data",),
        0,
    )
)
def unnormalised_inputs(ctx: Context, scale: float = 255.0, steps: int = 300) -> nn.Module:
    """ReLU MLP on the digits as raw 0-255 pixel values, SGD lr=0.05 (fine for normalised inputs)."""
    x, y, xt, yt = digits_split(normalize=False)  # pixels in [0, 1]
    if scale == 0:  # the counterfactual: standardise as the fix would
        mean, std = x.mean(), x.std()
        x, xt = (x - mean) / std, (xt - mean) / std
    else:
        x, xt = x * scale, xt * scale
    model = _mlp(2, 128, nn.ReLU)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.05), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


NAN_STEP = 150


@scenario(label=Label("one training batch carries a NaN pixel at step 150", ("nonfinite",), ("data",), NAN_STEP))
def nan_in_batch(ctx: Context, nan_step: int | None = NAN_STEP, steps: int = 250) -> nn.Module:
    """ReLU MLP on the digits; the batch of step 150 holds a NaN (a corrupt sample), SGD lr=0.1."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, nn.ReLU)

    def corrupt(step: int, xb: torch.Tensor) -> torch.Tensor:
        if step == nan_step:
            xb = xb.clone()
            xb[3, 17] = math.nan
        return xb

    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, steps=steps, corrupt=corrupt)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


def naive_binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy written by hand the unstable way, from probabilities.

    Once ``sigmoid(z)`` rounds to exactly 1 (z > ~17 in float32) or 0, one of the logs is ``-inf``
    and ``0 · -inf = NaN``. ``F.binary_cross_entropy_with_logits`` computes the same loss stably.
    """
    p = torch.sigmoid(logits)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


@scenario(
    label=Label(
        "a hand-written binary cross-entropy, log(sigmoid(z)) and log(1 - sigmoid(z)), turns NaN once the model is confident",
        ("nonfinite",),
        ("code",),
    )
)
def unstable_loss(ctx: Context, stable: bool = False, steps: int = 300) -> nn.Module:
    """Binary MLP (digit < 5?) on the digits trained with a naive BCE from probabilities, Adam lr=3e-3.

    ``ctx.onset`` is the first step whose loss is non-finite; ``measured["stable_loss_at_onset"]`` is
    the stable loss of that same step's logits, which shows that the loss code, not the model, failed.
    """
    x, y, xt, yt = digits_split()
    target, target_t = (y < 5).float(), (yt < 5).float()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = F.binary_cross_entropy_with_logits if stable else naive_binary_cross_entropy
    with ctx.session(model, opt) as session:
        for step in range(steps):
            xb, yb = sample_batch(ctx, x, target, 64)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)[:, 0]  # (B,)
            loss = loss_fn(logits, yb)
            if ctx.onset is None and not torch.isfinite(loss):
                ctx.onset = step
                ctx.measured["stable_loss_at_onset"] = float(F.binary_cross_entropy_with_logits(logits.detach(), yb))
            loss.backward()
            session.step(loss)
            opt.step()
    model.eval()
    ctx.eval = EvalSet(xt, target_t, kind="binary")
    return model


# ---------------------------------------------------------------------------- recurrent and attention models


class VanillaRNN(nn.Module):
    """``nn.RNN`` with ReLU units and its recurrent matrix set to ``recurrent_gain`` × identity."""

    def __init__(self, channels: int, hidden: int, classes: int, recurrent_gain: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(channels, hidden, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            # (H, H): every eigenvalue is recurrent_gain, so above 1 the state and the gradient
            # through time grow like recurrent_gain ** T.
            self.rnn.get_parameter("weight_hh_l0").copy_(recurrent_gain * torch.eye(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (B, T, H)
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


@scenario(
    label=Label(
        "vanilla ReLU RNN over 60 steps with recurrent weights 1.05 x identity, no clipping: gradients explode",
        DIVERGED,
        ("gradient_clipping",),
        0,
    )
)
def exploding_rnn(
    ctx: Context, recurrent_gain: float = 1.05, clip: float | None = None, lr: float = 0.01, steps: int = 200
) -> nn.Module:
    """ReLU RNN (hidden 32) on 60-step sequences, recurrent weights 1.05·I, SGD lr=0.01, no gradient clipping."""
    x, y = synth.channel_sum_sequences(2000, 60, 4, ctx.gen)
    model = VanillaRNN(4, 32, 4, recurrent_gain)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with ctx.session(model, opt) as session:
        for _ in range(steps):
            xb, yb = sample_batch(ctx, x[:1600], y[:1600], 32)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            session.step(loss)
            if clip is not None:  # the counterfactual: what the fix does
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    model.eval()
    ctx.eval = EvalSet(x[1600:], y[1600:], n_classes=4)
    return model


@scenario(
    label=Label(
        "post-LN transformer at a constant Adam lr=3e-2 from step 0, no warmup or decay: it never settles",
        ("stalled_training", "oscillating_loss"),
        ("learning_rate",),
        0,
    ),
    fast=False,
)
def transformer_no_warmup(
    ctx: Context, lr: float = 3e-2, warmup_cosine: bool = False, steps: int = 300
) -> nn.Module:
    """The healthy transformer scenario at a constant Adam lr=3e-2 from the first step: no warmup, no decay.

    The counterfactuals: ``warmup_cosine=True`` (50 warmup steps, cosine decay, same peak lr), or ``lr=3e-3``.
    """
    x, y = synth.marker_tokens(3000, 16, 8, 4, ctx.gen)
    model = TokenTransformer(8, 16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(50, steps)) if warmup_cosine else None
    fit(ctx, model, opt, x[:2500], y[:2500], steps=steps, scheduler=sched)
    ctx.eval = EvalSet(x[2500:], y[2500:], n_classes=4)
    return model


# ---------------------------------------------------------------------------- optimizer and code


@scenario(
    label=Label(
        "SGD momentum 0.99 at lr=0.03: the heavy ball overshoots and the loss swings ever wider instead of settling",
        ("oscillating_loss",),
        # Momentum 0.9 or a 10x lower lr both cut the effective step lr/(1 - momentum) tenfold (checked).
        ("optimizer", "learning_rate"),
        0,
    )
)
def momentum_oscillation(ctx: Context, momentum: float = 0.99, lr: float = 0.03, steps: int = 400) -> nn.Module:
    """ReLU MLP on the digits, SGD lr=0.03 with momentum 0.99 (with 0.9 it trains smoothly)."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, nn.ReLU)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


class TwoTower(nn.Module):
    """A trunk plus an auxiliary tower whose features are added in; ``detach_aux`` cuts the tower off."""

    def __init__(self, detach_aux: bool) -> None:
        super().__init__()
        self.detach_aux = detach_aux
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.aux = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.aux(x)
        if self.detach_aux:
            extra = extra.detach()  # the bug: the aux tower never receives a gradient
        logits: torch.Tensor = self.head(self.trunk(x) + extra)
        return logits


@scenario(
    label=Label(
        "a submodule's output is .detach()ed: its parameters never receive a gradient",
        ("no_gradient",),
        ("code",),
        0,
    )
)
def detached_branch(ctx: Context, detach_aux: bool = True, steps: int = 300) -> nn.Module:
    """Two-tower MLP on the digits whose aux tower output is detached before it joins the trunk, Adam."""
    x, y, xt, yt = digits_split()
    model = TwoTower(detach_aux)
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


# ---------------------------------------------------------------------------- the same faults in other architectures


@scenario(label=Label("CNN with SGD momentum 0.9 at lr=10 (200x too high): the loss diverges", DIVERGED, ("learning_rate",), 0))
def cnn_lr_too_high(ctx: Context, lr: float = 10.0, steps: int = 150) -> nn.Module:
    """The healthy small CNN on the 8×8 digits at lr=10 instead of 0.05, SGD with momentum 0.9."""
    x, y, xt, yt = digits_split()
    model = SmallCNN()
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), x, y, steps=steps)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(label=Label("LSTM with Adam at lr=1e-6: the loss barely moves", ("stalled_training",), ("learning_rate",), 0))
def lstm_lr_too_low(ctx: Context, lr: float = 1e-6, steps: int = 300) -> nn.Module:
    """The healthy LSTM sequence classifier at Adam lr=1e-6 instead of 1e-2."""
    x, y = synth.channel_sum_sequences(3000, 20, 4, ctx.gen)
    model = SequenceLSTM(4, 32, 4)
    fit(ctx, model, torch.optim.Adam(model.parameters(), lr=lr), x[:2500], y[:2500], steps=steps)
    ctx.eval = EvalSet(x[2500:], y[2500:], n_classes=4)
    return model


@scenario(
    label=Label(
        "optimizer.zero_grad() is never called: every update applies the sum of all past gradients",
        ("accumulating_gradients",),
        ("code",),
        0,
    )
)
def no_zero_grad(ctx: Context, zero_grad: bool = False, lr: float = 0.05, steps: int = 300) -> nn.Module:
    """The healthy ReLU MLP on the digits, SGD at lr=0.05, in a loop that never resets the gradients."""
    x, y, xt, yt = digits_split()
    model = _mlp(2, 128, nn.ReLU)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps, zero_grad=zero_grad)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model


@scenario(
    label=Label(
        "the training data is stored class by class and never shuffled: each run of ~9 batches holds one class",
        ("unshuffled_data",),
        ("data",),
        0,
    )
)
def sorted_by_class(
    ctx: Context, shuffle: bool = False, lr: float = 0.1, epochs: int = 3, batch_size: int = 16
) -> nn.Module:
    """The healthy ReLU MLP on the digits sorted by label, read in order (``DataLoader(..., shuffle=False)``)
    for 3 epochs in batches of 16, SGD at lr=0.1."""
    x, y, xt, yt = digits_split()
    by_class = torch.argsort(y, stable=True)
    x, y = x[by_class], y[by_class]
    model = _mlp(2, 128, nn.ReLU)
    steps = epochs * math.ceil(len(x) / batch_size)
    fit(ctx, model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps, batch_size=batch_size, shuffle=shuffle)
    ctx.eval = EvalSet(xt, yt, n_classes=10)
    return model
