"""The HTML report: self-contained, escaped, deterministic, and showing what the run holds."""

from __future__ import annotations

import datetime as dt
import errno
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.offline
import pytest
import torch
import torch.nn.functional as F
from report_support import (
    LAYERS,
    N_STEPS,
    NAN_STEP,
    SPIKE_STEP,
    decode,
    hostile_run,
    page_data,
    sample_findings,
    sample_run,
    strip_timestamp,
)
from torch import nn

import gradscope
from gradscope.cli import main
from gradscope.errors import InvalidInputError, RunNotFoundError
from gradscope.findings import Finding, Fix
from gradscope.reporting import render_html, report
from gradscope.store.run import Run
from gradscope.testing import save_run, synthetic_run

WHEN = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(sample_run(), sample_findings(), generated_at=WHEN)


def figures_by_id(page: str) -> dict[str, dict[str, object]]:
    return {f["id"]: f for f in page_data(page)["figures"]}


# --------------------------------------------------------------------------- self-contained, offline


def test_plotly_js_is_embedded_exactly_once(page: str) -> None:
    bundle_head = plotly.offline.get_plotlyjs()[:300]
    assert page.count(bundle_head) == 1
    assert page.index(bundle_head) < page.index("</head>")


def test_no_network_references(page: str) -> None:
    # The plotly.js bundle mentions URLs in strings it never loads (and the CSP below forbids any
    # request); everything else in the page must not point outside the file.
    own = page.replace(plotly.offline.get_plotlyjs(), "")
    assert not re.search(r"<script[^>]*\ssrc\s*=", own, re.I)
    assert not re.search(r"<link\b", own, re.I)
    assert not re.search(r"https?:|//[a-z]", own.replace("http-equiv", ""), re.I)
    assert "connect-src 'none'" in page and 'http-equiv="Content-Security-Policy"' in page


def test_one_plot_div_per_figure_with_fixed_ids(page: str) -> None:
    ids = re.findall(r'<div id="([^"]+)" class="gs-plot"', page)
    assert ids == ["gs-curves", "gs-heat-grad-norm", "gs-heat-update-ratio", "gs-activations"]
    assert list(figures_by_id(page)) == ids


# --------------------------------------------------------------------------- verdict and findings


def test_verdict_counts_by_severity(page: str) -> None:
    assert '<section class="verdict problems"><h2>Problems found</h2>' in page
    for pill in ("1 error<", "1 warning<", "1 info<"):
        assert pill in page


def test_healthy_verdict() -> None:
    html = render_html(sample_run(), [], generated_at=WHEN)
    assert "Healthy: no problems found" in html
    assert "0 errors<" in html and 'id="findings"' not in html


def test_cards_show_code_severity_steps_layers_evidence_and_ranked_fixes(page: str) -> None:
    cards = re.findall(r'<article class="card sev-(\w+)" data-finding="(\d)".*?</article>', page, re.S)
    assert cards == [("error", "0"), ("warning", "1"), ("info", "2")]  # most severe first
    first = re.search(r'<article class="card sev-error".*?</article>', page, re.S)
    assert first is not None
    card = first.group(0)
    assert "<code>exploding_gradients</code>" in card and "step 200" in card
    assert "<code>fc5</code>" in card
    assert "<th>grad_norm</th><td>1,000</td>" in card and "<th>z</th><td>Inf</td>" in card
    fixes = re.findall(r'<li><span class="kind">(\w+)</span> ([^<]*)</li>', card)
    assert fixes == [("gradient_clipping", "clip_grad_norm_(model.parameters(), max_norm=1.0)"), ("learning_rate", "try lr=0.01")]
    assert "steps 0–599" in page and "whole run" in page


