"""``GradscopeCallback`` in a real ``transformers.Trainer`` with a 2-layer GPT-2 built from a config (nothing
downloads): one row per optimizer step, the real per-step loss (NaN included, which the Trainer's own
logs hide), the gradients the optimizer applies, findings at the end, and ``"stop"``/``"raise"``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it (transformers[torch])

import gradscope  # noqa: E402
from gradscope.integrations import MissingDependencyError  # noqa: E402
from gradscope.integrations.transformers import GradscopeCallback  # noqa: E402
from gradscope.preflight_checks import preflight  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 16, 4


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Learnable sequences: arithmetic progressions modulo VOCAB with a random start and stride."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2(*, nan_at: int | None = None) -> nn.Module:
    """GPT-2 with 2 layers of width 32. Untied embeddings and initializer_range 0.1 ≈ 1/√32, which keeps
    the narrow layers' signal at scale (GPT-2's 0.02 is meant for width 768). With ``nan_at``, the
    token embeddings of that training micro-batch (counted from 0) come out NaN, once."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
        tie_word_embeddings=False, initializer_range=0.1, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    if nan_at is not None:
        model.transformer.wte.register_forward_hook(_NanAt(nan_at))
    return model


class _NanAt:
    """The fault: one batch's embeddings come out NaN (the weights themselves stay finite)."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        self.calls += 1
        if self.calls - 1 != self.call:
            return None
        return torch.full_like(output, float("nan"))


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Reference(transformers.TrainerCallback):  # type: ignore[misc]
    """The gradient norm at the same event, and the losses the Trainer itself logs."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.update_norms: list[float] = []
        self.logged: list[float] = []
        self._before: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        grads = [p.grad.double().reshape(-1) for p in model.parameters() if p.grad is not None]
        self.grad_norms.append(torch.cat(grads).norm().item())
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        deltas = [(p.detach() - b).double().reshape(-1) for p, b in zip(model.parameters(), self._before, strict=True)]
        self.update_norms.append(torch.cat(deltas).norm().item())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.logged.append(float(logs["loss"]))


