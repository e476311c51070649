"""The docs that are generated from code stay in step with it, and the README's commands are the real ones."""

from __future__ import annotations

from pathlib import Path

from gradscope.detect.docs import render_reference
from gradscope.detect.registry import registered_detectors

ROOT = Path(__file__).resolve().parents[1]


def test_detector_reference_matches_the_detectors() -> None:
    expected = render_reference()
    actual = (ROOT / "docs" / "detectors.md").read_text()
    assert actual == expected, "regenerate it: python -m gradscope.detect.docs > docs/detectors.md"


def test_every_detector_documents_symptom_rule_and_fixes() -> None:
    for code, cls in registered_detectors().items():
        doc = cls.__doc__ or ""
        for section in ("Symptom", "Why it matters", "Rule", "Fixes"):
            assert section in doc, f"{code}: docstring lacks a {section} section"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert f"\n{command}\n" in readme
    assert f"\n{command}\n" in ci
