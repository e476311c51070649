"""Scoring the detectors against the scenario labels, and rendering the result as a table.

The metrics, per run of a scenario on one seed:

- an *alarm* is a finding at ``warning`` or ``error``;
- a faulty run is *detected* when one of its alarms has a code among the label's expected codes;
  that alarm is a *match*, and the *matching finding* is the first match in the order
  ``diagnose`` returns (most severe first, then earliest step): the one a reader acts on;
- *right first fix*: the matching finding's first fix has one of the label's fix kinds;
- *delay*: the earliest step of any match minus the fault's onset step;
- a healthy run raises a *false alarm* when it has any alarm at all.

A run whose training or diagnosis crashed is counted as missed (faulty) or reported apart (healthy),
never silently dropped.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.scenarios.core import Label
from gradscope.findings import Finding, Severity, sort_findings

__all__ = ["TARGETS", "RunOutcome", "RunScore", "Summary", "render_markdown", "render_text", "score_run", "summarize"]

# The targets the detectors are held to on this suite (issue 3).
TARGETS = {"recall": 0.95, "false_alarms": 0, "right_first_fix": 0.90}


@dataclass(frozen=True)
class RunOutcome:
    """What came out of one scenario run: its label and what ``gradscope.diagnose`` found."""

    scenario: str
    seed: int
    label: Label
    findings: tuple[Finding, ...]
    seconds: float = 0.0  # wall clock, training and diagnosis
    error: str | None = None  # the training or the diagnosis raised this
    notes: tuple[str, ...] = ()  # gradscope warnings seen while training (internal errors)
    cpu_seconds: float = 0.0  # CPU time of the worker: steadier than wall clock on a shared machine

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "label": self.label.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "seconds": self.seconds,
            "error": self.error,
            "notes": list(self.notes),
            "cpu_seconds": self.cpu_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOutcome:
        return cls(
            scenario=data["scenario"],
            seed=int(data["seed"]),
            label=Label.from_dict(data["label"]),
            findings=tuple(Finding.from_dict(f) for f in data["findings"]),
            seconds=float(data.get("seconds", 0.0)),
            error=data.get("error"),
            notes=tuple(data.get("notes", ())),
            cpu_seconds=float(data.get("cpu_seconds", 0.0)),
        )


@dataclass(frozen=True)
class RunScore:
    outcome: RunOutcome
    alarms: tuple[Finding, ...]
    matched: Finding | None
    delay: int | None

    @property
    def healthy(self) -> bool:
        return self.outcome.label.healthy

    @property
    def detected(self) -> bool:
        return self.matched is not None

    @property
    def false_alarm(self) -> bool:
        return self.healthy and bool(self.alarms)

    @property
    def first_fix(self) -> str | None:
        """The first fix kind of the finding a reader acts on: the match, else the top alarm."""
        finding = self.matched or (self.alarms[0] if self.alarms else None)
        if finding is None or not finding.fixes:
            return None
        return finding.fixes[0].kind.value

    @property
    def right_fix(self) -> bool | None:
        """Whether the matching finding's first fix is right; ``None`` when there is no match."""
        if self.matched is None:
            return None
        return self.first_fix in self.outcome.label.fix_kinds


def score_run(outcome: RunOutcome) -> RunScore:
    """Score one run against its label (see the module docstring for the definitions)."""
    # In the order diagnose returns them (most severe first, then earliest), whatever order they came in.
    alarms = tuple(f for f in sort_findings(outcome.findings) if f.severity.rank >= Severity.WARNING.rank)
    label = outcome.label
    if label.healthy:
        return RunScore(outcome, alarms, None, None)
    matches = [f for f in alarms if f.code in label.codes]
    matched = matches[0] if matches else None
    delay = None
    steps = [f.step for f in matches if f.step is not None]
    if steps and label.onset is not None:
        delay = min(steps) - label.onset
    return RunScore(outcome, alarms, matched, delay)


@dataclass(frozen=True)
class Summary:
    n_faulty: int
    n_detected: int
    n_healthy: int
    n_false_alarms: int
    n_right_fix: int
    delays: tuple[int, ...]
    n_errors: int
    missed: tuple[str, ...] = field(default=())  # "scenario/seed" of faulty runs not detected
    false_alarms: tuple[str, ...] = field(default=())
    wrong_fix: tuple[str, ...] = field(default=())

    @property
    def recall(self) -> float:
        return self.n_detected / self.n_faulty if self.n_faulty else float("nan")

    @property
    def right_first_fix(self) -> float:
        return self.n_right_fix / self.n_detected if self.n_detected else float("nan")

    @property
    def median_delay(self) -> float | None:
        return float(statistics.median(self.delays)) if self.delays else None

    @property
    def meets_targets(self) -> bool:
        return (
            self.n_faulty > 0
            and self.recall >= TARGETS["recall"]
            and self.n_false_alarms <= TARGETS["false_alarms"]
            and self.n_detected > 0
            and self.right_first_fix >= TARGETS["right_first_fix"]
        )


