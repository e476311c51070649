"""The report in a real headless Chromium: every plot renders, no JavaScript error, no network
request, clicking a finding highlights it; a screenshot lands in ``test-artifacts/``.

Skipped only when no ``chromium`` is installed (CI installs Debian's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from report_browser import Browser, find_chromium
from report_support import LAYERS, SPIKE_STEP, hostile_run, sample_findings, sample_run

from gradscope.findings import Finding, Fix
from gradscope.reporting import report

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

RENDERED = """(() => {
  const plots = Array.from(document.querySelectorAll('.gs-plot'));
  return {
    figures: JSON.parse(document.getElementById('gs-data').textContent).figures.length,
    divs: plots.length,
    plotly: plots.filter(d => d.classList.contains('js-plotly-plot')).length,
    // drawn: an SVG with one rendered element per trace (scatter/bar traces are g.trace, heatmaps g.hm).
    drawn: plots.filter(d => d.querySelector('svg.main-svg') !== null && d.data.length > 0
                             && d.querySelectorAll('svg.main-svg .trace, svg.main-svg .hm').length === d.data.length).length,
  };
})()"""


def highlights(plot_id: str) -> str:
    return f"document.getElementById({json.dumps(plot_id)}).layout.shapes.filter(s => s.name === 'gs-highlight')"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


def open_report(browser: Browser, page: Path) -> None:
    browser.events.clear()
    browser.open(page.resolve().as_uri())
    browser.wait_for("document.body.getAttribute('data-gs-ready') === '1'", timeout=90)


def test_report_renders_and_highlights_findings(browser: Browser, tmp_path: Path) -> None:
    page = report(sample_run(), tmp_path / "report.html", findings=sample_findings())
    open_report(browser, page)

    assert browser.evaluate(RENDERED) == {"figures": 4, "divs": 4, "plotly": 4, "drawn": 4}
    assert browser.evaluate("document.querySelectorAll('#gs-heat-grad-norm .ytick text').length") == len(LAYERS)

    # Card 0 is the error: a one-step spike in the last layer.
    browser.click('[data-finding="0"]')
    assert browser.wait_for(f"{highlights('gs-curves')}.length") == 1
    line = browser.evaluate(f"{highlights('gs-curves')}[0]")
    assert (line["type"], line["x0"], line["x1"]) == ("line", SPIKE_STEP, SPIKE_STEP)
    rows = browser.evaluate(f"{highlights('gs-heat-grad-norm')}.filter(s => s.xref === 'paper').map(s => s.y0)")
    assert rows == [LAYERS.index("fc5") - 0.5]
    assert browser.evaluate("document.querySelector('[data-finding=\"0\"]').getAttribute('aria-pressed')") == "true"
    # The highlight is drawn, not only in the layout.
    assert browser.evaluate("document.querySelectorAll('#gs-curves .shapelayer path').length") >= 2

    # Card 1 spans steps and three layers: a shaded range and three framed rows; card 0 is released.
    browser.click('[data-finding="1"]')
    browser.wait_for(f"{highlights('gs-curves')}[0].type === 'rect'")
    rect = browser.evaluate(f"{highlights('gs-curves')}[0]")
    assert (rect["x0"], rect["x1"]) == (0, 599)
    assert browser.evaluate(f"{highlights('gs-heat-grad-norm')}.length") == 1 + 3
    assert browser.evaluate(f"{highlights('gs-activations')}.length") == 3
    assert browser.evaluate("document.querySelectorAll('.card.selected').length") == 1

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000

    # Clicking the selected card again clears the highlight.
    browser.click('[data-finding="1"]')
    browser.wait_for(f"{highlights('gs-curves')}.length === 0")

    assert browser.errors() == []
    outside = [url for url in browser.requests() if not url.startswith(("file:", "data:", "blob:"))]
    assert outside == []


def test_hostile_names_render_as_text_and_run_nothing(browser: Browser, tmp_path: Path) -> None:
    run, findings = hostile_run()
    page = report(run, tmp_path / "hostile.html", findings=findings)
    open_report(browser, page)
    assert browser.evaluate(RENDERED) == {"figures": 4, "divs": 4, "plotly": 4, "drawn": 4}
    assert browser.evaluate("typeof window.gsPwned") == "undefined"
    assert browser.evaluate("document.querySelectorAll('main img, main svg[onload], main b, main i').length") == 0
    labels = browser.evaluate("Array.from(document.querySelectorAll('#gs-heat-grad-norm .ytick text')).map(t => t.textContent)")
    assert '<script>alert("layer")</script>' in labels
    card = browser.evaluate("document.querySelector('[data-finding=\"0\"] .message').textContent")
    assert card == "message </script><script>window.gsPwned=3</script>"
    assert browser.errors() == []


def test_long_fix_text_stays_inside_its_card(browser: Browser, tmp_path: Path) -> None:
    """A fix quoting a whole call, with no space to break at, is wider than a card: it wraps instead."""
    long_fix = "`torch.nn.utils.clip_grad_norm_(model.parameters(),max_norm=0.5)` after loss.backward()"
    findings = [
        *sample_findings(),
        Finding("exploding_gradients", "error", SPIKE_STEP, (LAYERS[-1],), "spike", {}, (Fix("gradient_clipping", long_fix),)),
    ]
    page = report(sample_run(), tmp_path / "long.html", findings=findings)
    open_report(browser, page)
    card_width = browser.evaluate("document.querySelector('.card').clientWidth")
    assert card_width < 8 * len(long_fix)  # the test means something: the text does not fit on one line
    overflowing = browser.evaluate(
        "Array.from(document.querySelectorAll('.card')).filter(c => c.scrollWidth > c.clientWidth)"
        ".map(c => c.querySelector('h3').textContent)"
    )
    assert overflowing == []
    assert browser.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
