"""The benchmark's scoring, verified on hand-made findings, and its machinery run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import gradscope
from benchmarks import detection
from benchmarks.scenarios import get_scenario
from benchmarks.scenarios.core import Label
from benchmarks.scoring import RunOutcome, render_markdown, render_text, score_run, summarize
from gradscope import Finding, Fix, FixKind, Severity

LR_FAULT = Label("lr too high", ("exploding_loss", "nonfinite"), ("learning_rate",), 10)
DEAD_FAULT = Label("dead units", ("dead_units",), ("initialization", "activation"), 0)


def finding(code: str, severity: str, step: int | None, *kinds: str) -> Finding:
    return Finding(code, Severity(severity), step, fixes=tuple(Fix(FixKind(k), f"do the {k} thing") for k in kinds))


def outcome(label: Label, *findings: Finding, scenario: str = "s", seed: int = 0) -> RunOutcome:
    return RunOutcome(scenario, seed, label, tuple(findings))


# ---------------------------------------------------------------------------- one run


def test_healthy_run_with_only_info_findings_is_clean() -> None:
    score = score_run(outcome(Label(), finding("nonfinite", "info", 3, "data")))
    assert not score.false_alarm and score.alarms == ()
    assert score.matched is None and score.right_fix is None and score.delay is None


@pytest.mark.parametrize("severity", ["warning", "error"])
def test_healthy_run_with_any_warning_or_error_is_a_false_alarm(severity: str) -> None:
    score = score_run(outcome(Label(), finding("stalled_training", severity, 40, "learning_rate")))
    assert score.false_alarm
    assert score.first_fix == "learning_rate"  # shown in the table even though nothing was expected


def test_faulty_run_detected_by_a_matching_error_scores_fix_and_delay() -> None:
    score = score_run(outcome(LR_FAULT, finding("exploding_loss", "error", 14, "learning_rate", "gradient_clipping")))
    assert score.detected and score.right_fix is True
    assert score.delay == 4  # step 14 - onset 10
    assert score.first_fix == "learning_rate"


def test_a_matching_finding_below_warning_does_not_count_as_detected() -> None:
    score = score_run(outcome(DEAD_FAULT, finding("dead_units", "info", 0, "initialization")))
    assert not score.detected and score.right_fix is None and score.delay is None


def test_alarms_with_other_codes_do_not_count_as_detected() -> None:
    score = score_run(outcome(DEAD_FAULT, finding("stalled_training", "warning", 5, "initialization")))
    assert not score.detected
    assert score.first_fix == "initialization"  # the top alarm's fix, for the table


def test_the_matching_finding_is_the_first_in_diagnose_order_whatever_the_input_order() -> None:
    # Two matches: a warning with the right fix at step 12, an error with a wrong fix at step 30.
    # Diagnose order puts the error first, so the reader acts on its (wrong) fix; the delay still
    # counts from the earliest match.
    score = score_run(
        outcome(
            LR_FAULT,
            finding("exploding_loss", "warning", 12, "learning_rate"),
            finding("nonfinite", "error", 30, "data"),
        )
    )
    assert score.matched is not None and score.matched.code == "nonfinite"
    assert score.right_fix is False
    assert score.delay == 2


def test_any_listed_fix_kind_is_right_and_a_missing_fix_is_wrong() -> None:
    assert score_run(outcome(DEAD_FAULT, finding("dead_units", "warning", 0, "activation"))).right_fix is True
    assert score_run(outcome(DEAD_FAULT, finding("dead_units", "warning", 0))).right_fix is False


def test_a_match_without_a_step_is_detected_without_a_delay() -> None:
    score = score_run(outcome(DEAD_FAULT, finding("dead_units", "warning", None, "initialization")))
    assert score.detected and score.delay is None


# ---------------------------------------------------------------------------- the summary


def _suite() -> list[RunOutcome]:
    return [
        # 3 healthy runs, one of which raises a false alarm
        outcome(Label(), scenario="h1"),
        outcome(Label(), finding("nonfinite", "info", 0, "data"), scenario="h2"),
        outcome(Label(), finding("oscillating_loss", "warning", 50, "optimizer"), scenario="h3"),
        # 4 faulty runs: detected+right (delay 4), detected+wrong (delay 0), missed, crashed
        outcome(LR_FAULT, finding("exploding_loss", "error", 14, "learning_rate"), scenario="f1"),
        outcome(LR_FAULT, finding("nonfinite", "error", 10, "data"), scenario="f2"),
        outcome(DEAD_FAULT, finding("dead_units", "info", 0, "activation"), scenario="f3"),
        RunOutcome("f4", 1, DEAD_FAULT, (), error="training raised RuntimeError: boom"),
    ]


def test_summary_counts_recall_false_alarms_right_fix_and_median_delay() -> None:
    summary = summarize([score_run(o) for o in _suite()])
    assert (summary.n_faulty, summary.n_detected, summary.recall) == (4, 2, 0.5)
    assert (summary.n_healthy, summary.n_false_alarms) == (3, 1)
    assert (summary.n_right_fix, summary.right_first_fix) == (1, 0.5)
    assert summary.delays == (4, 0) and summary.median_delay == 2.0
    assert summary.n_errors == 1
    assert summary.missed == ("f3/0", "f4/1") and summary.false_alarms == ("h3/0",) and summary.wrong_fix == ("f2/0",)
    assert not summary.meets_targets


def test_targets_are_met_only_with_full_recall_no_false_alarm_and_right_fixes() -> None:
    good = [
        outcome(Label(), scenario="h"),
        outcome(LR_FAULT, finding("exploding_loss", "error", 12, "learning_rate"), scenario="f"),
    ]
    assert summarize([score_run(o) for o in good]).meets_targets
    with_alarm = [*good, outcome(Label(), finding("dead_units", "warning", 3, "activation"), scenario="h2")]
    assert not summarize([score_run(o) for o in with_alarm]).meets_targets


def test_an_empty_suite_has_undefined_rates_and_misses_the_targets() -> None:
    summary = summarize([])
    assert math.isnan(summary.recall) and math.isnan(summary.right_first_fix) and summary.median_delay is None
    assert not summary.meets_targets


def test_tables_show_every_run_and_the_summary_numbers() -> None:
    scores = [score_run(o) for o in _suite()]
    summary = summarize(scores)
    text = render_text(scores, summary)
    assert "recall: 2/4 faulty runs = 50.0%" in text
    assert "false alarms: 1/3 healthy runs" in text
    assert "right first fix: 1/2 detected runs = 50.0%" in text
    assert "median steps from fault onset to detection: 2 (over 2 detected runs)" in text
    markdown = render_markdown(scores, summary, header=["measured today"], descriptions=[("f1", "fault", "an MLP", "lr | too high")])
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| scenario")]
    assert len(rows) == len(scores) + 1  # every run, plus the scenario description
    assert "| f1 | 0 | exploding_loss / nonfinite → learning_rate | exploding_loss (error@14) | learning_rate | detected, right fix | 4 |" in markdown
    assert "| f3 | 0 | dead_units → initialization / activation | dead_units (info@0) | — | missed |  |" in markdown
    assert "lr \\| too high" in markdown  # pipes in cells are escaped
    assert "crashed: training raised RuntimeError: boom" in markdown


def test_outcomes_survive_the_trip_between_processes() -> None:
    for o in _suite():
        back = RunOutcome.from_dict(o.to_dict())
        assert back == o


# ---------------------------------------------------------------------------- end to end


def test_run_one_records_the_same_training_as_plain_torch(tmp_path: Path) -> None:
    """The labels are measured without gradscope; the benchmark diagnoses monitored runs. Both must be
    the same training: the Monitor only reads."""
    outcome = detection.run_one("nan_in_batch", 0, str(tmp_path))
    assert outcome.error is None and outcome.label.onset == 150
    recorded = gradscope.load(tmp_path / "nan_in_batch-s0").loss
    plain = get_scenario("nan_in_batch").run(0).probe.loss_array()
    np.testing.assert_allclose(recorded, plain, rtol=1e-6)  # NaN where plain torch had NaN, from step 150
    assert list(outcome.findings) == list(gradscope.diagnose(tmp_path / "nan_in_batch-s0"))


def test_the_command_writes_a_table_of_every_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.md"
    code = detection.main(["--only", "converged_flat", "detached_branch", "--seeds", "0", "--jobs", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "recall:" in printed and "total runtime:" in printed
    table = out.read_text()
    assert "| converged_flat | 0 | healthy |" in table
    assert "| detached_branch | 0 | no_gradient → code |" in table
    assert "## Summary" in table and "false alarms:" in table and "Detectors registered:" in table
    # The summary agrees with the rows, whatever the detectors found.
    row = next(line for line in table.splitlines() if line.startswith("| detached_branch | 0 |"))
    result = row.split(" | ")[5]
    assert result in ("detected, right fix", "detected, wrong fix", "missed")
    assert f"recall: {int(result.startswith('detected'))}/1 faulty runs" in table
    healthy_row = next(line for line in table.splitlines() if line.startswith("| converged_flat | 0 |"))
    assert f"false alarms: {int('false alarm' in healthy_row)}/1 healthy runs" in table


def test_check_exits_nonzero_when_targets_are_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    healthy = RunOutcome("converged_flat", 0, Label(), (finding("stalled_training", "warning", 5, "learning_rate"),))
    monkeypatch.setattr(detection, "run_benchmark", lambda *a, **k: [healthy])
    assert detection.main(["--only", "converged_flat", "--out", "-", "--check"]) == 1
    assert detection.main(["--only", "converged_flat", "--out", "-"]) == 0


@pytest.mark.slow
def test_worker_processes_give_the_same_outcomes_as_inline(tmp_path: Path) -> None:
    scenarios = [get_scenario("detached_branch"), get_scenario("nan_in_batch")]
    parallel = detection.run_benchmark(scenarios, [0], jobs=2)
    inline = detection.run_benchmark(scenarios, [0], jobs=1)

    def scored(outcomes: list[RunOutcome]) -> list[tuple[object, ...]]:
        # What the scores depend on; evidence floats are left out of the comparison.
        return [
            (o.scenario, o.seed, o.label, o.error, [(f.code, f.severity, f.step, f.layers, f.fix_kinds) for f in o.findings])
            for o in outcomes
        ]

    assert scored(parallel) == scored(inline)
