"""Test support for the CLI and ``assert_healthy``: runs on disk with findings known in advance.

Real detectors decide from the data; to test how findings are printed, exit codes and formats, the
test-only ``fake_problem`` detector returns whatever findings a run carries in its metadata
(``meta["user"]["fake_findings"]``). Tests select it with ``--select fake_problem`` so that the
built-in detectors cannot change their expected output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gradscope.detect.base import _REGISTRY, Detector
from gradscope.findings import Finding, Fix
from gradscope.store.run import Run
from gradscope.testing import synthetic_run

FAKE_CODE = "fake_problem"
LAYERS = [f"layer{i}" for i in range(7)]


def register() -> None:
    """Register the ``fake_problem`` detector (idempotent)."""
    if FAKE_CODE in _REGISTRY:
        return

    class FakeProblem(Detector):
        """Test-only: reports the findings stored in the run's metadata."""

        code = FAKE_CODE

        def check(self, run: Run) -> Iterable[Finding]:
            return [Finding.from_dict(d) for d in run.meta.get("user", {}).get("fake_findings", [])]


def unregister() -> None:
    _REGISTRY.pop(FAKE_CODE, None)


def sample_findings() -> list[Finding]:
    """One finding per severity, with the characters every output format has to escape."""
    return [
        Finding(
            code="vanishing_gradients",
            severity="warning",
            step=0,
            last_step=499,
            layers=tuple(LAYERS),
            message="gradient norm of layer0 is 1e-6 of layer6's: 100% gone,\nnothing reaches the input <side> & stays",
            evidence={"ratio": 1e-6, "layers_below": 7},
            fixes=(Fix("activation", "replace nn.Sigmoid with nn.ReLU"), Fix("initialization", "nn.init.kaiming_normal_(w)")),
        ),
        Finding(
            code="nonfinite",
            severity="error",
            step=312,
            layers=("layer1", "layer2"),
            message="loss became NaN at step 312",
            evidence={"first_nonfinite_step": 312, "grad_norm_growth": float("inf")},
            fixes=(
                Fix("learning_rate", "lr=8.0 diverged; try lr=0.8"),
                Fix("gradient_clipping", "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"),
            ),
        ),
        Finding(code="stalled_training", severity="info", step=None, message="loss moved 0.1% over the last 200 steps"),
    ]


def make_run(findings: Sequence[Finding] = (), *, status: str = "complete", n_steps: int = 500) -> Run:
    rng = np.random.default_rng(0)
    return synthetic_run(
        np.geomspace(2.3, 0.2, n_steps) * (1 + 0.05 * rng.random(n_steps)),
        grad_norm={layer: np.full(n_steps, 0.5 / (i + 1)) for i, layer in enumerate(LAYERS)},
        meta={"user": {"fake_findings": [f.to_dict() for f in findings]}},
        status=status,
    )


