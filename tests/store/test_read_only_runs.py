"""A run this process may not write to (in a read-only directory, on a read-only mount, a read-only
file) is read as it is; one whose write-ahead log cannot be read without writing is refused with an
error that says why and what to do, never "corrupt".

The fault: ``gradscope check`` on a healthy, complete run in a read-only directory exited 2 with
"the database is corrupt or not a run (attempt to write a readonly database)", because every read
opened the file read-write, which in WAL mode needs the -wal and -shm files created beside it.

Root ignores file permissions, so as root the reads run in a child process without the capabilities
that let it (``setpriv``); where that is not possible the tests are skipped. The child is checked to
be refused a write first, so a test cannot pass because the directory was writable after all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_runs import write_small_run

import gradscope

STEPS, FLUSH_EVERY = 20, 4
_CAPS = "-dac_override,-dac_read_search,-fowner"  # what lets root write where permissions say no

# Loads each run directory given and prints what it found, or the GradscopeError it raised.
_READER = textwrap.dedent(
    """
    import json, os, sys
    import gradscope
    if sys.argv[1] == "access-lies":  # os.access() says writable, as ACLs or NFS root squash can make it
        os.access = lambda *args, **kwargs: True
    for path in sys.argv[2:]:
        try:
            run = gradscope.load(path)
            print(json.dumps({"steps": run.n_steps, "status": run.status, "loss": run.loss.tolist()}))
        except gradscope.GradscopeError as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    """
)

# Trains STEPS steps, flushing every FLUSH_EVERY, then dies with SIGKILL: its WAL is never folded in.
_KILLED_TRAINER = textwrap.dedent(
    f"""
    import os, signal, sys
    import torch
    from torch import nn
    import gradscope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradscope.Monitor(model, opt, log_dir=sys.argv[1], flush_every={FLUSH_EVERY}, flush_seconds=None, on_finding=None)
    for _ in range({STEPS + 2}):
        opt.zero_grad()
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        mon.step(loss)
        opt.step()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.fixture(scope="module")
