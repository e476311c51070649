"""Pass/fail verdicts on a run, for CI and for tests: :func:`assert_healthy` and the output formats of
``gradscope check`` (text, JSON, JUnit XML, GitHub workflow annotations).

A run *fails* at a severity level when at least one finding is at or above it: with the default
``fail_on="warning"`` a warning or an error fails, an info does not.
"""

from __future__ import annotations

import enum
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from typing import Any

from gradscope.detect.registry import Findings, check_codes, diagnose, parse_codes, selection
from gradscope.errors import InvalidInputError
from gradscope.findings import Finding, Severity, sort_findings
from gradscope.store.run import Run, load, require_steps

__all__ = [
    "OutputFormat",
    "assert_healthy",
    "checked_codes",
    "failing",
    "format_findings",
    "parse_codes",
    "require_detectors",
]

MAX_LAYERS_SHOWN = 5  # a finding can name all 50 layers of a model; a line should stay a line


class OutputFormat(str, enum.Enum):
    """How ``gradscope check`` prints its findings."""

    TEXT = "text"
    JSON = "json"
    JUNIT = "junit"
    GITHUB = "github"

    def __str__(self) -> str:
        return self.value


def failing(findings: Iterable[Finding], fail_on: str | Severity = Severity.WARNING) -> list[Finding]:
    """The findings at or above ``fail_on``, most severe first."""
    level = Severity.parse(fail_on).rank
    return sort_findings([f for f in findings if f.severity.rank >= level])


def checked_codes(select: str | Iterable[str] | None = None, ignore: str | Iterable[str] | None = None) -> list[str]:
    """The detector codes a diagnosis with ``select``/``ignore`` runs, sorted."""
    return sorted(selection(select, ignore)[0])


def require_detectors(select: list[str] | None, ignore: list[str] | None, *, flag: str = "") -> None:
    """Raise InvalidInputError for an unknown code, then for a selection that leaves no detector to
    run: a check that runs none finds nothing, and would pass as healthy. ``flag`` is the prefix the
    options are named with in the message (``"--"`` on the command line)."""
    check_codes(select, ignore)  # an unknown code first: a typo is the likelier mistake
    if checked_codes(select, ignore):
        return
    given = ([f"{flag}select {','.join(select)}"] if select is not None else []) + [f"{flag}ignore {','.join(ignore or ())}"]
    raise InvalidInputError(
        f"expected {flag}select/{flag}ignore to leave at least one detector to run but they leave none "
        f"({', '.join(given)}); select more codes or ignore fewer"
    )


def assert_healthy(
    run: str | os.PathLike[str] | Run,
    fail_on: str | Severity = "warning",
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
) -> Findings:
    """Fail a test when a run has findings at or above ``fail_on``; otherwise return all its findings.

    Use it inside pytest after a short training run::

        gradscope.assert_healthy("runs/smoke", fail_on="warning", ignore=["stalled_training"])

    Args:
        run: a run directory or a :class:`gradscope.Run`.
        fail_on: ``"info"``, ``"warning"`` (default) or ``"error"``.
        select, ignore: detector codes to run or skip (a list, or a comma-separated string).

    Raises:
        AssertionError: with one line per failing finding and its fixes.
        GradscopeError: the run cannot be read or holds no step, a code or severity is unknown, or
            ``select``/``ignore`` leave no detector to run.
    """
    level = Severity.parse(fail_on)
    selected, ignored = parse_codes(select), parse_codes(ignore)
    require_detectors(selected, ignored)
    loaded = require_steps(load(run), "check")  # a run that measured nothing must not pass as healthy
    findings = diagnose(loaded, select=selected, ignore=ignored)
    bad = failing(findings, level)
    if bad:
        source = str(loaded.path) if loaded.path is not None else "run"
        counts = _counts_text(bad)
        lines = [f"gradscope found {counts} at or above {level.value} in {source}:"]
        lines += _text_lines(bad, source=None)
        raise AssertionError("\n".join(lines))
    return findings


# --------------------------------------------------------------------------- output formats


def format_findings(
    findings: Sequence[Finding],
    output: str | OutputFormat,
    *,
    source: str,
    fail_on: str | Severity = Severity.WARNING,
    run: Run | None = None,
    codes: Sequence[str] = (),
) -> str:
    """Render findings the way ``gradscope check --format`` prints them (ends with a newline).

    Args:
        source: how the run is named in the output (the path the user gave).
        fail_on: the level at which findings count as failures (summary, JUnit failures).
        run: the diagnosed run, for the step count and the partial-run note.
        codes: the detector codes that ran (JUnit lists those without findings as passed tests).
    """
    kind = OutputFormat(output)
    level = Severity.parse(fail_on)
    ordered = sort_findings(findings)
    if kind is OutputFormat.TEXT:
        return _format_text(ordered, source, level, run)
    if kind is OutputFormat.JSON:
        return _format_json(ordered, source, level, run)
    if kind is OutputFormat.JUNIT:
        return _format_junit(ordered, source, level, codes)
    return _format_github(ordered, source, level, run)


def _where(f: Finding) -> str:
    if f.step is None:
        return "all steps"
    if f.last_step is not None and f.last_step != f.step:
        return f"steps {f.step}-{f.last_step}"
    return f"step {f.step}"


