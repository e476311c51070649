"""``GradscopeCallback`` in a real ``lightning.pytorch.Trainer``: one row per optimizer step, the loss
``training_step`` returned, gradients as Lightning hands them to the optimizer (accumulated, before
clipping), fp16 steps the GradScaler skips read as its overflows, findings at the end of ``fit``,
``"stop"``/``"raise"`` acting on the fit, and the Monitor closed on every way out."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradscope  # noqa: E402
from gradscope.datasets import load_digits  # noqa: E402
from gradscope.integrations import MissingDependencyError  # noqa: E402
from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402

BATCH = 32


class DigitsNet(pl.LightningModule):
    """A 64-32-10 MLP on the 8×8 digits that keeps every loss its training_step returned."""

    def __init__(self, lr: float = 0.1, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr = lr
        self.fail_at = fail_at
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("a bug in training_step")
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Reference(pl.Callback):
    """What each optimizer step really did, copied out with plain torch in the same hooks."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad.double().reshape(-1) for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(torch.cat(grads).norm().item())
        self.before.append([p.detach().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self.after) < len(self.before):  # an optimizer step happened in this batch
            self.after.append([p.detach().clone() for p in pl_module.parameters()])

    def update_norms(self) -> list[float]:
        return [
            torch.cat([(a - b).double().reshape(-1) for a, b in zip(after, before, strict=True)]).norm().item()
            for after, before in zip(self.after, self.before, strict=True)
        ]


def digits_loader(n_batches: int, *, nan_batch: int | None = None, nan_from: int | None = None) -> torch.utils.data.DataLoader[Any]:
    images, labels = load_digits(size=8)
    x, y = images[: n_batches * BATCH].clone(), labels[: n_batches * BATCH]
    if nan_batch is not None:
        x[nan_batch * BATCH + 3, 5] = math.nan  # one bad value in one example of one batch
    if nan_from is not None:
        x[nan_from * BATCH + 3 :: BATCH, 5] = math.nan  # one bad value in every batch from nan_from on
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def fit(
    model: pl.LightningModule, loader: Any, callbacks: list[Any], *, expect: type[BaseException] | None = None, **trainer_options: Any
) -> pl.Trainer:
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
    }
    options.update(trainer_options)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    if expect is None:
        trainer.fit(model, loader)
    else:
        with pytest.raises(expect):
            trainer.fit(model, loader)
    return trainer


def new_model(**kwargs: Any) -> DigitsNet:
    torch.manual_seed(0)
    return DigitsNet(**kwargs)


QUIET: dict[str, Any] = {"on_finding": None, "flush_every": 3}


