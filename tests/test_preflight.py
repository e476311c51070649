"""``gradscope.preflight``: each check catches its deliberately broken model or batch, names the culprit
and offers the fix; a healthy model passes every check; the model passed in is never changed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.datasets import load_digits
from gradscope.preflight_checks import CHECKS, PreflightResult, main, preflight

# --------------------------------------------------------------------------- data and models


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """64 real examples: 8×8 digits standardised, as (64, 64) float32 and (64,) int64 labels 0-9."""
    images, labels = load_digits(size=8)
    return images[:64], labels[:64]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class SmallCNN(nn.Module):
    """Conv → BatchNorm → ReLU → pool → Linear; ``view_bug`` flattens with the batch in the wrong place."""

    def __init__(self, *, view_bug: bool = False, running_stats: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4, track_running_stats=running_stats)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64, 10)
        self.view_bug = view_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.norm(self.conv(x.view(-1, 1, 8, 8)))))  # (B, 4, 4, 4)
        # The bug: view(64, -1).t() reinterprets memory across examples; view(len(x), 64) is right.
        h = h.view(64, -1).t() if self.view_bug else h.view(len(x), 64)
        return self.fc(h)


class Attention(nn.Module):
    """Rows of the 8×8 digit as a sequence of 8 tokens through self-attention."""

    def __init__(self, *, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8))  # (B, T, E)
        h, _ = self.attn(h, h, h)  # without batch_first, attends over the batch instead of the sequence
        return self.head(h.mean(dim=1))


class Detached(nn.Module):
    """Two branches, one detached by mistake, and a module never called."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(64, 32)
        self.right = nn.Linear(64, 32)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.left(x) + self.right(x).detach()))


class Tokens(nn.Module):
    """Embedding → Linear per token; ``leak`` centres the embeddings over the batch (in eval mode too)."""

    def __init__(self, *, leak: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20)
        self.leak = leak

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, 8)
        if self.leak:
            h = h - h.mean(dim=0)
        return self.out(h)  # (B, T, 20)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 20, (16, 6), generator=torch.Generator().manual_seed(0))
    return ids, ids


def codes(result: PreflightResult) -> set[str]:
    return {f.code for f in result.findings}


def only(result: PreflightResult, code: str) -> gradscope.Finding:
    found = [f for f in result.findings if f.code == code]
    assert len(found) == 1, result.summary()
    return found[0]


# --------------------------------------------------------------------------- healthy models pass