def closed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log_dir = write_small_run(tmp_path_factory.mktemp("closed") / "run", steps=STEPS, flush_every=FLUSH_EVERY, activation_every=50)
    assert sorted(p.name for p in log_dir.iterdir()) == [".gradscope.lock", "run.sqlite"]
    return log_dir


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs POSIX signals")
    log_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = subprocess.run([sys.executable, "-c", _KILLED_TRAINER, str(log_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (log_dir / "run.sqlite-wal").stat().st_size > 0 and (log_dir / "run.sqlite-shm").exists()
    return log_dir


@pytest.fixture
def no_write_access(tmp_path: Path) -> list[str]:
    """The command prefix under which a child process respects file permissions, checked."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a process respect read-only permissions")
        prefix = [setpriv, f"--bounding-set={_CAPS}", f"--inh-caps={_CAPS}"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", "import sys\ntry: open(sys.argv[1], 'x')\nexcept OSError: print('refused')", str(locked / "x")],
            capture_output=True,
            text=True,
        )
    finally:
        locked.chmod(0o755)
    if probe.stdout.strip() != "refused":
        pytest.skip(f"cannot make a process respect read-only permissions here ({probe.stderr.strip() or 'it wrote'})")
    return prefix


def _copy(run_dir: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for item in run_dir.iterdir():
        shutil.copyfile(item, to / item.name)
    return to


@pytest.fixture
def read_only() -> Iterator[Any]:
    """``read_only(path, dir=True)``: make the files in ``path`` (and ``path`` itself) read-only; undone at the end."""
    changed: list[tuple[Path, int]] = []

    def make(path: Path, *, directory: bool = True) -> Path:
        for item in [*path.iterdir(), *([path] if directory else [])]:
            mode = stat.S_IMODE(item.stat().st_mode)
            changed.append((item, mode))
            item.chmod(mode & ~0o222)
        return path

    yield make
    for item, mode in reversed(changed):
        item.chmod(mode)


def _read(prefix: list[str], *paths: Path, access_lies: bool = False) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", _READER, "access-lies" if access_lies else "-", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _as_written(run_dir: Path, scratch: Path) -> dict[str, Any]:
    """The run read here, from a copy: reading a killed run where it may write folds its log in."""
    run = gradscope.load(_copy(run_dir, scratch))
    return {"steps": run.n_steps, "status": run.status, "loss": run.loss.tolist()}


def test_a_complete_run_in_a_read_only_directory_is_read_as_it_is(
    closed_run: Path, tmp_path: Path, no_write_access: list[str], read_only: Any
) -> None:
    run_dir = read_only(_copy(closed_run, tmp_path / "copy"))
    assert _read(no_write_access, run_dir) == [_as_written(closed_run, tmp_path / "scratch")]

    check = subprocess.run(
        [*no_write_access, sys.executable, "-m", "gradscope.cli", "check", str(run_dir)], capture_output=True, text=True
    )
    assert (check.returncode, check.stderr) == (0, "")
    assert check.stdout.startswith(f"{run_dir}: no findings in {STEPS} steps")
    assert sorted(p.name for p in run_dir.iterdir()) == [".gradscope.lock", "run.sqlite"]


def test_a_read_only_run_file_is_read_and_nothing_is_left_beside_it(
    closed_run: Path, tmp_path: Path, no_write_access: list[str], read_only: Any
) -> None:
    run_dir = read_only(_copy(closed_run, tmp_path / "copy"), directory=False)  # the directory stays writable
    assert _read(no_write_access, run_dir) == [_as_written(closed_run, tmp_path / "scratch")]
    assert sorted(p.name for p in run_dir.iterdir()) == [".gradscope.lock", "run.sqlite"]  # no -wal or -shm left behind


def test_a_run_is_read_when_its_directory_only_looks_writable(
    closed_run: Path, tmp_path: Path, no_write_access: list[str], read_only: Any
) -> None:
    run_dir = read_only(_copy(closed_run, tmp_path / "copy"))
    assert _read(no_write_access, run_dir, access_lies=True) == [_as_written(closed_run, tmp_path / "scratch")]


def test_a_killed_run_in_a_read_only_directory_is_read_from_its_log(
    killed_run: Path, tmp_path: Path, no_write_access: list[str], read_only: Any
) -> None:
    """Its -shm file is there, so SQLite reads the log without writing: every flushed step, partial."""
    run_dir = read_only(_copy(killed_run, tmp_path / "copy"))
    (read,) = _read(no_write_access, run_dir)
    assert read == _as_written(killed_run, tmp_path / "scratch")
    assert (read["steps"], read["status"]) == (STEPS, "running")


def test_a_killed_run_whose_log_cannot_be_read_without_writing_is_refused_with_what_to_do(
    killed_run: Path, tmp_path: Path, no_write_access: list[str], read_only: Any
) -> None:
    run_dir = _copy(killed_run, tmp_path / "copy")
    (run_dir / "run.sqlite-shm").unlink()  # as when only run.sqlite and its -wal were copied
    read_only(run_dir)
    expected = (
        f"cannot read run '{run_dir / 'run.sqlite'}': expected to replay its write-ahead log run.sqlite-wal (its writer "
        "was killed, or is still running) but the run's directory is read-only for this process and SQLite cannot read "
        "the log without writing (unable to open database file); copy the whole run directory somewhere writable and "
        "read the copy"
    )
    assert _read(no_write_access, run_dir) == [{"error": "UnreadableRunError", "message": expected}]

    check = subprocess.run(
        [*no_write_access, sys.executable, "-m", "gradscope.cli", "check", str(run_dir)], capture_output=True, text=True
    )
    assert (check.returncode, check.stdout, check.stderr) == (2, "", f"gradscope: error: {expected}\n")


@pytest.mark.parametrize("name", ["run#3", "lr=1e-3?warmup", "100%"])
def test_a_run_whose_path_has_uri_characters_is_read_and_nothing_else_is_created(
    closed_run: Path, tmp_path: Path, name: str
) -> None:
    """'#' and '?' used to end the file name in the URI SQLite was given: it opened, and created,
    another file ("run", "lr=1e-3") and reported the run as corrupt."""
    run_dir = _copy(closed_run, tmp_path / "parent" / name)
    run = gradscope.load(run_dir)
    assert run.loss.tolist() == gradscope.load(closed_run).loss.tolist() and run.n_steps == STEPS
    assert [p.name for p in run_dir.parent.iterdir()] == [name]
