"""Models that trip naive hooks: in-place ops, odd outputs, sharing, freezing, buffers, recurrent and
attention layers, containers, unused branches. Each trains with a Monitor, no gradscope warning may
appear (the autouse fixture turns them into errors), and the recorded numbers equal torch's."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradscope


def _record(case: Any, reference: Any, quiet: dict[str, Any], steps: int = 3) -> tuple[nn.Module, list[Any], gradscope.Run]:
    model = case.model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    with gradscope.Monitor(model, opt, activation_every=1, flush_every=2, update_every=1, **quiet) as mon:
        trace = case.train(model, opt, mon, steps, capture=tuple(reference.watched(model)))
    return model, trace, mon.run


def _vectors(dim: int = 4, classes: int = 2) -> Any:
    def make(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)

    return make


# --------------------------------------------------------------------------- in-place ReLU


def test_inplace_relu_measures_the_layer_output_before_the_relu_overwrites_it(
    make_case: Any, reference: Any, quiet: dict[str, Any], close: Any
) -> None:
    case = make_case("inplace", lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)), _vectors())
    model, trace, run = _record(case, reference, quiet)
    reference.check_run(run, model, trace)
    # the Linear's own output had negative values and no zeros; the ReLU's output many zeros
    assert (run.metric("act_zero_frac")["0"] == 0).all()
    assert (run.metric("act_zero_frac")["1"] > 0.2).all()


# --------------------------------------------------------------------------- tuples, dicts, None


class _Pair(nn.Module):
    """Owns a parameter and returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x @ self.weight
        return y, torch.relu(y)


class _ToDict(nn.Module):
    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"main": pair[0] * 2, "aux": pair[1]}


class _Logger(nn.Module):
    """A side-effect module returning None."""

    def forward(self, x: torch.Tensor) -> None:
        return None


class _Counts(nn.Module):
    """Returns only an integer tensor: nothing to measure."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).sum(dim=-1)


class _OddOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _Pair()
        self.to_dict = _ToDict()
        self.log = _Logger()
        self.counts = _Counts()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.to_dict(self.pair(x))
        self.log(d["main"])
        self.counts(d["aux"])
        return self.head(d["main"] + d["aux"])


def test_modules_returning_tuples_dicts_none_and_integers(make_case: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(make_case("odd", _OddOutputs, _vectors()), reference, quiet)
    reference.check_run(run, model, trace)  # pair: its first tensor; to_dict: its first value
    assert run.metric("act_mean")[["log", "counts"]].isna().all().all()
    assert run.metric("act_mean")[["pair", "to_dict", "head"]].notna().all().all()
    assert set(run.layers) == {"pair", "head"}


# --------------------------------------------------------------------------- sharing and tying


class _SharedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.twice = nn.ModuleList([self.block, self.block])  # the same module registered again
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.twice:
            x = torch.tanh(block(x))
        return self.head(x)


def test_a_module_called_twice_aggregates_both_calls(make_case: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(make_case("shared", _SharedBlock, _vectors()), reference, quiet)
    assert all(len(t.outputs["block"]) == 2 for t in trace)
    reference.check_run(run, model, trace)  # statistics over both calls, gradient accumulated over both uses
    assert run.layers.count("block") == 1 and "twice.0" not in run.layers
    assert run.params == ["block.weight", "block.bias", "head.weight", "head.bias"]


class _TiedLM(nn.Module):
    """Input embedding and output projection share one weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.decoder = nn.Linear(4, 10)
        self.decoder.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(idx))


def _tokens(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)


def test_tied_parameters_are_tracked_once_with_their_full_gradient(
    make_case: Any, reference: Any, quiet: dict[str, Any], close: Any
) -> None:
    model, trace, run = _record(make_case("tied", _TiedLM, _tokens), reference, quiet)
    reference.check_run(run, model, trace)
    assert run.params == ["embed.weight", "decoder.bias"]
    assert run.layers == ["embed", "decoder"]
    # tracked once, under the first module owning it; its gradient (checked above) sums both uses
    assert run.meta["param_numels"] == [40, 10]
    assert run.modules["decoder"].n_params == 50  # the decoder still reports the weight it uses
    assert run.metric("act_mean")[run.input_layer].isna().all()  # integer token ids are not measured


# --------------------------------------------------------------------------- frozen parameters


