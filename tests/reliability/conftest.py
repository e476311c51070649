"""The reliability suite: faults injected into training, storage and reading, each asserted on values.

Helpers live in ``reliability_support``; the test directories whose helpers are reused here
(``tests/collect``, ``tests/report``) are put on ``sys.path`` so that their modules import by name,
as they do in their own directories.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for reused in ("collect", "report"):
    path = str(TESTS / reused)
    if path not in sys.path:
        sys.path.append(path)
