"""``GradscopeCallback`` for ``lightning.pytorch.Trainer``: diagnose a Lightning training in one line.

::

    import lightning.pytorch as pl
    from gradscope.integrations.lightning import GradscopeCallback

    trainer = pl.Trainer(max_epochs=3, callbacks=[GradscopeCallback(log_dir="runs/exp1")])
    trainer.fit(model, loader)

Install with ``pip install "gradscope[lightning]"``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gradscope.collect.monitor import Monitor
from gradscope.detect.registry import Findings
from gradscope.errors import GradscopeError, UnsupportedSetupError
from gradscope.findings import Finding, Severity
from gradscope.integrations import require
from gradscope.integrations._common import CallbackResults, FindingPolicy, check_monitor_options, final_findings
from gradscope.store.run import Run

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
else:
    pl = require("lightning.pytorch", extra="lightning", feature="gradscope.integrations.lightning")
    Callback = pl.callbacks.Callback

__all__ = ["GradscopeCallback"]


class GradscopeCallback(CallbackResults, Callback):
    """Record and diagnose a ``lightning.pytorch.Trainer`` fit with a :class:`gradscope.Monitor`.

    At the start of ``fit`` a Monitor is attached to the ``LightningModule`` and its optimizer. Once
    per optimizer step, in ``on_before_optimizer_step``, it records the gradients where Lightning
    documents them as final: accumulated over all micro-batches of the step, unscaled by the AMP
    gradient scaler, and not yet clipped. The loss recorded for the step is the mean of the
    losses ``training_step`` returned for its micro-batches (before Lightning divides them by
    ``accumulate_grad_batches``), read in ``on_before_backward`` on the device, without a host sync.
    With manual optimization it is the sum of the losses given to ``manual_backward`` since the
    previous step: the loss whose gradient the step applies (their mean when each was divided by
    the number of accumulated batches, as is usual).

    New findings are logged to the trainer's loggers as ``gradscope/<severity>s`` counts and to the
    ``gradscope.integrations`` Python logger; at the end of ``fit`` the whole run is diagnosed and
    the result is in :attr:`findings` (``callback.findings.summary()`` is a short report). The
    Monitor is closed at the end of ``fit`` and when it fails (``on_exception``), so the run on
    disk is complete or marked failed.

    Args:
        log_dir: directory for the run; ``None`` keeps it in memory (read it from :attr:`run`).
        on_finding: what a new finding during training does: ``"warn"`` (a ``RuntimeWarning`` for
            warnings and errors), ``"stop"`` (warn, and stop the fit gracefully with
            ``trainer.should_stop = True`` at the first error), ``"raise"`` (raise
            :class:`gradscope.TrainingFailure` at the first error), a callable taking the
            :class:`~gradscope.Finding`, or ``None`` (no live detection; the run is still diagnosed
            at the end).
        **monitor_options: passed to :class:`gradscope.Monitor` (``flush_every``,
            ``activation_every``, ``detect_every``, ``select``, ``ignore``, ``overwrite``,
            ``metadata``, …).

    Only one optimizer is supported (a single ``configure_optimizers`` optimizer); with several,
    ``fit`` is refused with :class:`gradscope.UnsupportedSetupError` rather than mixing their steps.
    """

    _how_to_start = "trainer.fit(...)"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        on_finding: str | Callable[[Finding], Any] | None = "warn",
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        check_monitor_options(monitor_options, "GradscopeCallback")
        self.log_dir = log_dir
        self.on_finding = on_finding
        self.monitor_options = monitor_options
        FindingPolicy(on_finding)  # validate now, not at the start of fit
        self.monitor: Monitor | None = None
        self._policy: FindingPolicy | None = None
        self._final: Findings | None = None
        self._run: Run | None = None
        self._trainer: pl.Trainer | None = None
        self._metadata: dict[str, Any] = {}  # the run's user metadata (see on_train_start)
        self._loss_sum: torch.Tensor | None = None  # device scalar: sum of this step's micro-batch losses
        self._loss_count = 0

    # ------------------------------------------------------------------ results


    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("complete")
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            raise UnsupportedSetupError(
                f"expected one optimizer but the LightningModule configures {len(optimizers)}; gradscope records one "
                "optimizer step per row, so it cannot tell their steps apart. Remove GradscopeCallback, or monitor "
                "each sub-model with its own gradscope.Monitor in training_step"
            )
        policy = FindingPolicy(self.on_finding)
        policy.listeners.append(self._log_finding)
        options = dict(self.monitor_options)
        options["metadata"] = {**self._describe(trainer), **(options.get("metadata") or {})}
        self.monitor = Monitor(
            pl_module,
            optimizers[0] if optimizers else None,
            log_dir=self.log_dir,
            on_finding=policy.monitor_option(),
            **options,
        )
        self._policy = policy
        self._trainer = trainer
        self._metadata = options["metadata"]
        self._final = None
        self._run = None
        self._loss_sum, self._loss_count = None, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint restores its global step after on_fit_start: record the
        # step this run's step 0 stands for once it is known, so the run lines up with Lightning's logs.
        if self.monitor is not None and self._metadata.get("global_step_at_start") != trainer.global_step:
            self._metadata = {**self._metadata, "global_step_at_start": trainer.global_step}
            self.monitor._set_meta({"user": self._metadata})

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.monitor is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        # Lightning hands over training_step's loss divided by accumulate_grad_batches (automatic
        # optimization) and multiplied by the AMP loss scale (fp16): undo both to get the loss the
        # user computed.
        value = loss.detach().reshape(()).float()
        if pl_module.automatic_optimization:
            value = value * trainer.accumulate_grad_batches
        scale = _loss_scale(trainer)
        if scale is not None:
            value = value / scale
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.monitor is None:
            return
        loss = self._loss_sum
        if loss is not None and pl_module.automatic_optimization:
            loss = loss / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        try:
            self.monitor.step(loss)
        except BaseException as e:
            self._close("failed", e)  # on_finding="raise": the run is complete up to the failure
            raise
        if self._policy is not None and self._policy.should_stop:
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("complete")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The fit already failed: do not hide its exception behind one of gradscope's.
        with contextlib.suppress(GradscopeError):
            self._close("failed", exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close("complete")

    # ------------------------------------------------------------------ internals

    def _close(self, status: str, exception: BaseException | None = None) -> None:
        monitor, policy = self.monitor, self._policy
        if monitor is None:
            return
        self.monitor = None
        try:
            if exception is not None:
                monitor.__exit__(type(exception), exception, exception.__traceback__)  # records it, then closes
            else:
                monitor.close(status=status)  # its last live detection may raise TrainingFailure ("raise")
        finally:
            self._run = monitor.run
            self._final = final_findings(self._run)
            self._log_counts(self._final)
        if policy is not None and exception is None:
            policy.warn_unseen(self._final)

    def _log_finding(self, finding: Finding) -> None:
        if self._policy is not None:
            self._log_counts(self._policy.seen)

    def _log_counts(self, findings: list[Finding]) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        counts = {
            f"gradscope/{severity.value}s": float(sum(1 for f in findings if f.severity is severity))
            for severity in (Severity.ERROR, Severity.WARNING, Severity.INFO)
        }
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=trainer.global_step)

    @staticmethod
    def _describe(trainer: pl.Trainer) -> dict[str, Any]:
        return {
            "framework": "lightning",
            "framework_version": importlib.metadata.version("lightning"),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val,
            "gradients": "accumulated, unscaled, before clipping",
            "precision": str(trainer.precision),
            "global_step_at_start": trainer.global_step,
        }


def _loss_scale(trainer: pl.Trainer) -> torch.Tensor | float | None:
    """The fp16 GradScaler's current scale, or None when the loss is not scaled. Kept as the
    scaler's own tensor: ``get_scale()`` reads it to the host, a device sync on every micro-batch."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        scale = scaler._get_scale_async()
        return scale if scale is not None else scaler.get_scale()  # None before its first scale()
    return None