def _partly_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def test_frozen_parameters_are_never_tracked_and_are_listed(make_case: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(make_case("frozen", _partly_frozen, _vectors()), reference, quiet)
    reference.check_run(run, model, trace)
    assert run.meta["frozen_params"] == ["0.weight", "0.bias", "2.bias"]
    assert run.params == ["2.weight", "4.weight", "4.bias"]
    assert run.layers == ["2", "4"]
    assert (run.metric("grad_missing").to_numpy() == 0).all()  # frozen is not "missing"
    assert run.modules["0"].n_trainable == 0 and run.modules["0"].n_params == 40
    assert run.metric("act_mean")["0"].notna().all()  # a frozen layer's output is still watched


def test_a_model_with_nothing_to_train_is_refused() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(gradscope.InvalidInputError, match=r"expected a model with trainable parameters but Linear has none"):
        gradscope.Monitor(model)


# --------------------------------------------------------------------------- buffers, RNNs, attention, containers


def test_batchnorm_buffers_are_not_parameters(cases: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(cases["cnn"], reference, quiet)
    reference.check_run(run, model, trace)
    assert not [p for p in run.params if "running" in p or "num_batches" in p]
    assert [p for p in run.params if p.startswith("1.")] == ["1.weight", "1.bias"]


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = kind(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # out: (B, T, 6); the hidden state is a tensor (RNN, GRU) or a tuple (LSTM)
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM], ids=lambda k: k.__name__)
def test_recurrent_layers(kind: type[nn.Module], make_case: Any, reference: Any, quiet: dict[str, Any]) -> None:
    def sequences(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 5, 4, generator=g), torch.randint(0, 2, (n,), generator=g)

    model, trace, run = _record(make_case(kind.__name__, lambda: _Recurrent(kind), sequences), reference, quiet)
    reference.check_run(run, model, trace)
    assert len([p for p in run.params if p.startswith("rnn.")]) == 8  # weight_ih/hh, bias_ih/hh × 2 layers


def test_transformer_encoder_layers_and_attention(cases: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(cases["transformer"], reference, quiet)
    reference.check_run(run, model, trace)
    for i in range(2):
        attn = f"encoder.layers.{i}.self_attn"
        assert {attn, f"{attn}.out_proj", f"encoder.layers.{i}.linear1", f"encoder.layers.{i}.norm2"} <= set(run.layers)
        assert (run.metric("grad_norm")[[attn, f"{attn}.out_proj"]].to_numpy() > 0).all()
    # forward order follows the calls: embedding first, head last; out_proj is never called as a
    # module (attention uses its weight directly), so it is placed right after its attention block
    assert run.forward_order[0] == "embed" and run.forward_order[-1] == "head"
    assert "encoder.layers.0.self_attn.out_proj" not in run.forward_order
    assert run.layers[0] == "embed" and run.layers[-1] == "head"
    for i in range(2):
        attn = run.layers.index(f"encoder.layers.{i}.self_attn")
        assert run.layers[attn + 1] == f"encoder.layers.{i}.self_attn.out_proj"


class _Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.act(block(x))
        return self.heads["a"](x) + 0.5 * self.heads["b"](x)


def test_models_built_in_module_list_and_dict(make_case: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(make_case("towers", _Towers, _vectors()), reference, quiet)
    reference.check_run(run, model, trace)
    assert run.layers == ["blocks.0", "blocks.1", "heads.a", "heads.b"]
    assert run.forward_order == ["blocks.0", "act", "blocks.1", "heads.a", "heads.b"]


# --------------------------------------------------------------------------- no gradient


class _UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)  # registered, never called: its parameters get no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_parameter_without_gradient_is_grad_missing(make_case: Any, reference: Any, quiet: dict[str, Any]) -> None:
    model, trace, run = _record(make_case("unused", _UnusedBranch, _vectors()), reference, quiet)
    reference.check_run(run, model, trace)
    missing = run.metric("grad_missing")
    np.testing.assert_array_equal(missing["unused"], [2, 2, 2])
    np.testing.assert_array_equal(missing["used"], [0, 0, 0])
    np.testing.assert_array_equal(run.metric("param_grad_missing")["unused.weight"], [1, 1, 1])
    np.testing.assert_array_equal(run.metric("grad_norm")["unused"], [0, 0, 0])
    np.testing.assert_array_equal(run.metric("update_norm")["unused"], [0, 0, 0])
    assert run.metric("act_mean")["unused"].isna().all()


def test_a_branch_used_on_some_steps_is_missing_exactly_on_the_others(quiet: dict[str, Any]) -> None:
    """Gradients that come and go (a branch taken on some steps): each step records its own."""
    torch.manual_seed(0)
    model = _UnusedBranch()
    used_branch = [True, False, False, True, True, False]
    with gradscope.Monitor(model, **quiet) as mon:
        for use in used_branch:
            model.zero_grad()  # set_to_none: an unused branch has no gradient at all
            x = torch.randn(8, 4)
            out = model.used(x) + (model.unused(x) if use else 0)
            out.sum().backward()
            mon.step(out.sum())
        run = mon.run
    expected_missing = [0 if use else 1 for use in used_branch]
    np.testing.assert_array_equal(run.metric("param_grad_missing")["unused.weight"], expected_missing)
    norms = run.metric("param_grad_norm")["unused.weight"].to_numpy()
    assert (norms[np.asarray(used_branch)] > 0).all() and (norms[~np.asarray(used_branch)] == 0).all()


# --------------------------------------------------------------------------- the model trains exactly as without a Monitor


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
def test_monitoring_does_not_change_training(name: str, cases: Any, quiet: dict[str, Any]) -> None:
    case = cases[name]
    finals = []
    for monitored in (False, True):
        model = case.model()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        if monitored:
            with gradscope.Monitor(model, opt, activation_every=1, flush_every=2, update_every=1, **quiet) as mon:
                case.train(model, opt, mon, 4)
        else:
            case.train(model, opt, None, 4)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})  # parameters and buffers
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


