"""The numbers a Monitor records equal a direct torch computation on tiny real models.

Gradients are compared at ``mon.step()`` time, ‖Δθ‖ against copies of the parameters taken just
before and just after ``optimizer.step()``, ``weight_norm`` against the parameters after the step,
and activation statistics against the module outputs captured by the test's own forward hook.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.collect import distributed, held, stats
from gradscope.collect import monitor as monitor_module

STEPS = 4


def _two_group_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    half = len(params) // 2
    return torch.optim.SGD(
        [{"params": params[:half], "lr": 0.05}, {"params": params[half:], "lr": 0.01}], lr=0.05, momentum=0.9
    )


def _train_and_record(case: Any, quiet: dict[str, Any], reference: Any) -> tuple[nn.Module, list[Any], gradscope.Run]:
    model = case.model()
    opt = _two_group_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # a new lr every step
    with gradscope.Monitor(model, opt, flush_every=3, activation_every=1, update_every=1, **quiet) as mon:
        trace = case.train(model, opt, mon, STEPS, capture=tuple(reference.watched(model)), between=lambda step: scheduler.step())
        run = mon.run
    return model, trace, run


def test_collected_numbers_match_torch(case: Any, quiet: dict[str, Any], reference: Any, close: Any) -> None:
    """Loss, global/per-layer/per-parameter gradient norms, weight norms, ‖Δθ‖ and every activation
    statistic of every watched module, on each step."""
    model, trace, run = _train_and_record(case, quiet, reference)
    reference.check_run(run, model, trace)

    ratio = run.metric("update_ratio")
    close(ratio.to_numpy(), (run.metric("update_norm") / run.metric("weight_norm")).to_numpy())
    assert (run.metric("update_norm").to_numpy() > 0).all()
    assert (run.metric("grad_nonfinite").to_numpy() == 0).all()
    assert (run.metric("output_nonfinite").to_numpy() == 0).all()
    # at least a few modules really were measured (not everything NaN)
    assert run.metric("act_std").notna().all().sum() >= 3


def test_learning_rate_of_every_param_group_per_step(cases: Any, quiet: dict[str, Any], reference: Any, close: Any) -> None:
    _, trace, run = _train_and_record(cases["mlp"], quiet, reference)
    for group in range(2):
        close(run.scalar(f"lr.{group}"), [t.lrs[group] for t in trace], rtol=1e-6, what=f"lr of group {group}")
    # the scheduler halves both every step: the series must show it, not the initial value repeated
    close(run.scalar("lr.0"), [0.05 * 0.5**k for k in range(STEPS)], rtol=1e-6)
    close(run.lr, run.scalar("lr.0"), rtol=0)


def test_input_batch_statistics(quiet: dict[str, Any], cases: Any, reference: Any, close: Any) -> None:
    case = cases["mlp"]
    model = case.model()
    with gradscope.Monitor(model, activation_every=1, update_every=1, **quiet) as mon:
        case.train(model, None, mon, 2)
        run = mon.run
    for step in range(2):
        x, _ = case.batch(step)
        expected = reference.activation([x])
        for metric in ("act_mean", "act_std", "act_max_abs"):
            close(run.metric(metric)[run.input_layer].iloc[step], expected[metric], what=metric)
    # the share of zeros and of dead units is a property of the data: not measured for the input
    assert run.metric("act_zero_frac")[run.input_layer].isna().all()
    assert run.metric("act_dead_frac")[run.input_layer].isna().all()
    assert run.metric("act_zero_frac").drop(columns=run.input_layer).notna().all().all()


def test_saturation_of_sigmoid_tanh_and_softmax(cases: Any, quiet: dict[str, Any], reference: Any, close: Any) -> None:
    case = cases["saturating_mlp"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=1, update_every=1, **quiet) as mon:
        trace = case.train(model, opt, mon, 2, capture=("1", "3", "5"))
        run = mon.run
    saturated = run.metric("act_saturated_frac")
    for name, kind in [("1", "sigmoid"), ("3", "tanh"), ("5", "softmax")]:
        for step, t in enumerate(trace):
            expected = reference.activation(t.outputs[name], kind)["act_saturated_frac"]
            close(saturated[name].iloc[step], expected, what=f"{kind} saturation")
        assert saturated[name].iloc[0] > 0.05, f"the model is built to saturate its {kind}"
    # unbounded modules have no saturation: NaN ("not applicable"), not 0
    assert saturated["0"].isna().all()


def test_dead_units_count_units_zero_over_the_whole_batch(quiet: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # half the units can never fire
        model[0].bias[4:] = 100.0  # the other half always fire
    with gradscope.Monitor(model, activation_every=1, update_every=1, **quiet) as mon:
        model(torch.randn(16, 4)).sum().backward()
        mon.step(0.0)
        run = mon.run
    assert run.metric("act_dead_frac")["1"].iloc[0] == pytest.approx(0.5)
    assert run.metric("act_zero_frac")["1"].iloc[0] == pytest.approx(0.5)
    assert run.metric("act_dead_frac")["0"].iloc[0] == 0.0


class _InjectNonFinite(nn.Module):
    """Puts an Inf and a NaN into its output: a stand-in for an overflowing layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = torch.zeros_like(x)
        bad[0, 0] = math.inf
        bad[1, 1] = math.nan
        return x + bad


