"""``gradscope check``: output formats, exit statuses, selection, and bad input.

Golden files live in ``tests/cli/golden/``; after an intended change of the output, rewrite them with
``GRADSCOPE_UPDATE_GOLDEN=1 python -m pytest tests/cli`` and review the diff.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from gs_cli_support import FAKE_CODE, sample_findings

from gradscope.checks import github_escape_data, github_escape_property
from gradscope.cli import main
from gradscope.findings import Finding, Fix

GOLDEN = Path(__file__).parent / "golden"
pytestmark = pytest.mark.usefixtures("fake_detector")


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GRADSCOPE_UPDATE_GOLDEN"):
        path.write_text(actual, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; create it with GRADSCOPE_UPDATE_GOLDEN=1"
    assert actual == path.read_text(encoding="utf-8")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- text


def test_text_lists_findings_most_severe_first_with_fixes(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run()
    status, out, err = run_cli(capsys, "check", run, "--select", FAKE_CODE)
    assert status == 1
    assert err == ""
    check_golden("check_text_problems.txt", out)
    headlines = [line for line in out.splitlines() if line.startswith("run: ") and "fix" not in line.split(":")[1]]
    assert [h.split(": ")[2].split()[0] for h in headlines[:3]] == ["error", "warning", "info"]


def test_text_of_a_healthy_run(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run([])
    status, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE)
    assert status == 0
    check_golden("check_text_healthy.txt", out)


def test_text_marks_a_partial_run(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run([], status="running")
    status, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE)
    assert status == 0
    assert "(partial run: status running)" in out


# --------------------------------------------------------------------------- exit status per --fail-on


@pytest.mark.parametrize(
    ("severities", "fail_on", "expected"),
    [
        (["info"], "info", 1),
        (["info"], "warning", 0),
        (["info"], "error", 0),
        (["warning"], "info", 1),
        (["warning"], "warning", 1),
        (["warning"], "error", 0),
        (["error"], "error", 1),
        (["warning", "info"], None, 1),  # default: warning
        (["info"], None, 0),
        ([], "info", 0),
    ],
)
def test_exit_status_follows_fail_on(
    write_run: Callable[..., str], capsys: pytest.CaptureFixture[str], severities: list[str], fail_on: str | None, expected: int
) -> None:
    findings = [Finding(f"code_{i}", s, step=i) for i, s in enumerate(severities)]
    run = write_run(findings)
    args = ["check", run, "--select", FAKE_CODE] + (["--fail-on", fail_on] if fail_on else [])
    status, out, _ = run_cli(capsys, *args)
    assert status == expected
    assert ("failed:" in out) == (expected == 1)


# --------------------------------------------------------------------------- json


def test_json_is_a_list_of_findings_plus_a_summary(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run()
    status, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE, "--format", "json", "--fail-on", "error")
    assert status == 1
    check_golden("check_json.json", out)
    data = json.loads(out)
    assert [f["code"] for f in data["findings"]] == ["nonfinite", "vanishing_gradients", "stalled_training"]
    assert data["findings"][0]["evidence"]["grad_norm_growth"] == "inf"  # JSON has no Infinity
    assert data["summary"] == {
        "run": "run",
        "steps": 500,
        "status": "complete",
        "partial": False,
        "fail_on": "error",
        "failed": True,
        "failing": 1,
        "total": 3,
        "counts": {"info": 1, "warning": 1, "error": 1},
    }
    round_trip = [Finding.from_dict(d) for d in data["findings"]]
    assert round_trip[1].fixes == (Fix("activation", "replace nn.Sigmoid with nn.ReLU"), Fix("initialization", "nn.init.kaiming_normal_(w)"))


# --------------------------------------------------------------------------- junit


@pytest.mark.parametrize(("fail_on", "failures"), [("info", 3), ("warning", 2), ("error", 1)])
def test_junit_fails_one_testcase_per_finding_at_or_above_fail_on(
    write_run: Callable[..., str], capsys: pytest.CaptureFixture[str], fail_on: str, failures: int
) -> None:
    run = write_run()
    status, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE, "--format", "junit", "--fail-on", fail_on)
    assert status == 1
    root = ET.fromstring(out.encode())  # valid XML, or this raises
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == failures == int(suite.get("failures", "-1"))
    assert int(suite.get("tests", "-1")) == len(cases)
    assert failed[0].get("classname") == "gradscope.nonfinite"
    failure = failed[0].find("failure")
    assert failure is not None and failure.get("type") == "error"
    assert "clip_grad_norm_" in (failure.text or "")
    if fail_on == "warning":
        check_golden("check_junit.xml", out)


def test_junit_of_a_healthy_run_has_a_passing_testcase_per_detector(
    write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run([])
    status, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE, "--format", "junit")
    assert status == 0
    suite = ET.fromstring(out.encode()).find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert [c.get("classname") for c in suite.findall("testcase")] == [f"gradscope.{FAKE_CODE}"]


def test_junit_stays_valid_xml_with_control_characters(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run([Finding("odd", "error", 1, message="bell \x07 and <tag> & \"quotes\"")])
    _, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE, "--format", "junit")
    failure = ET.fromstring(out.encode()).find("testsuite/testcase/failure")
    assert failure is not None
    assert failure.get("message") == "bell \ufffd and <tag> & \"quotes\""


# --------------------------------------------------------------------------- github


def test_github_annotations(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run()
    status, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE, "--format", "github")
    assert status == 1
    check_golden("check_github.txt", out)
    lines = out.splitlines()
    assert lines[0].startswith("::error title=gradscope nonfinite::run: step 312 [layers layer1, layer2]: loss became NaN")
    assert lines[1].startswith("::warning title=gradscope vanishing_gradients::")
    assert lines[2].startswith("::notice title=gradscope stalled_training::")
    # One annotation per line: the message's newline and percent signs are escaped.
    assert "100%25 gone,%0Anothing" in lines[1]
    assert "%0Afix 1 (activation): replace nn.Sigmoid with nn.ReLU" in lines[1]


def test_github_escaping_rules() -> None:
    assert github_escape_data("50% done\r\nnext: a,b") == "50%25 done%0D%0Anext: a,b"
    assert github_escape_property("code: a,b%\n") == "code%3A a%2Cb%25%0A"


def test_github_title_escapes_property_characters(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run([Finding("odd:code,x", "warning", 3, message="m")])
    _, out, _ = run_cli(capsys, "check", run, "--select", FAKE_CODE, "--format", "github")
    assert out.splitlines()[0] == "::warning title=gradscope odd%3Acode%2Cx::run: step 3: m"


# --------------------------------------------------------------------------- selection


def test_ignore_skips_a_detector(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run()
    # nonfinite stays selected (and finds nothing in this finite run): ignoring fake_problem drops its three findings.
    status, out, _ = run_cli(capsys, "check", run, "--select", f"{FAKE_CODE},nonfinite", "--ignore", FAKE_CODE)
    assert status == 0
    assert "no findings" in out


def test_select_accepts_commas_and_repetition(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run()
    status, out, _ = run_cli(capsys, "check", run, "--select", f"{FAKE_CODE},{FAKE_CODE}", "--select", FAKE_CODE)
    assert status == 1
    assert out.count("error nonfinite") == 1


# --------------------------------------------------------------------------- bad input → 2, one line, no traceback


def assert_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *, contains: str) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("gradscope: error: ")
    assert contains in err
    assert "Traceback" not in err


def test_missing_run_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["check", str(tmp_path / "nope")], contains="does not exist")


def test_directory_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["check", str(tmp_path)], contains="holds no run.sqlite")


def test_corrupt_run_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.sqlite").write_bytes(b"this is not a database at all" * 10)
    assert_one_line_error(capsys, ["check", str(tmp_path)], contains="not a gradscope run database")


def test_truncated_sqlite_file(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(write_run())
    db = run / "run.sqlite"
    db.write_bytes(db.read_bytes()[:2048])
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert_one_line_error(capsys, ["check", str(run), "--select", FAKE_CODE], contains="cannot read run")


def test_unknown_code_in_select(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["check", write_run(), "--select", "no_such_code"], contains="no_such_code")


def test_unknown_code_in_ignore(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["check", write_run(), "--ignore", "no_such_code"], contains="no_such_code")


def test_empty_select(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["check", write_run(), "--select", " , "], contains="--select")


@pytest.mark.parametrize(
    "options",
    [
        ["--select", FAKE_CODE, "--ignore", FAKE_CODE],
        ["--select", FAKE_CODE, "--ignore", FAKE_CODE, "--format", "junit"],  # was a JUnit report of tests="0"
        ["--select", f"{FAKE_CODE},nonfinite", "--ignore", "nonfinite", "--ignore", FAKE_CODE],
    ],
)
def test_a_selection_that_leaves_no_detector_is_refused_not_passed(
    options: list[str], write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert_one_line_error(capsys, ["check", write_run([]), *options], contains="to leave at least one detector to run")


def test_ignoring_every_detector_is_refused(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    from gradscope.detect.registry import registered_detectors

    every = ",".join(registered_detectors())
    assert_one_line_error(capsys, ["check", write_run([]), "--ignore", every], contains="they leave none (--ignore ")


def test_report_with_a_selection_that_leaves_no_detector(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["report", write_run([]), "--select", FAKE_CODE, "--ignore", FAKE_CODE]
    assert_one_line_error(capsys, argv, contains=f"they leave none (--select {FAKE_CODE}, --ignore {FAKE_CODE})")
    assert not Path("report.html").exists()


def test_an_unknown_code_is_named_before_an_empty_selection(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    # select=[typo] leaves no known detector either; the typo is what the user has to fix.
    assert_one_line_error(capsys, ["check", write_run([]), "--select", "nonfinte"], contains="but got nonfinte")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ([], "gradscope: error: the following arguments are required: COMMAND"),
        (["check"], "gradscope check: error: the following arguments are required: RUN"),
        (["report"], "gradscope report: error: the following arguments are required: RUN"),
        (["check", "run", "--fail-on", "fatal"], "gradscope check: error: argument --fail-on: invalid choice: 'fatal' (choose from "),
        (["check", "run", "--format", "xml"], "gradscope check: error: argument --format: invalid choice: 'xml' (choose from "),
        (["check", "run", "--no-such-option"], "gradscope: error: unrecognized arguments: --no-such-option"),
        (["frobnicate"], "gradscope: error: argument COMMAND: invalid choice: 'frobnicate' (choose from "),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    # docs/cli.md: a usage error prints one line on stderr, like every other exit-2 error; no usage block.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(line), err
    assert "usage:" not in err


@pytest.mark.parametrize(
    ("argv", "usage", "option_help"),
    [
        (["--help"], "usage: gradscope [-h] [--version] COMMAND", "diagnose a run and print its findings like a linter"),
        (["check", "--help"], "usage: gradscope check [-h]", "exit with status 1 when a finding is at or above this severity"),
        (["report", "-h"], "usage: gradscope report [-h]", "HTML file to write (default: report.html)"),
    ],
)
def test_help_still_prints_the_full_usage(
    argv: list[str], usage: str, option_help: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(usage)
    assert option_help in " ".join(out.split())  # help text is wrapped to the terminal width


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from gradscope import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"gradscope {__version__}\n"


def test_sample_findings_cover_every_severity() -> None:
    # The goldens above are only meaningful if the sample exercises all three severities.
    assert {f.severity.value for f in sample_findings()} == {"info", "warning", "error"}


def test_check_uses_sys_argv_when_called_without_arguments(
    write_run: Callable[..., str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_run([])
    monkeypatch.setattr(sys, "argv", ["gradscope", "check", run, "--select", FAKE_CODE])
    assert main() == 0