# --------------------------------------------------------------------------- a loss on another device


class _OnAnotherDevice(torch.Tensor):
    """A loss that behaves like one on another device than the model (a GPU model's loss moved to
    the CPU, or the reverse): ``torch.stack`` refuses it next to the model's values until it is
    moved with ``.to()``. This machine has one device, so the mismatch is simulated."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.stack and any(type(t) is cls for t in args[0]):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices")
        if func is torch.Tensor.to:
            return args[0].as_subclass(torch.Tensor).clone()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_a_loss_on_another_device_than_the_model_is_recorded_on_every_step(quiet: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    losses = []
    with gradscope.Monitor(model, opt, flush_every=2, **quiet) as mon:
        for _ in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
            mon.step(loss.detach().as_subclass(_OnAnotherDevice))
            opt.step()
    run = mon.run
    assert run.n_steps == 5
    np.testing.assert_allclose(run.loss, losses, rtol=1e-6)


# --------------------------------------------------------------------------- gradients the CPU read cannot view


def _float16_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(torch.float16)


class _FloatThenDouble(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2).to(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)).double())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize(
    ("build", "create_graph"),
    [(_float16_mlp, False), (_FloatThenDouble, False), (lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), True)],
    ids=["float16", "float32-and-float64", "create_graph"],
)
@pytest.mark.parametrize("held", [False, True], ids=["read-on-cpu", "held-as-on-a-device"])
def test_gradients_outside_the_numpy_read_are_measured_like_the_others(
    build: Any, create_graph: bool, held: bool, device_gradients: Any, quiet: dict[str, Any]
) -> None:
    """On the CPU, float32 and float64 gradients are read as numpy views, in one model too, and
    gradients of ``backward(create_graph=True)`` as well (``step()`` reads them with grad off).
    Half precision cannot be: it takes the general path, every step, with the same values. Held
    on a device, float64 norms are taken in float64 (a batched float32 norm refuses to narrow them)."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    expected = []
    monitor = gradscope.Monitor(model, opt, update_every=1, **quiet)
    with device_gradients(monitor) if held else monitor as mon:
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 4, generator=g)
            opt.zero_grad()
            out = model(x.half() if build is _float16_mlp else x)
            loss = out.float().pow(2).mean()
            loss.backward(create_graph=create_graph)
            expected.append([float(p.grad.detach().double().norm()) for p in model.parameters()])  # type: ignore[union-attr]
            mon.step(loss)
            opt.step()
        run = mon.run
    recorded = run.metric("param_grad_norm")[[name for name, _ in model.named_parameters()]].to_numpy()
    np.testing.assert_allclose(recorded, expected, rtol=1e-5)
    assert run.metric("update_norm").notna().all().all()
    if create_graph:
        for p in model.parameters():
            p.grad = None  # backward(create_graph=True) ties each parameter to its gradient


class _Float64Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2).double()
        self.sometimes = nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor, use: bool = True) -> torch.Tensor:
        return self.used(x) + (self.sometimes(x) if use else 0)