def test_long_fix_text_wraps_inside_its_card() -> None:
    """Fixes quote whole calls with no space to break at; the page lets them wrap inside the card
    (the browser test checks that nothing overflows a card once drawn)."""
    long_fix = "`torch.nn.utils.clip_grad_norm_(model.parameters(),max_norm=0.5)`"
    page = render_html(sample_run(), [Finding("exploding_gradients", "error", 3, fixes=(Fix("gradient_clipping", long_fix),))])
    assert f"{long_fix}</li>" in page  # the whole text is in the card: only the styling can cut it
    style = re.search(r"<style>(.*?)</style>", page, re.S)
    assert style is not None
    css = re.sub(r"/\*.*?\*/", "", style.group(1), flags=re.S)
    rules = {sel.strip(): body for sels, body in re.findall(r"([^{}]+)\{([^}]*)\}", css) for sel in sels.split(",")}
    for selector in (".card", ".card code"):
        assert "overflow-wrap: anywhere" in rules[selector], selector
    assert "minmax(min(380px, 100%), 1fr)" in rules[".cards"]  # one card never wider than a narrow screen


def test_highlight_data_points_at_steps_and_layer_rows(page: str) -> None:
    findings = page_data(page)["findings"]
    assert findings[0]["steps"] == [SPIKE_STEP, SPIKE_STEP]
    assert findings[0]["rows"]["gs-heat-grad-norm"] == [LAYERS.index("fc5")]
    assert findings[1]["steps"] == [0, N_STEPS - 1]
    assert findings[1]["rows"]["gs-heat-grad-norm"] == [0, 1, 2]
    # On the activation plot, columns are (input), fc0, act0, fc1, …: fc0..fc2 sit at 1, 3, 5.
    assert findings[1]["rows"]["gs-activations"] == [1, 3, 5]
    assert findings[2]["steps"] is None


# --------------------------------------------------------------------------- figures


def test_loss_is_log_scaled_and_findings_are_marked(page: str) -> None:
    curves = figures_by_id(page)["gs-curves"]
    layout = curves["layout"]
    assert isinstance(layout, dict)
    assert layout["yaxis"]["type"] == "log"  # loss spans three decades
    assert layout["yaxis2"].get("type") != "log"  # the lr schedule spans two: linear
    lines = [s["x0"] for s in layout["shapes"] if s["type"] == "line"]
    assert sorted(lines) == [0, SPIKE_STEP]


def test_loss_within_one_decade_stays_linear() -> None:
    run = synthetic_run(np.linspace(1.0, 0.5, 50))
    curves = figures_by_id(render_html(run, []))["gs-curves"]
    assert curves["layout"]["yaxis"].get("type") != "log"  # type: ignore[index]


def test_nonfinite_steps_are_marked_on_the_curves(page: str) -> None:
    data = figures_by_id(page)["gs-curves"]["data"]
    assert isinstance(data, list)
    marks = {t["name"]: decode(t["x"]).tolist() for t in data if "NaN/Inf" in t.get("name", "")}
    assert marks == {"loss: NaN/Inf": [NAN_STEP], "global gradient norm: NaN/Inf": [NAN_STEP]}