def test_nonfinite_outputs_are_flagged_and_traced_to_the_module(quiet: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), _InjectNonFinite(), nn.Linear(4, 2))
    with gradscope.Monitor(model, activation_every=2, update_every=1, check_outputs=True, **quiet) as mon:
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            mon.step(1.0)
        run = mon.run
    # check_outputs=True: every step a 0/1 flag per module, also on steps without activation sampling
    flags = run.metric("output_nonfinite")
    assert (flags["0"] == 0).all()
    assert (flags["1"] == 1).all()
    assert (flags["2"] == 1).all()  # the non-finite values flow on
    assert (flags[run.input_layer] == 0).all()
    assert (flags["(output)"] == 1).all()
    # sampled steps (0 and 2): the activation statistics flag it too
    counts = run.metric("act_nonfinite")
    np.testing.assert_array_equal(counts.index, [0, 2])
    assert (counts["1"] == 1).all()
    assert (counts["0"] == 0).all()
    # a NaN anywhere makes mean, std and max |x| NaN too
    assert run.metric("act_max_abs")["1"].isna().all()
    assert np.isfinite(run.metric("act_max_abs")["0"]).all()
    # the layer reading the bad values gets a non-finite weight gradient (its bias gradient stays
    # finite); the upstream layer's gradient passes through an addition and stays finite
    assert (run.metric("grad_nonfinite")["2"] == 1).all()
    assert (run.metric("grad_nonfinite")["0"] == 0).all()
    assert (run.metric("param_grad_norm")["2.weight"].isna() | np.isinf(run.metric("param_grad_norm")["2.weight"])).all()
    assert not np.isfinite(run.grad_norm).any()