@pytest.mark.parametrize("held", [False, True], ids=["read-on-cpu", "held-as-on-a-device"])
def test_a_float64_gradient_missing_on_some_steps_is_grad_missing(held: bool, device_gradients: Any, quiet: dict[str, Any]) -> None:
    """A float64 model takes the general path, where a missing gradient must be found as in float32."""
    torch.manual_seed(0)
    model = _Float64Branch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    used = [True, False, True, False]
    monitor = gradscope.Monitor(model, opt, update_every=1, **quiet)
    with device_gradients(monitor) if held else monitor as mon:
        for use in used:
            opt.zero_grad()
            loss = model(torch.randn(8, 4, dtype=torch.float64), use).pow(2).mean()
            loss.backward()
            mon.step(loss)
            opt.step()
        run = mon.run
    assert run.n_steps == len(used)
    np.testing.assert_array_equal(run.metric("param_grad_missing")["sometimes.weight"], [0, 1, 0, 1])
    norms = run.metric("param_grad_norm")
    assert (norms["used.weight"] > 0).all() and (norms["sometimes.weight"].to_numpy() > 0).tolist() == used


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("held", [False, True], ids=["read-on-cpu", "held-as-on-a-device"])
def test_a_model_cast_after_the_monitor_is_created_is_measured_in_its_new_dtype(
    cast: torch.dtype, held: bool, device_gradients: Any, quiet: dict[str, Any]
) -> None:
    """``model.half()`` after the Monitor: numpy would sum float16 squares in float16 (a norm over
    256 overflows), and cannot view bfloat16; both go to the general path, which sums in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    monitor = gradscope.Monitor(model, opt, update_every=1, **quiet)
    model.to(cast)
    expected: list[list[float]] = []
    with device_gradients(monitor) if held else monitor as mon:
        for step in range(3):
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step)).to(cast) * 30
            opt.zero_grad()
            loss = model(x).float().pow(2).sum()
            loss.backward()
            expected.append([float(p.grad.double().norm()) for p in model.parameters()])  # type: ignore[union-attr]
            mon.step(loss)
            opt.step()
        run = mon.run
    names = [name for name, _ in model.named_parameters()]
    recorded = run.metric("param_grad_norm")[names].to_numpy()
    assert np.max(expected) > 256  # its square overflows float16
    np.testing.assert_allclose(recorded, expected, rtol=1e-2 if cast != torch.float64 else 1e-6)
    assert (run.metric("grad_nonfinite").to_numpy() == 0).all()
    final = [float(p.detach().double().norm()) for p in model.parameters()]
    np.testing.assert_allclose(run.metric("param_weight_norm")[names].iloc[-1].to_numpy(), final, rtol=1e-2)
    assert (run.metric("param_update_norm")[names].to_numpy() > 0).all()


@pytest.mark.parametrize("held", [False, True], ids=["read-on-cpu", "held-as-on-a-device"])
def test_float64_norms_keep_float32_range(held: bool, device_gradients: Any, quiet: dict[str, Any]) -> None:
    """A float64 gradient of 1e20 per element has a norm float32 can store (~6e20), though its
    squares overflow float32; one of 1e-24 has a norm over float32's smallest normal value. Both are
    stored as they are, not as inf (a false non-finite report) or 0."""
    scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
    model = nn.Module()
    model.scale = scale
    monitor = gradscope.Monitor(model, **quiet)
    with device_gradients(monitor) if held else monitor as mon:
        for g in (1e20, 1e-24):
            scale.grad = torch.full((3,), g, dtype=torch.float64)
            mon.step(0.0)
        run = mon.run
    norms = run.metric("param_grad_norm")["scale"].to_numpy()
    np.testing.assert_allclose(norms, [1e20 * 3**0.5, 1e-24 * 3**0.5], rtol=1e-6)
    assert (run.metric("grad_nonfinite").to_numpy() == 0).all()


def test_a_model_cast_mid_run_measures_its_updates_against_a_snapshot_in_the_new_dtype(quiet: dict[str, Any]) -> None:
    """The copy of θ taken before each update is made again when the model's dtype changed: a
    float32 copy of a float64 model rounds θ by ~1e-8 relative, more than a small update moves it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    expected = []
    with gradscope.Monitor(model, opt, update_every=1, **quiet) as mon:
        for step in range(5):
            if step == 2:
                model.double()
            dtype = next(model.parameters()).dtype
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step), dtype=dtype)
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            mon.step(loss)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            expected.append([float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before, strict=True)])
        run = mon.run
    names = [name for name, _ in model.named_parameters()]
    np.testing.assert_allclose(run.metric("param_update_norm")[names].to_numpy()[2:], expected[2:], rtol=1e-4)


