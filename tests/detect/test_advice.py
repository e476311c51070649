"""Fixes are written from the run's own facts: its learning rate, optimizer, modules, input scale and
healthy gradient norm."""

from __future__ import annotations

import numpy as np
import pytest
import synth

from gradscope import Fix, Run
from gradscope.detect import advice as A
from gradscope.testing import synthetic_run


@pytest.mark.parametrize(
    ("value", "text"), [(0.0834, "0.1"), (2.6e-3, "0.003"), (0.17, "0.2"), (4.2, "5"), (7.4, "10"), (1.0, "1"), (0.0, "0")]
)
def test_nice_number_rounds_to_1_2_3_5_times_a_power_of_ten(value: float, text: str) -> None:
    assert A.nice_number(value) == text


def test_describe_modules_compresses_long_runs_of_names() -> None:
    types = {f"net.{i}": "Sigmoid" for i in range(1, 20, 2)}
    assert A.describe_modules([f"net.{i}" for i in range(1, 20, 2)], types) == "`net.1`…`net.19` (10 Sigmoid)"
    assert A.describe_modules(["a", "b"], {"a": "ReLU", "b": "GELU"}) == "`a`, `b` (GELU/ReLU)"
    assert A.describe_modules([], {}) == "(none)"


def test_facts_read_the_optimizer_and_the_model() -> None:
    opt = {"class": "SGD", "defaults": {"lr": 0.3}, "param_groups": [{"lr": 0.3, "momentum": 0.99, "weight_decay": 1e-4}]}
    run = synthetic_run(
        np.full(20, 1.0),
        grad_norm={"rnn": np.ones(20), "norm": np.ones(20), "head": np.ones(20)},
        module_types={"rnn": "LSTM", "norm": "LayerNorm", "act": "Tanh", "head": "Linear"},
        optimizer=opt,
        lr=0.3,
    )
    f = A.facts(run)
    assert f is A.facts(run)  # computed once per run
    assert f.optimizer_class == "SGD" and f.momentum == 0.99 and f.weight_decay == 1e-4 and not f.is_adaptive
    assert f.rnn_modules == ["rnn"] and f.has_norm and f.weight_layers == ["rnn", "head"]
    assert f.saturating_modules == ["act"] and f.output_module == "head"
    assert f.lr_text() == "lr=0.3, momentum=0.99 with SGD"


def test_lower_lr_proposal_aims_at_a_one_percent_update() -> None:
    # The first updates moved the weights by 80% of their norm: 80× too much for ~1% per step.
    run = synth.mlp_run(np.full(50, 2.3), lr=8.0, update_ratio=np.r_[np.full(3, 0.8), np.full(47, 0.01)])
    fix = A.lower_lr_fix(A.facts(run), 12)
    assert fix.kind.value == "learning_rate"
    assert fix.action.startswith("lr=8 with SGD diverged from step 12; try lr=0.1")
    assert "80%" in fix.action


def test_lower_lr_proposal_starts_from_the_lr_in_effect_where_the_run_failed() -> None:
    # A schedule that decays from 3 to 0.05: the run diverged at step 1, under lr=2.76, and the fix
    # must not quote the last lr (0.05) as the one that failed.
    lr = np.geomspace(3.0, 0.05, 50)
    run = synth.mlp_run(np.full(50, 2.3), lr=lr, update_ratio=np.r_[np.full(3, 0.8), np.full(47, 0.01)])
    fix = A.lower_lr_fix(A.facts(run), 1)
    assert fix.action.startswith("lr=2.76 with SGD diverged from step 1; try lr=0.03"), fix.action  # the lr at step 1
    assert A.lower_lr_fix(A.facts(run), None, what="makes the loss oscillate").action.startswith("lr=0.05 ")  # now
    # Later, at lr=0.25: the first updates moved the weights by 80% under lr=3, so ~1% takes lr≈0.04;
    # proposed from that measurement, not by shrinking 0.25 by 80×, and below the lr that failed.
    later = A.lower_lr_fix(A.facts(run), 30)
    assert later.action.startswith("lr=0.245 with SGD diverged from step 30; try lr=0.03"), later.action
    assert "80% of their norm per step under lr=3;" in later.action


