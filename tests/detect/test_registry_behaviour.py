"""Registry-level behaviour of diagnose that no single detector owns."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_diagnosed_run_is_freed_once_dropped() -> None:
    """Live detection diagnoses a fresh Run at every check: nothing may keep the old ones alive."""
    import gc
    import weakref

    import numpy as np

    import gradscope
    from gradscope.testing import synthetic_run

    run = synthetic_run(np.geomspace(2.3, 0.1, 200), grad_norm={"fc1": 0.5, "fc2": 0.4})
    gradscope.diagnose(run)
    ref = weakref.ref(run)
    del run
    gc.collect()
    assert ref() is None


def test_codes_are_taken_as_a_list_or_one_comma_separated_string_everywhere(tmp_path: Path) -> None:
    """``select="a,b"`` reads as on the command line in diagnose, report and the Monitor, as it
    does in assert_healthy (a string was once read letter by letter and refused)."""
    import math

    import numpy as np
    import torch

    import gradscope
    from gradscope.testing import synthetic_run

    loss = np.geomspace(2.3, 0.1, 200)
    loss[150] = math.nan
    run = synthetic_run(loss, grad_norm={"fc1": 0.5, "fc2": 0.4})
    as_list = [f.code for f in gradscope.diagnose(run, select=["nonfinite", "stalled_training"])]
    assert "nonfinite" in as_list
    assert [f.code for f in gradscope.diagnose(run, select="nonfinite, stalled_training")] == as_list
    assert "nonfinite" not in [f.code for f in gradscope.diagnose(run, ignore="nonfinite")]
    assert gradscope.report(run, tmp_path / "r.html", select="nonfinite").exists()
    model = torch.nn.Linear(2, 1)
    with gradscope.Monitor(model, select="nonfinite,exploding_loss") as mon:
        assert mon._select == ["nonfinite", "exploding_loss"]
    with pytest.raises(gradscope.InvalidInputError, match=r"but got no_such_code$"):  # not "n, o, …"
        gradscope.diagnose(run, select="nonfinite,no_such_code")