def test_by_default_modules_are_checked_on_sampled_steps_and_the_model_output_on_every_step(quiet: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), _InjectNonFinite(), nn.Linear(4, 2))
    hooks_on_next_step = []
    with gradscope.Monitor(model, activation_every=2, **quiet) as mon:
        for _ in range(4):
            model.zero_grad()
            loss = model(torch.randn(8, 4)).sum()  # the NaN output makes the loss NaN
            loss.backward()
            mon.step(loss)
            hooks_on_next_step.append(len(model[1]._forward_hooks))
        run = mon.run
    flags = run.metric("output_nonfinite")
    assert flags["(output)"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert flags["(input)"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert flags["1"].iloc[[0, 2]].tolist() == [1.0, 1.0]
    assert flags["1"].iloc[[1, 3]].isna().all()  # not checked on the steps between samples
    # module hooks are attached only for sampled steps: the others take PyTorch's fast call path
    assert hooks_on_next_step == [0, 1, 0, 1]


def _nan_batch_every_step(monitor_args: dict[str, Any], losses: list[Any]) -> Any:
    """Train a small model on batches whose first row is NaN, passing ``losses[i]`` to step()."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradscope.Monitor(model, **monitor_args) as mon:
        for given in losses:
            model.zero_grad()
            x = torch.randn(8, 4)
            x[0] = math.nan
            model(x).sum().backward()
            mon.step(given)
        return mon.run.metric("output_nonfinite")


def test_on_cpu_input_and_output_are_checked_on_the_steps_whose_loss_is_not_finite(quiet: dict[str, Any]) -> None:
    # steps 0 and 2 are sampled (activation statistics check everything); 1, 3 and 5 pass a finite
    # loss, so their input and output are stored as not checked; 4 passes a NaN loss, 6 none at all
    flags = _nan_batch_every_step(
        dict(activation_every=2, **quiet),
        [1.0, 1.0, 1.0, torch.tensor(2.0), torch.tensor(math.nan), 3.0, None],
    )
    for column in ("(input)", "(output)"):
        assert flags[column].iloc[[0, 2, 4, 6]].tolist() == [1.0, 1.0, 1.0, 1.0], column
        assert flags[column].iloc[[1, 3, 5]].isna().all(), column


def test_check_outputs_checks_input_and_output_on_every_step_whatever_the_loss(quiet: dict[str, Any]) -> None:
    flags = _nan_batch_every_step(dict(activation_every=0, check_outputs=True, **quiet), [1.0, 1.0, torch.tensor(2.0)])
    assert flags["(input)"].tolist() == [1.0, 1.0, 1.0]
    assert flags["(output)"].tolist() == [1.0, 1.0, 1.0]


def test_gradient_accumulation_checks_every_micro_batch_of_a_step_with_a_nan_loss(quiet: dict[str, Any]) -> None:
    """The first of two micro-batches carries the NaN: the kept input of the last forward alone
    would miss it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradscope.Monitor(model, activation_every=0, **quiet) as mon:
        model.zero_grad()
        bad = torch.randn(8, 4)
        bad[0] = math.nan
        total = model(bad).sum() + model(torch.randn(8, 4)).sum()
        total.backward()
        mon.step(total)
        flags = mon.run.metric("output_nonfinite")
    assert flags["(input)"].tolist() == [1.0]
    assert flags["(output)"].tolist() == [1.0]


def test_the_kept_input_and_output_are_let_go_at_the_next_forward_and_at_step(quiet: dict[str, Any]) -> None:
    """The forward keeps the output as it is, with its autograd graph (a detach would cost more
    than the check it serves), so it must not keep it longer than the loop itself would: the next
    training forward and step() let it go."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradscope.Monitor(model, activation_every=0, **quiet) as mon:
        first = weakref.ref(model(torch.randn(8, 4, requires_grad=True)))  # a forward never backpropagated
        assert first() is not None and mon._held_forward is not None and mon._held_forward[1] is first()
        second = weakref.ref(model(torch.randn(8, 4)))
        assert first() is None, "a second forward before step() still holds the first one's output and graph"
        mon.step(1.0)
        assert second() is None, "step() still holds the last forward's output"


def test_a_forward_in_eval_mode_with_grad_on_is_not_kept_past_the_loop(quiet: dict[str, Any]) -> None:
    """A validation pass that leaves grad on builds graphs nothing backpropagates: the hook sums
    such a forward at once instead of keeping its output, so its graph goes when the loop lets go."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradscope.Monitor(model, activation_every=0, **quiet) as mon:
        model.eval()
        out = weakref.ref(model(torch.randn(8, 4)))
        assert out() is None and mon._held_forward is None
        model.train()
        mon.step(1.0)


def test_the_output_checked_is_the_one_the_forward_returned(quiet: dict[str, Any]) -> None:
    """A loop may change the dict its model returned before step(): the NaN check reads what the
    forward wrote, not what the dict holds by then."""

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.linear(x)}

    model = DictOut()
    with gradscope.Monitor(model, activation_every=0, **quiet) as mon:
        out = model(torch.randn(8, 4))
        out["logits"] = torch.full((8, 2), math.nan)  # the loop's own change, after the forward
        mon.step(math.nan)
        flags = mon.run.metric("output_nonfinite")
    assert flags["(output)"].tolist() == [0.0] and flags["(input)"].tolist() == [0.0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 3, 5, 5).relu(),
        lambda: torch.randn(7, 4).t(),  # not contiguous
        lambda: torch.randn(9),
        lambda: torch.tensor(2.5),
        lambda: torch.where(torch.rand(5, 8) < 0.2, math.nan, torch.randn(5, 8)),
        lambda: torch.randn(4, 6, dtype=torch.float64),
    ],
    ids=["conv-relu", "transposed", "1d", "0d", "with-nan", "float64"],
)
def test_the_cpu_work_buffer_changes_no_statistic(make: Any) -> None:
    """Activation statistics computed in the reused CPU work buffer equal freshly allocated ones,
    also when a larger tensor used the buffer first."""
    torch.manual_seed(0)
    x = make()
    scratch = stats.Scratch()
    stats.observe(torch.randn(50, 50), stats.Bounded.NONE, scratch=scratch)  # leaves other values behind
    for kind in (stats.Bounded.NONE, stats.Bounded.SYMMETRIC):
        fresh = stats.observe(x, kind)
        reused = stats.observe(x, kind, scratch=scratch)
        stats.finish_units([fresh, reused])
        torch.testing.assert_close(torch.stack(reused.finished()), torch.stack(fresh.finished()), equal_nan=True)
        torch.testing.assert_close(reused.unit_sumsq, fresh.unit_sumsq, equal_nan=True)


