"""Generate the detector reference (``docs/detectors.md``) from the detectors themselves.

Each detector's class docstring is its user documentation, and each threshold's default carries its
rationale as a trailing comment in the ``Config`` dataclass; this module renders both, so the docs
cannot drift from the code. Regenerate with ``python -m gradscope.detect.docs > docs/detectors.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap

from gradscope.detect.base import Detector
from gradscope.detect.registry import registered_detectors

__all__ = ["render_reference", "threshold_rationales"]

_FIELD_LINE = re.compile(r"^\s*(\w+)\s*:[^=#]*=[^#]*#\s*(.+?)\s*$")


def threshold_rationales(detector: type[Detector]) -> dict[str, str]:
    """``{threshold name: rationale}`` read from the trailing comments of the detector's Config."""
    try:
        source = inspect.getsource(detector.Config)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def render_reference() -> str:
    lines = [
        "# Detector reference",
        "",
        "Generated from the detectors' own docstrings and thresholds by "
        "`python -m gradscope.detect.docs > docs/detectors.md`; do not edit by hand.",
        "",
        "Override a threshold with `gradscope.diagnose(run, config={\"<code>\": {\"<threshold>\": value}})`; "
        "skip a detector with `ignore=[\"<code>\"]`.",
        "",
    ]
    detectors = registered_detectors()
    lines += ["| code | summary |", "|---|---|"]
    for code, cls in sorted(detectors.items()):
        summary = (inspect.getdoc(cls) or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.append(f"| [`{code}`](#{code}) | {summary} |")
    lines.append("")
    for code, cls in sorted(detectors.items()):
        lines += [f"## {code}", "", textwrap.dedent(inspect.getdoc(cls) or "").strip(), ""]
        fields = dataclasses.fields(cls.Config) if dataclasses.is_dataclass(cls.Config) else ()
        if fields:
            rationale = threshold_rationales(cls)
            lines += ["| threshold | default | why |", "|---|---|---|"]
            defaults = cls.Config()
            for f in fields:
                lines.append(f"| `{f.name}` | `{getattr(defaults, f.name)!r}` | {rationale.get(f.name, '')} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