def test_raise_lr_proposal_aims_at_a_thousandth_per_step() -> None:
    run = synth.mlp_run(np.full(50, 2.3), lr=1e-5, update_ratio=4e-6)
    fix = A.raise_lr_fix(A.facts(run), 4e-6)
    assert "Try lr=0.003" in fix.action  # 1e-5 × 1e-3 / 4e-6 = 2.5e-3


def test_raise_lr_fix_quotes_the_threshold_it_is_named_at_and_the_healthy_range() -> None:
    """The text once said "healthy: ~1e-3" while the cause is named only under 1e-4: the reader could
    not tell where the line is. It must state the threshold actually used and the measured range."""
    assert A.LOW_UPDATE_RATIO < A.TARGET_UPDATE_RATIO_LOW <= A.HEALTHY_UPDATE_RATIO[0] < A.HEALTHY_UPDATE_RATIO[1]
    run = synth.mlp_run(np.full(50, 2.3), lr=1e-5, update_ratio=4e-6)
    action = A.raise_lr_fix(A.facts(run), 4e-6).action
    assert "too low is under 0.0001; healthy runs measured 0.003-0.04" in action, action
    assert "Try lr=0.003, to move it by ~0.001 per step." in action  # 4e-6 × 250
    assert "~1e-3" not in action
    capped = A.raise_lr_fix(A.facts(run), 1e-8).action
    assert "Try lr=0.01, to move it by ~1e-05 per step." in capped  # ×1000 at most: says what it reaches


@pytest.mark.parametrize(
    ("ratio", "named"), [(4e-6, True), (9e-5, True), (1.1e-4, False), (5e-4, False), (3e-3, False)]
)
def test_lr_too_low_is_named_exactly_below_the_quoted_threshold(ratio: float, named: bool) -> None:
    run = synth.mlp_run(synth._noisy(np.full(300, 2.3), 0.01, 5), lr=1e-3, update_ratio=ratio)
    names = [c.name for c in A.likely_causes(A.facts(run))]
    assert ("lr_too_low" in names) is named, names


def test_clip_threshold_is_the_90th_percentile_of_the_healthy_gradient_norm() -> None:
    n = 200
    healthy = np.linspace(0.1, 2.0, 100)  # p90 = 1.81
    grad = np.r_[healthy, np.full(n - 100, 1e5)]
    run = synthetic_run(np.full(n, 1.0), grad_norm={"rnn": grad}, module_types={"rnn": "RNN"})
    fix = A.clip_fix(A.facts(run), before=100)
    assert fix.kind.value == "gradient_clipping"
    assert "max_norm=2)" in fix.action and "`rnn` (RNN) is recurrent" in fix.action


@pytest.mark.parametrize(("healthy_steps", "proposed"), [(40, "max_norm=0.5)"), (1, "max_norm=1.0)")])
def test_clip_threshold_leaves_out_a_gradient_already_blowing_up_before_the_row(healthy_steps: int, proposed: str) -> None:
    """The row a rule calibrates before (the NaN, the loss's jump, the largest spike) can come
    steps after the gradient began to climb: those steps are not healthy."""
    n = 80
    climb = 0.5 * 20.0 ** np.arange(1, 18)  # ×20 per step, to 1e22
    grad = np.r_[np.linspace(0.4, 0.55, healthy_steps), climb, np.full(n - healthy_steps - climb.size, np.nan)]
    run = synthetic_run(np.full(n, 1.0), grad_norm={"fc": grad})
    fix = A.clip_fix(A.facts(run), before=healthy_steps + climb.size)
    assert proposed in fix.action, fix.action


def test_unnormalised_inputs_are_named_with_their_statistics() -> None:
    f = A.facts(synth.saturated_tanh())
    assert f.input_unnormalised
    fix = A.data_input_fix(f)
    assert fix.kind.value == "data" and "std 380" in fix.action
    assert not A.facts(synth.healthy_sgd()).input_unnormalised