def monitored_run(losses: Sequence[str]) -> Run:
    """A real Monitor run of a tiny MLP, one step per entry: ``"loss"`` passes the loss to step(),
    ``"none"`` passes None (no loss given), ``"nan"`` passes a NaN loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gradscope.Monitor(model, opt, on_finding=None) as mon:
        for kind in losses:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            mon.step({"loss": loss, "none": None, "nan": loss.detach() * float("nan")}[kind])
            opt.step()
        return mon.run


def curve_traces(page: str) -> dict[str, np.ndarray]:
    """The training-curve traces by name, each as its x values."""
    data = figures_by_id(page)["gs-curves"]["data"]
    assert isinstance(data, list)
    return {t["name"]: decode(t["x"]) for t in data}


def test_a_run_never_given_a_loss_has_no_loss_curve_and_no_nan_marks() -> None:
    run = monitored_run(["none"] * 12)
    assert np.isnan(run.loss).all() and run.scalar("loss_missing").all()
    page = render_html(run, [Finding("exploding_gradients", "error", 5, message="spike")])
    traces = curve_traces(page)
    assert list(traces) == ["learning rate", "global gradient norm", "findings"]  # no "loss", no "loss: NaN/Inf"
    titles = [a["text"] for a in figures_by_id(page)["gs-curves"]["layout"]["annotations"]]  # type: ignore[index]
    assert titles == ["learning rate", "global gradient norm"]
    assert "No loss curve: monitor.step() was never given a loss." in page


def test_steps_given_no_loss_are_left_out_while_a_nan_loss_is_still_marked() -> None:
    kinds = ["loss", "none", "none", "loss", "nan", "loss", "none", "loss"]
    run = monitored_run(kinds)
    page = render_html(run, [])
    traces = curve_traces(page)
    assert traces["loss: NaN/Inf"].tolist() == [kinds.index("nan")]  # the NaN loss, not the steps without one
    given = [step for step, kind in enumerate(kinds) if kind != "none"]
    assert traces["loss"].tolist() == given  # the line joins the given losses across the missing ones
    data = figures_by_id(page)["gs-curves"]["data"]
    line = decode(next(t for t in data if t["name"] == "loss")["y"])  # type: ignore[union-attr]
    np.testing.assert_allclose(line, run.loss[given], rtol=1e-6)  # NaN (a gap) only at the NaN loss
    assert "The loss line joins the 5 of 8 steps whose monitor.step() was given a loss." in page


def test_training_curves_without_an_optimizer_have_no_lr_row() -> None:
    curves = figures_by_id(render_html(sample_run(lr=None), []))["gs-curves"]
    titles = [a["text"] for a in curves["layout"]["annotations"]]  # type: ignore[index]
    assert titles == ["loss", "global gradient norm"]


def test_gradient_heatmap_rows_follow_forward_order_in_log10(page: str) -> None:
    heat = figures_by_id(page)["gs-heat-grad-norm"]["data"]
    assert isinstance(heat, list)
    main, overlay, first_marks = heat
    assert main["y"] == LAYERS
    z = decode(main["z"]).astype(np.float64)
    assert z.shape == (len(LAYERS), N_STEPS)  # 600 steps fit in 600 buckets: one per step
    run = sample_run()
    grads = run.metric("grad_norm")
    np.testing.assert_allclose(z[0, 10], math.log10(grads["fc0"].iloc[10]), rtol=1e-6)
    assert z[5, SPIKE_STEP] == pytest.approx(3.0)
    # The Inf gradient of fc1 is its own magenta cell, not a missing one.
    bad = decode(overlay["z"])
    assert np.argwhere(np.isfinite(bad)).tolist() == [[1, NAN_STEP]]
    # …and a marker that stays visible however thin the cell is drawn.
    assert first_marks["y"] == ["fc1"] and decode(first_marks["customdata"]).tolist() == [NAN_STEP]


def test_update_ratio_heatmap(page: str) -> None:
    heat = figures_by_id(page)["gs-heat-update-ratio"]["data"]
    assert isinstance(heat, list) and len(heat) == 1  # no Inf ratios: no overlay
    z = decode(heat[0]["z"]).astype(np.float64)
    np.testing.assert_allclose(z[:, 0], [-2, -3, -4, -5, -6, -7], atol=1e-5)  # update 10^-(2+i) over weight 1


def test_activation_health_uses_the_last_sample(page: str) -> None:
    data = figures_by_id(page)["gs-activations"]["data"]
    assert isinstance(data, list)
    bars = [t for t in data if t["type"] == "bar"]
    assert [b["name"].split(",")[0] for b in bars] == ["dead units (fraction)", "saturated (fraction)", "activation std"]
    assert bars[0]["x"][:4] == ["(input)", "fc0", "act0", "fc1"]
    dead = decode(bars[0]["y"])
    assert dead[bars[0]["x"].index("act3")] == pytest.approx(0.3)
    assert "step 575" in bars[0]["name"]  # activations sampled every 25 steps


def test_run_without_activations_or_updates_says_so() -> None:
    run = synthetic_run(np.linspace(1, 0.1, 20), lr=None, optimizer=None)
    html = render_html(run, [])
    assert "gs-activations" not in figures_by_id(html)
    assert "activation statistics (none sampled)" in html
    assert "none given" in html  # optimizer


# --------------------------------------------------------------------------- partial runs, metadata


@pytest.mark.parametrize(("status", "why"), [("running", "still being written"), ("failed", "raised an exception")])
def test_partial_run_banner(status: str, why: str) -> None:
    html = render_html(sample_run(status=status), [])
    banner = re.search(r'<div class="banner partial" role="alert">(.*?)</div>', html)
    assert banner is not None
    assert why in banner.group(1) and "up to step 599" in banner.group(1)


def test_complete_run_has_no_banner(page: str) -> None:
    assert "banner partial" not in page


def test_metadata(page: str) -> None:
    assert "<th>duration</th><td>1 min 36 s</td>" in page
    assert "<th>started</th><td>2023-11-14 22:13:20 UTC</td>" in page
    assert "SyntheticModel: 600 parameters (600 trainable) in 13 modules" in page
    assert "<p>SGD, 1 parameter group</p>" in page
    assert "<th>experiment</th><td>sigmoid-6</td>" in page


# --------------------------------------------------------------------------- escaping

def test_run_strings_cannot_inject_markup() -> None:
    run, findings = hostile_run()
    html = render_html(run, findings)
    body = html.split("</head>", 1)[1]
    scripts = re.findall(r"<script\b[^>]*>", body)
    assert scripts == ['<script type="application/json" id="gs-data">', "<script>"]  # only the page's own
    for bad in ("<img", "<svg", "<b>", "<i>", "onerror=\"window", "<script>alert", "<script>window"):
        assert bad not in body
    assert "&lt;script&gt;alert(&#x27;model&#x27;)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=&quot;window.gsPwned=1&quot;&gt;" in body
    # The JSON still carries the names, escaped for both the script element and plotly's label markup.
    heat = figures_by_id(html)["gs-heat-grad-norm"]["data"]
    assert heat[0]["y"][0] == "&lt;script&gt;alert(\"layer\")&lt;/script&gt;"  # type: ignore[index]


# --------------------------------------------------------------------------- determinism, writing


def test_same_run_gives_the_same_bytes_apart_from_the_timestamp(tmp_path: Path) -> None:
    a = report(sample_run(), tmp_path / "a.html", findings=sample_findings()).read_text(encoding="utf-8")
    b = report(sample_run(), tmp_path / "b.html", findings=sample_findings()).read_text(encoding="utf-8")
    assert strip_timestamp(a) == strip_timestamp(b)
    later = WHEN + dt.timedelta(hours=1)
    first = render_html(sample_run(), sample_findings(), generated_at=WHEN)
    second = render_html(sample_run(), sample_findings(), generated_at=later)
    assert first != second  # the generation time shows…
    assert first.replace("2024-01-02 03:04:05 UTC", "2024-01-02 04:04:05 UTC") == second  # …and nothing else differs
    assert strip_timestamp(first) == strip_timestamp(a)


def test_report_diagnoses_when_no_findings_are_given(tmp_path: Path) -> None:
    out = report(sample_run(), tmp_path / "sub" / "dir" / "r.html", select=[])
    assert out == tmp_path / "sub" / "dir" / "r.html"
    assert "Healthy: no problems found" in out.read_text(encoding="utf-8")


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="expected a file path for the report but got the directory"):
        report(sample_run(), tmp_path, findings=[])
    with pytest.raises(RunNotFoundError, match="does not exist"):
        report(tmp_path / "missing", tmp_path / "r.html")


@pytest.mark.parametrize("name", ["run.sqlite", "run.sqlite-wal", "run.sqlite-shm", "run.sqlite-journal", ".gradscope.lock"])
def test_report_refuses_to_write_over_the_runs_own_files(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_run(sample_run(), tmp_path / "run")
    database = tmp_path / "run" / "run.sqlite"
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    monkeypatch.chdir(tmp_path)  # relative paths, one through "..", are compared once resolved
    with pytest.raises(InvalidInputError, match=rf"expected a report path outside the run but got 'run/\.\./run/{re.escape(name)}'"):
        report("run", f"run/../run/{name}", findings=[])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # nothing written, nothing created
    assert gradscope.load(database).n_steps == N_STEPS


def test_report_refuses_a_link_to_the_run_database(tmp_path: Path) -> None:
    run_dir = save_run(sample_run(), tmp_path / "run")
    database = run_dir / "run.sqlite"
    (tmp_path / "symlink.html").symlink_to(database)
    os.link(database, tmp_path / "hardlink.html")
    for out in (tmp_path / "symlink.html", tmp_path / "hardlink.html"):
        for run in (run_dir, database):  # the run given as its directory or as its file
            with pytest.raises(InvalidInputError, match="which is the run's database"):
                report(run, out, findings=[])
    assert gradscope.load(run_dir).n_steps == N_STEPS


def test_cli_report_over_the_run_database_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = save_run(sample_run(), tmp_path / "run")
    assert main(["report", str(run_dir), "-o", str(run_dir / "run.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradscope: error: expected a report path outside the run")
    assert main(["check", str(run_dir), "--select", "nonfinite"]) != 2  # the run still reads


def test_a_failed_write_keeps_the_old_report_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.html"
    out.write_text("the previous report", encoding="utf-8")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        report(sample_run(), out, findings=[])
    assert out.read_text(encoding="utf-8") == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_rewriting_a_report_keeps_its_permissions_and_symlink(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "latest.html"
    target.parent.mkdir()
    target.write_text("old", encoding="utf-8")
    target.chmod(0o640)
    link = tmp_path / "report.html"
    link.symlink_to(target)
    assert report(sample_run(), link, findings=[]) == link
    assert link.is_symlink() and "gradscope report" in target.read_text(encoding="utf-8")
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest.html"]


def test_empty_run_renders() -> None:
    run = synthetic_run(np.zeros(0))
    html = render_html(run, [])
    assert "0 steps" in html and figures_by_id(html) == {}


# --------------------------------------------------------------------------- long runs


def test_100k_steps_50_layers_render_fast_and_small(tmp_path: Path) -> None:
    n, n_layers = 100_000, 50
    rng = np.random.default_rng(0)
    layers = [f"blocks.{i}.linear" for i in range(n_layers)]
    loss = np.geomspace(5, 0.05, n) * np.exp(0.05 * rng.standard_normal(n))
    loss[54_321] = 1e4  # one spike
    loss[70_000:70_005] = np.nan
    grads = {layer: np.full(n, 0.9**i) for i, layer in enumerate(layers)}
    grads[layers[3]][12_345] = np.inf
    run = synthetic_run(
        loss,
        grad_norm=grads,
        activations={"act_dead_frac": {layer: 0.01 * i for i, layer in enumerate(layers)}},
        activation_steps=np.arange(0, n, 100),
    )
    started = time.perf_counter()
    out = report(run, tmp_path / "big.html", findings=[Finding("exploding_loss", "error", 54_321, message="spike")])
    elapsed = time.perf_counter() - started
    size = out.stat().st_size
    print(f"100k steps x 50 layers: {size / 1e6:.2f} MB in {elapsed:.2f} s")
    assert elapsed < 30  # a loose bound for shared CI machines; it takes ~1-2 s on a laptop
    assert size < 10_000_000

    figures = figures_by_id(out.read_text(encoding="utf-8"))
    loss_trace = figures["gs-curves"]["data"][0]  # type: ignore[index]
    x, y = decode(loss_trace["x"]), decode(loss_trace["y"])
    assert len(x) <= 4000
    assert np.nanmax(y) == 1e4 and x[np.nanargmax(y)] == 54_321  # the spike survived downsampling
    marks = [t for t in figures["gs-curves"]["data"] if t.get("name") == "loss: NaN/Inf"]  # type: ignore[union-attr]
    assert decode(marks[0]["x"]).tolist() == [70_000]
    heat = figures["gs-heat-grad-norm"]["data"]
    assert decode(heat[0]["z"]).shape == (n_layers, 600)  # type: ignore[index]
    assert np.argwhere(np.isfinite(decode(heat[1]["z"]))).tolist() == [[3, 12_345 * 600 // n]]  # type: ignore[index]
    assert heat[2]["y"] == [layers[3]]  # type: ignore[index]