def _layers(f: Finding) -> str:
    # "layer"/"layers" first: an nn.Sequential names its layers 0, 1, 2…, which next to a step
    # range would read as more steps
    if not f.layers:
        return ""
    shown = ", ".join(f.layers[:MAX_LAYERS_SHOWN])
    more = f", +{len(f.layers) - MAX_LAYERS_SHOWN} more" if len(f.layers) > MAX_LAYERS_SHOWN else ""
    return f" [{'layer' if len(f.layers) == 1 else 'layers'} {shown}{more}]"


def _headline(f: Finding) -> str:
    return f"{_where(f)}: {f.severity.value} {f.code}{_layers(f)}: {_one_line(f.message)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text_lines(findings: Sequence[Finding], source: str | None) -> list[str]:
    lines = []
    prefix = f"{source}: " if source is not None else "  "
    for f in findings:
        lines.append(prefix + _headline(f))
        for i, fix in enumerate(f.fixes, start=1):
            lines.append(f"    fix {i} ({fix.kind.value}): {_one_line(fix.action)}")
    return lines


def _counts_text(findings: Sequence[Finding]) -> str:
    parts = []
    for s in (Severity.ERROR, Severity.WARNING, Severity.INFO):
        n = sum(1 for f in findings if f.severity is s)
        if n:
            parts.append(f"{n} {s.value}" + ("s" if n != 1 and s is not Severity.INFO else ""))
    return ", ".join(parts) if parts else "no findings"


def _summary(findings: Sequence[Finding], source: str, level: Severity, run: Run | None) -> str:
    bad = failing(findings, level)
    scope = ""
    if run is not None:
        scope = f" in {run.n_steps} steps" + (f" (partial run: status {run.status})" if run.is_partial else "")
    verdict = f"failed: {len(bad)} at or above {level.value}" if bad else f"passed: nothing at or above {level.value}"
    return f"{source}: {_counts_text(findings)}{scope}; {verdict}"


def _format_text(findings: Sequence[Finding], source: str, level: Severity, run: Run | None) -> str:
    lines = _text_lines(findings, source)
    if lines:
        lines.append("")
    lines.append(_summary(findings, source, level, run))
    return "\n".join(lines) + "\n"


def _format_json(findings: Sequence[Finding], source: str, level: Severity, run: Run | None) -> str:
    bad = failing(findings, level)
    summary: dict[str, Any] = {
        "run": source,
        "steps": run.n_steps if run is not None else None,
        "status": run.status if run is not None else None,
        "partial": run.is_partial if run is not None else None,
        "fail_on": level.value,
        "failed": bool(bad),
        "failing": len(bad),
        "total": len(findings),
        "counts": {s.value: sum(1 for f in findings if f.severity is s) for s in Severity},
    }
    # allow_nan=False: evidence is already made JSON-safe by Finding.to_dict; anything else is a bug to surface.
    return json.dumps({"summary": summary, "findings": [f.to_dict() for f in findings]}, indent=2, allow_nan=False) + "\n"


# XML 1.0 forbids most control characters even when escaped; a message carrying one would make the
# whole report unparsable, so they are replaced.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_ILLEGAL.sub("\ufffd", text)


def _format_junit(findings: Sequence[Finding], source: str, level: Severity, codes: Sequence[str]) -> str:
    bad = failing(findings, level)
    suites = ET.Element("testsuites", {"name": "gradscope"})
    seen_codes = {f.code for f in findings}
    passed_codes = [c for c in codes if c not in seen_codes]
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            "name": _xml_text(f"gradscope check {source}"),
            "tests": str(len(findings) + len(passed_codes)),
            "failures": str(len(bad)),
            "errors": "0",
            "skipped": "0",
        },
    )
    suites.set("tests", suite.get("tests", "0"))
    suites.set("failures", suite.get("failures", "0"))
    for f in findings:
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": _xml_text(f"gradscope.{f.code}"), "name": _xml_text(f"{f.code} at {_where(f)}{_layers(f)}")},
        )
        details = "\n".join(_text_lines([f], source))
        if f.severity.rank >= level.rank:
            failure = ET.SubElement(
                case, "failure", {"type": f.severity.value, "message": _xml_text(_one_line(f.message) or f.code)}
            )
            failure.text = _xml_text(details)
        else:
            out = ET.SubElement(case, "system-out")
            out.text = _xml_text(details)
    for code in passed_codes:
        ET.SubElement(suite, "testcase", {"classname": _xml_text(f"gradscope.{code}"), "name": _xml_text(f"{code}: no findings")})
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


_GITHUB_COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def github_escape_data(text: str) -> str:
    """Escape a workflow-command message: ``%``, CR and LF."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_escape_property(text: str) -> str:
    """Escape a workflow-command property value: as data, plus ``:`` and ``,``."""
    return github_escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _format_github(findings: Sequence[Finding], source: str, level: Severity, run: Run | None) -> str:
    lines = []
    for f in findings:
        title = github_escape_property(f"gradscope {f.code}")
        body = [f"{source}: {_where(f)}{_layers(f)}: {f.message}"]
        body += [f"fix {i} ({fix.kind.value}): {fix.action}" for i, fix in enumerate(f.fixes, start=1)]
        lines.append(f"::{_GITHUB_COMMAND[f.severity]} title={title}::{github_escape_data(chr(10).join(body))}")
    lines.append(_summary(findings, source, level, run))
    return "\n".join(lines) + "\n"