def summarize(scores: Sequence[RunScore]) -> Summary:
    faulty = [s for s in scores if not s.healthy]
    healthy = [s for s in scores if s.healthy]
    detected = [s for s in faulty if s.detected]

    def key(s: RunScore) -> str:
        return f"{s.outcome.scenario}/{s.outcome.seed}"

    return Summary(
        n_faulty=len(faulty),
        n_detected=len(detected),
        n_healthy=len(healthy),
        n_false_alarms=sum(s.false_alarm for s in healthy),
        n_right_fix=sum(bool(s.right_fix) for s in detected),
        delays=tuple(s.delay for s in detected if s.delay is not None),
        n_errors=sum(s.outcome.error is not None for s in scores),
        missed=tuple(key(s) for s in faulty if not s.detected),
        false_alarms=tuple(key(s) for s in healthy if s.false_alarm),
        wrong_fix=tuple(key(s) for s in detected if not s.right_fix),
    )


# ---------------------------------------------------------------------------- rendering


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def _finding_cell(f: Finding) -> str:
    where = f"@{f.step}" if f.step is not None else ""
    return f"{f.code} ({f.severity.value}{where})"


def _row(score: RunScore) -> list[str]:
    o = score.outcome
    label = o.label
    expected = "healthy" if label.healthy else f"{' / '.join(label.codes)} → {' / '.join(label.fix_kinds)}"
    found = ", ".join(_finding_cell(f) for f in o.findings) or "—"
    if o.error:
        found = f"crashed: {o.error}" + (f"; {found}" if o.findings else "")
    if label.healthy:
        result = "false alarm" if score.false_alarm else "clean"
    elif score.detected:
        result = "detected, right fix" if score.right_fix else "detected, wrong fix"
    else:
        result = "missed"
    delay = "" if score.delay is None else str(score.delay)
    return [o.scenario, str(o.seed), expected, found, score.first_fix or "—", result, delay]


_HEADER = ["scenario", "seed", "expected (codes → first fix)", "found (severity@step)", "first fix", "result", "delay"]


def _summary_lines(summary: Summary) -> list[str]:
    median = summary.median_delay
    lines = [
        f"recall: {summary.n_detected}/{summary.n_faulty} faulty runs = {_pct(summary.recall)} (target ≥ {TARGETS['recall']:.0%})",
        f"false alarms: {summary.n_false_alarms}/{summary.n_healthy} healthy runs (target {TARGETS['false_alarms']})",
        f"right first fix: {summary.n_right_fix}/{summary.n_detected} detected runs = {_pct(summary.right_first_fix)} "
        f"(target ≥ {TARGETS['right_first_fix']:.0%})",
        "median steps from fault onset to detection: "
        + ("n/a (nothing detected)" if median is None else f"{median:g} (over {len(summary.delays)} detected runs)"),
    ]
    if summary.n_errors:
        lines.append(f"runs that crashed: {summary.n_errors}")
    lines.append("targets met" if summary.meets_targets else "targets NOT met")
    return lines


def render_text(scores: Sequence[RunScore], summary: Summary) -> str:
    """A plain-text table for the terminal."""
    rows = [_HEADER, *[_row(s) for s in scores]]
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(_HEADER))]
    out = []
    for i, row in enumerate(rows):
        cells = [cell if len(cell) <= widths[j] else cell[: widths[j] - 1] + "…" for j, cell in enumerate(row)]
        out.append("  ".join(c.ljust(widths[j]) for j, c in enumerate(cells)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out += _summary_lines(summary)
    return "\n".join(out)


def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def render_markdown(
    scores: Sequence[RunScore], summary: Summary, *, header: Sequence[str] = (), descriptions: Sequence[tuple[str, ...]] = ()
) -> str:
    """The published table: ``header`` lines, the summary, every run, then the scenario list."""
    lines = ["# Detection benchmark", "", *header, "", "## Summary", ""]
    lines += [f"- {line}" for line in _summary_lines(summary)]
    if summary.missed:
        lines.append(f"- missed: {', '.join(summary.missed)}")
    if summary.false_alarms:
        lines.append(f"- false alarms: {', '.join(summary.false_alarms)}")
    if summary.wrong_fix:
        lines.append(f"- wrong first fix: {', '.join(summary.wrong_fix)}")
    lines += ["", "## Runs", "", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for s in scores:
        lines.append("| " + " | ".join(_md_escape(c) for c in _row(s)) + " |")
    if descriptions:
        lines += ["", "## Scenarios", "", "| scenario | kind | what it trains | injected fault |", "|---|---|---|---|"]
        for row in descriptions:
            lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
