"""Bad input is refused clearly, the same way by every entry point.

Runs: a missing path, an empty directory, a truncated or corrupt database, a run from a newer
schema, files that are not runs, and a run with zero steps. ``gradscope.load``, ``gradscope.report``,
``gradscope.assert_healthy``, ``gradscope check`` and ``gradscope report`` all raise (or, for the
CLI, print) one GradscopeError subclass with a one-line message naming the path and the problem;
the CLI exits 2 with that line and no traceback.

A run with zero steps *loads* (a live reader may open a run before its first flush, and
``Monitor.run`` must work on a fresh Monitor), but checking or reporting it is refused: a run that
measured nothing must not pass CI as "healthy" or give an empty page.

``tests/store/test_load_errors.py`` holds the detailed ``load`` messages for each kind of damage;
``tests/collect/test_monitor_errors.py`` the misuses of ``Monitor`` (non-module, foreign optimizer,
non-scalar loss, ``step()`` after ``close()``). The gaps are filled at the end of this file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_support import mlp, train
from torch import nn

import gradscope
from gradscope.cli import main as cli

NOT_FOUND, UNREADABLE = gradscope.RunNotFoundError, gradscope.UnreadableRunError


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log_dir = tmp_path_factory.mktemp("good") / "run"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.Monitor(model, opt, log_dir=log_dir, flush_every=4, activation_every=2, on_finding=None) as mon:
        train(model, opt, mon, 40)
    return log_dir


def _copy(good: Path, to: Path) -> Path:
    to.mkdir()
    (to / "run.sqlite").write_bytes((good / "run.sqlite").read_bytes())
    return to


def _missing(good: Path, at: Path) -> Path:
    return at / "no" / "such" / "run"


def _empty_dir(good: Path, at: Path) -> Path:
    at.mkdir()
    return at


def _truncated(good: Path, at: Path) -> Path:
    at.mkdir()
    (at / "run.sqlite").write_bytes((good / "run.sqlite").read_bytes()[:6000])
    return at


def _corrupt(good: Path, at: Path) -> Path:
    data = bytearray((good / "run.sqlite").read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # the first page past the header: the schema itself
    at.mkdir()
    (at / "run.sqlite").write_bytes(bytes(data))
    return at


def _newer_schema(good: Path, at: Path) -> Path:
    run_dir = _copy(good, at)
    with sqlite3.connect(run_dir / "run.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    return run_dir


def _text_file(good: Path, at: Path) -> Path:
    at.mkdir()
    path = at / "train.log"
    path.write_text("epoch 1 loss 2.3\n")
    return path


def _other_database(good: Path, at: Path) -> Path:
    at.mkdir()
    with sqlite3.connect(at / "run.sqlite") as conn:
        conn.execute("CREATE TABLE experiments (name TEXT)")
    conn.close()
    return at


def _zero_steps(good: Path, at: Path) -> Path:
    with gradscope.Monitor(nn.Linear(2, 2), log_dir=at, on_finding=None):
        pass  # closed before any step()
    return at


# kind → (builder, error class, what the message says, loads fine)
KINDS: dict[str, tuple[Callable[[Path, Path], Path], type[Exception], str, bool]] = {
    "missing": (_missing, NOT_FOUND, "the path does not exist; pass the log_dir given to Monitor", False),
    "empty_directory": (_empty_dir, NOT_FOUND, "the directory holds no run.sqlite; pass the log_dir given to Monitor", False),
    "truncated": (_truncated, UNREADABLE, "corrupt", False),
    "corrupt": (_corrupt, UNREADABLE, "the database is corrupt or not a run", False),
    "newer_schema": (_newer_schema, UNREADABLE, "written with run schema 99 but this gradscope reads up to 1; upgrade gradscope", False),
    "text_file": (_text_file, UNREADABLE, "it is not a gradscope run database; pass a log_dir written by gradscope.Monitor", False),
    "other_database": (_other_database, UNREADABLE, "the database is corrupt or not a run (no such table: meta)", False),
    "zero_steps": (_zero_steps, UNREADABLE, "expected recorded steps but it holds none: the Monitor was closed before any step()", True),
}


@pytest.fixture(scope="module")
def bad_runs(good_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    return {kind: build(good_run, root / kind) for kind, (build, *_) in KINDS.items()}


def _one_line_naming(message: str, path: Path, problem: str) -> None:
    assert "\n" not in message, message
    assert str(path) in message, message
    assert problem in message, message


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_refuses_each_bad_input_with_its_own_error(kind: str, bad_runs: dict[str, Path]) -> None:
    _, error, problem, loads = KINDS[kind]
    path = bad_runs[kind]
    if loads:
        run = gradscope.load(path)
        assert run.n_steps == 0 and run.status == "complete"
        assert gradscope.diagnose(run) == []  # the library call reports no finding, it refuses nothing
        return
    with pytest.raises(error) as caught:
        gradscope.load(path)
    assert type(caught.value) is error  # the specific subclass, not just any GradscopeError
    _one_line_naming(str(caught.value), path, problem)


@pytest.mark.parametrize("kind", list(KINDS))
def test_report_and_assert_healthy_refuse_it_the_same_way(kind: str, bad_runs: dict[str, Path], tmp_path: Path) -> None:
    _, error, problem, _ = KINDS[kind]
    path = bad_runs[kind]
    out = tmp_path / "report.html"
    with pytest.raises(error) as from_report:
        gradscope.report(path, out)
    _one_line_naming(str(from_report.value), path, problem)
    assert not out.exists()
    with pytest.raises(error) as from_assert:
        gradscope.assert_healthy(path)
    _one_line_naming(str(from_assert.value), path, problem)
    if kind == "zero_steps":
        assert str(from_report.value).startswith(f"cannot report run {str(path)!r}: ")
        assert str(from_assert.value).startswith(f"cannot check run {str(path)!r}: ")


@pytest.mark.parametrize("command", ["check", "report"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cli_exits_2_with_the_message_on_one_line(
    kind: str, command: str, bad_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, problem, _ = KINDS[kind]
    path = bad_runs[kind]
    argv = [command, str(path)] + (["-o", str(tmp_path / "r.html")] if command == "report" else [])
    assert cli(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("gradscope: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    _one_line_naming(err.strip(), path, problem)
    assert not (tmp_path / "r.html").exists()


def test_cli_processes_print_one_line_and_no_traceback(bad_runs: dict[str, Path], tmp_path: Path) -> None:
    """As separate processes (nothing else on stderr: no warning, no traceback), all at once."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # a warning would show as an extra line
    procs = {
        kind: subprocess.Popen(
            [sys.executable, "-m", "gradscope.cli", "check", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for kind, path in bad_runs.items()
    }
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (kind, err)
        assert out == ""
        assert err.count("\n") == 1 and "Traceback" not in err, (kind, err)
        _one_line_naming(err.strip(), bad_runs[kind], KINDS[kind][2])


# --------------------------------------------------------------------------- Monitor misuse not covered elsewhere


@pytest.mark.parametrize(
    "loss", [torch.tensor(1 + 2j), torch.tensor(0.5, device="meta"), torch.tensor(True)], ids=["complex", "meta", "bool"]
)
def test_a_loss_that_is_not_a_real_number_is_refused(loss: torch.Tensor) -> None:
    with gradscope.Monitor(nn.Linear(2, 2), on_finding=None) as mon:
        with pytest.raises(gradscope.InvalidInputError, match=r"expected a real scalar loss but got"):
            mon.step(loss)
        mon.step(0.5)
    assert mon.run.loss.tolist() == [0.5]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float16, torch.bfloat16])
def test_a_loss_of_any_real_dtype_is_recorded_as_its_value(dtype: torch.dtype) -> None:
    # A count or a 0/1 error used as the loss is an integer tensor of whatever width the loop made.
    with gradscope.Monitor(nn.Linear(2, 2), on_finding=None) as mon:
        mon.step(torch.tensor(3, dtype=dtype))
        mon.step(torch.tensor([[2]], dtype=dtype))
    assert mon.run.loss.tolist() == [3.0, 2.0]


def test_a_model_on_the_meta_device_is_refused() -> None:
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(gradscope.InvalidInputError, match=r"meta device"):
        gradscope.Monitor(model, on_finding=None)
