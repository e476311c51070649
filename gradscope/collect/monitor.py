"""``Monitor``: attach to a model (and optimizer), collect per-layer statistics while it trains, store them.

The hot path (``step()`` and the hooks) only launches device work and holds its results; values
reach the host once per flush, in one copy. Per step that is one batched ``torch._foreach_norm``
over the gradients (on an accelerator its results are held and stacked many steps at a time: see
held.py; on the CPU, where a read waits for nothing, they are read at once), plus a ``sum`` each
of the input batch and the model's output (NaN/Inf sentinels; on CPU only when the step's loss is
not finite). Full activation statistics, ‖Δθ‖ and live detection run on their own
cadences (see docs/performance.md).
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import math
import os
import platform
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradscope._version import __version__
from gradscope.collect import stats
from gradscope.collect.cadence import DEFAULT_ACTIVATIONS, DEFAULT_UPDATES, Cadence
from gradscope.collect.distributed import DistributedContext, refuse_sharded_parameters
from gradscope.collect.held import HeldValues
from gradscope.collect.hooks import CallWatch, CopySafeHook, has_pre_hooks, watch_calls
from gradscope.collect.layout import ModelLayout, describe_optimizer
from gradscope.errors import InvalidInputError, TrainingFailure, expect_int
from gradscope.findings import Finding
from gradscope.store import schema
from gradscope.store.run import Run, load
from gradscope.store.sqlite import RunWriter

__all__ = ["Monitor", "OnFinding"]

OnFinding = str | Callable[[Finding], Any] | None

# The share of training time live detection may use, and the least training time between two of
# its runs (see Monitor's ``detect_every``).
LIVE_DETECTION_SHARE = 0.01
LIVE_DETECTION_SECONDS = 10.0


class _LiveAction(enum.Enum):
    WARN = "warn"
    RAISE = "raise"
    NONE = "none"


class Monitor:
    """Watch a model while it trains and record what backpropagation does to each layer.

    Use it as a context manager around the training loop and call :meth:`step` once per optimizer
    step, after ``loss.backward()`` (before or just after ``optimizer.step()``)::

        with gradscope.Monitor(model, optimizer=opt, log_dir="runs/exp1") as mon:
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()

    Args:
        model: any ``nn.Module``.
        optimizer: the optimizer that updates ``model``. Optional; with it, ‖Δθ‖ is measured exactly
            around each ``optimizer.step()`` and learning rates are recorded.
        log_dir: directory to store the run in; ``None`` keeps it in memory only.
        flush_every: the most steps between writes to the store (500 by default).
        flush_seconds: the most time between writes, in seconds (2 by default; ``None``: no time
            limit). A crash loses at most the steps since the last write: ``flush_every`` steps and
            about ``flush_seconds`` of training, whichever is fewer. Each write costs ~1 ms on CPU
            (a 0.6 ms-step MLP: 200 steps between writes made them ~1% of its training time), so
            fast models write every 500 steps (a third of a second for that MLP) and slow ones every
            ~2 s. Under torch.distributed it is ignored: ranks must write at the same step, so only
            ``flush_every`` decides.
        activation_every: sample full activation statistics every this many steps (0: never). By
            default (``None``) every 50 steps for the first 1,000 steps this Monitor records (a
            resumed run's Monitor counts from its own start), then every 200: activations drift
            slowly next to gradients, and a sampled step costs several reductions per module
            (~0.5 ms for a 64×128 MLP on CPU, with the hooks). The first steps, where most failures
            start and short runs end, are sampled four times as often as the rest (see
            ``gradscope.collect.cadence``). On CPU this keeps one float32 work buffer the size of
            the largest activation.
        update_every: measure ‖Δθ‖ and ‖θ‖ every this many steps (0: never). By default (``None``)
            every 25 steps for the first 1,000 steps, then every 200, on the steps whose activation
            statistics are sampled: the update/weight ratio drifts slowly, and each measurement
            copies every parameter and reads it three more times. Holds one copy of the parameters
            in memory.
        check_outputs: look for NaN/Inf in every watched module's output, the input batch and the
            model's output on every step (one ``sum`` each, an extra read of every activation), so
            a non-finite value can be traced to the exact module that made it. Off by default:
            every module is checked on sampled steps, and the input batch and the model's output
            on every step whose loss is not finite (or not given), which tells bad data from a bad
            loss from a bad model at a fraction of the cost. (On an accelerator they are checked on
            every step: reading the loss there would wait for the device. On CPU, a NaN in the
            input or output that leaves the loss finite, say in masked positions, shows on sampled
            steps only.)
        on_finding: what live detection does with a new finding: ``"warn"`` (a Python warning),
            ``"raise"`` (raise :class:`gradscope.TrainingFailure` on the first error), a callable
            taking the :class:`Finding`, or ``None`` (no live detection).
        detect_every: steps between live detector runs. By default detection runs after a flush
            once the steps trained since its last run took 10 s, and 99× as long as that run did
            (at the median step time, so pauses for evaluation or other work do not count): a
            finding comes within ~10 s of training, and detection uses at most 1% of training time
            (~0.2% where a run takes ~15 ms, as on small models). The first NaN/Inf in the loss or
            gradients is checked at the next flush whatever the budget.
        live_window: live detection reads the first ``live_window`` steps and the last
            ``live_window`` steps of the run, never the whole history, so its cost stays constant.
        select, ignore: detector codes to run (or skip) live, as a list or one string ``"a,b"``; an
            unknown code is refused here, at once.
        overwrite: replace a run already in ``log_dir``.
        strict: raise gradscope's own internal errors into the training loop instead of warning.
        metadata: anything JSON-serialisable to store with the run (hyperparameters, a name).
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop. Gradients are then read
            at :meth:`step` as without a scaler, before any clipping, and divided by the scale the
            scaler multiplied them by (unless they are unscaled already: ``unscale_()`` was called, or
            ``scaler.step()`` ran; gradscope never calls ``unscale_`` itself). Steps the scaler skips
            for Inf/NaN gradients are recorded as ``optimizer_skipped``, their gradients as the
            non-finite values that made it skip, and an occasional skip is not read as a failure.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        flush_every: int = 500,
        flush_seconds: float | None = 2.0,
        activation_every: int | None = None,
        update_every: int | None = None,
        check_outputs: bool = False,
        on_finding: OnFinding = "warn",
        detect_every: int | None = None,
        live_window: int = 2000,
        select: str | Iterable[str] | None = None,
        ignore: str | Iterable[str] | None = None,
        overwrite: bool = False,
        strict: bool = False,
        metadata: dict[str, Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            hint = " (a class was given: instantiate it)" if isinstance(model, type) else ""
            raise InvalidInputError(f"expected model to be a torch.nn.Module but got {type(model).__name__}{hint}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidInputError(
                f"expected optimizer to be a torch.optim.Optimizer but got {type(optimizer).__name__}; "
                "pass the optimizer that updates the model, or None"
            )
        self.flush_every = expect_int("flush_every", flush_every, at_least=1)
        self.flush_seconds = _positive_seconds("flush_seconds", flush_seconds)
        # None (the default) or the spacing given; the steps sampled are the cadences' to decide.
        self.activation_every = expect_int("activation_every", activation_every, at_least=0) if activation_every is not None else None
        self.update_every = expect_int("update_every", update_every, at_least=0) if update_every is not None else None
        self.activation_cadence = DEFAULT_ACTIVATIONS if self.activation_every is None else Cadence.fixed(self.activation_every)
        self.update_cadence = DEFAULT_UPDATES if self.update_every is None else Cadence.fixed(self.update_every)
        self.detect_every = expect_int("detect_every", detect_every, at_least=1) if detect_every is not None else None
        self.live_window = expect_int("live_window", live_window, at_least=1)
        self.check_outputs = bool(check_outputs)
        self.strict = bool(strict)
        self._live, self._on_finding_callable = _parse_on_finding(on_finding)
        self._detects_live = self._live is not _LiveAction.NONE or self._on_finding_callable is not None
        self._select: list[str] | None = None
        self._ignore: list[str] | None = None
        if self._detects_live or select is not None or ignore is not None:
            from gradscope.detect.registry import check_codes, parse_codes  # detection is downstream of collection

            self._select, self._ignore = parse_codes(select), parse_codes(ignore)
            # A typo in a code is refused here, not at the first live detection, where it could only
            # be a warning; and the detectors load now, not in the middle of training.
            check_codes(self._select, self._ignore)

        refuse_sharded_parameters(model)
        if any(p.device.type == "meta" for p in model.parameters()):
            raise InvalidInputError(
                "expected a model with real parameters but its parameters are on the meta device (they hold no "
                "values); materialise it first (model.to_empty(device=...) and initialise) and attach the Monitor then"
            )
        self._dist = DistributedContext.detect()
        if self._dist is not None:
            # Ranks exchange their statistics at each write, so every rank must write at the same
            # step. A rank's own clock cannot decide that: a rank a little behind would write a step
            # later, and its collective would meet DDP's all-reduce instead (a hang). Under
            # torch.distributed only the step count decides.
            self.flush_seconds = None
        self._layout = layout = ModelLayout.of(model)
        if not layout.params:
            raise InvalidInputError(
                f"expected a model with trainable parameters but {type(model).__name__} has none requiring grad; "
                "unfreeze some (requires_grad=True) or monitor the model that trains"
            )
        not_in_optimizer: list[str] = []
        if optimizer is not None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            not_in_optimizer = [n for n, p in zip(layout.param_names, layout.params, strict=True) if id(p) not in owned]
            if len(not_in_optimizer) == len(layout.params):
                raise InvalidInputError(
                    f"expected an optimizer that owns the model's parameters but {type(optimizer).__name__} holds none of "
                    f"the {len(layout.params)} trainable parameters of {type(model).__name__}; "
                    "create the optimizer from model.parameters() of this model"
                )

        if grad_scaler is not None:
            if not isinstance(grad_scaler, torch.amp.GradScaler):
                raise InvalidInputError(
                    f"expected grad_scaler to be a torch.amp.GradScaler but got {type(grad_scaler).__name__}"
                )
            if optimizer is None:
                raise InvalidInputError(
                    "expected an optimizer with grad_scaler: the steps the scaler skips are found in optimizer.step(); "
                    "pass the optimizer the scaler steps"
                )
        self._grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self._scale_version_at_forward: int | None = None  # see _note_scale_version
        self._model: nn.Module | None = model
        self._optimizer = optimizer
        self._params: list[nn.Parameter] = layout.params
        self._param_tensors: list[torch.Tensor] = list(layout.params)  # the same, typed for the _foreach ops
        self._device = layout.params[0].device
        self._n_params = n_params = len(layout.params)
        self._n_watched = n_watched = len(layout.watched_names)
        self._n_groups = len(optimizer.param_groups) if optimizer is not None else 0
        # Columns of the device step buffer: loss | per-parameter grad norm | input and output sentinels
        # | sentinel per watched module | param norm | update norm. The first three are held per step
        # and written by the flush (see below). The watched modules' sentinels are written only on
        # the steps that check them; layer-level and run-level values are derived on the host at
        # flush (_derive_step_columns).
        self._c_grad = 1
        self._c_io = self._c_grad + n_params  # the input batch, then the model's output
        self._c_watched = self._c_io + 2
        self._c_pnorm = self._c_watched + n_watched
        self._c_upd = self._c_pnorm + n_params
        self._n_dev_cols = self._c_upd + n_params
        # The sentinel columns in stored order: watched modules, input batch, model output.
        self._sentinel_cols = np.r_[self._c_watched : self._c_pnorm, self._c_io : self._c_io + 2]
        rows = self.flush_every + 1  # +1: the row of a step whose update lands before it is recorded
        # float32 whatever torch's default dtype (a bf16 default would round every stored value)
        self._buf = torch.full((rows, self._n_dev_cols), math.nan, dtype=torch.float32, device=self._device)
        # Each step's loss: read on the host when that waits for nothing (a CPU tensor, a number; NaN
        # when none was given), else held on its device. Its gradient norms (with a GradScaler, divided
        # by its scale: see _gradient_scale) likewise: read into the buffer at once when it
        # and every parameter are on the CPU, else held on the device. The sums that check its input
        # batch and output are held (see held.py). All held values go into the buffer at the flush;
        # a held step that is lost (an internal error) is stored as missing, not as NaN.
        # (On the CPU, holding the norms would cost more than reading them: hundreds of small tensors
        # kept across steps made the next backward pass ~15 µs slower on a 0.6 ms MLP step.)
        self._single_device = all(p.device == self._device for p in layout.params)  # until a value is not (_stack)
        on_cpu = self._device.type == "cpu" and self._single_device
        self._grads_read_into: np.ndarray | None = self._buf.numpy() if on_cpu else None  # the same memory
        # each row's gradient-norm segment as a view, made once: slicing a row each step costs ~2 µs
        self._grad_rows = [] if self._grads_read_into is None else [r[self._c_grad : self._c_io] for r in self._grads_read_into]
        self._host_loss = np.full(rows, math.nan)
        self._host_losses_written = 0  # rows of _host_loss already in the buffer (see _write_step_values)
        self._held_losses = HeldValues(1, self._stack, self._when_lost(self._mark_losses_missing))
        self._held_grads = HeldValues(n_params, self._stack, self._when_lost(self._mark_gradients_missing))
        self._held_io = HeldValues(2, self._stack, self._when_lost(self._mark_outputs_unchecked))
        self._host_lr: list[list[Any]] = []
        self._host_missing = np.zeros((rows, n_params), dtype=bool)
        self._host_modules_checked = np.zeros(rows, dtype=bool)  # module outputs were checked on that step
        self._io_unchecked: list[int] = []  # rows whose input batch and output were not checked
        # Rows whose input batch (or output) was checked but not seen: passed by keyword only, or
        # an output with no tensor gradscope can find. Stored as not checked, never as finite.
        self._io_unseen = 0  # this step's forwards: bit 0 an input not seen, bit 1 an output
        self._input_unseen: list[int] = []
        self._output_unseen: list[int] = []
        self._loss_missing: list[int] = []  # rows whose step() got no loss: their NaN is no NaN loss
        # Activation statistics: one row per sampled step, watched modules + input.
        act_rows = self.flush_every // max(self.activation_cadence.densest, 1) + 2
        self._act_buf = torch.full((act_rows, n_watched + 1, stats.N_ACT_PARTS), math.nan, dtype=torch.float32, device=self._device)
        self._act_counts = np.full((act_rows, n_watched + 1, 3), np.nan)  # elements, units, saturation denominator
        self._act_count_rows: dict[tuple[tuple[int, int, int, int], ...], np.ndarray] = {}  # see _finish_activations
        self._act_steps: list[int] = []
        self._bounded = [stats.bounded_kind(m) for m in layout.watched_modules] + [stats.Bounded.NONE]
        self._observed: dict[int, stats.Observed] = {}
        self._scratch = stats.Scratch()  # CPU work buffer for activation statistics
        self._sentinel: dict[int, torch.Tensor] = {}  # watched module -> output sum (check_outputs only)
        self._call_order: list[int] = []
        self._zero = torch.zeros((), dtype=torch.float32, device=self._device)
        self._io_sums: dict[str, torch.Tensor] = {}  # NaN/Inf sentinels of this step's input batch and output
        # On CPU a value is read without waiting for a device, so the input batch and the output are
        # summed only when the step's loss turns out non-finite (or is not given): the forward keeps
        # them (until step()) instead of summing them, ~3% of a 0.6 ms step. A step with a
        # finite loss stores them as "not checked"; sampled steps check them always. On an
        # accelerator the sums are queued every step, as reading the loss there would wait for it.
        self._io_on_demand = self._device.type == "cpu" and not self.check_outputs and self._dist is None
        self._held_forward: tuple[torch.Tensor | None, torch.Tensor | None] | None = None  # (input batch, output)
        self._nan_parts = [torch.full((), math.nan, dtype=torch.float32, device=self._device)] * stats.N_ACT_PARTS
        # each sampled step's row of the activation buffer, flat: all modules' parts in one stack
        self._act_rows = [self._act_buf[k].view(-1) for k in range(act_rows)]
        param_layer = np.asarray(layout.param_layer, dtype=np.int64)
        order = np.argsort(param_layer, kind="stable")
        starts = np.flatnonzero(np.r_[True, param_layer[order][1:] != param_layer[order][:-1]])
        self._layer_segments = (order, starts, param_layer[order][starts])
        # Complex parameters are normed as real pairs, float64 ones in float64 (the batched float32
        # norm refuses to narrow them): see _float32_norms.
        self._unusual_params = any(p.is_complex() or p.dtype == torch.float64 for p in layout.params)
        self._plain_grads = not self._unusual_params
        # On the CPU, float32 and float64 values are read through numpy (see _read_gradient_norms),
        # until one cannot be (a sparse gradient; a model cast to half precision after this).
        self._numpy_params = all(p.dtype in (torch.float32, torch.float64) for p in layout.params)
        self._grads_via_numpy = self._numpy_params
        self._all_grads_last_step = True  # every tracked parameter had a gradient at the last step
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_valid = False

        self._step = 0  # the next step to record
        # Steps before this one may be recorded by the short path of step() (see _record_plain_step);
        # set by each step that takes the full path, 0 until one does.
        self._plain_end = 0
        # Whether step 0 is being recorded. The hooks read this flag, never the step count: under
        # torch.compile the hooks are compiled in, and a compiled graph is guarded on the values
        # they read (a step count would recompile the model on every sampled step).
        self._first_step = True
        self._flush_deadline = self._next_flush_deadline()
        self._base = 0  # first step held in the buffers
        # A training forward ran since the last step(): the gradients an optimizer.step() now applies
        # are not recorded yet (step() comes after it). Set by the forward hooks, cleared by step().
        self._forward_since_step = False
        self._update_step: int | None = None  # the step whose update the running optimizer.step() makes
        self._optimizer_stepped: set[int] = set()  # steps whose optimizer.step() ran (not skipped)
        self._has_optimizer = optimizer is not None
        self._sampling = self.activation_cadence.due(0)
        self._closed = False
        self._write_failed = False
        self._loss_given = False
        self._failed_hooks: set[str] = set()
        self._hooks_silence_reported = False  # see _report_silent_module_hooks
        self._module_hook_ran = False  # a watched module's hook ran since the last step()
        self._hooks_compiled_in = False  # see _model_is_compiled
        self._replaced_params_checked = False  # see _report_replaced_parameters
        self._added_groups_reported = False  # see _learning_rates
        self._live_seen: dict[str, int] = {}  # code -> highest severity rank reported live
        self._live_findings: list[Finding] = []
        self._last_detect = 0
        self._detect_cost: float | None = None  # seconds the last live detection took
        self._step_clock: list[float] = []  # perf_counter() at each step() since the last flush, and one before
        self._step_seconds = 0.0  # median time per training step, measured over the last flush
        self._nonfinite_flushed = False  # a flush already held NaN/Inf in the loss or gradients
        self._started = time.time()

        # Under torch.distributed only rank 0 writes; the other ranks keep a small in-memory store for
        # the header and take part in the flush collective.
        writes = self._dist is None or self._dist.is_writer
        self._writer = RunWriter(log_dir if writes else None, overwrite=overwrite)
        # The model's own forward is watched by a forward hook until a step's training forward runs it
        # eagerly, then by a CallWatch, which costs a fraction of a hook on every call (see
        # _watch_model_calls); back on the hook whenever a step's forward misses the watch. The
        # handle is whichever is on; _call_watch is the watch when it is.
        self._model_handle: RemovableHandle | CallWatch | None = None
        self._call_watch: CallWatch | None = None
        self._watch_wanted = True  # on the hook, and a watch may take over (False under a watch, or where unsafe)
        # On the hook: the step's training forwards ran it eagerly / inside a compiled graph. A watch
        # takes over only after a step with eager forwards alone: a compiled one would run around it.
        self._eager_forward_seen = self._compiled_forward_seen = False
        self._model_forward_seen = False  # the model hook saw a training forward since the last step()
        self._hook_trial_step = -1  # the step whose forward must reach the hook after the watch missed one
        self._model_hook_silence_reported = False
        self._module_handles: list[RemovableHandle] = []
        self._optimizer_handles: list[RemovableHandle] = []
        try:
            self._write_header(model, optimizer, layout, not_in_optimizer, metadata)
            self._attach(model, optimizer)
        except BaseException:
            self._detach()
            self._writer.close("failed")
            raise
        _open_monitors.add(self)

    # ------------------------------------------------------------------ public API

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record one optimizer step. Call once per ``optimizer.step()``, after ``backward()``.

        ``loss`` is a scalar tensor or a number (with gradient accumulation: the step's total or mean
        loss), or ``None`` when the step has none to give: it is then stored as NaN and marked in
        ``loss_missing``, so it is not read as a NaN loss. No device-to-host copy happens here except
        at a write (every ``flush_every`` steps or ``flush_seconds``): a loss and gradient norms on an
        accelerator are kept there until then. On the CPU they are read at once, which waits for
        nothing (the loss also decides whether the input batch and the output are checked: see
        ``check_outputs``).
        """
        if self._step < self._plain_end:  # most steps (see _record_plain_step)
            try:
                if self._record_plain_step(loss):
                    return
            except Exception:
                pass  # it changed nothing: the full path records the step, and reports what fails there
        if self._closed:
            raise InvalidInputError("step() called after the Monitor was closed; create a new Monitor for a new run")
        loss_value = _check_loss(loss)
        try:
            self._record_step(loss_value)
        except Exception as e:  # a gradscope bug must not take the user's training down
            self._internal_error("step", e)

    def flush(self) -> None:
        """Write every complete step held in memory to the store now."""
        if self._closed:
            return
        try:
            self._flush(upto=self._step)
        except Exception as e:
            self._internal_error("flush", e)

    @property
    def run(self) -> Run:
        """The run recorded so far (flushes first); after :meth:`close`, the finished run."""
        if not self._closed:
            self.flush()
        elif self._writer.log_dir is not None:
            return load(self._writer.log_dir)  # close() closed the writer's connection
        return Run._from_connection(self._writer.conn, self._where, self._writer.log_dir)

    @property
    def log_dir(self) -> str | None:
        return str(self._writer.log_dir) if self._writer.log_dir is not None else None

    @property
    def findings(self) -> list[Finding]:
        """Findings raised by live detection so far, in the order they appeared."""
        return list(self._live_findings)

    @property
    def steps_recorded(self) -> int:
        return self._step

    def close(self, *, status: str = "complete") -> None:
        """Flush, remove every hook, and release the model. Safe to call twice.

        Under torch.distributed a complete run's last steps are combined across ranks, which every
        rank does in its own ``close()``. A run that failed (``status="failed"``: an exception, or
        an interpreter exit without ``close()``) or whose process group is gone writes rank 0's own
        values instead, with no collective: the other ranks may never get there, and waiting for
        them would hang the failing process instead of letting it exit with its error.
        """
        if self._closed:
            return
        try:
            if self._optimizer is None:
                self._measure_update_without_optimizer()  # the last step's update happened since step()
            self._close_flush(collective=status == "complete")
            if self._detects_live:
                self._detect_live()
        except Exception as e:
            self._internal_error("close", e)  # re-raises TrainingFailure and, when strict, everything
        finally:
            self._closed = True
            self._plain_end = 0  # step() now refuses
            self._detach()
            # A run that lost writes is not complete, whatever ended it: readers mark it partial.
            final = "incomplete" if self._write_failed and status == "complete" else status
            try:
                self._writer.set_meta({"steps": self._step, "duration_s": time.time() - self._started})
                if self._writer.log_dir is None:
                    self._writer.set_meta({"status": final, "ended_at": time.time()})
            except Exception as e:
                self._write_error(e)
            finally:
                if self._writer.log_dir is not None:
                    try:
                        self._writer.close(final)  # releases the file and the lock even if it cannot write
                    except Exception as e:
                        self._write_error(e)
            self._model = None
            self._optimizer = None
            self._params = []
            self._param_tensors = []
            # the layout holds the submodules and parameters: dropping them lets the model be collected
            self._layout.params = []
            self._layout.watched_modules = []
            self._snapshot = None
            self._held_forward = None
            self._scratch.release()
            _open_monitors.discard(self)

    def _close_flush(self, *, collective: bool) -> None:
        if self._dist is None or not collective:
            self._flush(upto=self._step, collective=False)
            return
        try:
            self._flush(upto=self._step)
        except Exception as e:  # another rank is gone (its collective failed or timed out): write ours
            self._flush(upto=self._step, collective=False)
            self._internal_error("close (ranks not combined)", e)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            with contextlib.suppress(Exception):  # recording the exception must not mask it
                self._writer.add_event("exception", self._step, {"type": type(exc).__name__, "message": str(exc)[:500]})
        self.close(status="complete" if exc is None else "failed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Monitor({self._where!r}, steps={self._step}, {state})"

    # ------------------------------------------------------------------ setup

    @property
    def _where(self) -> str:
        return str(self._writer.log_dir) if self._writer.log_dir is not None else "memory"

    def _write_header(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        layout: ModelLayout,
        not_in_optimizer: list[str],
        metadata: dict[str, Any] | None,
    ) -> None:
        self._writer.set_meta(
            {
                "gradscope_version": __version__,
                "torch_version": torch.__version__,
                "python_version": platform.python_version(),
                "started_at": self._started,
                "model_class": type(model).__name__,
                "modules": layout.modules,
                "layers": layout.layer_names,
                "params": layout.param_names,
                "param_layers": [layout.layer_names[i] for i in layout.param_layer],
                "param_numels": [p.numel() for p in layout.params],
                "frozen_params": layout.frozen_params,
                "params_not_in_optimizer": not_in_optimizer,
                "watched": layout.watched_names,
                "optimizer": describe_optimizer(optimizer),
                "device": str(self._device),
                "world_size": self._dist.world_size if self._dist is not None else 1,
                "config": {
                    "flush_every": self.flush_every,
                    "flush_seconds": self.flush_seconds,
                    "activation_every": self.activation_cadence.describe(),
                    "update_every": self.update_cadence.describe(),
                    "check_outputs": self.check_outputs,
                },
                "user": metadata or {},
            }
        )
        # loss_missing: 1 on the steps whose step() got no loss, so that their NaN does not read as a NaN loss
        run_cols = [(schema.RUN_LAYER, "loss"), (schema.RUN_LAYER, "loss_missing"), (schema.RUN_LAYER, "global_grad_norm")]
        run_cols += [(schema.RUN_LAYER, f"lr.{g}") for g in range(self._n_groups)]
        if optimizer is not None:
            run_cols.append((schema.RUN_LAYER, "optimizer_skipped"))
        if self._dist is not None:
            if self._dist.keeps_rank_losses:
                run_cols += [(schema.RUN_LAYER, f"loss_rank.{r}") for r in range(self._dist.world_size)]
            run_cols.append((schema.RUN_LAYER, "nonfinite_rank"))
        layer_cols = [(layer, metric) for metric in schema.LAYER_METRICS for layer in layout.layer_names]
        param_cols = [(p, metric) for metric in schema.PARAM_METRICS for p in layout.param_names]
        sentinel_cols = [
            (name, schema.OUTPUT_NONFINITE) for name in [*layout.watched_names, schema.INPUT_LAYER, schema.OUTPUT_LAYER]
        ]
        self._writer.define_stream(schema.STEP_STREAM, run_cols + layer_cols + param_cols + sentinel_cols)
        act_cols = [
            (name, metric) for metric in schema.ACTIVATION_METRICS for name in [*layout.watched_names, schema.INPUT_LAYER]
        ]
        self._writer.define_stream(schema.FORWARD_STREAM, act_cols)

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self._attach_module_hooks()  # step 0 always: it gives the forward order
        self._hook_model(model)
        self._update_optimizer_hooks()

    def _hook_model(self, model: nn.Module) -> None:
        """The model's forward hook, in place of whatever watched its forward before."""
        self._unhook_model()
        self._model_handle = model.register_forward_hook(CopySafeHook(self._model_hook))

    def _unhook_model(self) -> None:
        """Take the model's forward hook or watch off."""
        if self._model_handle is not None:
            self._model_handle.remove()
        self._model_handle = self._call_watch = None

    def _watch_model_calls(self) -> None:
        """After a step whose training forward ran the model's hook eagerly: the hook gives way to a
        :class:`CallWatch`, which runs the same checks at ~a fifth of its cost per forward. Never with
        a GradScaler (a forward the watch missed would misread the scaler's stage: see
        _note_scale_version), nor where :func:`watch_calls` finds it unsafe: the hook then stays."""
        self._watch_wanted = False
        model = self._model
        if model is None or self._model_handle is None or self._grad_scaler is not None:
            return
        self._unhook_model()  # first: watch_calls wants a module without hooks
        watch = watch_calls(model, self._model_hook)
        if watch is None:
            self._hook_model(model)
        else:
            self._model_handle = self._call_watch = watch

    def _model_forward_missed(self, step: int) -> bool:
        """No training forward of the model reached its hook or watch since the last step(): the
        step's input batch and output are stored as not checked, never as finite. A step that only
        evaluated, a loop that calls the model's submodules or ``.forward()``, or a model now run
        compiled around the watch (``model.compile()`` replaces it; ``torch.compile(model)`` calls
        ``forward`` around it for PyTorch's own module classes).

        Under a watch, a forward hook takes over, which a compiled graph runs too, and the watch
        comes back at the next step whose forward runs the hook eagerly. A graph
        ``torch.compile(model)`` compiled without the hook does not run it either
        (``torch._dynamo.config.skip_nnmodule_hook_guards``): True when the next step's forward
        misses the hook too, to warn once that the checks are off."""
        self._held_forward = None
        self._io_unseen = 3  # neither the input batch nor the output found: not checked
        if self._call_watch is not None:
            assert self._model is not None
            self._hook_model(self._model)
            self._watch_wanted = True
            self._hook_trial_step = step + 1
            return False
        return step == self._hook_trial_step and not self._model_hook_silence_reported

    def _model_gained_pre_hooks(self) -> bool:
        """Under a watch: whether the model (or every module) got a forward pre-hook since it was
        installed. A pre-hook may change the arguments, and the watch sees them as they were passed
        where a forward hook sees them changed: that step is not checked, and the hook takes over
        for good (:func:`watch_calls` refuses a module with hooks)."""
        return self._model is not None and has_pre_hooks(self._model)

    def _report_silent_model_hook(self, step: int) -> None:
        self._model_hook_silence_reported = True
        warnings.warn(
            f"gradscope: no training forward reached the model's hook at steps {step - 1} and {step}, where one did "
            "before, so their input batch and output are stored as not checked for NaN/Inf, and will be until one "
            "does. If those steps trained the model, it ran without the hook: a model compiled with torch.compile after "
            "its first steps can (compile it before its first step with the Monitor), and so does a loop that calls "
            "model.forward() or the model's submodules instead of the model. Losses, gradients and updates are "
            "recorded either way",
            RuntimeWarning,
            stacklevel=4,
        )

    def _detach(self) -> None:
        self._detach_module_hooks()
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
        self._unhook_model()  # a watch holds the model's call

    # Hooks on every watched module run only on the steps that need them (sampled steps, or every
    # step with check_outputs=True): a module with no hook takes PyTorch's fast call path, so the
    # other steps pay nothing per module.
    def _attach_module_hooks(self) -> None:
        if self._module_handles:
            return
        for index, module in enumerate(self._layout.watched_modules):
            self._module_handles.append(module.register_forward_hook(CopySafeHook(self._make_output_hook(index))))

    def _detach_module_hooks(self) -> None:
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()

    # The optimizer hooks likewise run only around the steps whose update is measured (the sampled
    # step and the one after it: the update of step s runs just before or just after step() records
    # s), unless a GradScaler needs them every step to notice the steps it skips.
    def _update_optimizer_hooks(self) -> None:
        optimizer = self._optimizer
        due = self.update_cadence.due
        wanted = optimizer is not None and (self._grad_scaler is not None or due(self._step) or due(self._step - 1))
        if wanted and not self._optimizer_handles:
            assert optimizer is not None
            self._optimizer_handles = [
                optimizer.register_step_pre_hook(self._before_optimizer_step),
                optimizer.register_step_post_hook(self._after_optimizer_step),
            ]
        elif not wanted and self._optimizer_handles:
            for handle in self._optimizer_handles:
                handle.remove()
            self._optimizer_handles = []

    # ------------------------------------------------------------------ hooks (hot path)

    def _make_output_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        name = self._layout.watched_names[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not _training_forward():
                return
            self._forward_since_step = self._module_hook_ran = True
            if name in self._failed_hooks or not (self._sampling or self.check_outputs or self._first_step):
                return  # compiled in, the hooks stay attached on the other steps (see _model_is_compiled)
            try:
                self._observe(index, stats.first_tensor(output))
            except Exception as e:
                self._hook_failed(name, e)

        return hook

    def _model_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """After the model's forward: the input batch and the output, each checked for NaN/Inf. Run by
        a forward hook until a step's training forward runs it eagerly, then by a CallWatch (see
        _watch_model_calls and _model_forward_missed).

        The input is the first tensor among the positional arguments. Keyword arguments are not
        looked at: PyTorch's keyword-aware hooks cost ~40 µs per forward on CPU, a tenth of a small
        model's step, and inputs passed by keyword are mostly token ids, which cannot be NaN. An
        input passed by keyword only, or an output with no tensor :func:`stats.first_tensor` can
        find, is stored as not checked on the steps that check them.
        """
        if not _training_forward():
            return
        self._forward_since_step = self._model_forward_seen = True
        if self._watch_wanted:
            if torch.compiler.is_compiling():
                self._compiled_forward_seen = True
            else:
                self._eager_forward_seen = True
        if self._grad_scaler is not None:
            self._note_scale_version()
        if self._io_on_demand and not self._sampling and self._held_forward is None and module.training:
            # The common case, on every training forward: keep the input batch and the output for
            # step(), which sums them only when the loss is not finite. Kept as they are: a detach
            # alone costs ~2.5 µs on the CPU, and in training mode the autograd graph they hold is
            # the one the loss holds until backward() frees its buffers. (A forward in eval mode
            # with grad on, which nothing backpropagates, is summed at once instead: kept, its
            # graph would outlive the loop's own reference to it.)
            if args and type(args[0]) is torch.Tensor and type(output) is torch.Tensor:
                self._held_forward = (args[0], output)
            else:  # found now: the loop may change a dict or list it passed or got back before step()
                self._held_forward = self._io_tensors(args, output)
            return
        if self._held_forward is not None:
            self._sum_held()  # a second forward before step() (gradient accumulation)
        x, y = self._io_tensors(args, output)
        if self._sampling and x is not None and schema.INPUT_LAYER not in self._failed_hooks:
            try:
                self._observe(self._n_watched, x)  # its sum is the sentinel
            except Exception as e:
                self._hook_failed(schema.INPUT_LAYER, e)
        elif x is not None:
            self._add_io_sum(schema.INPUT_LAYER, x)
        if y is not None:
            self._add_io_sum(schema.OUTPUT_LAYER, y)

    def _io_tensors(self, args: tuple[Any, ...], output: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The input batch and the output of a forward of the model, noting one that is not found."""
        x = args[0] if args and type(args[0]) is torch.Tensor else stats.first_tensor(args)
        y = output if type(output) is torch.Tensor else stats.first_tensor(output)
        if x is None or y is None:
            self._io_unseen |= (x is None) | (y is None) << 1
        return x, y

    def _sum_held(self) -> None:
        """Add the kept forward's input batch and output to the step's sentinels, and let them go."""
        assert self._held_forward is not None
        x, y = self._held_forward
        self._held_forward = None
        if x is not None:
            self._add_io_sum(schema.INPUT_LAYER, x)
        if y is not None:
            self._add_io_sum(schema.OUTPUT_LAYER, y)

    def _add_io_sum(self, layer: str, t: torch.Tensor) -> None:
        """Add ``t`` to the NaN/Inf sentinel of the input batch or the model output (``layer``)."""
        if layer in self._failed_hooks:
            return
        try:
            if _summable(t):
                self._io_sums[layer] = _add_sum(self._io_sums.get(layer), t)
        except Exception as e:
            self._hook_failed(layer, e)

    def _observe(self, index: int, x: torch.Tensor | None) -> None:
        """A watched module's output (or, at ``index == n_watched``, the input batch): full
        statistics on sampled steps, else only its NaN/Inf sentinel (``check_outputs=True``)."""
        if x is None or not stats.is_measurable(x):
            return
        if self._first_step and index < self._n_watched and index not in self._call_order:
            self._call_order.append(index)  # forward order is taken from step 0 only
        if self._sampling:
            grad_was_enabled = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)  # no autograd graph for statistics; cheaper than x.detach()
            try:
                observed = stats.observe(x, self._bounded[index], units=index < self._n_watched, scratch=self._scratch)
                previous_obs = self._observed.get(index)
                self._observed[index] = observed if previous_obs is None else stats.combine(previous_obs, observed)
            finally:
                torch._C._set_grad_enabled(grad_was_enabled)
        else:
            self._sentinel[index] = _add_sum(self._sentinel.get(index), x)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        try:
            positional = args[1:] if args and args[0] is optimizer else args  # torch passes self in args
            closure = positional[0] if positional else kwargs.get("closure")
            # With a closure the gradients this update applies are computed inside optimizer.step():
            # they belong to the step recorded in the closure (Lightning calls step() there) or, if
            # none is, to the one recorded right after it; both are the step about to be recorded.
            # Decided here, once: the closure's forwards must not change it.
            target = self._step if closure is not None else self._update_target()
            self._optimizer_stepped.add(target)
            self._update_step = None
            if self.update_cadence.due(target):
                self._take_snapshot()
                self._update_step = target
        except Exception as e:
            self._internal_error("optimizer pre-step hook", e)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        try:
            if self._update_step is not None:
                self._measure_update(self._update_step)
            self._update_step = None
        except Exception as e:
            self._internal_error("optimizer post-step hook", e)

    def _update_target(self) -> int:
        # The step an optimizer update belongs to: the one about to be recorded when step() comes
        # after optimizer.step() (a forward ran since the last step()), or the last recorded one when
        # step() came before it. Whether step() was called since the previous optimizer.step() cannot
        # tell the two apart: it was, in both orders.
        return self._step if self._forward_since_step or self._step == 0 else self._step - 1

    def _take_snapshot(self) -> None:
        with torch.no_grad():
            if self._snapshot is None or any(s.dtype != p.dtype for s, p in zip(self._snapshot, self._params, strict=True)):
                self._snapshot = [p.detach().clone() for p in self._params]  # first, or the model was cast since
            else:
                torch._foreach_copy_(self._snapshot, self._param_tensors)
            self._snapshot_valid = True

    def _measure_update(self, target: int) -> None:
        if not self._snapshot_valid or self._snapshot is None:
            return
        row = target - self._base
        if not 0 <= row < self._buf.shape[0]:
            return
        if self._grads_read_into is not None and self._numpy_params:
            self._numpy_params = self._read_update_norms(self._grads_read_into[row, self._c_pnorm :], self._snapshot)
            if self._numpy_params:
                self._snapshot_valid = False
                return
        with torch.no_grad():
            torch._foreach_sub_(self._snapshot, self._param_tensors)  # the snapshot now holds -Δθ
            # ‖θ‖ then ‖Δθ‖ of every parameter in one batched norm, written as one row segment
            tensors = [*self._param_tensors, *self._snapshot]
            norms = _float32_norms([_real(t) for t in tensors]) if self._unusual_params else _float32_norms(tensors)
            self._write(norms, self._buf[row, self._c_pnorm :])
        self._snapshot_valid = False

    def _read_update_norms(self, out: np.ndarray, snapshot: list[torch.Tensor]) -> bool:
        """On the CPU: ‖θ‖ then ‖Δθ‖ of every parameter into ``out`` (a view of the row), through
        numpy views, one subtraction and two BLAS dot products per parameter. In the training loop
        that takes about a third less time than the batched torch subtraction and norm on the MLP,
        the 26-layer MLP and the transformer of ``benchmarks.overhead`` (see _read_gradient_norms).
        False, with nothing changed, when a parameter is no longer float32 or float64 (a model cast
        after the Monitor was created): the caller then takes the torch path."""
        try:
            thetas = [p.detach().numpy() for p in self._params]  # bfloat16: TypeError
        except (RuntimeError, TypeError):
            return False
        for theta in thetas:
            if theta.dtype.char not in "fd":  # float32, float64: not float16, whose squares numpy sums in float16
                return False
        n = self._n_params
        squares = np.empty(2 * n)  # float64: a float64 parameter's squares may not fit in float32
        for i, (theta, before) in enumerate(zip(thetas, snapshot, strict=True)):
            delta = before.numpy()
            np.subtract(delta, theta, out=delta)  # the snapshot now holds -Δθ
            squares[i] = np.vdot(theta, theta)
            squares[n + i] = np.vdot(delta, delta)
        with np.errstate(over="ignore"):  # a norm past float32's range is stored as inf
            out[:] = np.sqrt(squares)
        return True

    def _record_step(self, loss: torch.Tensor | float | None) -> None:
        step = self._step
        now = time.perf_counter()
        self._plain_end = 0  # until this step completes
        self._step_clock.append(now)
        if self._optimizer is None:
            self._measure_update_without_optimizer()  # before the flush that writes the previous step
        try:  # until the step counts as recorded, a failure undoes what it kept (_forget_unrecorded)
            if step - self._base >= self.flush_every or (step > self._base and now >= self._flush_deadline):
                self._flush(upto=step)
            row = step - self._base
            if self._call_watch is not None and self._model_gained_pre_hooks():
                self._model_forward_seen = False  # the watch saw the arguments before a pre-hook changed them
            silent_model = not self._model_forward_seen and self._model_forward_missed(step)
            grad_was_enabled = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)  # torch.no_grad() at a fifth of its cost, on every step
            try:
                self._record_loss_gradients_and_outputs(row, loss)
                if self._observed and not self._finish_activations(step):
                    self._record_watched_sentinels(row)  # no room left for the statistics: the sums alone
            finally:
                torch._C._set_grad_enabled(grad_was_enabled)
            if self._optimizer is not None:
                self._host_lr.append(self._current_learning_rates(self._optimizer))
            if step == 0:
                self._record_forward_order()
            if loss is None:
                self._loss_missing.append(row)
            elif not self._loss_given:
                self._loss_given = True  # tells a NaN loss apart from "no loss passed to step()"
                self._set_meta({"loss_given": True})
            if self._observed or self._sentinel:
                # the watched modules' sentinels were written for this step (a sampled step, or
                # check_outputs with a training forward since the last step); else they read "not checked"
                self._host_modules_checked[row] = True
        except BaseException:
            self._forget_unrecorded(step)
            raise
        # The step is recorded; what it found is reported once the Monitor's state has moved on,
        # so that a warning turned into an error (-W error) loses nothing.
        silent_hooks = self._sampling and self._forward_since_step and not self._module_hook_ran and not self._hooks_silence_reported
        self._module_hook_ran = False
        self._sentinel.clear()
        self._observed.clear()
        self._held_forward = None
        if self._io_sums:
            self._io_sums.clear()
        self._io_unseen = 0
        self._step = step = step + 1
        if self._watch_wanted:
            if self._eager_forward_seen and not self._compiled_forward_seen:
                self._watch_model_calls()
            self._eager_forward_seen = self._compiled_forward_seen = False
        elif self._model_hook_silence_reported and self._model_forward_seen:
            self._model_hook_silence_reported = False  # the check is back: a later silence is warned again
        self._model_forward_seen = False
        self._first_step = False
        self._forward_since_step = False
        self._sampling = self.activation_cadence.due(step)
        if self.check_outputs or self._sampling:
            self._attach_module_hooks()
        elif self._module_handles and not self._hooks_compiled_in:
            if self._model_is_compiled():
                self._hooks_compiled_in = True  # see _model_is_compiled
            else:
                self._detach_module_hooks()
        updates = self.update_cadence
        k = updates.spacing(step)
        if k and self._grad_scaler is None and step % k <= 2:
            self._update_optimizer_hooks()  # they change only at the first and third step of a cycle
        if self._optimizer is None and updates.due(step - 1):
            self._take_snapshot()  # the update of the step just recorded happens after step()
        if silent_hooks:
            self._report_silent_module_hooks(step - 1)
        if silent_model:
            self._report_silent_model_hook(step - 1)
        if not self._all_grads_last_step and not self._replaced_params_checked:
            self._report_replaced_parameters()
        self._plain_end = self._plain_steps_end(step)

    # Most steps of a run on the CPU record a finite loss, read the gradient norms, and change
    # nothing else: no write, no sampled measurement, no hook to attach or take off, no input or
    # output to sum. The full path above asks about each of those on every step. In the 0.6 ms MLP
    # step of benchmarks.overhead, where its ~40 checks run cold after the backward pass, that cost
    # ~13 µs beyond the gradient read; the short path costs ~8. Such "plain" steps take the short
    # path, whose state changes are exactly the full path's for them (tests/collect/test_plain_steps.py).
    # Each step on the full path works out how far ahead the steps that can be plain go, from the
    # settings and cadences; each plain step checks the rest, which can change between two steps.

    def _plain_steps_end(self, step: int) -> int:
        """The first step from ``step`` on that must take the full path of step() (``step`` when
        every step must). A step is plain only on the CPU, with an optimizer and no GradScaler, the
        input/output check on demand and every setting that does something at each step off; and
        only where neither it nor the step after it is sampled, the update's optimizer hooks are
        not added or removed after it, and no write falls on it."""
        if not (
            self._io_on_demand  # on the CPU, one process, check_outputs off
            and self._grads_read_into is not None
            and self._grads_via_numpy
            and self._all_grads_last_step
            and self._optimizer is not None
            and self._grad_scaler is None
            and self._loss_given
            and not self._first_step
            and not self._watch_wanted
            and not self._model_hook_silence_reported
            and not (self._module_handles and not self._hooks_compiled_in)
        ):
            return step
        end = self._base + self.flush_every  # a write by the step count
        # The step before a sampled one adds the module hooks at its end; the sampled one measures.
        sampled = self.activation_cadence.next_due(step)
        if sampled is not None:
            end = min(end, max(step, sampled - 1))
        # The optimizer hooks are added or removed at the end of the steps just before, at and just
        # after a measured update (_update_optimizer_hooks).
        measured = self.update_cadence.next_due(max(step - 1, 0))
        if measured is not None:
            end = min(end, max(step, measured - 1))
        return end

    def _record_plain_step(self, loss: torch.Tensor | float | None) -> bool:
        """Record a step on the short path, if it is plain (see _plain_steps_end, which has checked
        what it can ahead of time): a finite loss on the host, given as a CPU tensor or a float; the
        one training forward of the step kept by the model's check (so no other input or output to
        sum, and none to sum now); no write due by the clock; and every gradient read through numpy.
        False, with nothing changed, when it is not: the full path records it. Called by step()
        first, before the full path's checks of its argument: anything unusual goes there."""
        if type(loss) is torch.Tensor:
            if not (loss.is_cpu and loss.numel() == 1):
                return False
            loss = loss.item()
        if type(loss) is not float or not math.isfinite(loss) or self._held_forward is None or self._io_sums:
            return False
        now = time.perf_counter()
        if now >= self._flush_deadline or (self._call_watch is not None and has_pre_hooks(self._model)):  # type: ignore[arg-type]
            return False  # a write due, or a pre-hook added under the watch (see _model_gained_pre_hooks)
        assert self._optimizer is not None  # see _plain_steps_end
        learning_rates = self._current_learning_rates(self._optimizer)  # first: it may raise
        step = self._step
        row = step - self._base
        if not self._read_gradient_norms_through_numpy(self._grad_rows[row]):  # writes the row only if it reads
            return False
        self._step_clock.append(now)
        try:  # as on the full path: an interrupt (Ctrl-C) midway must not leave half a step behind
            self._io_unchecked.append(row)  # the loss is finite: the input batch and output are not summed
            self._host_loss[row] = loss
            self._host_lr.append(learning_rates)
            self._held_forward = None
            self._io_unseen = 0
            self._module_hook_ran = self._model_forward_seen = self._forward_since_step = False
            self._step = step + 1
        except BaseException:
            self._forget_unrecorded(step)
            raise
        return True

    @staticmethod
    def _current_learning_rates(optimizer: torch.optim.Optimizer) -> list[Any]:
        # a tensor learning rate is copied: schedulers update it in place (fill_)
        return [lr if type(lr := g["lr"]) is float else _kept(lr) for g in optimizer.param_groups]

    def _model_is_compiled(self) -> bool:
        """Whether the model, or part of it, runs compiled with hooks inside the graph: handed over
        compiled (``Monitor(torch.compile(model))``), or compiled in place, whole or by regions
        (``model.compile()``, ``block.compile()``). A compiled graph does not notice hooks added or
        removed later, so the module hooks then stay attached on every step, each returning at
        once off the sampled steps; the graph is guarded on that (two variants). Asked once per
        sampled step, when the hooks would come off. (``torch.compile(model)`` after the Monitor
        compiles a wrapper instead, whose graphs follow the hooks.)"""
        model = self._model
        if model is None:
            return False
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            return True
        return any(
            (call := getattr(module, "_compiled_call_impl", None)) is not None and not isinstance(call, CallWatch)
            for module in model.modules()
        )

    def _report_silent_module_hooks(self, step: int) -> None:
        """Warn once when a sampled step's training forward ran none of the watched modules' hooks,
        so that missing activation statistics are not missing without a word: modules called
        through ``.forward()``, run under ``torch.no_grad()`` inside the model's forward, or
        compiled in a graph traced while the hooks were removed (a compiled wrapper that ran before
        the Monitor existed; ``model.compile()`` between two sampled steps)."""
        if any(name in self._failed_hooks for name in self._layout.watched_names):
            return  # already reported as failed
        self._hooks_silence_reported = True
        warnings.warn(
            f"gradscope: no module's forward hook ran in the training forward of sampled step {step}, so activation "
            "statistics and per-module NaN tracing are missing there. Modules called through .forward(), run under "
            "torch.no_grad() inside forward, or compiled while gradscope's hooks were not attached run without them; "
            "with torch.compile, compile the whole model once the Monitor exists (torch.compile(model)). Losses, "
            "gradients and updates are recorded either way",
            RuntimeWarning,
            stacklevel=4,
        )

    def _forget_unrecorded(self, step: int) -> None:
        """Undo what a ``step()`` that failed before its end kept for its row: that step is not
        recorded, and the next one is recorded on the same row, from a clean start."""
        row = step - self._base  # a flush may have run, or failed, before the failure
        for held in (self._held_losses, self._held_grads, self._held_io):
            held.forget(row)
        for rows in (self._io_unchecked, self._input_unseen, self._output_unseen):
            if rows and rows[-1] == row:
                rows.pop()
        self._host_missing[row] = False
        self._host_modules_checked[row] = False
        del self._host_lr[row:]  # one entry per row recorded since the last flush
        if self._act_steps and self._act_steps[-1] == step:
            self._act_steps.pop()  # its row of the activation buffer is rewritten by the next sampled step
        self._step_clock.pop()
        self._observed.clear()
        self._sentinel.clear()
        self._io_sums.clear()
        self._io_unseen = 0
        self._held_forward = None
        self._model_forward_seen = False  # a step() tried again with no new forward has nothing to check

    def _record_loss_gradients_and_outputs(self, row: int, loss: torch.Tensor | float | None) -> None:
        """The step's loss, gradient norms (with a GradScaler, divided by its scale while the
        gradients are still scaled) and input/output sums. A loss already on the host goes to the
        host array, and gradient norms on the CPU straight into the buffer row; values on a device
        are held (a loss detached: no graph kept), with no wait for the device. The holds come
        last, gradients first: a failure before them leaves nothing held. (Norms a failed step
        wrote into its row are overwritten by the step recorded next on that row.)"""
        io = self._io_sentinels(row, loss)
        scale = self._gradient_scale() if self._grad_scaler is not None else None
        if self._grads_read_into is not None:
            self._read_gradient_norms(self._grad_rows[row], row)
            if scale is not None:
                self._unscale_norms(self._grad_rows[row], float(scale))  # on the CPU: no wait
        elif scale is None:
            self._held_grads.hold(row, self._gradient_norms(row))
        else:  # in float64: the squares of scaled float32 gradients can pass float32's range
            self._held_grads.hold(row, _divided(self._gradient_norms(row, dtype=torch.float64), scale))
        if isinstance(loss, torch.Tensor):
            # a copy: the loop may reuse the tensor in place (an accumulator, a CUDA graph's output)
            self._held_losses.hold(row, [loss.detach().reshape(()).clone()])
        else:
            self._host_loss[row] = math.nan if loss is None else loss
        if io is not None:
            self._held_io.hold(row, io)
        if self._sentinel and not self._observed:
            self._record_watched_sentinels(row)

    def _unscale_norms(self, norms: np.ndarray, scale: float) -> None:
        """Divide a row of scaled gradient norms (CPU) by the GradScaler's scale. A norm that read
        as Inf or NaN is read again in float64 first: the squares of scaled float32 gradients can
        pass float32's range (a scale of 2^100 on a CPU scaler, which only fp16 overflow bounds)
        where the unscaled norm is ordinary; a gradient truly Inf or NaN reads so again."""
        overflowed = np.flatnonzero(~np.isfinite(norms))
        norms /= scale
        for i in overflowed:
            grad = self._params[i].grad
            if grad is not None:
                norms[i] = float(torch.linalg.vector_norm(grad, dtype=torch.float64)) / scale

    def _gradient_scale(self) -> torch.Tensor | None:
        """The factor the GradScaler still has the gradients multiplied by, as its own tensor (no
        host read), or None once they are unscaled: ``scaler.step()`` ran for this step (step() after
        it), or ``unscale_()`` was called (to clip). Reading the gradients here, not inside
        ``optimizer.step()``, records them before any clipping, as without a scaler. (A step the
        scaler then skips has non-finite gradients, scaled or not: they read as its reason.)"""
        scaler = self._grad_scaler
        assert scaler is not None
        if self._step in self._optimizer_stepped:
            return None
        scale = getattr(scaler, "_scale", None)  # None before the first scale(): nothing was scaled
        if not isinstance(scale, torch.Tensor):
            return None
        # update() changes the scale in place: if it ran since the forward, so did scaler.step(), which
        # unscaled the gradients, whether or not it then skipped optimizer.step() (step() after update()).
        seen = self._scale_version_at_forward
        if seen is not None and scale._version != seen:
            return None
        # GradScaler keeps no public record of the stage (READY: not unscaled yet); a torch without
        # these attributes reads as "still scaled", the stage right after backward(), as documented.
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(self._optimizer))
        if state is not None and getattr(state.get("stage"), "name", "READY") != "READY":
            return None
        return scale

    def _note_scale_version(self) -> None:
        """At a training forward under a GradScaler: the version of its scale tensor then (0 before
        its first scale(), which creates it), for _gradient_scale."""
        if torch.compiler.is_compiling():
            return  # not traced into the model's graph; step() then reads the scaler's stage alone
        scale = getattr(self._grad_scaler, "_scale", None)
        self._scale_version_at_forward = scale._version if isinstance(scale, torch.Tensor) else 0

    def _when_lost(self, mark: Callable[[list[int]], None]) -> Callable[[list[int], Exception], None]:
        """What a HeldValues does when its values are lost (a failed stack or write): mark their
        rows as no loss, no gradient or not checked, never as NaN values a detector would report,
        and report the error once."""

        def lost(rows: list[int], error: Exception) -> None:
            mark(rows)
            self._internal_error("holding step values", error)

        return lost

    def _mark_losses_missing(self, rows: list[int]) -> None:
        self._loss_missing += rows

    def _mark_gradients_missing(self, rows: list[int]) -> None:
        self._host_missing[rows] = True
        self._buf[rows, self._c_grad : self._c_io] = 0.0  # a missing gradient's norm, as stored; never NaN

    def _mark_outputs_unchecked(self, rows: list[int]) -> None:
        self._io_unchecked += rows
        self._buf[rows, self._c_io : self._c_watched] = 0.0  # finite, so combined ranks do not read a NaN

    def _write(self, values: list[torch.Tensor], out: torch.Tensor) -> None:
        """Stack 0-d values into a slice of a device buffer: one write, whatever device each value
        was computed on (parameters can be spread over devices)."""
        if values:
            self._stack(values, out=out)

    def _stack(self, values: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """``torch.stack`` of 0-d values on the buffers' device, whatever device each was computed on."""
        try:
            moved = self._on_buffer_device(values)
            return torch.stack(moved) if out is None else torch.stack(moved, out=out)  # out=None costs a little more
        except RuntimeError:
            if not self._single_device:
                raise
            # The parameters share one device but a value does not: a loss moved to the CPU, or an
            # input batch a model moves to its device inside forward(). Move values from now on.
            self._single_device = False
            return self._stack(values, out)

    def _on_buffer_device(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The values on the buffers' device (parameters or inputs can be on other devices)."""
        return values if self._single_device else [v.to(self._device) for v in values]

    def _io_sentinels(self, row: int, loss: torch.Tensor | float | None) -> list[torch.Tensor] | None:
        """The NaN/Inf sentinels (sums) of the step's input batch and model output; None when they
        are not checked (the row is marked so)."""
        if self._held_forward is not None:
            if (type(loss) is float and math.isfinite(loss)) or (type(loss) is torch.Tensor and math.isfinite(loss.item())):
                # The loss is finite, and with it (nearly always) what the model read and wrote: the
                # sums are skipped and the step stores them as "not checked".
                self._held_forward = None
                self._io_unchecked.append(row)
                return None
            self._sum_held()
        observed_input = self._observed.get(self._n_watched)
        if observed_input is not None:
            input_sum = observed_input.total  # sampled: its statistics hold the sum
        else:
            input_sum = self._io_sums.get(schema.INPUT_LAYER, self._zero)
        if self._failed_hooks:  # a failed sum checked nothing
            self._io_unseen |= (schema.INPUT_LAYER in self._failed_hooks) | (schema.OUTPUT_LAYER in self._failed_hooks) << 1
        if self._io_unseen & 1:
            self._input_unseen.append(row)
        if self._io_unseen & 2:
            self._output_unseen.append(row)
        return [input_sum, self._io_sums.get(schema.OUTPUT_LAYER, self._zero)]

    def _record_watched_sentinels(self, row: int) -> None:
        """Each watched module's output sum, written on the device: on a ``check_outputs`` step that
        is not sampled, and on a sampled step whose statistics found no buffer row left. (Otherwise a
        sampled step's sums are part of its activation statistics, and the flush copies them over on
        the host: see _fill_sampled_sentinels.) A module that did not run reads as finite (0)."""
        if self._observed:
            sums = [o.total if (o := self._observed.get(i)) else self._zero for i in range(self._n_watched)]
        else:
            sums = [self._sentinel.get(i, self._zero) for i in range(self._n_watched)]
        self._write(sums, self._buf[row, self._c_watched : self._c_pnorm])

    def _read_gradient_norms(self, out: np.ndarray, row: int) -> None:
        """On the CPU: each tracked parameter's gradient norm, read into ``out`` (a view of the row)."""
        if not self._read_gradient_norms_through_numpy(out):
            out[:] = [norm.item() for norm in self._gradient_norms(row)]

    def _read_gradient_norms_through_numpy(self, out: np.ndarray) -> bool:
        """Gradients in float32 or float64 are read through numpy, one BLAS dot product each: in a
        training loop that is ~5 µs less per step than ``torch._foreach_norm`` and a read of each
        norm on the 0.6 ms MLP, and less on every workload of ``benchmarks.overhead`` (torch's
        foreach ops are a loop over the tensors on the CPU too, and each op there runs cold). It
        also sums more accurately. False when they cannot be, with ``out`` untouched: a step with a
        missing gradient takes the general path; a sparse or half-precision gradient (a model cast
        after the Monitor was created) turns this path off."""
        if not (self._grads_via_numpy and self._all_grads_last_step):
            return False
        try:
            grads = [p.grad.numpy() for p in self._params]  # type: ignore[union-attr]
        except AttributeError:  # a missing gradient (None): found without a scan of the list each step
            return False
        except (RuntimeError, TypeError):  # sparse or bfloat16 (TypeError), a negative view (RuntimeError)
            self._grads_via_numpy = False
            return False
        float64 = False
        for g in grads:
            kind = g.dtype.char
            if kind == "d":
                float64 = True
            elif kind != "f":
                self._grads_via_numpy = False  # float16: numpy would sum its squares in float16
                return False
        squares = [np.vdot(g, g) for g in grads]  # each in its gradient's dtype, as torch sums them
        if float64:  # the root first: a float64 square may not fit in float32 where its root does
            with np.errstate(over="ignore"):  # a norm past float32's range is stored as inf
                out[:] = np.sqrt(squares)
        else:
            out[:] = squares
            np.sqrt(out, out=out)
        return True

    def _gradient_norms(self, row: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Each tracked parameter's gradient norm; 0 where it has no gradient, marked in ``_host_missing``."""
        grads = [p.grad for p in self._params]
        if self._all_grads_last_step:
            try:
                return self._grad_norms(grads, dtype)  # type: ignore[arg-type]
            except (TypeError, AttributeError):  # a None among the gradients (see _grad_norms), found without a scan each step
                pass
        missing = [g is None for g in grads]
        self._all_grads_last_step = not any(missing)
        if self._all_grads_last_step:
            return self._grad_norms(grads, dtype)  # type: ignore[arg-type]
        self._host_missing[row] = missing
        present = iter(self._grad_norms([g for g in grads if g is not None], dtype))
        return [self._zero if m else next(present) for m in missing]

    def _report_replaced_parameters(self) -> None:
        """At the first missing gradient, warn if tracked parameters are no longer the model's:
        replaced after the Monitor was created (``load_state_dict(assign=True)``, a parametrization
        such as ``weight_norm``), they never get a gradient again, and would read as cut off from
        the loss."""
        self._replaced_params_checked = True
        if self._model is None:
            return
        current = {id(p) for p in self._model.parameters()}
        gone = [name for name, p in zip(self._layout.param_names, self._params, strict=True) if id(p) not in current]
        if gone:
            shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
            warnings.warn(
                f"gradscope: {len(gone)} of the parameters the Monitor tracks are no longer the model's ({shown}): they were "
                "replaced after it was created (load_state_dict(assign=True), a parametrization such as weight_norm), so they "
                "get no gradient and are recorded as missing. Create the Monitor once the model's parameters are final",
                RuntimeWarning,
                stacklevel=4,
            )

    def _grad_norms(self, grads: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        if not grads:
            return []
        if self._plain_grads:
            try:
                return list(torch._foreach_norm(grads, 2, dtype=dtype))
            except (NotImplementedError, RuntimeError):
                self._plain_grads = False  # sparse (nn.Embedding(sparse=True)) or, after a cast, float64: the general path from now on
        return _float32_norms([_real(_dense(g)) for g in grads])

    def _measure_update_without_optimizer(self) -> None:
        # No optimizer hooks: Δθ is the change between consecutive step() calls (or the last step()
        # and close()) and belongs to the earlier step, the one whose gradients the update used.
        last = self._step - 1
        if last >= 0 and self.update_cadence.due(last):
            self._measure_update(last)

    def _finish_activations(self, step: int) -> bool:
        """Write the step's activation statistics; False when the buffer has no row left."""
        k = len(self._act_steps)
        if k >= self._act_buf.shape[0]:
            return False
        stats.finish_units(list(self._observed.values()))
        parts: list[torch.Tensor] = []
        for index in range(self._n_watched + 1):
            observed = self._observed.get(index)
            parts += self._nan_parts if observed is None else observed.finished()
        self._write(parts, self._act_rows[k])  # every module's statistics of the step in one write
        # the host-known counts of the modules that ran (the others stay NaN): the same from step to
        # step unless shapes change, so each distinct row is built once and copied
        key = tuple((i, o.n, o.units, o.saturation_denominator) for i, o in self._observed.items())
        counts = self._act_count_rows.get(key)
        if counts is None:
            if len(self._act_count_rows) >= 256:  # shapes that vary (sequence lengths): keep the cache small
                self._act_count_rows.clear()
            counts = self._act_count_rows[key] = np.full(self._act_counts.shape[1:], np.nan)
            counts[[i for i, *_ in key]] = [c for _, *c in key]
        self._act_counts[k] = counts
        self._act_steps.append(step)
        return True

    def _fill_sampled_sentinels(self, steps: np.ndarray, parts: np.ndarray, counts: np.ndarray) -> None:
        """On the host, at flush: each sampled step's watched-module sentinels are their output sums,
        already in the activation statistics, so the step does not write them on the device.
        ``steps`` is ``(..., n, cols)``, ``parts`` ``(..., k, watched+1, parts)``, ``counts`` alike."""
        if not self._act_steps or not self._n_watched:
            return
        rows = np.asarray(self._act_steps) - self._base
        sums = parts[..., : self._n_watched, stats.PART_SUM].copy()
        sums[np.isnan(counts[..., : self._n_watched, 0])] = 0.0  # did not run on that step: finite
        steps[..., rows, self._c_watched : self._c_pnorm] = sums

    def _record_forward_order(self) -> None:
        names = self._layout.watched_names
        seen = [names[i] for i in self._call_order]
        position = {n: i for i, n in enumerate(seen)}

        def rank(layer: str) -> tuple[int, int]:
            # A layer never called as a module (MultiheadAttention.out_proj, used through its weight)
            # goes right after its closest called ancestor; one without (an unused branch) goes last.
            name = layer
            while name not in position and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in position:
                return position[name], int(name != layer)
            return len(seen), 0

        layers = sorted(self._layout.layer_names, key=rank)
        self._set_meta({"forward_order": seen, "layers": layers})

    def _set_meta(self, values: dict[str, Any]) -> None:
        """Store run metadata during training: a failed write (a full disk) is a write error, which
        leaves the run partial, not a reason to stop recording steps."""
        try:
            self._writer.set_meta(values)
        except Exception as e:
            self._write_error(e)

    # ------------------------------------------------------------------ flush (one host copy)

    def _flush(self, upto: int, *, collective: bool = True) -> None:
        """Write the steps before ``upto``. Under torch.distributed, with ``collective``, every rank
        takes part (they all flush at the same steps); without it, or once the process group is
        gone, rank 0 writes its own values alone (see close)."""
        n = upto - self._base
        if n <= 0:
            return
        self._write_step_values(n)
        loss_given = ~_rows_mask(self._loss_missing, n)
        k = len(self._act_steps)
        counts = self._act_counts[:k]
        collective = collective and self._dist is not None and self._dist.connected
        if self._dist is None:
            host = self._buf[:n].cpu().numpy().astype(np.float64)  # the one device-to-host copy
            parts = self._act_buf[:k].cpu().numpy().astype(np.float64)  # (k, watched+1, parts)
            self._fill_sampled_sentinels(host, parts, counts)
            per_rank = None
        else:
            host, parts, counts, per_rank, loss_given = self._combine_ranks(n, k, loss_given, collective=collective)
        if self._dist is None or self._dist.is_writer:
            step_columns = self._derive_step_columns(host, n, self._base, per_rank, loss_given)
            chunks = [(schema.STEP_STREAM, np.arange(self._base, upto), step_columns)]
            if k:
                act = stats.finish_on_host(parts, counts)  # (k, watched+1, metrics)
                act = act.transpose(0, 2, 1).reshape(k, -1)  # columns: metric-major
                chunks.append((schema.FORWARD_STREAM, np.asarray(self._act_steps), act))
            try:
                self._writer.append_chunks(chunks)  # one transaction: a crash keeps the whole flush or none of it
            except Exception as e:
                # A full disk or a vanished directory must not stop training: these steps are
                # dropped, recording goes on (later flushes may succeed), and the run ends partial.
                self._write_error(e)
        # Carry over the row of the step being recorded next (its update may already have landed).
        carry = self._buf[n].clone()
        self._buf.fill_(math.nan)
        self._buf[0].copy_(carry)
        self._host_loss.fill(math.nan)
        self._host_losses_written = 0
        self._act_buf.fill_(math.nan)
        self._act_counts.fill(np.nan)
        self._act_steps.clear()
        self._host_lr = self._host_lr[n:]
        self._host_missing[0] = self._host_missing[n]
        self._host_missing[1:] = False
        self._host_modules_checked[0] = self._host_modules_checked[n]
        self._host_modules_checked[1:] = False
        self._io_unchecked = _rows_after(self._io_unchecked, n)
        self._input_unseen = _rows_after(self._input_unseen, n)
        self._output_unseen = _rows_after(self._output_unseen, n)
        self._loss_missing = _rows_after(self._loss_missing, n)
        self._base = upto
        self._flush_deadline = self._next_flush_deadline()
        self._time_steps()
        try:
            if self._detects_live and (self._dist is None or self._dist.is_writer) and self._detection_due(upto, self._new_nonfinite(host, loss_given)):
                self._detect_live()
        finally:
            if collective:
                self._agree_on_stop()

    def _agree_on_stop(self) -> None:
        """Under torch.distributed only rank 0 runs live detection. A framework callback that stops
        training at an error (``on_finding="stop"``) must stop every rank after the same step, or
        the others wait forever in their next collective: rank 0's decision is sent to every rank
        at each write, where they all meet anyway."""
        policy = self._on_finding_callable
        if self._dist is None or not getattr(policy, "agrees_on_stop", False):
            return
        stop = self._dist.broadcast_flag(getattr(policy, "stop_requested", None) is not None, self._device)
        policy.stop_decided(stop)  # type: ignore[union-attr]

    def _write_step_values(self, n: int) -> None:
        """The held steps' losses, gradient norms and input/output sums into the buffer."""
        # The host-read losses not written yet (NaN on rows whose loss is on a device): a flush tried
        # again after a failure must not write over the device losses its first try wrote.
        written = self._host_losses_written
        if written < n:
            self._buf[written:n, 0].copy_(torch.from_numpy(self._host_loss[written:n]))
            self._host_losses_written = n
        self._held_losses.write_into(self._buf[:, :1])
        self._held_grads.write_into(self._buf[:, self._c_grad : self._c_io])
        self._held_io.write_into(self._buf[:, self._c_io : self._c_watched])

    def _combine_ranks(
        self, n: int, k: int, loss_given: np.ndarray, *, collective: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One all_gather of this flush's buffers, combined across ranks (see collect/distributed.py).
        ``loss_given`` says which of this rank's steps have a loss; the combined one says which
        steps have one on any rank (their loss is the mean over the ranks that gave one). Without
        ``collective``, this rank's values alone, the other ranks' losses NaN (see close)."""
        assert self._dist is not None
        counts = torch.from_numpy(self._act_counts[:k]).to(self._device)
        given = torch.from_numpy(loss_given).to(self._device)
        tensors = [self._buf[:n], self._act_buf[:k], counts, given]
        if collective:
            steps, acts, act_counts, given_by_rank = self._dist.gather(tensors)
            ranks = np.arange(self._dist.world_size)
        else:
            steps, acts, act_counts, given_by_rank = (t.unsqueeze(0).float() for t in tensors)
            ranks = np.array([self._dist.rank])
        steps_np = steps.cpu().numpy().astype(np.float64)  # (world, n, cols)
        acts_np = acts.cpu().numpy().astype(np.float64)  # (world, k, watched+1, parts)
        counts_np = act_counts.cpu().numpy().astype(np.float64)
        given_np = given_by_rank.cpu().numpy().T > 0.5  # (n, world)
        self._fill_sampled_sentinels(steps_np, acts_np, counts_np)  # per rank, before ranks are compared
        with np.errstate(invalid="ignore"):
            host = steps_np.mean(axis=0)  # gradients, weights, updates: equal on every rank under DDP
            cols = self._sentinel_cols
            host[:, cols] = steps_np[:, :, cols].sum(axis=0)
            losses = steps_np[:, :, 0].T  # (n, world)
            givers = given_np.sum(axis=1)
            host[:, 0] = np.where(given_np, losses, 0.0).sum(axis=1) / np.maximum(givers, 1)
            host[givers == 0, 0] = math.nan
            # A rank "went non-finite" by its own loss or forward outputs; gradients cannot tell, as
            # DDP's all-reduce spreads one rank's NaN gradient to every rank. A step a rank gave no
            # loss for holds a NaN placeholder there, not a NaN loss.
            outputs = steps_np[:, :, cols]
            # watched modules not checked on a step hold NaN placeholders, not NaN values
            outputs[:, ~self._host_modules_checked[:n], : self._n_watched] = 0.0
            bad = (~np.isfinite(losses) & given_np) | ~np.isfinite(outputs).all(axis=2).T
            first_bad = np.where(bad.any(axis=1), ranks[bad.argmax(axis=1)], np.nan)
            parts = acts_np.sum(axis=0)
            parts[..., stats.PART_MIN] = acts_np[..., stats.PART_MIN].min(axis=0)
            parts[..., stats.PART_MAX] = acts_np[..., stats.PART_MAX].max(axis=0)
            parts[..., stats.PART_ALIVE] = acts_np[..., stats.PART_ALIVE].mean(axis=0)
            counts_all = counts_np[0].copy()
            counts_all[..., 0] = counts_np[..., 0].sum(axis=0)
            counts_all[..., 2] = counts_np[..., 2].sum(axis=0)
        rank_losses = np.full((n, self._dist.world_size if self._dist.keeps_rank_losses else 0), np.nan)
        if self._dist.keeps_rank_losses:
            rank_losses[:, ranks] = losses
        per_rank = np.concatenate([rank_losses, first_bad[:, None]], axis=1)
        return host, parts, counts_all, per_rank, givers > 0

    def _derive_step_columns(
        self, host: np.ndarray, n: int, first_step: int, per_rank: np.ndarray | None, loss_given: np.ndarray
    ) -> np.ndarray:
        """Device columns (per parameter) → stored columns (run, per layer, per parameter, sentinel)."""
        p = self._n_params
        grad = host[:, self._c_grad : self._c_grad + p]
        pnorm = host[:, self._c_pnorm : self._c_pnorm + p]
        upd = host[:, self._c_upd : self._c_upd + p]
        sentinel = host[:, self._sentinel_cols]  # watched modules, input batch, model output
        missing = self._host_missing[:n]
        grad = np.where(missing, 0.0, grad)
        lr = self._learning_rates(n)
        if self._has_optimizer:
            # 1 where optimizer.step() did not run for the step: a GradScaler skipping Inf/NaN
            # gradients, or a loop that records steps it does not take. Known on every step with a
            # GradScaler, else on the steps whose update is measured (NaN on the others).
            steps = np.arange(first_step, first_step + n)
            known = np.ones(n, dtype=bool) if self._grad_scaler is not None else self.update_cadence.due_steps(steps)
            stepped = _rows_mask([s - first_step for s in self._optimizer_stepped if s >= first_step], n)
            skipped = np.where(known, (~stepped).astype(np.float64), np.nan)
            self._optimizer_stepped.difference_update(range(first_step, first_step + n))
            lr = np.concatenate([lr, skipped[:, None]], axis=1)
        if per_rank is not None:
            lr = np.concatenate([lr, per_rank], axis=1)  # loss per rank, first non-finite rank
        sq = grad * grad
        global_norm = np.sqrt(sq.sum(axis=1))
        # Per-layer sums over each layer's parameters: one reduceat over the parameter columns sorted
        # by layer, for all five metrics at once (a NaN stays in its own layer, unlike in a matmul).
        order, starts, layers = self._layer_segments
        with np.errstate(over="ignore"):
            per_param = np.stack([sq, pnorm * pnorm, upd * upd, ~np.isfinite(grad), missing])[:, :, order]
        per_layer = np.zeros((5, n, len(self._layout.layer_names)))
        per_layer[:, :, layers] = np.add.reduceat(per_param, starts, axis=2)
        np.sqrt(per_layer[:3], out=per_layer[:3])
        layer_grad, layer_pnorm, layer_upd, layer_nonfinite, layer_missing = per_layer
        with np.errstate(invalid="ignore"):
            output_nonfinite = (~np.isfinite(sentinel)).astype(np.float64)
        output_nonfinite[~self._host_modules_checked[:n], : self._n_watched] = np.nan  # not checked
        output_nonfinite[_rows_mask(self._io_unchecked, n), self._n_watched :] = np.nan
        output_nonfinite[_rows_mask(self._input_unseen, n), self._n_watched] = np.nan
        output_nonfinite[_rows_mask(self._output_unseen, n), self._n_watched + 1] = np.nan
        return np.concatenate(
            [
                host[:, :1],
                (~loss_given).astype(np.float64)[:, None],
                global_norm[:, None],
                lr,
                layer_grad,
                layer_pnorm,
                layer_upd,
                layer_nonfinite,
                layer_missing,
                grad,
                pnorm,
                upd,
                missing.astype(np.float64),
                output_nonfinite,
            ],
            axis=1,
        )

    # ------------------------------------------------------------------ live detection

    def _next_flush_deadline(self) -> float:
        return time.perf_counter() + (self.flush_seconds if self.flush_seconds is not None else math.inf)

    def _time_steps(self) -> None:
        """The median time between step() calls over the last flush: the training loop's own pace,
        unmoved by an evaluation pass or a checkpoint between two steps."""
        clock = self._step_clock
        if len(clock) >= 2:
            periods = np.diff(np.asarray(clock))
            middle = len(periods) // 2
            self._step_seconds = float(np.partition(periods, middle)[middle])  # a median, at a third of np.median's cost
        self._step_clock = clock[-1:]

    def _new_nonfinite(self, host: np.ndarray, loss_given: np.ndarray) -> bool:
        """Whether this flush holds the run's first NaN/Inf loss or gradient norm (a step given no
        loss holds a NaN placeholder, not a NaN loss)."""
        if self._nonfinite_flushed:
            return False
        bad = not np.isfinite(host[:, self._c_grad : self._c_io]).all() or not np.isfinite(host[loss_given, 0]).all()
        self._nonfinite_flushed = bad
        return bad

    def _learning_rates(self, n: int) -> np.ndarray:
        rows = self._host_lr[:n]
        if not rows or not self._n_groups:
            return np.full((n, self._n_groups), math.nan)
        try:
            return np.asarray(rows, dtype=np.float64).reshape(n, self._n_groups)
        except (TypeError, ValueError):  # tensor learning rates, or groups added mid-run
            lr = np.full((n, self._n_groups), math.nan)
            for i, row in enumerate(rows):
                values = [float(v) for v in row][: self._n_groups]  # tensor learning rates are read here, once per flush
                lr[i, : len(values)] = values
            if not self._added_groups_reported and any(len(row) > self._n_groups for row in rows):
                self._added_groups_reported = True
                warnings.warn(
                    f"gradscope: the optimizer has more parameter groups than the {self._n_groups} it had when the Monitor "
                    "was created (add_param_group); the learning rates of the new ones are not recorded (a run's lr.<group> "
                    "columns are fixed at its start). Add every group before creating the Monitor",
                    RuntimeWarning,
                    stacklevel=6,  # the step() that wrote
                )
            return lr

    def _detection_due(self, step: int, nonfinite: bool) -> bool:
        if self.detect_every is not None:
            return step - self._last_detect >= self.detect_every
        if nonfinite or self._detect_cost is None:
            return True
        # Budget: detection may use LIVE_DETECTION_SHARE of training time (1%), so it runs again once
        # the steps trained since its last run took 99× its cost, and LIVE_DETECTION_SECONDS (10 s)
        # at least. A run costs ~15 ms on a small model, so by the share alone it came every ~1.5 s:
        # more often than any finding needs (a first NaN/Inf is checked at once, above), and the
        # cold caches it leaves made it cost more than its share.
        # Re-evaluated at every flush with the current step time.
        wait = max((1 - LIVE_DETECTION_SHARE) / LIVE_DETECTION_SHARE * self._detect_cost, LIVE_DETECTION_SECONDS)
        return (step - self._last_detect) * self._step_seconds >= wait

    def _detect_live(self) -> None:
        from gradscope.detect.registry import diagnose_live

        started = time.perf_counter()
        self._last_detect = self._step
        run = Run._from_connection(
            self._writer.conn,
            self._where,
            self._writer.log_dir,
            head_steps=self.live_window,
            since_step=max(0, self._step - self.live_window),
        )
        try:
            self._report_live(diagnose_live(run, select=self._select, ignore=self._ignore))
        finally:
            self._detect_cost = time.perf_counter() - started

    def _report_live(self, findings: Iterable[Finding]) -> None:
        for finding in findings:
            # One report per problem: a detector's layer list can shift between checks as more steps
            # arrive, so a code is reported again only when its severity rises.
            seen = self._live_seen.get(finding.code)
            if seen is not None and finding.severity.rank <= seen:
                continue
            self._live_seen[finding.code] = finding.severity.rank
            self._live_findings.append(finding)
            if self._on_finding_callable is not None:
                self._on_finding_callable(finding)
            elif self._live is _LiveAction.WARN and finding.severity.rank >= 1:
                warnings.warn(f"gradscope: {finding}", RuntimeWarning, stacklevel=4)
            elif self._live is _LiveAction.RAISE and finding.severity.rank >= 2:
                raise TrainingFailure(finding)

    # ------------------------------------------------------------------ failure handling

    def _hook_failed(self, name: str, error: Exception) -> None:
        if self.strict:
            raise error
        self._failed_hooks.add(name)
        warnings.warn(
            f"gradscope: statistics of {name or 'the model'} are skipped from now on: {type(error).__name__}: {error}",
            RuntimeWarning,
            stacklevel=3,
        )

    def _write_error(self, error: Exception) -> None:
        if self.strict:
            raise error
        self._write_failed = True
        if "write" not in self._failed_hooks:
            self._failed_hooks.add("write")
            warnings.warn(
                f"gradscope: cannot write the run to {self._where} ({type(error).__name__}: {error}); training goes on, "
                "steps that cannot be written are dropped and the run will read as partial",
                RuntimeWarning,
                stacklevel=3,
            )

    def _internal_error(self, where: str, error: Exception) -> None:
        if self.strict or isinstance(error, TrainingFailure):
            raise error
        key = f"internal:{where}"
        if key not in self._failed_hooks:
            self._failed_hooks.add(key)
            warnings.warn(
                f"gradscope: internal error in {where}, training goes on: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------------- helpers


def _positive_seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise InvalidInputError(f"expected {name} to be a number of seconds > 0, or None, but got {value!r}")
    return float(value)


def _parse_on_finding(value: OnFinding) -> tuple[_LiveAction, Callable[[Finding], Any] | None]:
    if value is None:
        return _LiveAction.NONE, None
    if callable(value):
        return _LiveAction.NONE, value
    try:
        return _LiveAction(value), None
    except ValueError:
        raise InvalidInputError(
            f"expected on_finding to be 'warn', 'raise', a callable or None but got {value!r}"
        ) from None


_INTEGER_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})
_LOSS_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16}) | _INTEGER_DTYPES


def _kept(value: Any) -> Any:
    """A copy of a tensor value the loop may change in place before the write reads it."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _training_forward() -> bool:
    """Whether a forward is part of training, for the hooks: not under ``torch.no_grad()`` (an
    evaluation pass), and not a trace of the model (``torch.jit.trace``, ``torch.export``), whose
    inputs are placeholders and whose calls are no training step."""
    # torch.jit.is_tracing, not torch._C._is_tracing: torch.compile knows the former (no graph break)
    return torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_exporting()  # type: ignore[attr-defined]


def _check_loss(loss: object) -> torch.Tensor | float | None:
    """The loss given to ``step()``, checked: a real scalar tensor or a number, else a clear error.

    A plain CPU tensor comes back as its value, a float: reading it waits for no device, and kept on the
    host it costs no device op (a detach alone is ~8 µs in a 0.6 ms step on CPU, where every extra
    op runs cold); the check of the input batch and output reads it anyway. A loss on another
    device stays a tensor, read at the next write."""
    if type(loss) is torch.Tensor:
        if loss.is_cpu and loss.numel() == 1:
            value = loss.item()
            if type(value) is float:  # a floating-point loss on the CPU: the usual case, read in ~1 µs
                return value
        elif loss.dtype in _LOSS_DTYPES and loss.numel() == 1 and not loss.is_meta:
            return loss
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.is_meta or not (loss.is_floating_point() or loss.dtype in _INTEGER_DTYPES):
            raise InvalidInputError(
                f"expected a real scalar loss but got a {loss.dtype} tensor on {loss.device}; pass the real, "
                "computed loss (e.g. loss.real or the value the optimizer minimises)"
            )
        if loss.numel() != 1:
            raise InvalidInputError(
                f"expected a scalar loss but got a tensor of shape {tuple(loss.shape)}; reduce it first (loss.mean())"
            )
        # an integer loss on the CPU is read too; a subclass (a DTensor) is left for the write
        return float(loss.item()) if type(loss) is torch.Tensor and loss.is_cpu else loss
    if isinstance(loss, (int, float, np.floating, np.integer)) and not isinstance(loss, bool):
        return float(loss)
    raise InvalidInputError(f"expected the loss as a scalar tensor or a number but got {type(loss).__name__}")


def _rows_mask(rows: list[int], n: int) -> np.ndarray:
    """(n,) bool: True at the listed buffer rows below ``n`` (the rows a flush writes)."""
    mask = np.zeros(n, dtype=bool)
    mask[[row for row in rows if row < n]] = True
    return mask


def _rows_after(rows: list[int], n: int) -> list[int]:
    """The listed rows a flush of ``n`` rows leaves in the buffer, renumbered from 0 (they move up)."""
    return [row - n for row in rows if row >= n]


def _summable(x: torch.Tensor) -> bool:
    """Whether ``x`` can hold NaN/Inf and be summed: a real floating-point, dense tensor. (An empty
    one sums to 0, finite, so unlike ``stats.is_measurable`` its size is not checked: one call less
    on every forward.)"""
    return x.is_floating_point() and x.layout == torch.strided


def _add_sum(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A NaN/Inf sentinel: the running sum of ``x`` over the step's forwards, non-finite exactly
    when some value was (or when the values reach ~1e38, far past any activation that trains)."""
    grad_was_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # no autograd graph for a sentinel; cheaper than x.detach()
    try:
        s = x.sum() if x.dtype == torch.float32 else x.sum(dtype=torch.float32)
        return s if total is None else total + s
    finally:
        torch._C._set_grad_enabled(grad_was_enabled)


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real pairs, with the same L2 norm (float norms refuse complex input)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _float32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's L2 norm as a 0-d float32 tensor, summed in float32 (half precision too) or, for
    float64, in float64 and then rounded (inf past float32's range): the batched float32 norm
    refuses to narrow float64, and a float32 copy would overflow its squares far earlier."""
    if all(t.dtype != torch.float64 for t in tensors):
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return [torch.linalg.vector_norm(t, dtype=None if t.dtype == torch.float64 else torch.float32).float() for t in tensors]


def _divided(norms: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
    """Each norm over ``scale``, on the device, in one batched op (a new list: a missing gradient's
    norm is a shared zero, never written to)."""
    try:
        return list(torch._foreach_div(norms, scale))
    except RuntimeError:  # norms on several devices (a model split over them)
        return [n / scale.to(n.device) for n in norms]


def _dense(grad: torch.Tensor) -> torch.Tensor:
    if grad.layout != torch.strided:
        return grad.coalesce().values() if grad.is_sparse else grad.to_dense()
    return grad


# Monitors still open at interpreter exit are flushed, so a script that ends (or dies of an uncaught
# exception) without closing its Monitor keeps every step it recorded.
_open_monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _close_open_monitors() -> None:
    for monitor in list(_open_monitors):
        with contextlib.suppress(Exception):
            monitor.close(status="failed")
