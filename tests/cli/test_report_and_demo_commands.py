"""``gradscope report`` and ``gradscope demo`` called through ``main``."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from gs_cli_support import FAKE_CODE

from gradscope.cli import main

pytestmark = pytest.mark.usefixtures("fake_detector")


def test_report_writes_the_page_and_says_where(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run()
    assert main(["report", run, "-o", "out/report.html", "--select", FAKE_CODE]) == 0
    assert capsys.readouterr().out == "wrote out/report.html\n"
    page = Path("out/report.html").read_text(encoding="utf-8")
    assert "1 error" in page and "1 warning" in page and "1 info" in page


def test_report_defaults_to_report_html(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run([])
    assert main(["report", run, "--select", FAKE_CODE]) == 0
    assert "Healthy" in Path("report.html").read_text(encoding="utf-8")


def test_report_into_a_directory_is_a_one_line_error(
    write_run: Callable[..., str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = write_run([])
    assert main(["report", run, "-o", str(tmp_path), "--select", FAKE_CODE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "directory" in err


def test_report_with_an_unknown_code(write_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", write_run([]), "--ignore", "no_such_code"]) == 2
    assert "no_such_code" in capsys.readouterr().err


def test_demo_hands_its_arguments_to_the_demo_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    monkeypatch.setitem(sys.modules, "gradscope.demo", types.SimpleNamespace(main=fake_main))
    assert main(["demo", "--out", "somewhere", "--help"]) == 3
    assert seen == [["--out", "somewhere", "--help"]]


def test_demo_returning_none_means_success(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradscope.demo", types.SimpleNamespace(main=lambda argv: None))
    assert main(["demo"]) == 0


def test_demo_missing_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A None entry in sys.modules makes the import fail with ModuleNotFoundError, as if the file were absent.
    monkeypatch.setitem(sys.modules, "gradscope.demo", None)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo is not available" in err


def test_demo_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from gradscope.errors import InvalidInputError

    def failing_demo(argv: list[str]) -> int:
        raise InvalidInputError("expected an output folder but got a file\nwith two lines")

    monkeypatch.setitem(sys.modules, "gradscope.demo", types.SimpleNamespace(main=failing_demo))
    assert main(["demo", "--out", "x"]) == 2
    assert capsys.readouterr().err == "gradscope: error: expected an output folder but got a file with two lines\n"
