"""``unshuffled_data``: training data that comes in runs of one class, on synthetic and real runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import synth
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradscope
from gradscope.datasets import load_digits
from gradscope.detect.rules.unshuffled_data import rank_autocorrelation, sawtooth
from gradscope.store.run import Run


def _codes(run: Run) -> set[str]:
    return {f.code for f in gradscope.diagnose(run)}


def class_runs(n: int = 300, examples: int = 150, batch: int = 16, seed: int = 0) -> np.ndarray:
    """The loss of a classifier fed its data sorted by label: in each run of ``examples / batch``
    steps of one class it learns to predict that class (the loss falls ~2 decades), then jumps back
    up when the next class begins."""
    rng = np.random.default_rng(seed)
    seen = (np.arange(n) * batch) % (10 * examples)  # index of the first example of each batch
    into_class = (seen % examples) / batch  # steps since this class began
    log_loss = 0.4 - 0.25 * into_class + rng.normal(0, 0.05, n)
    return np.asarray(10**log_loss, dtype=np.float64)


def test_loss_that_saws_with_the_class_runs_is_named_with_its_period_and_jump() -> None:
    run = synth.mlp_run(class_runs())
    found = [f for f in gradscope.diagnose(run) if f.code == "unshuffled_data"]
    assert len(found) == 1
    f = found[0]
    assert f.severity.value == "warning" and f.step == 0
    assert f.evidence["period_steps"] in (9.0, 10.0)  # 150 examples / 16 per batch = 9.4 steps a class
    assert 1.8 < f.evidence["jump_decades"] < 2.6
    assert "every ~9 steps" in f.message or "every ~10 steps" in f.message
    assert f.fixes[0].kind.value == "data" and "shuffle=True" in f.fixes[0].action


def test_the_class_runs_are_not_also_called_an_oscillation_to_fix_with_the_learning_rate() -> None:
    # The sawtooth swings like an oscillation; oscillating_loss's fix (a lower lr) would be wrong.
    run = synth.mlp_run(class_runs())
    from gradscope.detect.rules.oscillating_loss import OscillatingLoss
    from gradscope.detect.rules.unshuffled_data import UnshuffledData

    assert UnshuffledData().class_runs(run) is not None
    assert "oscillating_loss" not in _codes(run)
    assert [f.code for f in OscillatingLoss().run(run)] == ["oscillating_loss"]  # replaced, in a diagnosis
    # ignored, or tuned not to fire, unshuffled_data replaces nothing: the oscillation is reported
    assert [f.code for f in gradscope.diagnose(run, ignore="unshuffled_data")] == ["oscillating_loss"]
    tuned = gradscope.diagnose(run, config={"unshuffled_data": {"min_asymmetry": 0.99}})
    assert [f.code for f in tuned] == ["oscillating_loss"]
    # a plain momentum-style oscillation, symmetric in time, is still one
    steps = np.arange(300)
    swinging = synth.mlp_run(10 ** (0.3 - steps / 600 + 0.3 * np.sin(2 * np.pi * steps / 12)))
    assert UnshuffledData().class_runs(swinging) is None
    assert [f.code for f in OscillatingLoss().run(swinging)] == ["oscillating_loss"]


def test_sawtooth_measures_period_and_asymmetry_of_a_pattern() -> None:
    y = np.log10(class_runs(n=400, examples=100, batch=10))  # 10 steps a class
    tooth = sawtooth(y, min_period=4, min_periodicity=0.35)
    assert tooth is not None and tooth.period == 10
    assert tooth.asymmetry > 0.5  # up in one step, down over nine
    assert tooth.jumps.size in (39, 40)
    # The same curve played backwards rises slowly and drops at once: periodic, but not this fault.
    backwards = sawtooth(y[::-1], min_period=4, min_periodicity=0.35)
    assert backwards is not None and backwards.asymmetry < -0.5


def test_rank_autocorrelation_ignores_the_size_of_outliers() -> None:
    wave = np.tile([1.0, 2.0, 3.0, 4.0], 25)
    spiked = wave.copy()
    spiked[::8] = -1e9  # a batch whose loss is 1e-9: a deep low in log space, one rank lower
    assert rank_autocorrelation(wave, 8)[4] == pytest.approx(rank_autocorrelation(spiked, 8)[4], abs=0.1)
    assert rank_autocorrelation(np.full(50, 2.0), 8).size == 0


def _restarts(n: int = 300, period: int = 30) -> Run:
    # SGDR (CosineAnnealingWarmRestarts): the lr jumps back to its peak every 30 steps, and so does the loss.
    phase = np.arange(n) % period
    lr = 0.1 * 0.5 * (1 + np.cos(np.pi * phase / period))
    return synth.mlp_run(class_runs(n, examples=period * 16), lr=lr)


def _periodic(kind: str, n: int = 400, period: int = 10) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(3)
    shape = {
        "square": 0.5 * ((t % period) < period // 2),
        "spikes": 1.0 * (t % period == 0),
        "slow-rise-sudden-drop": 0.1 * (t % period),
    }[kind]
    return np.asarray(np.geomspace(2.3, 0.3, n) * 10 ** (shape + rng.normal(0, 0.05, n)), dtype=np.float64)


@pytest.mark.parametrize(
    "make",
    [
        *synth.HEALTHY.values(),
        synth.oscillating,  # momentum swings: periodic, but as steep down as up
        _restarts,
        lambda: synth.mlp_run(_periodic("square")),
        lambda: synth.mlp_run(_periodic("spikes")),
        lambda: synth.mlp_run(_periodic("slow-rise-sudden-drop")),
    ],
    ids=[*synth.HEALTHY, "momentum-oscillation", "lr-warm-restarts", "square-wave", "spikes", "reverse-sawtooth"],
)
def test_runs_that_are_not_class_runs_are_not_named(make: Callable[[], Run]) -> None:
    assert "unshuffled_data" not in _codes(make())


def test_a_noisy_small_batch_run_and_a_step_decay_run_are_not_class_runs() -> None:
    # The two healthy shapes most like it: batches of 4 swing by ±0.4 decades, and step decay drops in stairs.
    assert "unshuffled_data" not in _codes(synth.healthy_noisy_small_batch())
    assert "unshuffled_data" not in _codes(synth.healthy_step_decay())


def _digits_run(tmp_path: Path, shuffle: bool, *, momentum: float = 0.0, lr: float = 0.1, epochs: int = 2) -> Run:
    torch.manual_seed(0)
    images, labels = load_digits(size=8)
    by_class = torch.argsort(labels, stable=True)  # a dataset stored class by class
    data = TensorDataset(images[by_class][:1500], labels[by_class][:1500])
    loader = DataLoader(data, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with gradscope.Monitor(model, opt, log_dir=tmp_path / "run", on_finding=None) as mon:
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()
    return gradscope.load(tmp_path / "run")


@pytest.mark.parametrize("shuffle", [False, True], ids=["shuffle=False", "shuffle=True"])
def test_a_real_dataloader_over_data_sorted_by_class(tmp_path: Path, shuffle: bool) -> None:
    assert ("unshuffled_data" in _codes(_digits_run(tmp_path, shuffle))) is not shuffle


def test_every_finding_on_unshuffled_data_leads_with_shuffling(tmp_path: Path) -> None:
    # With momentum the class switches also blow up the gradients and kill units: those findings
    # rank above the shuffle warning, and their first fix must be the same one (shuffled, the same
    # network and optimizer train to ~98% with no finding at all).
    sorted_run = _digits_run(tmp_path / "sorted", False, momentum=0.9, lr=0.05, epochs=3)
    findings = list(gradscope.diagnose(sorted_run))
    assert "unshuffled_data" in {f.code for f in findings} and len(findings) >= 2
    assert [f.fixes[0].kind.value for f in findings if f.fixes] == ["data"] * len([f for f in findings if f.fixes])
    assert list(gradscope.diagnose(_digits_run(tmp_path / "shuffled", True, momentum=0.9, lr=0.05, epochs=3))) == []