def _as_two_ranks_seeing_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a Monitor believe it is rank 0 of 2 whose peer recorded exactly what it did: ranks
    combine their statistics in-process, through a stand-in for all_gather."""

    def all_gather(outputs: list[torch.Tensor], flat: torch.Tensor, async_op: bool = False) -> Any:
        for out in outputs:
            out.copy_(flat)
        finished: torch.futures.Future[None] = torch.futures.Future()
        finished.set_result(None)
        return finished  # stands in for the finished collective: only its wait() is called

    monkeypatch.setattr(distributed.DistributedContext, "detect", classmethod(lambda cls: cls(rank=0, world_size=2)))
    monkeypatch.setattr(distributed.DistributedContext, "connected", property(lambda self: True))
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)


def test_under_torch_distributed_only_the_step_count_decides_when_to_write(
    quiet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks exchange their statistics at each write. Had each rank's clock decided when, a rank a
    little behind would write a step later, and its collective would meet the other ranks' DDP
    all-reduce: the job hangs. So under torch.distributed ``flush_seconds`` is ignored."""
    _as_two_ranks_seeing_the_same(monkeypatch)
    exchanges: list[int] = []
    gather = distributed.DistributedContext.gather

    def counted(context: distributed.DistributedContext, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        exchanges.append(tensors[0].shape[0])  # the rows of the step buffer it carries
        return gather(context, tensors)

    monkeypatch.setattr(distributed.DistributedContext, "gather", counted)
    model, opt, x, y = _mlp_and_data()
    with gradscope.Monitor(model, opt, flush_every=5, flush_seconds=0.001, **quiet) as mon:
        assert mon.flush_seconds is None
        for _ in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            time.sleep(0.003)  # longer than flush_seconds: alone, a write after every step
            mon.step(None)
            opt.step()
    assert exchanges == [5, 5, 2]
    assert mon.run.n_steps == 12 and mon.run.meta["config"]["flush_seconds"] is None


@pytest.mark.parametrize("ranks", [1, 2])
def test_steps_given_no_loss_are_marked_and_read_as_no_nan_loss(
    ranks: int, quiet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop that passes its loss only on some steps (say, when it logs): the others store a NaN
    placeholder marked in ``loss_missing``, which diagnose does not read as a NaN loss, nor, across
    ranks, as a rank that went non-finite."""
    if ranks == 2:
        _as_two_ranks_seeing_the_same(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    given = [step % 10 == 0 for step in range(120)]
    with gradscope.Monitor(model, opt, **quiet) as mon:
        for give in given:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss if give else None)
            opt.step()
        run = mon.run
    np.testing.assert_array_equal(run.scalar("loss_missing"), [0.0 if g else 1.0 for g in given])
    assert np.isfinite(run.loss[given]).all() and np.isnan(run.loss[~np.asarray(given)]).all()
    assert "nonfinite" not in {f.code for f in gradscope.diagnose(run)}
    if ranks == 2:
        assert np.isnan(run.scalar("nonfinite_rank")).all()


@pytest.mark.parametrize(
    "batch_of",
    [lambda per_step: 2 * per_step + 1, lambda per_step: 5 * per_step, lambda per_step: 1],
    ids=["two-steps-and-a-value", "five-steps", "less-than-a-step"],
)
def test_step_values_stacked_in_batches_match_torch(
    batch_of: Any, case: Any, quiet: dict[str, Any], reference: Any, device_gradients: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step's gradient norms wait, unstacked, to be stacked with later steps' values: any batch
    size, with flushes falling inside a batch, gives the same numbers."""
    model = case.model()
    per_step = len([p for p in model.parameters() if p.requires_grad])  # one gradient norm each
    monkeypatch.setattr(held, "STACK_BATCH", batch_of(per_step))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"flush_every": 7, "activation_every": 0, "update_every": 1, "check_outputs": True}
    with device_gradients(gradscope.Monitor(model, opt, **options, **quiet)) as mon:
        trace = case.train(model, opt, mon, 17)
        run = mon.run
    reference.check_run(run, model, trace, activations=False)


def test_a_held_loss_holds_no_autograd_graph(device_loss: Any, quiet: dict[str, Any]) -> None:
    """A loss on a device waits for the flush detached: holding it must not keep the step's graph
    (a loop that calls step() without backward() would otherwise keep every step's activations)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradscope.Monitor(model, activation_every=0, flush_seconds=None, **quiet) as mon:
        losses = [model(torch.randn(8, 4)).sum() for _ in range(3)]
        with pytest.warns(RuntimeWarning, match="no training forward reached the model's hook at steps 1 and 2"):
            for loss in losses:  # steps 1 and 2 have no forward of their own: nothing checked their input
                mon.step(device_loss(loss))
        held_losses = mon._held_losses._values
        assert len(held_losses) == 3
        # neither the tensor nor what it is a view of keeps a graph
        for t in held_losses:
            assert t.grad_fn is None and not t.requires_grad and (t._base is None or t._base.grad_fn is None)
        run = mon.run
    np.testing.assert_allclose(run.loss, [loss.item() for loss in losses], rtol=1e-6)


def _failing_on_call(n: int, real: Callable[..., Any], *, after: bool = False) -> Callable[..., Any]:
    """``real``, except that its ``n``-th call raises an injected internal failure (``after``: once
    ``real`` has run)."""
    calls = 0

    def wrapper(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n and not after:
            raise RuntimeError("injected")
        result = real(*args)
        if calls == n:
            raise RuntimeError("injected")
        return result

    return wrapper


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("lost", ["gradients", "input and output", "loss"])
def test_a_failed_stack_loses_its_steps_as_missing_values_and_recording_goes_on(
    lost: str, ranks: int, device_loss: Any, device_gradients: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An internal failure while stacking held values warns once, keeps training and recording, and
    stores the steps it held as missing (no gradients, outputs not checked, no loss), never as NaN
    values a detector would report. The step being recorded and the other values are kept. Across
    ranks, a lost step is not taken for a rank that went non-finite either."""
    if ranks == 2:
        _as_two_ranks_seeing_the_same(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    monkeypatch.setattr(held, "STACK_BATCH", 12)
    width = {"gradients": 4, "input and output": 2, "loss": 1}[lost]  # values per step
    per_batch = 12 // width
    steps = 3 * per_batch + 1
    with pytest.warns(RuntimeWarning, match="internal error") as caught:
        checks = lost == "input and output"
        options = {"flush_seconds": None, "activation_every": 0, "update_every": 0, "check_outputs": checks}
        live: list[Any] = []
        with device_gradients(gradscope.Monitor(model, opt, on_finding=live.append, **options)) as mon:
            values = {"gradients": mon._held_grads, "input and output": mon._held_io, "loss": mon._held_losses}[lost]
            values._stack = _failing_on_call(2, values._stack)  # the second batch
            for _ in range(steps):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(device_loss(loss) if lost == "loss" else loss)
                opt.step()
            run = mon.run
            assert not mon._nonfinite_flushed  # a lost row was not taken for the run's first NaN
    assert sum("internal error" in str(w.message) for w in caught) == 1
    assert "nonfinite" not in {f.code for f in live}
    assert run.n_steps == steps
    missing = np.zeros(steps, dtype=bool)
    missing[per_batch : 2 * per_batch] = True
    np.testing.assert_array_equal(run.scalar("loss_missing"), missing if lost == "loss" else False)
    assert np.isfinite(run.loss[~missing]).all() and (lost == "loss" or np.isfinite(run.loss).all())
    any_missing = run.metric("grad_missing").to_numpy().sum(axis=1) > 0
    np.testing.assert_array_equal(any_missing, missing if lost == "gradients" else False)
    assert np.isfinite(run.metric("grad_norm").to_numpy()).all()
    flags = run.metric("output_nonfinite")[["(input)", "(output)"]].to_numpy()
    if lost == "input and output":
        assert np.isnan(flags[missing]).all() and (flags[~missing] == 0).all()
    elif lost == "gradients" and ranks == 1:
        assert np.isnan(flags).all()  # not checked: the (CPU) loss was read, and finite
    else:
        assert (flags == 0).all()  # checked: a loss on a device is not read to decide, nor across ranks
    assert "nonfinite" not in {f.code for f in gradscope.diagnose(run)}
    if ranks == 2:
        assert run.meta["world_size"] == 2 and np.isnan(run.scalar("nonfinite_rank")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_losses_held_on_a_device_land_in_their_rows_with_gaps_and_a_retried_step(
    dtype: torch.dtype, device_loss: Any, quiet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Losses on a device (of any dtype) mixed with numbers and steps given none leave gaps in the
    held rows. A step() that fails after holding its values is not recorded: the next step takes
    its row, and only that step's loss and gradient norms are stored there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    monkeypatch.setattr(held, "STACK_BATCH", 3)  # batches close inside a flush, and at its end
    expected_losses: list[float] = []
    expected_norms: list[list[float]] = []
    options = {"flush_every": 7, "flush_seconds": None, "activation_every": 0, "update_every": 0}
    with (
        pytest.warns(RuntimeWarning, match="internal error") as caught,
        gradscope.Monitor(model, opt, **options, **quiet) as mon,
    ):
        # the fourth step is given a device loss: it fails after holding everything
        record = mon._record_loss_gradients_and_outputs
        failed = False

        def fourth_step_fails(*args: Any) -> None:
            nonlocal failed
            record(*args)
            if mon._step == 3 and not failed:
                failed = True
                raise RuntimeError("injected")

        mon._record_loss_gradients_and_outputs = fourth_step_fails  # type: ignore[method-assign]
        for i in range(20):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x) * (1 + i), y)  # a new value every step
            loss.backward()
            given: Any = [device_loss(loss.detach().to(dtype)), loss.item(), None][i % 3]
            mon.step(given)
            if i != 3:
                expected_losses.append(math.nan if given is None else float(given))
                expected_norms.append([p.grad.norm().item() for p in model.parameters()])  # type: ignore[union-attr]
            opt.step()
        run = mon.run
    assert sum("internal error" in str(w.message) for w in caught) == 1
    np.testing.assert_allclose(run.loss, expected_losses, rtol=1e-6)  # NaN where none was given
    np.testing.assert_array_equal(run.scalar("loss_missing"), np.isnan(expected_losses))
    np.testing.assert_allclose(run.metric("param_grad_norm").to_numpy(), expected_norms, rtol=1e-5)


def test_a_loss_tensor_the_loop_reuses_in_place_is_recorded_step_by_step(
    device_loss: Any, quiet: dict[str, Any]
) -> None:
    """A loss on a device is held until the write: a loop that writes each step's loss into the
    same tensor (an accumulator, a CUDA graph's static output) still gets each step's value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    total = device_loss(torch.zeros(()))
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        for i in range(5):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            total.fill_(float(i))  # the loop's running value, written in place
            mon.step(total)
            opt.step()
        run = mon.run
    np.testing.assert_array_equal(run.loss, [0.0, 1.0, 2.0, 3.0, 4.0])


def _mlp_and_data() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.05), torch.randn(64, 8), torch.randint(0, 2, (64,))


def test_a_flush_that_fails_midway_and_runs_again_keeps_the_losses_held_on_a_device(
    device_loss: Any, quiet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try of a flush writes the held losses into the buffer and lets them go; the flush
    that runs again must not write over them (with the NaN of their empty host slots)."""
    model, opt, x, y = _mlp_and_data()
    failing = _failing_on_call(1, monitor_module.Monitor._derive_step_columns)
    monkeypatch.setattr(monitor_module.Monitor, "_derive_step_columns", failing)
    losses = []
    with (
        pytest.warns(RuntimeWarning, match="internal error") as caught,
        gradscope.Monitor(model, opt, flush_every=5, flush_seconds=None, **quiet) as mon,
    ):
        for _ in range(12):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(device_loss(loss))
            losses.append(loss.item())
            opt.step()
        run = mon.run
    assert sum("internal error" in str(w.message) for w in caught) == 1
    del losses[5]  # the step whose flush failed is not recorded: the next one takes its number
    np.testing.assert_allclose(run.loss, losses, rtol=1e-6)
    assert not run.scalar("loss_missing").any()
    assert "nonfinite" not in {f.code for f in gradscope.diagnose(run)}


def test_a_step_that_fails_after_its_bookkeeping_leaves_nothing_behind(
    quiet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """step() fails late on a sampled step: its learning rates, activation row and module marks are
    undone, so the next step, recorded on its row, stores its own values and nothing twice."""
    model, opt, x, y = _mlp_and_data()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # a new lr every step
    failing = _failing_on_call(1, monitor_module.Monitor._record_forward_order)
    monkeypatch.setattr(monitor_module.Monitor, "_record_forward_order", failing)  # runs at step 0
    lrs = []
    with (
        pytest.warns(RuntimeWarning, match="internal error") as caught,
        gradscope.Monitor(model, opt, activation_every=1, flush_seconds=None, **quiet) as mon,
    ):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            lrs.append(opt.param_groups[0]["lr"])
            mon.step(None)
            opt.step()
            scheduler.step()
        run = mon.run
    assert sum("internal error" in str(w.message) for w in caught) == 1
    assert run.n_steps == 4
    np.testing.assert_allclose(run.scalar("lr.0"), lrs[1:])
    np.testing.assert_array_equal(run.activation_steps, np.arange(4))
    assert run.meta["forward_order"]


def test_a_step_that_fails_while_holding_its_gradients_leaves_no_marks_on_its_row(
    device_gradients: Any, quiet: dict[str, Any]
) -> None:
    """The failed attempt had a parameter with no gradient and a finite loss (outputs "not
    checked"); the next step, recorded on its row, has every gradient and a NaN loss, so its input
    and output are checked: neither mark of the failed attempt may stay."""
    model, opt, x, y = _mlp_and_data()
    with (
        pytest.warns(RuntimeWarning, match="internal error") as caught,
        device_gradients(gradscope.Monitor(model, opt, activation_every=0, update_every=0, flush_seconds=None, **quiet)) as mon,
    ):
        mon._held_grads.hold = _failing_on_call(3, mon._held_grads.hold)  # type: ignore[method-assign]
        for i in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if i == 2:
                model[2].bias.grad = None  # the failed attempt: one gradient missing
            mon.step(loss * math.nan if i == 3 else loss)  # the retry on row 2: a NaN loss
            opt.step()
        run = mon.run
    assert sum("internal error" in str(w.message) for w in caught) == 1
    assert run.n_steps == 4
    assert run.metric("grad_missing").to_numpy()[2].sum() == 0
    flags = run.metric("output_nonfinite")[["(input)", "(output)"]].to_numpy()
    np.testing.assert_array_equal(flags[2], [0.0, 0.0])  # checked, and finite
    assert np.isnan(flags[[0, 1, 3]]).all()  # finite losses: not checked


def test_a_bfloat16_default_dtype_still_records_in_float32(quiet: dict[str, Any]) -> None:
    """With torch's default dtype set to bfloat16 the model is built in bf16; the Monitor's own
    buffers stay float32, so nothing it stores is rounded to bf16 (and it attaches at all)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model, opt, x, y = _mlp_and_data()
        assert next(model.parameters()).dtype == torch.bfloat16
        expected = []
        with gradscope.Monitor(model, opt, **quiet) as mon:
            for _ in range(6):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                expected.append([p.grad.float().norm().item() for p in model.parameters()])  # type: ignore[union-attr]
                mon.step(loss)
                opt.step()
            run = mon.run
    finally:
        torch.set_default_dtype(previous)
    np.testing.assert_allclose(run.metric("param_grad_norm").to_numpy(), expected, rtol=1e-6)


class _KeywordModel(nn.Module):
    """A model called with keyword arguments only (as the Hugging Face Trainer calls its models),
    returning an object that is not a tensor, tuple, list, dict or dataclass."""

    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, features: torch.Tensor) -> _KeywordModel.Output:
        return _KeywordModel.Output(self.linear(features))


@pytest.mark.parametrize("options", [dict(activation_every=0), dict(activation_every=1), dict(check_outputs=True)])
def test_an_input_or_output_gradscope_cannot_see_is_stored_as_not_checked(options: dict[str, Any], quiet: dict[str, Any]) -> None:
    """The model hook reads positional inputs and tensor-like outputs only: on a step whose input and
    output are checked, one it could not see reads as not checked (NaN), never as checked and finite."""
    model = _KeywordModel()
    with gradscope.Monitor(model, **options, **quiet) as mon:
        for loss_factor in (1.0, math.nan):
            model.zero_grad()
            out = model(features=torch.randn(8, 4))
            loss = out.logits.sum() * loss_factor
            loss.backward()
            mon.step(loss)
        flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]].to_numpy()
    assert np.isnan(flags).all()
