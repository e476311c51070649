"""A real run whose every name carries markup and script, recorded by a Monitor, stored, loaded,
diagnosed by the real detectors and reported: nothing it holds may become markup or run as script.

``tests/report/test_report_in_browser.py`` renders a hand-made hostile run; this one goes through
the whole pipeline and reaches the surfaces a hand-made run does not: module *class* names, a
hostile ``log_dir`` path (the page title and header), parameter names in the model summary, keys
of an optimizer's param group, and detector messages that quote layer names.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reliability_support import batch
from report_browser import Browser, find_chromium
from torch import nn

import gradscope

# Module names may not contain "."; every payload would run if it reached the page as markup.
IMG = "<img src=x onerror=window['gsPwned']=1>"
SCRIPT = "</script><script>window['gsPwned']=2</script>"
UNUSED = "<svg onload=window['gsPwned']=3>"
EVIL_CLASS = "<b onmouseover=window['gsPwned']=4>Evil</b>"
LOG_DIR = "<iframe srcdoc=x onload=window['gsPwned']=5>"
META_KEY, META_VALUE = "<script>window['gsPwned']=6</script>", "<img src=y onerror=window['gsPwned']=7>"
GROUP_KEY = "<i onclick=window['gsPwned']=8>note</i>"
PAYLOADS = (IMG, SCRIPT, UNUSED, EVIL_CLASS, LOG_DIR, META_KEY, META_VALUE, GROUP_KEY)
INJECTED = "main img, main svg[onload], main iframe, main b, main i, main script, header *:not(h1):not(p)"


def hostile_model() -> nn.Module:
    torch.manual_seed(0)
    evil_linear = type(EVIL_CLASS, (nn.Linear,), {})  # a class whose __name__ is markup
    model = nn.Module()
    model.add_module(IMG, nn.Linear(6, 16))
    model.add_module(SCRIPT, evil_linear(16, 3))
    model.add_module(UNUSED, nn.Linear(6, 3))  # never called: the no_gradient detector names it

    def forward(x: torch.Tensor) -> torch.Tensor:
        return getattr(model, SCRIPT)(torch.relu(getattr(model, IMG)(x)))

    model.forward = forward  # type: ignore[method-assign]
    return model


@dataclass
class Page:
    log_dir: Path
    path: Path
    html: str
    findings: list[gradscope.Finding]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Page:
    log_dir = tmp_path_factory.mktemp("hostile") / LOG_DIR
    model = hostile_model()
    params = list(model.named_parameters())
    opt = torch.optim.SGD([{"params": [p for _, p in params], "lr": 0.1, GROUP_KEY: SCRIPT}])
    with gradscope.Monitor(model, opt, log_dir=log_dir, flush_every=5, activation_every=1, on_finding=None, metadata={META_KEY: META_VALUE}) as mon:
        for step in range(30):
            x, y = batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
    run = gradscope.load(log_dir)
    findings = gradscope.diagnose(run)
    out = gradscope.report(run, log_dir.parent / "report.html", findings=findings)
    return Page(log_dir, out, out.read_text(encoding="utf-8"), list(findings))


def test_the_run_really_carries_the_payloads(page: Page) -> None:
    run = gradscope.load(page.log_dir)
    assert set(run.layers) == {IMG, SCRIPT, UNUSED}
    assert run.modules[SCRIPT].type == EVIL_CLASS
    assert run.meta["user"] == {META_KEY: META_VALUE}
    assert run.meta["optimizer"]["param_groups"][0][GROUP_KEY] == SCRIPT
    no_gradient = [f for f in page.findings if f.code == "no_gradient"]
    assert no_gradient and UNUSED in no_gradient[0].layers and UNUSED in no_gradient[0].message


def test_every_payload_is_escaped_in_the_html(page: Page) -> None:
    head, body = page.html.split("</head>", 1)
    before_plotly = head.split("<script", 1)[0]
    assert f"<title>gradscope report: {html.escape(str(page.log_dir))}</title>" in before_plotly
    # The page's own two scripts are the only ones, and no tag a payload carries exists as a tag.
    assert re.findall(r"<script\b[^>]*>", body) == ['<script type="application/json" id="gs-data">', "<script>"]
    for tag in ("<img", "<svg", "<iframe", "<b ", "<i "):
        assert tag not in before_plotly + body, tag
    for payload in PAYLOADS:
        assert html.escape(payload) in body, payload  # shown, as text


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_nothing_runs_in_the_browser_and_every_name_reads_literally(
    page: Page, tmp_path: Path
) -> None:
    out = page.path
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path / "profile") as browser:
        browser.open(out.resolve().as_uri())
        browser.wait_for("document.body.getAttribute('data-gs-ready') === '1'", timeout=90)
        for card in range(browser.evaluate("document.querySelectorAll('[data-finding]').length")):
            browser.click(f'[data-finding="{card}"]')  # highlighting draws every finding's layer names
        browser.pump(0.5)
        browser.evaluate("document.querySelectorAll('*').forEach(e => e.dispatchEvent(new MouseEvent('mouseover')))")
        assert browser.evaluate("typeof window.gsPwned") == "undefined"
        assert browser.evaluate(f"document.querySelectorAll({INJECTED!r}).length") == 0
        assert browser.evaluate("document.querySelector('header .source').textContent").endswith(LOG_DIR)
        assert browser.evaluate("document.title").endswith(LOG_DIR)
        labels = browser.evaluate("Array.from(document.querySelectorAll('#gs-heat-grad-norm .ytick text')).map(t => t.textContent)")
        assert set(labels) == {IMG, SCRIPT, UNUSED}
        text = browser.evaluate("document.body.innerText")
        for payload in PAYLOADS:
            assert payload in text, payload
        assert browser.errors() == []
        assert [u for u in browser.requests() if not u.startswith(("file:", "data:", "blob:"))] == []
