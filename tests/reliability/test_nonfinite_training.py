"""Non-finite values everywhere: a NaN loss from the first step, an Inf parameter, an all-NaN batch.

Training is never interrupted, no gradscope warning appears, every statistic stays well defined (a
fraction stays in [0, 1] or NaN, a count is a whole number in range, the NaN counts equal torch's),
``diagnose`` reports ``nonfinite`` at the right step without a detector failing, ``gradscope check``
fails the run and the report renders with the non-finite steps marked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reliability_support import batch, detector_errors, gradscope_warnings
from report_support import decode, page_data
from torch import nn

import gradscope
from gradscope.cli import main as cli
from gradscope.store.schema import ACTIVATION_METRICS, OUTPUT_NONFINITE

STEPS = 12
NAN_BATCH_STEP = 5


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _nan_loss(out: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    return F.cross_entropy(out, y) * float("nan")  # a loss that is NaN from step 0 on


def _plain_loss(out: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _inf_weight(model: nn.Module) -> None:
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")  # type: ignore[index]


def _nan_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    return (torch.full_like(x, float("nan")), y) if step == NAN_BATCH_STEP else (x, y)


SCENARIOS: dict[str, dict[str, Any]] = {
    "nan_loss_from_step_0": {"loss": _nan_loss, "first_bad": 0},
    "inf_parameter": {"prepare": _inf_weight, "first_bad": 0},
    "all_nan_batch": {"batch": _nan_batch, "first_bad": NAN_BATCH_STEP},
}


def _record(name: str, log_dir: Path) -> tuple[gradscope.Run, list[str], dict[str, Any]]:
    """Train a scenario, noting with torch which module outputs held NaN/Inf on each step."""
    scenario = SCENARIOS[name]
    model = _model()
    scenario.get("prepare", lambda m: None)(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = scenario.get("batch", batch)
    loss_fn = scenario.get("loss", _plain_loss)
    counts: dict[str, list[float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out.detach()))
        for name, module in model.named_children()
    ]
    options: dict[str, Any] = {"flush_every": 4, "activation_every": 1, "update_every": 1, "on_finding": None}
    with gradscope_warnings() as warned, gradscope.Monitor(model, opt, log_dir=log_dir, **options) as mon:
        for step in range(STEPS):
            x, y = make_batch(step)
            opt.zero_grad()
            loss = loss_fn(model(x), y, step)
            loss.backward()
            mon.step(loss)
            opt.step()
            for module_name, out in outputs.items():
                counts.setdefault(module_name, []).append(float((~torch.isfinite(out)).any()))
    for handle in handles:
        handle.remove()
    return gradscope.load(log_dir), warned, counts


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[gradscope.Run, list[str], dict[str, Any]]]:
    return {name: _record(name, tmp_path_factory.mktemp(name)) for name in SCENARIOS}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_statistics_stay_well_defined(name: str, recorded: Any) -> None:
    run, warned, counts = recorded[name]
    assert warned == []
    assert run.n_steps == STEPS and run.status == "complete"
    for metric in ("act_zero_frac", "act_dead_frac", "act_saturated_frac"):
        values = run.metric(metric).to_numpy()
        assert ((values >= 0) & (values <= 1) | np.isnan(values)).all(), metric
    nonfinite = run.metric("act_nonfinite")
    for module, expected in counts.items():
        np.testing.assert_array_equal(nonfinite[module], expected)  # exactly the steps whose output held NaN/Inf
    flags = run.metric(OUTPUT_NONFINITE).to_numpy()
    assert set(np.unique(flags)) <= {0.0, 1.0}
    grad_nonfinite = run.metric("grad_nonfinite").to_numpy()
    assert ((grad_nonfinite >= 0) & (grad_nonfinite <= 2) & (grad_nonfinite == np.round(grad_nonfinite))).all()
    # NaN and Inf survive the trip to disk and back as themselves, not as garbage or zeros
    first = SCENARIOS[name]["first_bad"]
    assert not np.isfinite(run.grad_norm[first:]).any()
    assert np.isfinite(run.grad_norm[:first]).all()
    frame = run.to_pandas()
    assert set(frame["metric"]) >= set(ACTIVATION_METRICS) - {"act_saturated_frac"}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_diagnose_reports_nonfinite_at_the_first_bad_step(name: str, recorded: Any) -> None:
    run, _, _ = recorded[name]
    findings = gradscope.diagnose(run)
    assert detector_errors(findings) == []
    nonfinite = [f for f in findings if f.code == "nonfinite"]
    assert len(nonfinite) == 1
    assert nonfinite[0].step == SCENARIOS[name]["first_bad"]
    assert nonfinite[0].severity is gradscope.Severity.ERROR  # the run ends non-finite
    if name == "all_nan_batch":
        assert nonfinite[0].layers[0] == "(input)"  # traced to the data


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_check_fails_and_the_report_renders(name: str, recorded: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _, _ = recorded[name]
    assert cli(["check", str(run.path), "--fail-on", "error"]) == 1
    out = capsys.readouterr().out
    first = SCENARIOS[name]["first_bad"]
    assert f": steps {first}-{STEPS - 1}: error nonfinite [" in out
    page = gradscope.report(run, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<code>nonfinite</code>" in page
    curves = {f["id"]: f for f in page_data(page)["figures"]}["gs-curves"]["data"]
    marks = [t for t in curves if t.get("name") in ("loss: NaN/Inf", "grad norm: NaN/Inf")]
    assert marks, "the non-finite steps are marked on the curves"
    assert min(int(decode(t["x"]).min()) for t in marks) == first


def test_nan_activations_are_not_dead_units(recorded: Any) -> None:
    run, _, _ = recorded["all_nan_batch"]
    dead = run.metric("act_dead_frac").loc[NAN_BATCH_STEP:, ["0", "1", "2"]]
    assert (dead.to_numpy() < 1).all(), dead


def test_a_nan_run_has_no_dead_units_finding(recorded: Any) -> None:
    for name in SCENARIOS:
        run, _, _ = recorded[name]
        assert [f.code for f in gradscope.diagnose(run) if f.code == "dead_units"] == [], name


def test_a_nan_loss_is_reported_as_a_nan_loss(recorded: Any) -> None:
    run, _, _ = recorded["nan_loss_from_step_0"]
    finding = next(f for f in gradscope.diagnose(run) if f.code == "nonfinite")
    assert "finite loss" not in finding.message
    assert finding.evidence["loss_nonfinite_steps"] == STEPS
