"""Training killed with SIGKILL, or stopped by an uncaught exception, at seeded random points: the run
loads with every step of every committed flush, ``diagnose``, ``check`` and ``report`` work on it,
and both the report and ``check`` say it is partial.

The faults (see ``forking_trainer.py``): SIGKILL right after ``mon.step()``, right before it (after
``backward()``), inside the SQLite transaction of a flush (its rows written, not committed), inside
the final flush of ``close()``; an exception out of a ``with Monitor`` block, and one out of a script
that never closes its Monitor (the interpreter's exit hook saves the run). Every child uses its own
random ``flush_every``, sampling cadences, optimizer or none, live detection or none.

``tests/store/test_crash_safety.py`` kills a trainer from outside at one moment while reading it;
this file covers many kill points, the exact loss bound, and the readers downstream of ``load``.
"""

from __future__ import annotations

import json
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reliability_support import assert_prefix, detector_errors, logged_losses, run_forked

import gradscope
from gradscope.cli import main as cli

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals and fork")

STEPS = 40
KINDS = (
    "kill_after_step",
    "kill_after_step",
    "kill_after_step",
    "kill_before_step",
    "kill_before_step",
    "kill_in_flush",
    "kill_in_flush",
    "kill_in_close",
    "raise_in_with",
    "raise_unclosed",
)


def _cases(root: Path) -> list[dict[str, Any]]:
    rng = random.Random(7)  # seeded: the same kill points on every run of the suite
    cases = []
    for index, kind in enumerate(KINDS):
        flush = rng.choice([3, 4, 5, 7])
        if kind == "kill_in_flush":
            at = flush * rng.randrange(1, (STEPS - 1) // flush + 1)  # a step whose step() flushes
        else:
            at = rng.randrange(flush, STEPS - 1)
        cases.append(
            {
                "kind": kind,
                "at": at,
                "steps": STEPS,
                "seed": index,
                "flush_every": flush,
                "activation_every": rng.choice([0, 1, 2, 3]),
                "update_every": rng.choice([0, 1, 3]),
                "optimizer": rng.random() < 0.7,
                "live": rng.random() < 0.5,
            }
        )
    # Killed before its first flush: the run loads but holds no step.
    cases.append({"kind": "kill_after_step", "at": 2, "steps": STEPS, "seed": 99, "flush_every": 5, "live": True})
    for index, case in enumerate(cases):
        case["log_dir"] = str(root / f"run{index}")
        case["losses"] = str(root / f"losses{index}.txt")
    return cases


def expected_steps(case: dict[str, Any]) -> tuple[int, int]:
    """(steps the loop recorded with mon.step, steps that must be on disk).

    A flush runs inside the step() of every step that is a multiple of flush_every and writes the
    steps before it; close() writes the rest. After a crash, the steps of the last committed flush
    are all there and no step after them is.
    """
    kind, at, flush = case["kind"], case["at"], case["flush_every"]
    recorded = {
        "kill_after_step": at + 1,
        "kill_before_step": at,
        "kill_in_flush": at,  # the flush dies inside step()
        "kill_in_close": STEPS,
        "raise_in_with": at + 1,
        "raise_unclosed": at + 1,
    }[kind]
    if kind.startswith("raise"):
        return recorded, recorded  # closed by __exit__ or the exit hook: everything is saved
    if kind == "kill_in_flush":
        return recorded, recorded - flush  # the flush being written is lost, the ones before are not
    return recorded, (recorded - 1) // flush * flush


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    root = tmp_path_factory.mktemp("crashes")
    cases = _cases(root)
    results, stderr = run_forked(cases, root)
    return cases, results, stderr


def _ids() -> list[str]:
    return [f"{i}-{kind}" for i, kind in enumerate(KINDS)] + [f"{len(KINDS)}-before-first-flush"]


def test_the_children_died_the_way_they_were_told(crashed: Any) -> None:
    cases, results, stderr = crashed
    for case, result in zip(cases, results, strict=True):
        if case["kind"].startswith("raise"):
            assert result == {"exit": 1, "signal": None}, case
        else:
            assert result == {"exit": None, "signal": signal.SIGKILL}, case
    # The two uncaught exceptions printed their own traceback and nothing else went wrong on the way
    # out: no error in gradscope's exit hook, nothing "ignored" while the interpreter shut down.
    assert len(re.findall(r"RuntimeError: the training loop failed at step \d+", stderr)) == 2, stderr
    assert "Error in atexit" not in stderr and "Exception ignored" not in stderr, stderr
    assert str(Path(gradscope.__file__).parent) not in stderr, stderr  # no frame inside gradscope


@pytest.mark.parametrize("index", range(len(KINDS) + 1), ids=_ids())
def test_a_crashed_run_keeps_every_flushed_step_and_reads_as_partial(index: int, crashed: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases, _, _ = crashed
    case = cases[index]
    losses = logged_losses(Path(case["losses"]))
    recorded, on_disk = expected_steps(case)
    assert len(losses) == recorded, "the child logged every step it recorded"

    run = gradscope.load(case["log_dir"])
    assert run.n_steps == on_disk
    assert run.n_steps >= recorded - case["flush_every"], "a crash loses at most flush_every steps"
    assert_prefix(run, losses, on_disk)
    assert run.is_partial
    assert run.status == ("failed" if case["kind"].startswith("raise") else "running")
    every = case.get("activation_every", 2)
    if every:
        # activation statistics are committed with their steps: all of them, none beyond
        np.testing.assert_array_equal(run.activation_steps, np.arange(0, on_disk, every))
    if case["kind"] == "raise_in_with":
        assert [(e["kind"], e["step"]) for e in run.events] == [("exception", case["at"] + 1)]

    capsys.readouterr()
    status = cli(["check", case["log_dir"], "--format", "json"])
    out, err = capsys.readouterr()
    if on_disk == 0:
        assert status == 2 and out == ""
        assert err.count("\n") == 1
        assert f"cannot check run {case['log_dir']!r}: expected recorded steps but it holds none" in err
        assert "died before the first flush (every 5 steps)" in err
        with pytest.raises(gradscope.UnreadableRunError, match="expected recorded steps but it holds none"):
            gradscope.report(case["log_dir"], tmp_path / "r.html")
        return

    assert detector_errors(gradscope.diagnose(run)) == []
    assert status in (0, 1), err
    summary = json.loads(out)["summary"]
    assert (summary["steps"], summary["status"], summary["partial"]) == (on_disk, run.status, True)
    assert not [f for f in json.loads(out)["findings"] if f["code"] == "detector_error"]

    page = gradscope.report(case["log_dir"], tmp_path / "r.html").read_text(encoding="utf-8")
    banner = re.search(r'<div class="banner partial" role="alert">(.*?)</div>', page)
    assert banner is not None
    assert f"(status: {run.status})" in banner.group(1)
    assert f"up to step {on_disk - 1:,}" in banner.group(1)
    assert f"{on_disk:,} steps" in page
