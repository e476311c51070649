"""What the framework callbacks share: turning ``on_finding`` into live actions, and the end-of-training
diagnosis. Framework-free, so it imports without Lightning or transformers."""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from gradscope.detect.registry import Findings, diagnose
from gradscope.errors import GradscopeError, InvalidInputError, TrainingFailure
from gradscope.findings import Finding, Severity

if TYPE_CHECKING:
    from gradscope.collect.monitor import Monitor
    from gradscope.store.run import Run

__all__ = ["FindingPolicy", "LiveAction", "final_findings"]

_log = logging.getLogger("gradscope.integrations")

# Monitor options the callbacks set themselves: passing them too would be ambiguous.
RESERVED_OPTIONS = ("model", "optimizer", "log_dir", "on_finding")


class LiveAction(enum.Enum):
    WARN = "warn"
    RAISE = "raise"
    STOP = "stop"
    NONE = "none"


class FindingPolicy:
    """What a callback does with each new live finding: log it, then warn, raise, stop or call the user.

    Given to the :class:`~gradscope.Monitor` as its ``on_finding`` callable, so the callback sees every
    finding (all severities) and keeps the framework's own stop flag in its hands.
    """

    def __init__(self, on_finding: str | Callable[[Finding], Any] | None, *, stacklevel: int = 2) -> None:
        self.user_callable: Callable[[Finding], Any] | None = None
        if on_finding is None:
            self.action = LiveAction.NONE
        elif callable(on_finding):
            self.action = LiveAction.NONE
            self.user_callable = on_finding
        else:
            try:
                self.action = LiveAction(on_finding)
            except ValueError:
                raise InvalidInputError(
                    f"expected on_finding to be 'warn', 'raise', 'stop', a callable or None but got {on_finding!r}"
                ) from None
        self.stop_requested: Finding | None = None
        self.stopped_with_rank0 = False  # under torch.distributed: rank 0 found the error (see stop_decided)
        self.seen: list[Finding] = []
        self.listeners: list[Callable[[Finding], None]] = []

    @property
    def should_stop(self) -> bool:
        """Whether the framework should end training now (``on_finding="stop"`` and an error)."""
        return self.stop_requested is not None or self.stopped_with_rank0

    @property
    def agrees_on_stop(self) -> bool:
        """Whether the Monitor must share rank 0's stop decision with every rank at each write."""
        return self.action is LiveAction.STOP

    def stop_decided(self, stop: bool) -> None:
        """Rank 0's stop decision, received by every rank at a write: only rank 0 runs live
        detection, and every rank must stop after the same step."""
        if stop and self.stop_requested is None:
            self.stopped_with_rank0 = True

    @property
    def live(self) -> bool:
        """Whether the Monitor should run live detection at all."""
        return self.action is not LiveAction.NONE or self.user_callable is not None

    def monitor_option(self) -> Callable[[Finding], Any] | None:
        return self if self.live else None

    def __call__(self, finding: Finding) -> None:
        self.seen.append(finding)
        _log.info("gradscope: %s", finding)
        for listener in self.listeners:
            listener(finding)
        if self.user_callable is not None:
            self.user_callable(finding)
            return
        is_error = finding.severity is Severity.ERROR
        if self.action is LiveAction.RAISE and is_error:
            raise TrainingFailure(finding)
        # As the Monitor's own "raise": errors raise, nothing else is said; "stop" warns like "warn".
        if self.action in (LiveAction.WARN, LiveAction.STOP) and finding.severity.rank >= 1:
            warnings.warn(f"gradscope: {finding}", RuntimeWarning, stacklevel=2)
        if self.action is LiveAction.STOP and is_error and self.stop_requested is None:
            self.stop_requested = finding

    def warn_unseen(self, findings: Findings) -> None:
        """At the end of training: warn about findings of the full diagnosis that live detection missed."""
        if self.action not in (LiveAction.WARN, LiveAction.STOP) and self.user_callable is None:
            return
        seen = {(f.code, f.layers) for f in self.seen}
        for finding in findings:
            if (finding.code, finding.layers) in seen or finding.severity.rank < 1:
                continue
            if self.user_callable is not None:
                self.user_callable(finding)
            else:
                warnings.warn(f"gradscope: {finding}", RuntimeWarning, stacklevel=2)


def check_monitor_options(options: dict[str, Any], where: str) -> None:
    clash = sorted(set(options) & set(RESERVED_OPTIONS))
    if clash:
        raise InvalidInputError(
            f"expected Monitor options other than {', '.join(RESERVED_OPTIONS)} but got {', '.join(clash)}; "
            f"{where} attaches the Monitor to the framework's model and optimizer itself, and takes log_dir and "
            "on_finding as its own arguments"
        )


def final_findings(run: Any) -> Findings:
    """The diagnosis of the whole run at the end of training (not the bounded live window)."""
    findings = diagnose(run)
    _log.info("gradscope diagnosis of %s:\n%s", getattr(run, "path", None) or "the run", findings.summary())
    return findings


class CallbackResults:
    """What both framework callbacks give back: the findings and the run, during and after training."""

    monitor: Monitor | None
    _policy: FindingPolicy | None
    _final: Findings | None
    _run: Run | None
    _how_to_start: ClassVar[str]  # the call that records a run, for the error when there is none

    @property
    def findings(self) -> Findings:
        """After training: the diagnosis of the whole run, most severe first. During: the live findings so far."""
        if self._final is not None:
            return self._final
        return Findings(self._policy.seen if self._policy is not None else [])

    @property
    def run(self) -> Run:
        """The run recorded by the last (or current) training."""
        if self.monitor is not None:
            return self.monitor.run
        if self._run is not None:
            return self._run
        raise GradscopeError(f"expected a run but none was recorded yet; call {self._how_to_start} with this callback first")
