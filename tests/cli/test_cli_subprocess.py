"""The command line as a separate process: real exit statuses, real stdout/stderr, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gs_cli_support import FAKE_CODE, make_run, sample_findings

from gradscope import __version__
from gradscope.testing import save_run

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
# Runs the CLI with the test-only detector registered: the one thing a plain `python -m gradscope.cli` lacks.
WITH_FAKE_DETECTOR = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import gs_cli_support; gs_cli_support.register(); "
    "from gradscope.cli import main; sys.exit(main())"
)


def command(*argv: str, fake: bool = False) -> list[str]:
    prefix = ["-c", WITH_FAKE_DETECTOR, str(HERE)] if fake else ["-m", "gradscope.cli"]
    return [sys.executable, *prefix, *argv]


def console_script() -> list[str]:
    """The installed ``gradscope`` entry point when there is one (it is, after pip install), else ``python -m``."""
    exe = shutil.which("gradscope", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "gradscope.cli"]


# Each process pays for importing torch (~2 s), so they all start at once and the tests read their results.
# The other exit-2 cases (corrupt run, unknown code, usage errors) are covered in-process by test_check_command
# and test_preflight; these are the ones CI would misread if the process itself exited otherwise.
COMMANDS = {
    "problems": command("check", "run", "--select", FAKE_CODE, fake=True),
    "missing": command("check", "missing", "--fail-on", "error"),
    "version": [*console_script(), "--version"],
    "usage": command("check", "run", "--format", "xml"),
    "no_detector": command("check", "run", "--select", "nonfinite", "--ignore", "nonfinite", "--format", "junit"),
    "broken_preflight_target": command("preflight", "pf_syntax.py:make"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("runs")
    save_run(make_run(sample_findings()), root / "run")
    (root / "pf_syntax.py").write_text("import torch\n\ndef make(:\n    pass\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {
        name: subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, argv in COMMANDS.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_problems_exit_1_with_the_golden_text(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = results["problems"]
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    assert result.stdout == (GOLDEN / "check_text_problems.txt").read_text(encoding="utf-8")


def test_bad_input_exits_2_with_one_line(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = results["missing"]
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("gradscope: error: no run at 'missing'")
    assert "Traceback" not in result.stderr


def test_version(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = results["version"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gradscope {__version__}"


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("usage", "gradscope check: error: argument --format: invalid choice: 'xml' (choose from "),
        ("no_detector", "gradscope: error: expected --select/--ignore to leave at least one detector to run but they leave none"),
        ("broken_preflight_target", "gradscope: error: could not load pf_syntax.py:make: SyntaxError: invalid syntax (line 3)"),
    ],
)
def test_refused_input_exits_2_with_one_line_not_1_with_a_traceback(
    name: str, line: str, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    # Exit 1 means "findings at or above --fail-on": a broken script or an empty selection must not read as one.
    result = results[name]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(line), result.stderr
