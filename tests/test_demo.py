"""`gradscope demo` end to end: four real trainings on the bundled digits, diagnosed and reported."""

from __future__ import annotations

import io
from pathlib import Path

from gradscope.demo import run_demo


def test_demo_diagnoses_each_configuration_and_writes_reports(tmp_path: Path) -> None:
    out = io.StringIO()
    results = run_demo(tmp_path, steps=200, stream=out)

    def blocking(name: str) -> dict[str, str]:
        return {f.code: f.fixes[0].kind.value for f in results[name] if f.severity.rank >= 1}

    assert blocking("healthy") == {}
    assert blocking("lr-too-high").get("exploding_loss") == "learning_rate"
    assert blocking("deep-sigmoid").get("vanishing_gradients") == "activation"
    assert blocking("lr-too-low").get("stalled_training") == "learning_rate"
    for name in results:
        report = tmp_path / name / "report.html"
        assert report.stat().st_size > 100_000  # plotly.js is embedded: the page works offline
        assert (tmp_path / name / "run" / "run.sqlite").exists()
    text = out.getvalue()
    assert "traced on training example" in text and "weights that moved most" in text
