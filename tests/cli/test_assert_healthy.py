"""``assert_healthy``: the pytest-side twin of ``gradscope check``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from gs_cli_support import FAKE_CODE, make_run, sample_findings

from gradscope.checks import assert_healthy, failing, parse_codes
from gradscope.errors import InvalidInputError, RunNotFoundError
from gradscope.findings import Finding

pytestmark = pytest.mark.usefixtures("fake_detector")


def test_raises_with_every_failing_finding_and_its_fixes(write_run: Callable[..., str]) -> None:
    run = write_run()
    with pytest.raises(AssertionError) as exc:
        assert_healthy(run, select=[FAKE_CODE])
    message = str(exc.value)
    assert message.splitlines()[0] == "gradscope found 1 error, 1 warning at or above warning in run:"
    assert "  step 312: error nonfinite [layers layer1, layer2]: loss became NaN at step 312" in message
    assert "    fix 2 (gradient_clipping): torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)" in message
    assert "vanishing_gradients" in message
    assert "stalled_training" not in message  # info is below the default fail_on


def test_passes_below_fail_on_and_returns_the_findings() -> None:
    run = make_run([f for f in sample_findings() if f.severity.value != "error"])
    findings = assert_healthy(run, fail_on="error", select=FAKE_CODE)
    assert [f.code for f in findings] == ["vanishing_gradients", "stalled_training"]


def test_info_level_fails_on_info() -> None:
    run = make_run([Finding("stalled_training", "info", None, message="slow")])
    assert_healthy(run, select=FAKE_CODE)
    with pytest.raises(AssertionError, match="1 info at or above info"):
        assert_healthy(run, fail_on="info", select=FAKE_CODE)


def test_ignore_as_comma_separated_string() -> None:
    run = make_run(sample_findings())
    assert assert_healthy(run, select=f"{FAKE_CODE},nonfinite", ignore=f"{FAKE_CODE}, ") == []


def test_a_selection_that_leaves_no_detector_is_refused_not_passed() -> None:
    """A check that runs no detector finds nothing: it must not pass as healthy (as gradscope check)."""
    run = make_run(sample_findings())
    with pytest.raises(InvalidInputError, match="leave at least one detector to run but they leave none"):
        assert_healthy(run, select=FAKE_CODE, ignore=FAKE_CODE)


def test_bad_arguments_raise_gradscope_errors(tmp_path: object) -> None:
    run = make_run([])
    with pytest.raises(InvalidInputError, match=r"expected a severity \(info, warning, error\) but got 'fatal'"):
        assert_healthy(run, fail_on="fatal")
    with pytest.raises(InvalidInputError, match="no_such_code"):
        assert_healthy(run, select=["no_such_code"])
    with pytest.raises(RunNotFoundError, match="does not exist"):
        assert_healthy("/nonexistent/run/dir")


def test_parse_codes() -> None:
    assert parse_codes(None) is None
    assert parse_codes("a, b,,a") == ["a", "b"]
    assert parse_codes(["a,b", "c", "b"]) == ["a", "b", "c"]
    assert parse_codes([]) == []


def test_failing_orders_most_severe_first() -> None:
    findings = sample_findings()
    assert [f.code for f in failing(findings, "info")] == ["nonfinite", "vanishing_gradients", "stalled_training"]
    assert [f.code for f in failing(findings, "error")] == ["nonfinite"]