def train(
    tmp_path: Path,
    model: nn.Module,
    data: Any,
    callbacks: list[Any],
    *,
    expect: type[BaseException] | None = None,
    trainer_class: Any = None,
    **options: Any,
) -> Any:
    arguments: dict[str, Any] = {
        "output_dir": str(tmp_path / "hf"),
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-2,
        "max_grad_norm": 0.0,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    arguments.update(options)
    trainer = (trainer_class or transformers.Trainer)(
        model=model, args=transformers.TrainingArguments(**arguments), train_dataset=data, callbacks=callbacks
    )
    if expect is None:
        trainer.train()
    else:
        with pytest.raises(expect):
            trainer.train()
    return trainer


QUIET: dict[str, Any] = {"on_finding": None, "flush_every": 3}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_row_per_optimizer_step_with_the_trainers_loss_and_gradients(tmp_path: Path, accumulate: int) -> None:
    ref, callback = Reference(), GradscopeCallback(**QUIET, update_every=1)
    trainer = train(
        tmp_path, gpt2(), Tokens(32), [ref, callback],
        gradient_accumulation_steps=accumulate, max_steps=6, logging_strategy="steps", logging_steps=1, learning_rate=1e-3,
    )
    run = callback.run
    assert trainer.state.global_step == 6
    np.testing.assert_array_equal(run.steps, np.arange(6))
    np.testing.assert_allclose(run.loss, ref.logged, rtol=1e-5, atol=1e-4)  # the Trainer's own loss (older versions log 4 decimals)
    np.testing.assert_allclose(run.grad_norm, ref.grad_norms, rtol=1e-4)
    update = np.sqrt((run.metric("update_norm") ** 2).sum(axis=1).to_numpy())
    np.testing.assert_allclose(update, ref.update_norms, rtol=1e-4)
    np.testing.assert_allclose(run.lr, [1e-3 * (1 - s / 6) for s in range(6)], rtol=1e-6)  # linear decay
    assert run.meta["user"]["framework"] == "transformers"
    assert run.layers  # GPT-2's modules that own parameters
    assert "transformer.h.0.attn.c_attn" in run.layers


def test_gradients_are_the_clipped_ones_the_optimizer_applies(tmp_path: Path) -> None:
    ref, callback = Reference(), GradscopeCallback(**QUIET)
    train(tmp_path, gpt2(), Tokens(16), [ref, callback], max_steps=4, max_grad_norm=0.05)
    np.testing.assert_allclose(callback.run.grad_norm, 0.05, rtol=1e-3)
    np.testing.assert_allclose(callback.run.grad_norm, ref.grad_norms, rtol=1e-4)
    assert callback.run.meta["user"]["gradients"] == "accumulated, after clipping"


def test_a_nan_loss_is_recorded_although_the_trainer_hides_it(tmp_path: Path) -> None:
    ref, callback = Reference(), GradscopeCallback(**QUIET)
    train(
        tmp_path, gpt2(nan_at=3), Tokens(32), [ref, callback],
        max_steps=8, logging_strategy="steps", logging_steps=1,
    )
    loss = callback.run.loss
    assert np.isfinite(loss[:3]).all() and not np.isfinite(loss[3])
    assert np.isfinite(ref.logged[3])  # logging_nan_inf_filter replaced it by the running average
    nonfinite = [f for f in callback.findings if f.code == "nonfinite"]
    assert nonfinite and nonfinite[0].step == 3
    assert nonfinite[0].severity is gradscope.Severity.ERROR


def test_stop_ends_training_after_the_first_error(tmp_path: Path) -> None:
    callback = GradscopeCallback(on_finding="stop", flush_every=1, detect_every=1)
    with pytest.warns(RuntimeWarning, match="gradscope: error: nonfinite"):
        trainer = train(tmp_path, gpt2(nan_at=3), Tokens(80), [callback], max_steps=20)
    # Step 3 is written (and diagnosed) when step 4 is recorded: training ends there, not at 20.
    assert trainer.state.global_step == 5
    assert callback.run.n_steps == 5


def test_raise_fails_training_with_the_finding_and_removes_every_hook(tmp_path: Path) -> None:
    callback = GradscopeCallback(log_dir=tmp_path / "run", on_finding="raise", flush_every=1, detect_every=1)
    model = gpt2(nan_at=3)
    hooks_before = hook_counts(model)
    with pytest.raises(gradscope.TrainingFailure, match="nonfinite") as info:
        train(tmp_path, model, Tokens(80), [callback], max_steps=20)
    assert info.value.finding.step == 3  # type: ignore[attr-defined]
    run = gradscope.load(tmp_path / "run")
    assert run.status == "failed"
    assert hook_counts(model) == hooks_before


class Regressor(nn.Module):
    """A model of one's own (no ``**kwargs``): its loss is a per-micro-batch mean, averaged by the Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x).squeeze(-1)
        return {"loss": F.mse_loss(out, labels), "logits": out} if labels is not None else {"logits": out}


class Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_the_loss_of_a_model_without_loss_kwargs_is_the_mean_of_its_micro_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor()
    micro: list[float] = []
    model.register_forward_hook(lambda m, a, out: micro.append(out["loss"].item()) if m.training else None)
    ref, callback = Reference(), GradscopeCallback(**QUIET)
    train(
        tmp_path, model, Pairs(24), [ref, callback],
        gradient_accumulation_steps=3, max_steps=2, logging_strategy="steps", logging_steps=1,
    )
    expected = np.asarray(micro).reshape(2, 3).mean(axis=1)
    np.testing.assert_allclose(callback.run.loss, expected, rtol=1e-5)
    np.testing.assert_allclose(callback.run.loss, ref.logged, rtol=1e-5, atol=1e-4)


class OwnLossTrainer(transformers.Trainer):  # type: ignore[misc]
    """A Trainer computing the loss itself from the model's logits: the model never sees the labels."""

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.mse_loss(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss


def test_a_loss_computed_outside_the_model_is_missing_and_said_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = GradscopeCallback(**QUIET)
    with pytest.warns(RuntimeWarning, match="the model's output carries no loss") as caught:
        train(tmp_path, Regressor(), Pairs(16), [callback], max_steps=4, trainer_class=OwnLossTrainer)
    assert len([w for w in caught if "carries no loss" in str(w.message)]) == 1
    run = callback.run
    assert run.n_steps == 4 and np.isnan(run.loss).all()
    assert run.grad_norm.min() > 0
    assert not [f for f in callback.findings if f.code == "nonfinite"]  # a loss never given is not a NaN loss


def test_missing_transformers_gives_the_install_command(
    without_module: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    without_module("transformers")
    monkeypatch.delitem(sys.modules, "gradscope.integrations.transformers")
    with pytest.raises(MissingDependencyError, match=r'pip install "gradscope\[transformers\]"') as info:
        importlib.import_module("gradscope.integrations.transformers")
    assert isinstance(info.value, ImportError) and isinstance(info.value, gradscope.GradscopeError)


def test_preflight_passes_on_gpt2_and_finds_a_batch_mixing_bug() -> None:
    ids = Tokens(8).ids
    batch = ({"input_ids": ids, "labels": ids}, ids)
    result = preflight(gpt2(), lambda out, y: out.loss, batch)
    result.assert_ok()
    assert result.measurements["n_classes"] == VOCAB  # logits (B, T, V) for labels (B, T)
    assert abs(result.measurements["initial_loss"] - np.log(VOCAB)) < 0.3

    def reverse_the_batch(module: nn.Module, args: Any, out: Any) -> Any:  # the bug: examples swap places
        return (out[0].flip(0), *out[1:]) if isinstance(out, tuple) else out.flip(0)

    broken = gpt2()
    broken.transformer.h[0].register_forward_hook(reverse_the_batch)
    result = preflight(broken, lambda out, y: out.loss, batch)
    assert [f.code for f in result.findings] == ["batch_dependence"]
    assert result.findings[0].layers == ("transformer.h.0",)


def test_gpt2_with_its_default_init_trains_without_a_warning() -> None:
    """GPT-2's std=0.02 init shrinks each narrow layer's signal ~10×, but LayerNorm and the residual
    stream keep it from compounding: a healthy run, not an init_scale warning."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
    assert config.initializer_range == 0.02
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gradscope.Monitor(model, opt, on_finding=None) as mon:
        for _ in range(150):
            start = torch.randint(0, 8, (16, 1), generator=g)
            tokens = (start + torch.arange(32)) % 16  # a learnable pattern
            opt.zero_grad()
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            mon.step(loss)
            opt.step()
    run = mon.run
    assert run.loss[-10:].mean() < 0.5 * run.loss[:10].mean()  # it learns
    assert [f for f in gradscope.diagnose(run) if f.severity.rank >= 1] == []