def test_init_gain_separates_default_large_and_small_initialisation() -> None:
    default = A.facts(synth.mlp_run(np.full(50, 2.3), depth=4, init_gain=0.58)).init_gain
    large = A.facts(synth.mlp_run(np.full(50, 2.3), depth=4, init_gain=11.0)).init_gain
    small = A.facts(synth.mlp_run(np.full(50, 2.3), depth=4, init_gain=0.01)).init_gain
    assert default == pytest.approx(np.log10(0.58), abs=0.05)
    assert large > A.INIT_GAIN_DECADES > default > -A.INIT_GAIN_DECADES > small


def test_likely_causes_put_the_recurrent_clip_before_the_learning_rate() -> None:
    causes = A.likely_causes(A.facts(synth.exploding_rnn()), diverged=True)
    assert [c.name for c in causes][:2] == ["exploding_recurrence", "lr_too_high"]


def test_likely_causes_of_a_healthy_run_are_empty() -> None:
    assert A.likely_causes(A.facts(synth.healthy_sgd())) == []


def test_ranked_fixes_keep_one_fix_per_kind_except_learning_rate_and_code() -> None:
    a = Fix("activation", "x")
    b = Fix("activation", "y")
    lr1, lr2 = Fix("learning_rate", "p"), Fix("learning_rate", "q")
    assert A.ranked_fixes([a, lr1], [b, lr2, a]) == (a, lr1, lr2)


def _decaying_run(shrink: float, weight_decay: float, optimizer: str = "SGD") -> Run:
    """A stalled run whose weight norms end ``shrink``× below where they started."""
    n = 300
    weights = np.geomspace(5.0, 5.0 / shrink, n)
    return synthetic_run(
        synth._noisy(np.full(n, 2.3), 0.01, 50),
        grad_norm={"fc0": 0.1, "head": 0.1},
        weight_norm={"fc0": weights, "head": weights},
        update_norm={"fc0": 5e-3, "head": 5e-3},
        lr=0.01,
        optimizer={"class": optimizer, "param_groups": [{"lr": 0.01, "weight_decay": weight_decay, "n_params": 2}]},
    )


@pytest.mark.parametrize(
    ("shrink", "weight_decay", "optimizer", "named"),
    [(100.0, 0.5, "SGD", True), (4.0, 50.0, "AdamW", True), (1.5, 0.5, "SGD", False), (100.0, 0.0, "SGD", False)],
    ids=["sgd-collapse", "adamw-3x", "mild-shrink", "no-decay"],
)
def test_weights_shrunk_by_weight_decay_are_named(shrink: float, weight_decay: float, optimizer: str, named: bool) -> None:
    causes = [c.name for c in A.likely_causes(A.facts(_decaying_run(shrink, weight_decay, optimizer)))]
    assert ("weight_decay_too_high" in causes) is named, causes
    if named:
        fix = next(c.fix for c in A.likely_causes(A.facts(_decaying_run(shrink, weight_decay, optimizer))) if c.name == "weight_decay_too_high")
        assert fix.kind.value == "optimizer" and ("weight_decay=0.01" if optimizer == "AdamW" else "weight_decay=0.0005") in fix.action


@pytest.mark.parametrize(
    ("last", "named"),
    [("Softmax", "softmax_before_loss"), ("ReLU", "activation_on_logits"), ("LogSoftmax", None), ("Linear", None)],
)
def test_a_model_ending_in_a_softmax_or_relu_is_named_first(last: str, named: str | None) -> None:
    """nn.CrossEntropyLoss applies log-softmax itself, so a Softmax before it squashes the gradients;
    a ReLU on logits cuts every negative one to 0, where no gradient passes."""
    run = synthetic_run(
        synth._noisy(np.full(300, 1.46), 0.01, 51),
        grad_norm={"fc0": 0.1, "head": 0.1},
        module_types={"fc0": "Linear", "act0": "ReLU", "head": "Linear", "out": last},
    )
    causes = A.likely_causes(A.facts(run))
    assert (causes[0].name if causes else None) == named, [c.name for c in causes]
