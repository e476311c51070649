"""``diagnose``: run the registered detectors over a run, isolating failures."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from gradscope.detect.base import Detector, detector_classes
from gradscope.errors import InvalidInputError
from gradscope.findings import Finding, Severity, sort_findings
from gradscope.store.run import Run, load

if TYPE_CHECKING:
    from gradscope.collect.monitor import Monitor

__all__ = ["DETECTOR_ERROR", "Findings", "diagnose", "diagnose_live", "parse_codes", "registered_detectors", "selection"]

DETECTOR_ERROR = "detector_error"
_log = logging.getLogger("gradscope")


class Findings(list[Finding]):
    """The findings of one diagnosis, most severe first. A plain list, plus :meth:`summary`."""

    def __init__(self, findings: Iterable[Finding] = (), run: Run | None = None) -> None:
        super().__init__(sort_findings(list(findings)))
        self.run = run

    def by_severity(self, at_least: str | Severity) -> list[Finding]:
        level = Severity.parse(at_least).rank
        return [f for f in self if f.severity.rank >= level]

    def summary(self) -> str:
        """A short plain-text report: a verdict line, then one line per finding with its first fix."""
        counts = {s: sum(1 for f in self if f.severity is s) for s in Severity}
        if not self:
            verdict = "healthy: no findings"
        else:
            parts = [f"{counts[s]} {s.value}{'s' if counts[s] != 1 else ''}" for s in reversed(list(Severity)) if counts[s]]
            verdict = "problems found: " + ", ".join(parts)
        lines = [verdict]
        for f in self:
            lines.append(f"  {f}")
            if f.fixes:
                lines.append(f"    fix ({f.fixes[0].kind.value}): {f.fixes[0].action}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def registered_detectors() -> dict[str, type[Detector]]:
    """Every detector known to gradscope, by code."""
    _load_builtin_detectors()
    return detector_classes()


def diagnose(
    run: str | os.PathLike[str] | Run | Monitor,
    *,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Findings:
    """Run the detectors over a run and return their findings, most severe first.

    Args:
        run: a run directory, a :class:`Run`, or a :class:`Monitor` (diagnosed on what it recorded so far).
        select: only these detector codes (a list, or one string ``"a,b"``); ``ignore``: skip these codes.
        config: per-code threshold overrides, e.g. ``{"exploding_loss": {"threshold_decades": 2.0}}``
            (each detector's settings are in docs/detectors.md).

    A detector that crashes becomes a ``detector_error`` finding (severity ``info``); the others still report.
    """
    # A Monitor can only exist if its module was imported; checking sys.modules keeps torch out of
    # processes that only read runs (gradscope check, reports).
    monitor_module = sys.modules.get("gradscope.collect.monitor")
    if monitor_module is not None and isinstance(run, monitor_module.Monitor):
        run = run.run
    if not isinstance(run, Run):
        if not isinstance(run, (str, os.PathLike)):
            raise InvalidInputError(
                f"expected a run directory, a gradscope.Run or a gradscope.Monitor but got {type(run).__name__}"
            )
        run = load(run)
    detectors = _select(select, ignore, config or {})
    findings: list[Finding] = []
    for detector in detectors:
        try:
            findings.extend(detector.run(run))
        except Exception as e:
            findings.append(
                Finding(
                    code=DETECTOR_ERROR,
                    severity=Severity.INFO,
                    step=None,
                    message=f"the {detector.code} detector failed on this run ({type(e).__name__}: {e}); "
                    "its verdict is missing, the other detectors still ran. Please report this as a gradscope bug.",
                    evidence={},
                    fixes=(),
                )
            )
            _log.debug("detector %s failed:\n%s", detector.code, traceback.format_exc())
    made = {f.code for f in findings}
    replaced = {code for detector in detectors if detector.code in made for code in detector.supersedes}
    return Findings([f for f in findings if f.code not in replaced] if replaced else findings, run)


def check_codes(select: str | Iterable[str] | None, ignore: str | Iterable[str] | None) -> None:
    """Raise ``InvalidInputError`` naming any unknown detector code in ``select`` or ``ignore``.
    Loads the built-in detectors, so a Monitor calls it when it is created, not in the middle of training."""
    _select(select, ignore, {})


def diagnose_live(run: Run, *, select: str | Iterable[str] | None = None, ignore: str | Iterable[str] | None = None) -> Findings:
    """The diagnosis a Monitor runs during training, on the run recorded so far."""
    return diagnose(run, select=select, ignore=ignore)


def parse_codes(values: str | Iterable[str] | None) -> list[str] | None:
    """Detector codes from ``"a,b"``, ``["a", "b,c"]`` or ``None`` (meaning: no restriction).

    Blank entries are dropped and duplicates removed, keeping the first occurrence's order.
    """
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    codes: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidInputError(f"expected detector codes as strings but got {type(item).__name__}")
        for code in item.split(","):
            code = code.strip()
            if code and code not in codes:
                codes.append(code)
    return codes


def selection(select: str | Iterable[str] | None, ignore: str | Iterable[str] | None) -> tuple[list[str], set[str]]:
    """The codes ``select``/``ignore`` name (``"a,b"`` too, as on the command line): those a diagnosis
    runs, in order, and every code given that no detector has."""
    available = registered_detectors()
    picked, left_out = parse_codes(select), parse_codes(ignore)
    chosen = picked if picked is not None else list(available)
    skipped = set(left_out or ())
    unknown = (set(chosen) | skipped) - set(available)
    return [code for code in chosen if code not in skipped and code not in unknown], unknown


def _select(select: str | Iterable[str] | None, ignore: str | Iterable[str] | None, config: Mapping[str, Any]) -> list[Detector]:
    available = registered_detectors()
    codes, unknown_codes = selection(select, ignore)
    unknown = sorted(unknown_codes | (set(config) - set(available)))
    if unknown:
        raise InvalidInputError(
            f"expected detector codes among {', '.join(sorted(available)) or '(none registered)'} but got {', '.join(unknown)}"
        )
    return [available[code](**config.get(code, {})) for code in codes]


def _load_builtin_detectors() -> None:
    import gradscope.detect.rules  # noqa: F401  (defining the classes registers them)
