"""The HTML diagnostic report: one self-contained page per run.

``gradscope.report("runs/exp1", "report.html")`` diagnoses the run and writes a page that opens
offline in any browser: the verdict and the findings with their fixes at the top, then the loss,
learning rate and gradient norm over steps, per-layer heatmaps of gradient norms and update/weight
ratios, activation health through depth, and the run's metadata.

(The package is ``gradscope.reporting`` rather than ``gradscope.report`` so that the function
``gradscope.report`` does not shadow it.)
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from gradscope.errors import InvalidInputError
from gradscope.findings import Finding
from gradscope.reporting.html import render_html
from gradscope.store.run import Run, load, require_steps
from gradscope.store.sqlite import DB_NAME, LOCK_NAME

__all__ = ["render_html", "report"]

# The files SQLite keeps beside a database while it is open or was not closed cleanly: writing over
# one loses the transactions it holds, or makes SQLite read the database as corrupt.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def report(
    run: str | os.PathLike[str] | Run,
    path: str | os.PathLike[str],
    *,
    findings: Iterable[Finding] | None = None,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
) -> Path:
    """Write the HTML report of a run and return the path written.

    Args:
        run: a run directory (the ``log_dir`` given to :class:`gradscope.Monitor`) or a :class:`gradscope.Run`.
            A run still being written, or cut short by a crash, gives a report of what it holds, marked partial; a run with no recorded step is refused.
        path: the HTML file to write; missing parent directories are created. The page is written to
            a temporary file beside it, then moved into place, so a failed write leaves any file
            already at ``path`` as it was.
        findings: the findings to show; by default the run is diagnosed with :func:`gradscope.diagnose`.
        select, ignore: detector codes to run or skip when diagnosing (as in :func:`gradscope.diagnose`).

    The page embeds everything it needs (plotly.js included, ~5 MB) and makes no network request.
    Long runs are drawn from min/max envelopes per step bucket, so spikes and NaN/Inf steps stay visible.

    Raises:
        RunNotFoundError, UnreadableRunError: the run cannot be read, or it holds no recorded step.
        InvalidInputError: ``path`` is a directory, or one of the run's own files (its ``run.sqlite``,
            SQLite's ``-wal``/``-shm``/``-journal`` files beside it, or the Monitor's lock file),
            or an unknown detector code was given.
    """
    from gradscope.detect.registry import diagnose  # the report is downstream of detection

    loaded = require_steps(load(run), "report")  # an empty page would hide that nothing was recorded
    out = Path(path)
    if out.is_dir():
        raise InvalidInputError(f"expected a file path for the report but got the directory {str(out)!r}; pass e.g. {str(out / 'report.html')!r}")
    _refuse_run_files(loaded, out)  # before diagnosing: a refused path should not cost a diagnosis first
    chosen = list(findings) if findings is not None else list(diagnose(loaded, select=select, ignore=ignore))
    page = render_html(loaded, chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, page)
    return out


def _refuse_run_files(run: Run, out: Path) -> None:
    """Raise if ``out`` is one of the files that hold ``run``: the report would replace the run itself."""
    if run.path is None:
        return  # a run kept in memory has no file to protect
    database = run.path / DB_NAME if run.path.is_dir() else run.path
    protected = [
        ("database", database),
        *(("SQLite side file", Path(f"{database}{suffix}")) for suffix in SQLITE_SIDE_FILES),
        # A new file in place of the lock lets a second Monitor write the run while the first still does.
        ("lock file", database.parent / LOCK_NAME),
    ]
    # resolve() follows symlinks and makes relative paths absolute; samefile() also catches hard links.
    target = out.resolve()
    for what, own in protected:
        if target == own.resolve() or _same_existing_file(out, own):
            raise InvalidInputError(
                f"expected a report path outside the run but got {str(out)!r}, which is the run's {what} "
                f"{str(own)!r}: writing the report there would damage the run; pass e.g. "
                f"{str(database.parent / 'report.html')!r}"
            )


def _same_existing_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): resolve() already compared the paths
        return False


def _write_atomically(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` through a temporary file in the same directory and ``os.replace``,
    so that readers and a failed write (full disk, interrupt) see the old file or the new, never half a page."""
    try:
        mode: int | None = os.stat(out).st_mode
    except OSError:  # no file yet (or no access to it: the write below then says why)
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        # /dev/stdout, a FIFO, /dev/null: replacing the node would remove a device or a pipe rather
        # than write into it, and a stream holds no earlier page a failed write could clobber.
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        return
    # Write beside the file the path points at, so that a symlinked report stays a symlink and
    # os.replace never crosses file systems (where it is not atomic, or fails).
    target = out.resolve()
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 under the umask, as a plain open() creates
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename: a crash then cannot leave an empty page
        if mode is not None:
            os.chmod(temp, stat.S_IMODE(mode))  # replacing a report keeps its permissions, as writing into it did
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
