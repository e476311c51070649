"""``GradscopeCallback`` for ``transformers.Trainer``: diagnose a Hugging Face training in one line.

::

    from transformers import Trainer
    from gradscope.integrations.transformers import GradscopeCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradscopeCallback(log_dir="runs/exp1")])
    trainer.train()

Install with ``pip install "gradscope[transformers]"``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradscope.collect.hooks import CopySafeHook
from gradscope.collect.monitor import Monitor
from gradscope.detect.registry import Findings
from gradscope.errors import InvalidInputError
from gradscope.findings import Finding
from gradscope.integrations import require
from gradscope.integrations._common import CallbackResults, FindingPolicy, check_monitor_options, final_findings
from gradscope.store.run import Run

if TYPE_CHECKING:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
else:
    transformers = require("transformers", extra="transformers", feature="gradscope.integrations.transformers")
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["GradscopeCallback"]


class GradscopeCallback(CallbackResults, TrainerCallback):
    """Record and diagnose a ``transformers.Trainer`` training with a :class:`gradscope.Monitor`.

    At ``on_train_begin`` a Monitor is attached to the Trainer's model and optimizer. Once per
    optimizer step, at ``on_pre_optimizer_step``, it records the gradients the optimizer is about to
    apply: accumulated over the step's micro-batches and, as the Trainer documents for this event,
    **after** its gradient clipping (``max_grad_norm``, 1.0 by default) — the norms then top out at
    ``max_grad_norm``; set ``max_grad_norm=0`` to record unclipped gradients.

    The loss of each step is read from the model's own output (``outputs.loss``) by a forward hook,
    once per micro-batch and on the device (no host sync), and combined the way the Trainer combines
    it for the gradients: summed when the Trainer normalises over the whole accumulated batch
    (``num_items_in_batch``), averaged otherwise. Unlike the Trainer's logs, which replace NaN/Inf
    losses by the running average (``logging_nan_inf_filter``), the recorded loss keeps them. A loss
    computed outside the model (``compute_loss_func``, label smoothing, an overridden
    ``compute_loss``) is not seen: the run then holds no loss, and a warning says so once.

    New findings go to the ``gradscope.integrations`` Python logger and, depending on
    ``on_finding``, to warnings; at ``on_train_end`` the whole run is diagnosed and the result is in
    :attr:`findings` (``callback.findings.summary()`` is a short report).

    Args:
        log_dir: directory for the run; ``None`` keeps it in memory (read it from :attr:`run`).
        on_finding: ``"warn"``, ``"stop"`` (warn, and end training with
            ``control.should_training_stop = True`` after the step where the first error appeared),
            ``"raise"`` (raise :class:`gradscope.TrainingFailure` at the first error), a callable
            taking the :class:`~gradscope.Finding`, or ``None`` (no live detection; the run is still
            diagnosed at the end).
        **monitor_options: passed to :class:`gradscope.Monitor` (``flush_every``,
            ``activation_every``, ``detect_every``, ``select``, ``ignore``, ``overwrite``,
            ``metadata``, …).

    The Trainer has no event for a training that raises: when ``trainer.train()`` fails, call
    :meth:`close` (the run is otherwise closed at interpreter exit, marked failed).
    """

    _how_to_start = "trainer.train()"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        on_finding: str | Callable[[Finding], Any] | None = "warn",
        **monitor_options: Any,
    ) -> None:
        check_monitor_options(monitor_options, "GradscopeCallback")
        self.log_dir = log_dir
        self.on_finding = on_finding
        self.monitor_options = monitor_options
        FindingPolicy(on_finding)  # validate now, not when training starts
        self.monitor: Monitor | None = None
        self._policy: FindingPolicy | None = None
        self._final: Findings | None = None
        self._run: Run | None = None
        self._hook: RemovableHandle | None = None
        self._args: TrainingArguments | None = None
        self._loss_sum: torch.Tensor | None = None  # device scalar: sum of this step's micro-batch losses
        self._loss_count = 0
        self._normalised_over_step = False
        self._warned_no_loss = False

    # ------------------------------------------------------------------ results


    def close(self, *, status: str = "complete") -> None:
        """Close the Monitor (flush, remove every hook) and diagnose the run. Safe to call twice."""
        self._close(status)

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._close("complete")
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"expected the Trainer to pass its model to callbacks but got {type(model).__name__}; "
                "create the Trainer with model=..."
            )
        policy = FindingPolicy(self.on_finding)
        options = dict(self.monitor_options)
        options["metadata"] = {**_describe(args, state), **(options.get("metadata") or {})}
        self.monitor = Monitor(
            model,
            _torch_optimizer(kwargs.get("optimizer")),
            log_dir=self.log_dir,
            on_finding=policy.monitor_option(),
            **options,
        )
        self._policy = policy
        self._args = args
        self._final = None
        self._run = None
        self._reset_loss()
        self._hook = model.register_forward_hook(CopySafeHook(self._capture_loss), with_kwargs=True)  # an EMA copy is plain

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.monitor is None:
            return control
        loss = self._step_loss()
        try:
            self.monitor.step(loss)
        except BaseException:
            self._close("failed")  # on_finding="raise": the run is complete up to the failure
            raise
        if self._policy is not None and self._policy.should_stop:
            control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close("complete")

    # ------------------------------------------------------------------ loss capture

    def _capture_loss(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # evaluation and prediction forwards
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None and isinstance(output, (tuple, list)) and output and "labels" in kwargs:
            loss = output[0]  # return_dict=False: the Trainer reads the loss from the first element too
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or loss.numel() == 0:
            return
        value = loss.detach().float().mean()  # (n_gpu,) under DataParallel
        if kwargs.get("num_items_in_batch") is not None:
            self._normalised_over_step = True
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def _step_loss(self) -> torch.Tensor | None:
        total, count, over_step = self._loss_sum, self._loss_count, self._normalised_over_step
        self._reset_loss()
        if total is None:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn(
                    "gradscope: the model's output carries no loss (it is computed outside the model: "
                    "compute_loss_func, label smoothing or an overridden compute_loss), so the run records none; "
                    "gradients and activations are still recorded",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        if not over_step:
            return total / count  # each micro-batch loss is its own mean; the Trainer averages them
        # The model divided each micro-batch's summed loss by the token count of the whole step, so
        # the micro-batch losses add up to the step's mean. Across processes the Trainer counts the
        # tokens of every rank and multiplies the loss back by the number of processes.
        args = self._args
        if args is not None and getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
            total = total * args.world_size
        return total

    def _reset_loss(self) -> None:
        self._loss_sum = None
        self._loss_count = 0
        self._normalised_over_step = False

    # ------------------------------------------------------------------ internals

    def _close(self, status: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        monitor, policy = self.monitor, self._policy
        if monitor is None:
            return
        self.monitor = None
        try:
            monitor.close(status=status)  # its last live detection may raise TrainingFailure ("raise")
        finally:
            self._run = monitor.run
            self._final = final_findings(self._run)
        if policy is not None and status == "complete":
            policy.warn_unseen(self._final)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under the Trainer's wrapper (``AcceleratedOptimizer.optimizer``), whose step hooks fire."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _describe(args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
    return {
        "framework": "transformers",
        "framework_version": transformers.__version__,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm,
        "gradients": "accumulated, after clipping" if args.max_grad_norm and args.max_grad_norm > 0 else "accumulated",
        "global_step_at_start": state.global_step,
    }