@pytest.mark.parametrize("build", [mlp, lambda: SmallCNN(), lambda: Attention(batch_first=True)], ids=["mlp", "cnn_batchnorm", "attention"])
def test_a_healthy_model_passes_every_check(build: Any, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    result = preflight(build(), F.cross_entropy, digits)
    result.assert_ok()
    assert result.ok and result.findings == []
    assert result.passed == list(CHECKS)
    m = result.measurements
    assert m["expected_initial_loss"] == pytest.approx(math.log(10))
    assert abs(m["initial_loss"] - math.log(10)) < 0.3
    assert m["overfit_final_loss"] <= 0.05 * m["overfit_start_loss"]
    assert m["overfit_steps"] < 200


def test_a_healthy_token_model_passes_and_skips_the_scale_of_integer_inputs() -> None:
    torch.manual_seed(0)
    result = preflight(Tokens(leak=False), token_loss, token_batch()).assert_ok()
    assert "data_unnormalized" in result.skipped
    assert result.measurements["n_classes"] == 20  # the last dimension of (B, T, 20) for targets (B, T)


# --------------------------------------------------------------------------- each check catches its bug


def test_a_view_across_the_batch_is_batch_dependence_at_the_next_module(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    finding = only(preflight(SmallCNN(view_bug=True), F.cross_entropy, digits), "batch_dependence")
    assert finding.severity is gradscope.Severity.ERROR
    assert finding.layers == ("fc",)
    assert "view" in finding.fixes[0].action
    assert finding.evidence["leak"] > 0


def test_attention_without_batch_first_mixes_the_batch(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    finding = only(preflight(Attention(batch_first=False), F.cross_entropy, digits), "batch_dependence")
    assert finding.layers == ("attn",)
    assert "batch_first=True" in finding.fixes[0].action


def test_batchnorm_is_checked_in_eval_mode_but_batch_statistics_in_eval_are_a_leak(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    assert "batch_dependence" in preflight(SmallCNN(), F.cross_entropy, digits).passed
    torch.manual_seed(0)
    finding = only(preflight(SmallCNN(running_stats=False), F.cross_entropy, digits), "batch_dependence")
    assert finding.layers == ("norm",)  # it normalises with the batch's statistics even in eval mode


def test_centring_integer_token_embeddings_over_the_batch_is_found_by_perturbation() -> None:
    torch.manual_seed(0)
    finding = only(preflight(Tokens(leak=True), token_loss, token_batch()), "batch_dependence")
    assert "changing the other examples' inputs" in finding.message
    assert finding.layers == ("out",)  # the first module to see the centred embeddings


def test_a_detached_branch_and_an_unused_module_get_no_gradient(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    finding = only(preflight(Detached(), F.cross_entropy, digits), "missing_gradient")
    assert finding.severity is gradscope.Severity.ERROR
    assert finding.layers == ("right", "unused")
    assert finding.evidence["params"] == 4
    assert ".detach()" in finding.fixes[0].action


def test_dead_relus_give_an_all_zero_gradient(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU is off for every example
    result = preflight(model, F.cross_entropy, digits)
    finding = only(result, "missing_gradient")
    assert finding.severity is gradscope.Severity.WARNING
    assert finding.layers == ("0", "2")  # the first layer, and the weight of the second that sees only zeros
    assert finding.evidence == {"params": 3, "zero": 1}  # 0.weight, 0.bias, 2.weight; 2.bias still learns
    assert "overfit_batch" in codes(result)  # and it cannot learn


def test_a_loss_detached_from_the_model_is_reported(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    def detached_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.detach(), y)

    finding = only(preflight(mlp(), detached_loss, digits, select=["missing_gradient"]), "missing_gradient")
    assert "does not require grad" in finding.message


def test_unnormalised_pixels_are_reported_with_the_initial_loss_they_cause() -> None:
    images, labels = load_digits(size=8, normalize=False)
    raw = images[:64] * 255  # pixel values 0…255
    result = preflight(mlp(), F.cross_entropy, (raw, labels[:64]))
    data = only(result, "data_unnormalized")
    assert data.severity is gradscope.Severity.WARNING
    assert data.evidence["max"] == pytest.approx(255)
    assert data.evidence["std"] > 10
    initial = only(result, "initial_loss")
    assert initial.evidence["ratio"] > 1.5
    assert initial.fix_kinds == ["initialization", "data"]
    with pytest.raises(AssertionError, match="data_unnormalized"):
        result.assert_ok()
    result.assert_ok(fail_on="error")  # both are warnings


def test_features_of_very_different_scales_are_unnormalised() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    x[:, 2] *= 5000.0  # an income next to standardised features
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    finding = only(preflight(nn.Linear(4, 3), F.cross_entropy, (x, y), select=["data_unnormalized"]), "data_unnormalized")
    assert finding.evidence["feature_scale_ratio"] > 1000
    assert "per feature" in finding.fixes[0].action


def test_one_based_labels_are_out_of_range_and_the_loss_checks_wait(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    result = preflight(mlp(), F.cross_entropy, (x, y + 1))  # 1…10 for 10 outputs
    finding = only(result, "label_range")
    assert finding.severity is gradscope.Severity.ERROR
    assert (finding.evidence["label_min"], finding.evidence["label_max"], finding.evidence["n_classes"]) == (1, 10, 10)
    assert "1-based" in finding.fixes[0].action
    assert set(result.skipped) == {"initial_loss", "missing_gradient", "overfit_batch"}


def test_n_classes_disagreeing_with_the_output_is_reported(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    finding = only(preflight(mlp(), F.cross_entropy, digits, n_classes=12, select=["label_range"]), "label_range")
    assert "outputs 10 classes" in finding.message


def test_nan_in_the_batch_is_reported_with_its_examples_and_blocks_the_model_checks(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    x = x.clone()
    x[5, 3] = math.nan
    x[9, 0] = math.inf
    result = preflight(mlp(), F.cross_entropy, (x, y))
    finding = only(result, "data_nonfinite")
    assert finding.evidence == {"nan": 1, "inf": 1, "examples": 2}
    assert "examples 5, 9" in finding.message
    assert {"initial_loss", "missing_gradient", "batch_dependence", "overfit_batch"} <= set(result.skipped)


class SoftmaxThenCrossEntropy(nn.Module):
    """The classic: probabilities fed to F.cross_entropy, which expects logits, so the loss cannot reach 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_model_that_cannot_overfit_a_few_examples(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    result = preflight(SoftmaxThenCrossEntropy(), F.cross_entropy, digits)
    assert codes(result) == {"overfit_batch"}  # its initial loss looks perfectly normal
    finding = result.findings[0]
    assert finding.severity is gradscope.Severity.ERROR
    assert finding.evidence["steps"] == 200 and finding.evidence["examples"] == 8
    # The floor of cross-entropy over softmax probabilities for 10 classes: ln(e + 9) - 1 ≈ 1.46.
    assert finding.evidence["final_loss"] > 1.4
    assert "softmax" in " ".join(f.action for f in finding.fixes)


def test_an_overfit_that_turns_nan_is_reported_with_a_lower_learning_rate(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    finding = only(preflight(mlp(), F.cross_entropy, digits, overfit_lr=1e6, select=["overfit_batch"]), "overfit_batch")
    assert not math.isfinite(finding.evidence["final_loss"]) or finding.evidence["final_loss"] > 1
    assert finding.fix_kinds[0] in ("learning_rate", "code")


def test_dropout_is_seeded_so_two_runs_agree(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    first, second = preflight(model, F.cross_entropy, digits), preflight(model, F.cross_entropy, digits)
    first.assert_ok()
    assert first.measurements == second.measurements


# --------------------------------------------------------------------------- the user's model is untouched


def test_the_model_its_gradients_buffers_mode_and_the_random_state_are_untouched(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    preflight(model, F.cross_entropy, digits)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running statistics
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


# --------------------------------------------------------------------------- results and errors


def test_assert_ok_lists_every_failure_with_its_fixes(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    result = preflight(Detached(), F.cross_entropy, digits)
    with pytest.raises(AssertionError) as info:
        result.assert_ok()
    text = str(info.value)
    assert text.startswith("gradscope preflight: 1 problem at or above warning:")
    assert "error: missing_gradient [right, unused]:" in text
    assert "fix (code):" in text
    assert json.loads(json.dumps(result.to_dict()))["findings"][0]["code"] == "missing_gradient"


def test_select_and_ignore(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    result = preflight(mlp(), F.cross_entropy, digits, select=["label_range", "overfit_batch"], ignore=["overfit_batch"])
    assert result.passed == ["label_range"]
    as_text = preflight(mlp(), F.cross_entropy, digits, select="label_range, overfit_batch", ignore="overfit_batch")
    assert as_text.passed == ["label_range"]  # one string "a,b", as on the command line


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": (torch.zeros(2, 64),)}, r"expected batch to be \(inputs, targets\) but got a tuple of 1 items"),
        ({"select": ["overfit"]}, "expected preflight check codes among .* but got overfit"),
        ({"n_classes": 1}, "expected n_classes to be an integer ≥ 2 or None but got 1"),
        ({"overfit_target": 2.0}, "expected overfit_target to be a fraction between 0 and 1 but got 2.0"),
        ({"model": nn.Linear}, "expected model to be a torch.nn.Module but got type .*instantiate it"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], match: str, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    arguments: dict[str, Any] = {"model": mlp(), "loss_fn": F.cross_entropy, "batch": digits, **kwargs}
    with pytest.raises(gradscope.InvalidInputError, match=match):
        preflight(**arguments)


def test_a_loss_fn_that_does_not_reduce_is_refused(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    def per_example(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(gradscope.InvalidInputError, match=r"expected loss_fn to return a scalar tensor but got a tensor of shape \(64,\)"):
        preflight(mlp(), per_example, digits)


# --------------------------------------------------------------------------- command line

_TARGET = """
import torch, torch.nn.functional as F
from torch import nn
from gradscope.datasets import load_digits

def healthy():
    torch.manual_seed(0)
    x, y = load_digits(size=8)
    return {"model": nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), "loss_fn": F.cross_entropy, "batch": (x[:32], y[:32])}

def one_based():
    kwargs = healthy()
    x, y = kwargs["batch"]
    kwargs["batch"] = (x, y + 1)
    return kwargs

def nothing():
    return 3
"""


def test_the_command_line_runs_a_target_and_exits_by_its_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "checks.py"
    target.write_text(_TARGET)
    assert main([f"{target}:healthy"]) == 0
    assert capsys.readouterr().out.startswith("preflight passed: 7 checks")
    assert main([f"{target}:one_based", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["findings"][0]["code"] == "label_range"
    assert main([f"{target}:one_based", "--select", "data_nonfinite,data_unnormalized"]) == 0
    capsys.readouterr()
    assert main([f"{target}:nothing"]) == 2
    assert "expected nothing() to return a dict with model, loss_fn and batch" in capsys.readouterr().err
    assert main([f"{tmp_path / 'missing.py'}:healthy"]) == 2


# A target that cannot be loaded is bad input (exit 2, one line), never "findings" (exit 1) with a traceback.
_BROKEN_TARGETS = {
    "syntax": ("import torch\n\ndef make(:\n    pass\n", "make", "SyntaxError: invalid syntax (line 3)"),
    "raises": ("def make():\n    batch = None\n    return {'batch': 1 / 0}\n", "make", "ZeroDivisionError: division by zero (line 3)"),
    "import": ("import no_such_dependency_of_the_target\n", "make", "ModuleNotFoundError: No module named 'no_such_dependency_of_the_target' (line 1)"),
    "exits": ("import sys\nsys.exit(3)\n", "make", "it called sys.exit(3) (line 2)"),
}


@pytest.mark.parametrize("kind", sorted(_BROKEN_TARGETS))
def test_a_target_that_cannot_be_loaded_exits_2_with_one_line(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source, function, error = _BROKEN_TARGETS[kind]
    monkeypatch.chdir(tmp_path)
    Path("pf_target.py").write_text(source)
    assert main([f"pf_target.py:{function}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"gradscope: error: could not load pf_target.py:{function}: {error}\n"


def test_a_module_target_that_raises_on_import_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pf_broken_module.py").write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["pf_broken_module:make"]) == 2
    expected = "gradscope: error: could not load pf_broken_module:make: RuntimeError: no GPU here (pf_broken_module.py, line 2)\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("missing", "expected a function 'missing' in '{file}' but '{file}' defines no 'missing'"),
        ("extra_key", "expected extra_key() to return preflight's keyword arguments (model, loss_fn, batch, n_classes, "
         "overfit_steps, overfit_examples, overfit_lr, overfit_target, select, ignore, seed) but got lr; remove it from the dict"),
    ],
)
def test_a_target_that_is_not_usable_exits_2_with_one_line(
    function: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "checks.py"
    target.write_text(_TARGET + "\ndef extra_key():\n    return {**healthy(), 'lr': 0.1}\n")
    assert main([f"{target}:{function}"]) == 2
    assert capsys.readouterr().err == f"gradscope: error: {error.format(file=target)}\n"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--select", "label_range", "--ignore", "label_range"], "to leave at least one preflight check to run but they leave none (select label_range, ignore label_range)"),
        (["--ignore", ",".join(CHECKS)], "to leave at least one preflight check to run but they leave none (ignore "),
        (["--select", " , "], "expected check codes after --select but got none"),
    ],
)
def test_a_selection_that_leaves_no_check_is_refused_not_passed(
    options: list[str], error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "checks.py"
    target.write_text(_TARGET)
    assert main([f"{target}:healthy", *options]) == 2
    out, err = capsys.readouterr()
    assert "preflight passed: 0 checks" not in out
    assert err.count("\n") == 1 and err.startswith("gradscope: error: expected ") and error in err


def test_a_usage_error_is_one_line_and_help_is_full(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["checks.py:make", "--format", "xml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradscope preflight: error: argument --format: invalid choice: 'xml'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gradscope preflight [-h]")


def test_an_error_of_the_model_while_the_checks_run_keeps_its_traceback(tmp_path: Path) -> None:
    # Documented: preflight() raises what the model's forward raises, unchanged; its traceback shows the line to fix.
    target = tmp_path / "checks.py"
    target.write_text(_TARGET + "\ndef wrong_width():\n    return {**healthy(), 'model': nn.Linear(65, 10)}\n")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main([f"{target}:wrong_width"])


def test_the_pytest_example_passes_on_the_model_and_catches_its_bug() -> None:
    spec = importlib.util.spec_from_file_location("example_test_preflight", Path(__file__).parents[1] / "examples" / "test_preflight_example.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.test_model_trains()
    example.test_preflight_catches_a_flatten_that_mixes_the_batch()


def test_gradscope_preflight_is_the_function_after_its_module_is_imported(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    import gradscope.preflight_checks

    result = gradscope.preflight(mlp(), F.cross_entropy, digits, select=["label_range"])
    assert isinstance(result, PreflightResult) and result.passed == ["label_range"]
