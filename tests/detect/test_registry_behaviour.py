"""Registry-level behaviour of diagnose that no single detector owns."""

from __future__ import annotations


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
