"""Train tiny models in forked children that die in chosen ways: SIGKILL at a step, inside a flush's
transaction or inside ``close()``, or an uncaught exception.

Run as ``python forking_trainer.py CASES.json``. The parent imports torch once (the slow part),
then forks one child per case, so a dozen real processes cost about as much as one. Each child
writes ``"<step> <loss>"`` per recorded step to its ``losses`` file with an unbuffered ``os.write``,
so the lines survive the child's SIGKILL. The parent prints a JSON list: per case, the child's exit
code or the signal that killed it.

Case keys: ``kind`` (``clean``, ``kill_before_step``, ``kill_after_step``, ``kill_in_flush``,
``kill_in_close``, ``raise_in_with``, ``raise_unclosed``, ``contend``), ``log_dir``, ``losses``,
``seed``, ``steps``, ``at`` (the step of the fault), ``flush_every``, ``activation_every``,
``update_every``, ``optimizer`` (bool), ``live`` (bool: live detection on), ``sleep`` (seconds per
step), ``stop_file`` (stop early once it exists), ``strict``, ``overwrite``, ``error_file``
(``contend``: where a refused Monitor writes its message).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.store import sqlite as store_sqlite

EXIT_REFUSED = 3


def _die_at_next_commit() -> None:
    """SIGKILL this process inside the next transaction, after its INSERTs ran and before COMMIT."""
    original = store_sqlite._Transaction.__exit__

    def exit_and_die(self: Any, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, exc_type, exc, tb)

    store_sqlite._Transaction.__exit__ = exit_and_die  # type: ignore[method-assign]


def child(case: dict[str, Any], barrier: int | None) -> int:
    """Train one case; returns the exit status (unless killed or raising on purpose)."""
    torch.set_num_threads(1)
    torch.manual_seed(case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if case.get("optimizer", True) else None
    losses = os.open(case["losses"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    kind, at = case["kind"], case.get("at", -1)
    if barrier is not None:
        os.read(barrier, 1)  # every contending child starts its Monitor at the same moment
    try:
        mon = gradscope.Monitor(
            model,
            opt,
            log_dir=case["log_dir"],
            flush_every=case.get("flush_every", 4),
            flush_seconds=None,  # writes exactly every flush_every steps: the kill points count on it
            activation_every=case.get("activation_every", 2),
            update_every=case.get("update_every", 1),
            on_finding="warn" if case.get("live") else None,
            overwrite=case.get("overwrite", False),
            strict=case.get("strict", False),
            metadata={"seed": case["seed"]},
        )
    except gradscope.GradscopeError as e:
        if kind != "contend":
            raise
        with open(case["error_file"], "w", encoding="utf-8") as f:
            f.write(str(e))
        return EXIT_REFUSED

    def train() -> None:
        for step in range(case["steps"]):
            if case.get("stop_file") and os.path.exists(case["stop_file"]):
                break
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if kind == "kill_before_step" and step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "kill_in_flush" and step == at:
                _die_at_next_commit()  # this step() flushes the steps before it
            mon.step(loss)
            os.write(losses, f"{step} {loss.item()!r}\n".encode())
            if kind == "kill_after_step" and step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind in ("raise_in_with", "raise_unclosed") and step == at:
                raise RuntimeError(f"the training loop failed at step {step}")
            if opt is not None:
                opt.step()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.sub_(0.1 * p.grad)
            if case.get("sleep"):
                time.sleep(case["sleep"])

    if kind == "raise_in_with":
        with mon:
            train()
    elif kind == "raise_unclosed":
        train()  # never closed: the interpreter's exit hook has to save the run
    else:
        train()
        if kind == "kill_in_close":
            _die_at_next_commit()  # the final flush of close()
        mon.close()
    return 0


def _warm_up() -> None:
    """Pay, once and before forking, for what every child would otherwise pay again: the lazy imports
    behind ``gradscope.Monitor`` and live detection, and torch's first optimizer and backward."""
    import gradscope.collect.monitor
    import gradscope.detect.rules  # noqa: F401

    torch.set_num_threads(1)  # before any op: no intra-op worker thread exists when the children fork
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the first optimizer imports torch._dynamo (~2 s)
    F.cross_entropy(model(torch.randn(3, 2)), torch.tensor([0, 1, 0])).backward()
    opt.step()


def main() -> None:
    _warm_up()
    with open(sys.argv[1], encoding="utf-8") as f:
        cases: list[dict[str, Any]] = json.load(f)
    contenders = sum(1 for c in cases if c["kind"] == "contend")
    barrier_r, barrier_w = os.pipe() if contenders else (None, None)
    children: dict[int, int] = {}
    for index, case in enumerate(cases):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            # An exception from here reaches the top of the interpreter as in a real training
            # script: traceback, atexit hooks, exit status 1.
            status = child(case, barrier_r if case["kind"] == "contend" else None)
            # Normal endings skip the interpreter's teardown (~1 s of module finalisation per child);
            # the children whose exception escaped above took the real way out.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        children[pid] = index
    if barrier_w is not None:
        os.write(barrier_w, b"x" * contenders)
    results: dict[int, dict[str, int | None]] = {}
    while children:
        pid, status = os.wait()
        index = children.pop(pid)
        results[index] = {
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        }
    print(json.dumps([results[i] for i in range(len(cases))]))


if __name__ == "__main__":
    main()