@pytest.mark.parametrize("accumulate", [1, 3])
def test_one_row_per_optimizer_step_with_the_training_step_loss_and_its_gradients(accumulate: int) -> None:
    # 8 batches: with accumulation 3 the steps take batches 0-2, 3-5 and 6-7 (a short last step).
    model, ref, callback = new_model(), Reference(), GradscopeCallback(**QUIET)
    trainer = fit(model, digits_loader(8), [ref, callback], accumulate_grad_batches=accumulate)
    run = callback.run

    steps = math.ceil(8 / accumulate)
    assert trainer.global_step == steps
    np.testing.assert_array_equal(run.steps, np.arange(steps))
    micro = np.asarray(model.losses)
    expected_loss = [micro[i : i + accumulate].mean() for i in range(0, 8, accumulate)]  # mean of its micro-batches
    np.testing.assert_allclose(run.loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(run.grad_norm, ref.grad_norms, rtol=1e-4)
    np.testing.assert_allclose(run.lr, 0.1)
    assert run.status == "complete"
    assert run.meta["user"]["framework"] == "lightning"
    assert run.meta["user"]["accumulate_grad_batches"] == accumulate


@pytest.mark.parametrize("accumulate", [1, 2])
def test_update_norms_belong_to_their_step(accumulate: int) -> None:
    # Without accumulation Lightning records the step inside the optimizer's closure, after the
    # optimizer's pre-step hook: the update must still land on the step being recorded.
    model, ref, callback = new_model(), Reference(), GradscopeCallback(**QUIET, update_every=1)
    fit(model, digits_loader(8), [ref, callback], accumulate_grad_batches=accumulate)
    recorded = np.sqrt((callback.run.metric("update_norm") ** 2).sum(axis=1).to_numpy())
    np.testing.assert_allclose(recorded, ref.update_norms(), rtol=1e-4)


def test_gradients_are_recorded_before_lightning_clips_them() -> None:
    model, ref, callback = new_model(), Reference(), GradscopeCallback(**QUIET)
    fit(model, digits_loader(4), [ref, callback], gradient_clip_val=0.01)
    assert min(ref.grad_norms) > 0.1  # far above the clipping threshold
    np.testing.assert_allclose(callback.run.grad_norm, ref.grad_norms, rtol=1e-4)


def test_a_healthy_fit_has_no_warning_or_error(tmp_path: Path) -> None:
    callback = GradscopeCallback(log_dir=tmp_path / "run", flush_every=10)
    model = new_model()
    fit(model, digits_loader(28), [callback], max_epochs=3)  # 84 steps
    run = gradscope.load(tmp_path / "run")
    assert run.n_steps == 84 and run.status == "complete"
    assert run.loss[-10:].mean() < 0.5 * run.loss[:5].mean()  # it learns
    bad = [f for f in callback.findings if f.severity.rank >= gradscope.Severity.WARNING.rank]
    assert bad == [], "\n".join(map(str, bad))


def test_a_nan_in_one_batch_is_recorded_at_its_step_and_diagnosed() -> None:
    callback = GradscopeCallback(**QUIET)
    fit(new_model(), digits_loader(8, nan_batch=5), [callback])
    loss = callback.run.loss
    assert np.isfinite(loss[:5]).all() and np.isnan(loss[5])
    nonfinite = [f for f in callback.findings if f.code == "nonfinite"]
    assert nonfinite and nonfinite[0].step == 5
    assert nonfinite[0].severity is gradscope.Severity.ERROR


def test_stop_ends_the_fit_after_the_step_of_the_first_error() -> None:
    callback = GradscopeCallback(on_finding="stop", flush_every=1, detect_every=1)
    with pytest.warns(RuntimeWarning, match="gradscope: error: nonfinite"):
        trainer = fit(new_model(), digits_loader(20, nan_batch=5), [callback])
    # Step 5 is written (and diagnosed) when step 6 is recorded, once its update has landed: the fit
    # stops after step 6 instead of running 20.
    assert trainer.global_step == 7
    assert trainer.should_stop
    assert callback.run.n_steps == 7


def test_raise_fails_the_fit_with_the_finding_and_closes_the_run(tmp_path: Path) -> None:
    callback = GradscopeCallback(log_dir=tmp_path / "run", on_finding="raise", flush_every=1, detect_every=1)
    model = new_model()
    with pytest.raises(gradscope.TrainingFailure, match="nonfinite") as info:
        fit(model, digits_loader(20, nan_batch=5), [callback])
    assert info.value.finding.step == 5  # type: ignore[attr-defined]
    run = gradscope.load(tmp_path / "run")
    assert run.status == "failed" and run.n_steps == 6
    assert not any(m._forward_hooks for m in model.modules())  # every hook was removed


def test_an_exception_in_training_step_closes_the_run_as_failed(tmp_path: Path) -> None:
    callback = GradscopeCallback(log_dir=tmp_path / "run", on_finding=None, flush_every=100)
    model = new_model(fail_at=3)
    fit(model, digits_loader(8), [callback], expect=RuntimeError)
    run = gradscope.load(tmp_path / "run")
    assert run.status == "failed"
    assert run.n_steps == 3  # steps 0-2 were flushed although flush_every is 100
    assert [e["type"] for e in run.events if e.get("kind") == "exception"] == ["RuntimeError"]
    assert not any(m._forward_hooks for m in model.modules())


class _MetricsLogger(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "test"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_findings_are_counted_in_the_trainers_logger() -> None:
    logger = _MetricsLogger()
    callback = GradscopeCallback(on_finding=None, flush_every=4)
    fit(new_model(), digits_loader(8, nan_batch=5), [callback], logger=logger)
    ours = [m for m, _ in logger.metrics if "gradscope/errors" in m]
    assert ours, logger.metrics
    final = ours[-1]
    assert final["gradscope/errors"] == sum(f.severity is gradscope.Severity.ERROR for f in callback.findings) >= 1


class TwoOptimizers(DigitsNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.zeros(())

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_several_optimizers_are_refused() -> None:
    callback = GradscopeCallback(on_finding=None)
    with pytest.raises(gradscope.UnsupportedSetupError, match=r"expected one optimizer but .* configures 2"):
        fit(TwoOptimizers(), digits_loader(2), [callback])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_finding": "loud"}, "expected on_finding to be 'warn', 'raise', 'stop', a callable or None but got 'loud'"),
        ({"optimizer": None}, "expected Monitor options other than .* but got optimizer"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(gradscope.InvalidInputError, match=match):
        GradscopeCallback(**kwargs)


def test_a_callable_on_finding_sees_each_finding_once() -> None:
    seen: list[gradscope.Finding] = []
    callback = GradscopeCallback(on_finding=seen.append, flush_every=1, detect_every=1)
    fit(new_model(), digits_loader(10, nan_batch=5), [callback])
    codes = [(f.code, f.layers) for f in seen]
    assert ("nonfinite", seen[0].layers) in codes
    assert len(codes) == len(set(codes))


def test_missing_lightning_gives_the_install_command(without_module: Callable[[str], None], monkeypatch: pytest.MonkeyPatch) -> None:
    without_module("lightning")
    monkeypatch.delitem(sys_modules(), "gradscope.integrations.lightning")
    with pytest.raises(MissingDependencyError, match=r'pip install "gradscope\[lightning\]"') as info:
        importlib.import_module("gradscope.integrations.lightning")
    assert isinstance(info.value, ImportError) and isinstance(info.value, gradscope.GradscopeError)
    assert info.value.extra == "lightning"


def sys_modules() -> dict[str, Any]:
    import sys

    return sys.modules


def test_with_a_grad_scaler_the_loss_and_gradients_are_unscaled(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plugin = pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model, ref, callback = new_model(), Reference(), GradscopeCallback(**QUIET)
    reads: list[float] = []  # get_scale() copies the scale to the host: a device sync per micro-batch on a GPU
    monkeypatch.setattr(scaler, "get_scale", lambda: reads.append(1.0) or 1024.0)
    fit(model, digits_loader(6), [ref, callback], plugins=[plugin], accumulate_grad_batches=2)
    assert reads == []
    micro = np.asarray(model.losses)
    np.testing.assert_allclose(callback.run.loss, micro.reshape(3, 2).mean(axis=1), rtol=1e-5)  # not ×1024
    np.testing.assert_allclose(callback.run.grad_norm, ref.grad_norms, rtol=1e-4)
    assert max(ref.grad_norms) < 10  # Lightning unscales before on_before_optimizer_step


class ManualSteps(DigitsNet):
    """Manual optimization, stepping once every two batches (accumulating by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        self.manual_backward(loss / 2)
        if batch_idx % 2 == 1:
            optimizer = self.optimizers()
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad()  # type: ignore[union-attr]
        return loss


def test_manual_optimization_records_each_optimizer_step_with_the_losses_backpropagated() -> None:
    torch.manual_seed(0)
    model, ref, callback = ManualSteps(), Reference(), GradscopeCallback(**QUIET)
    fit(model, digits_loader(6), [ref, callback])
    run = callback.run
    assert run.n_steps == 3
    # The sum of what was given to manual_backward (each loss halved): the mean of the two losses.
    np.testing.assert_allclose(run.loss, np.asarray(model.losses).reshape(3, 2).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(run.grad_norm, ref.grad_norms, rtol=1e-4)


def test_a_resumed_fit_records_the_global_step_its_first_row_stands_for(tmp_path: Path) -> None:
    """Lightning restores a checkpoint's global step after on_fit_start: the run's step 0 is then
    that step, as the metadata must say for the run to line up with Lightning's own logs."""
    model = new_model()
    first = fit(model, digits_loader(6), [], enable_checkpointing=True, default_root_dir=tmp_path)
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    callback = GradscopeCallback(**QUIET)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        callbacks=[callback], max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(new_model(), digits_loader(6), ckpt_path=checkpoint)
    assert first.global_step == 6 and trainer.global_step == 12
    run = callback.run
    assert run.n_steps == 6
    assert run.meta["user"]["global_step_at_start"] == 6
    assert run.meta["user"]["framework"] == "lightning"


def fp16_plugin() -> Any:
    """fp16 mixed precision on the CPU with a real GradScaler (``Trainer(precision="16-mixed")`` falls
    back to bf16 there, which has no scaler). Scale 2^24: the fp16 gradients overflow (fp16 tops out
    near 2^16) until the scaler has backed off, so it skips the first steps, as every fp16 run does
    while its scale calibrates. Backing off 16× at a time leaves the scale far below overflow once
    calibrated, so that this short run skips no step later."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, backoff_factor=2.0**-4)
    return pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)


def steps_that_changed_no_weight(ref: Reference) -> list[bool]:
    """Which optimizer steps the GradScaler skipped, seen from the weights alone (SGD with momentum
    moves every weight on a step it takes from a non-zero gradient)."""
    return [
        all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        for after, before in zip(ref.after, ref.before, strict=True)
    ]


def test_fp16_steps_the_grad_scaler_skips_read_as_its_overflows_with_gradients_before_clipping() -> None:
    # The gradients are read where Lightning hands them over, unscaled and before clipping, so a blow-up
    # the clipping hides still shows; a step the scaler skips shows as its reason, a non-finite
    # gradient with a finite loss, which the detectors read as the scaler at work, not a failure.
    model, ref, callback = new_model(), Reference(), GradscopeCallback(**QUIET)
    fit(model, digits_loader(16), [ref, callback], plugins=[fp16_plugin()], gradient_clip_val=0.01)
    run = callback.run
    skipped = np.asarray(steps_that_changed_no_weight(ref))
    assert run.n_steps == len(skipped) == 16
    assert 0 < skipped.sum() < 16  # both kinds of step happened
    np.testing.assert_array_equal(~np.isfinite(run.grad_norm), skipped)  # each skip, and only skips
    taken = ~skipped
    np.testing.assert_allclose(run.grad_norm[taken], np.asarray(ref.grad_norms)[taken], rtol=1e-4)  # unscaled
    assert (run.grad_norm[taken] > 0.1).all()  # not the clipped norm (0.01)
    assert np.isfinite(run.loss).all()
    bad = [f for f in callback.findings if f.severity.rank >= gradscope.Severity.WARNING.rank]
    assert bad == [], "\n".join(map(str, bad))


def test_a_fp16_fit_that_stays_nonfinite_is_still_an_error() -> None:
    # NaN in every batch from batch 8 on: the loss is NaN at each of those steps and the scaler skips
    # them all, a failure that must not pass for the scaler's calibration.
    model, ref, callback = new_model(), Reference(), GradscopeCallback(**QUIET)
    fit(model, digits_loader(16, nan_from=8), [ref, callback], plugins=[fp16_plugin()])
    run = callback.run
    assert all(steps_that_changed_no_weight(ref)[8:])
    assert np.isnan(run.loss[8:]).all() and np.isfinite(run.loss[:8]).all()
    nonfinite = [f for f in callback.findings if f.code == "nonfinite"]
    assert len(nonfinite) == 1
    assert nonfinite[0].severity is gradscope.Severity.ERROR
    assert nonfinite[0].last_step == 15
    assert nonfinite[0].evidence["loss_nonfinite_steps"] == 8