def test_a_learning_rate_held_as_a_tensor_is_recorded_step_by_step(quiet: dict[str, Any]) -> None:
    """A tensor learning rate (as compiled optimizers take) is changed in place by schedulers:
    each step's value is copied, not the tensor kept until the write."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with gradscope.Monitor(model, opt, **quiet) as mon:
        for _ in range(4):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)
            opt.step()
            scheduler.step()
        run = mon.run
    np.testing.assert_allclose(run.metric("lr.0").to_numpy().ravel(), [0.1, 0.05, 0.025, 0.0125], rtol=1e-6)


@dataclasses.dataclass
class _Prediction:
    cache: torch.Tensor = dataclasses.field(init=False)  # never set: reading it raises
    logits: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    note: str = "a dataclass output, as some model libraries return"


class _DataclassModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> _Prediction:
        return _Prediction(logits=self.net(x) * float("nan"))  # the output goes NaN


def test_a_dataclass_output_is_checked_like_a_dict(quiet: dict[str, Any]) -> None:
    model = _DataclassModel()
    with gradscope.Monitor(model, **quiet) as mon:
        out = model(torch.randn(8, 4))
        loss = out.logits.mean()
        loss.backward()
        mon.step(loss)
        run = mon.run
    assert run.metric("output_nonfinite")["(output)"].tolist() == [1.0]  # not 0 (checked, finite)


class _CallsForwardDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second.forward(self.first.forward(x))  # .forward(): past every hook


def test_sampled_steps_whose_module_hooks_never_run_are_reported_once(quiet: dict[str, Any]) -> None:
    model = _CallsForwardDirectly()
    with pytest.warns(RuntimeWarning, match="no module.s forward hook ran in the training forward of sampled step 0") as warned, gradscope.Monitor(model, activation_every=2, **quiet) as mon:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)
    assert sum("forward hook ran" in str(w.message) for w in warned) == 1


@pytest.mark.parametrize("how", ["load_state_dict(assign=True)", "weight_norm"])
def test_parameters_replaced_after_the_monitor_is_created_are_reported(how: str, quiet: dict[str, Any]) -> None:
    """Replaced parameters get no gradient: without a word they would read as cut off from the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with gradscope.Monitor(model, **quiet) as mon:
        if how == "weight_norm":
            nn.utils.parametrizations.weight_norm(model[0])
        else:
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        with pytest.warns(RuntimeWarning, match="no longer the model's .*0.weight"):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)


class _RegisteredBackwards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.Linear(8, 2)  # registered first, runs second
        self.enc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("activation_every", [0, 50])
def test_the_forward_order_is_taken_on_step_0_whatever_the_cadence(activation_every: int, quiet: dict[str, Any]) -> None:
    model = _RegisteredBackwards()
    with gradscope.Monitor(model, activation_every=activation_every, **quiet) as mon:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)
        run = mon.run
    assert run.forward_order == ["enc", "dec"]
    assert run.layers[:2] == ["enc", "dec"]


def test_warnings_raised_as_errors_lose_no_step(quiet: dict[str, Any]) -> None:
    """Under ``-W error`` a gradscope warning raises in the loop; the step it reports on is
    recorded first, so the run keeps every step."""
    model = _CallsForwardDirectly()
    mon = gradscope.Monitor(model, activation_every=2, **quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            try:
                mon.step(loss)
            except RuntimeWarning:
                assert step == 0  # the one report, once
    mon.close()
    assert mon.run.n_steps == 4


def test_a_param_group_added_after_the_monitor_is_created_is_reported(quiet: dict[str, Any]) -> None:
    """Its learning rate has no column in the run: said once, at the write, not silently dropped."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="more parameter groups than the 1") as warned, gradscope.Monitor(model, opt, flush_every=2, **quiet) as mon:
        for step in range(5):
            if step == 1:
                opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss)
            opt.step()
    assert sum("parameter groups" in str(w.message) for w in warned) == 1
    np.testing.assert_allclose(mon.run.metric("lr.0").to_numpy().ravel(), [0.1] * 5)
