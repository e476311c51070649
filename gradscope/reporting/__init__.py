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
from collections.abc import Iterable
from pathlib import Path

from gradscope.errors import InvalidInputError
from gradscope.findings import Finding
from gradscope.reporting.html import render_html
from gradscope.store.run import Run, load, require_steps

__all__ = ["render_html", "report"]


def report(
    run: str | os.PathLike[str] | Run,
    path: str | os.PathLike[str],
    *,
    findings: Iterable[Finding] | None = None,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
) -> Path:
    """Write the HTML report of a run and return the path written.

    Args:
        run: a run directory (the ``log_dir`` given to :class:`gradscope.Monitor`) or a :class:`gradscope.Run`.
            A run still being written, or cut short by a crash, gives a report of what it holds, marked partial; a run with no recorded step is refused.
        path: the HTML file to write; missing parent directories are created.
        findings: the findings to show; by default the run is diagnosed with :func:`gradscope.diagnose`.
        select, ignore: detector codes to run or skip when diagnosing (as in :func:`gradscope.diagnose`).

    The page embeds everything it needs (plotly.js included, ~5 MB) and makes no network request.
    Long runs are drawn from min/max envelopes per step bucket, so spikes and NaN/Inf steps stay visible.

    Raises:
        RunNotFoundError, UnreadableRunError: the run cannot be read, or it holds no recorded step.
        InvalidInputError: ``path`` is a directory, or an unknown detector code was given.
    """
    from gradscope.detect.registry import diagnose  # the report is downstream of detection

    loaded = require_steps(load(run), "report")  # an empty page would hide that nothing was recorded
    out = Path(path)
    if out.is_dir():
        raise InvalidInputError(f"expected a file path for the report but got the directory {str(out)!r}; pass e.g. {str(out / 'report.html')!r}")
    chosen = list(findings) if findings is not None else list(diagnose(loaded, select=select, ignore=ignore))
    page = render_html(loaded, chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
