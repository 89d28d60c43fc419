"""The dashboard in a real Chromium: every page, a slice change per page, links and downloads.

Starts ``streamlit run app/main.py -- --runs DIR`` on a free port with two demo runs,
drives it with Playwright and saves a screenshot of every page to
``artifacts/screenshots/``. Needs Chromium at ``/usr/bin/chromium``
(``apt-get install -y chromium``) and, for the slide check, LibreOffice
(``apt-get install -y libreoffice-impress``). Without them the tests are skipped, except
where ``EXPLAIND_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a missing one fails them.

Covered: presentation mode at 1920×1080 (no label overlaps or is cut off, every text
scaled, the sidebar folds away), offline HTML export, server-side PNG/SVG/PDF, the slide
export converted by LibreOffice, and a corpus of hostile link values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from pypdf import PdfReader

from engine.store import add_progress, write_run
from tests.dashboard import CHROMIUM, CHROMIUM_ARGS, ROOT, SETTLE_MS, dashboard, settle
from tests.dashboard import open_page as load_page
from tests.fixtures_store import make_demo_bundle, synthetic_progress

pytestmark = pytest.mark.browser

SCREENSHOTS = ROOT / "artifacts" / "screenshots"
README_SCREENSHOT = ROOT / "docs" / "screenshots" / "dashboard.png"
PAGES = ("overview", "components", "data", "reconstruction", "pruning", "compare")
PROJECTOR = {"width": 1920, "height": 1080}
PRESENTATION_MIN_PX = 20  # smallest text in presentation mode (the page's root font is 22 px)

# Problems a projector shows: chart labels (ticks, titles, legend, notes) that overlap or
# run past the chart's edge, page text cut off, metric values not larger than their
# labels; with ``minPx``, text under that size and tables drawn as (unscalable) grids.
LAYOUT_PROBLEMS = """(minPx) => {
  const problems = [];
  const box = (e) => e.getBoundingClientRect();
  const name = (e) => (e.textContent || "").trim().slice(0, 40);
  const apart = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) <= 1
      || Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) <= 1;
  document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot').forEach((plot, i) => {
    const frame = box(plot);
    const texts = [...plot.querySelectorAll("svg text")]
      .filter((t) => !t.closest(".hoverlayer") && name(t) && box(t).width > 0);
    texts.forEach((t, a) => {
      const r = box(t);
      if (r.left < frame.left - 1 || r.right > frame.right + 1 || r.top < frame.top - 1 || r.bottom > frame.bottom + 1)
        problems.push(`chart ${i}: "${name(t)}" is cut off at the chart's edge`);
      texts.slice(a + 1).forEach((u) => {
        if (!apart(r, box(u))) problems.push(`chart ${i}: "${name(t)}" overlaps "${name(u)}"`);
      });
    });
  });
  const clipped = (e) => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 2;
  const html = ['[data-testid="stMetricValue"] p', '[data-testid="stMetricLabel"] p',
    '[data-testid="stButtonGroup"] button p', '[data-testid="stTable"] td', '[data-testid="stTable"] th',
    '[data-testid="stWidgetLabel"] p', "h1", "h2", "h3", '[data-testid="stCaptionContainer"] p',
    '[data-testid="stAlert"] p', '[data-baseweb="select"] div[value]'].map((s) => '[data-testid="stMain"] ' + s).join();
  document.querySelectorAll(html).forEach((e) => {
    if (box(e).width > 0 && clipped(e)) problems.push(`"${name(e)}" is clipped (${e.tagName.toLowerCase()})`);
  });
  document.querySelectorAll('[data-testid="stMain"] [data-testid="stButtonGroup"] button').forEach((b) => {
    const inner = b.querySelector("p");
    if (inner && (box(inner).right > box(b).right + 1 || box(inner).left < box(b).left - 1))
      problems.push(`button "${name(b)}" is cut off`);
  });
  document.querySelectorAll('[data-testid="stMain"] [data-testid="stMetric"]').forEach((m) => {
    const size = (sel) => parseFloat(getComputedStyle(m.querySelector(sel)).fontSize);
    if (size('[data-testid="stMetricValue"] p') <= size('[data-testid="stMetricLabel"] p'))
      problems.push(`metric "${name(m)}": the value is not larger than its label`);
  });
  if (minPx) {
    document.querySelectorAll(html).forEach((e) => {
      const px = parseFloat(getComputedStyle(e).fontSize);
      if (box(e).width > 0 && px < minPx) problems.push(`"${name(e)}" is set in ${px}px, under ${minPx}px`);
    });
    if (document.querySelector('[data-testid="stMain"] [data-testid="stDataFrame"]'))
      problems.push("a table is drawn as a grid, which does not scale");
  }
  return problems;
}"""

# charts by their place on the page; one plotly has not drawn yet reads as null
FIGURE_DATA = """(index) => {
    const chart = document.querySelectorAll('[data-testid="stPlotlyChart"]')[index];
    const plot = chart && chart.querySelector('.js-plotly-plot');
    return plot && plot.data ? JSON.stringify({data: plot.data, layout: plot.layout}) : null;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A running dashboard on two demo runs; yields its base URL."""
    runs = tmp_path_factory.mktemp("browser-runs")
    add_progress(write_run(runs / "demo.duckdb", make_demo_bundle()), *synthetic_progress(40))
    write_run(runs / "demo-seed1.duckdb", make_demo_bundle(seed=1))
    shutil.copyfile(ROOT / "sample_runs" / "tiny-lm.duckdb", runs / "tiny-lm.duckdb")  # a checkpoint series
    try:
        with dashboard(runs, tmp_path_factory.mktemp("server") / "streamlit.log") as base:
            yield base
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install it (apt-get install -y chromium) to run the browser tests"
        if os.environ.get("EXPLAIND_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(SETTLE_MS)
    yield tab
    context.close()


def require(tool: str, install: str) -> str:
    """The path of ``tool``; skips (or, under ``EXPLAIND_REQUIRE_BROWSER=1``, fails) without it."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is missing: install it ({install}) to run this browser test"
        if os.environ.get("EXPLAIND_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def figure(tab, index: int = 0) -> str:
    tab.wait_for_function(f"() => ({FIGURE_DATA})({index}) !== null", timeout=SETTLE_MS)
    return tab.evaluate(FIGURE_DATA, index)


def changed(tab, before: str, index: int = 0) -> str:
    """Wait for figure ``index`` to differ from ``before``; return the new figure JSON."""
    tab.wait_for_function(f"(old) => {{ const now = ({FIGURE_DATA})({index}); return now && now !== old; }}",
                          arg=before, timeout=SETTLE_MS)
    settle(tab)
    return figure(tab, index)


def no_exception(tab) -> None:
    assert tab.locator('[data-testid="stException"]').count() == 0, tab.locator(
        '[data-testid="stException"]').first.inner_text()


def shoot(tab, name: str) -> None:
    """Screenshot the whole page: the viewport grows to the height of the scrolling main area."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = tab.viewport_size
    height = tab.evaluate("""() => document.querySelector('[data-testid="stMain"]').scrollHeight""")
    tab.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 8000)})
    tab.wait_for_timeout(500)
    tab.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    tab.set_viewport_size(size)


def open_page(tab, server: str, name: str, query: str = "") -> None:
    load_page(tab, server, name, query)
    no_exception(tab)


def control(tab, name: str):
    """The widget of URL control ``name`` (streamlit marks each keyed widget with a CSS class)."""
    return tab.locator(f".st-key-url-{name}")


def segmented(tab, name: str, option: str) -> None:
    control(tab, name).get_by_role("radio", name=option, exact=True).click()


def test_every_page_draws_without_exceptions(page, server):
    for name in PAGES:
        open_page(page, server, name, "?run=demo")
        assert page.locator('[data-testid="stPlotlyChart"]').count() >= 1, name
        assert "Page not found" not in page.locator("body").inner_text()
        shoot(page, name)


def test_the_checkpoint_sample_draws_and_its_data_page_explains_the_missing_axis(page, server):
    for name in ("overview", "components", "reconstruction"):
        open_page(page, server, name, "?run=tiny-lm")
        assert "step" in figure(page), name  # waits for the first chart's data (Overview shows an alert first)
    shoot(page, "tiny-lm-reconstruction")
    open_page(page, server, "data", "?run=tiny-lm")
    assert "series of checkpoints" in page.locator('[data-testid="stAlert"]').first.inner_text()


def test_overview_log_axis_changes_the_figure_and_url(page, server):
    open_page(page, server, "overview", "?run=demo")
    before = figure(page)
    control(page, "logx").get_by_text("Log step axis").click()
    after = changed(page, before)
    assert '"type":"log"' in after.replace(" ", "")
    assert "logx=1" in page.url
    no_exception(page)


def test_components_level_window_and_subset_change_the_heatmap(page, server):
    open_page(page, server, "components", "?run=demo")
    before = figure(page)
    segmented(page, "level", "module")
    after = changed(page, before)
    assert "blocks.0.attn" in after and "blocks.0.attn" not in before
    assert "level=module" in page.url
    segmented(page, "measure", "share")
    shared = changed(page, after)
    assert "level=module" in page.url and "measure=share" in page.url
    shoot(page, "components-module-share")
    # a copied link reopens the same view
    link = page.url
    page.goto(link)
    settle(page)
    assert figure(page) == shared
    no_exception(page)


def test_data_page_example_count_changes_the_ranking(page, server):
    open_page(page, server, "data", "?run=demo&k=10")
    before = figure(page)
    box = control(page, "k").locator("input")
    box.fill("2")
    box.press("Enter")
    after = changed(page, before)
    assert after.count('"#') < before.count('"#') or len(after) < len(before)
    assert "k=2" in page.url
    no_exception(page)


def test_invalid_link_warns_and_falls_back(page, server):
    open_page(page, server, "components", "?run=nope&level=atoms&steps=9-3")
    alerts = " ".join(page.locator('[data-testid="stAlert"]').all_inner_texts())
    assert "run=nope" in alerts and "level=atoms" in alerts and "steps=9-3" in alerts
    assert "level=layer" in page.url
    shoot(page, "invalid-link")


@pytest.fixture
def projector(browser):
    context = browser.new_context(viewport=PROJECTOR, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(SETTLE_MS)
    yield tab
    context.close()


def test_presentation_mode_fits_a_projector(projector, server):
    """1920×1080, every page: no chart label overlaps another or runs off the chart, no text
    is cut off or under 20 px, metric values are larger than their labels."""
    for name in PAGES:
        open_page(projector, server, name, "?run=demo&present=1")
        projector.wait_for_timeout(500)
        assert projector.evaluate(LAYOUT_PROBLEMS, PRESENTATION_MIN_PX) == [], name
        spec = figure(projector)
        assert '"size":20' in spec.replace(" ", "")  # figures re-rendered at presentation font sizes
        if name in ("overview", "components"):
            shoot(projector, f"{name}-presentation")
    open_page(projector, server, "components", "?run=demo")
    assert projector.evaluate(LAYOUT_PROBLEMS, 0) == []  # and on screen, outside presentation mode


def test_presentation_toggle_folds_the_sidebar(projector, server):
    open_page(projector, server, "overview", "?run=demo")
    sidebar = projector.locator('[data-testid="stSidebar"]')
    assert sidebar.get_attribute("data-collapsed") == "false"
    before = figure(projector)
    control(projector, "present").get_by_text("Presentation mode").click()
    changed(projector, before)
    projector.wait_for_function(
        """() => document.querySelector('[data-testid="stSidebar"]').dataset.collapsed === 'true'""",
        timeout=SETTLE_MS,
    )
    assert "present=1" in projector.url
    assert projector.evaluate(LAYOUT_PROBLEMS, PRESENTATION_MIN_PX) == []


def download(tab, label: str, chart: int = 0):
    """Open the Download menu under chart ``chart`` and download ``label``; returns the download."""
    tab.locator('[data-testid="stPopover"] button').nth(chart).click()
    with tab.expect_download(timeout=120_000) as info:
        tab.locator('[data-testid="stPopoverBody"]').get_by_role("button", name=label).click()
    tab.keyboard.press("Escape")
    return info.value


def test_html_export_opens_offline(page, server, browser, tmp_path):
    open_page(page, server, "reconstruction", "?run=demo&steps=5-30&subset=class&class=3")
    exported = download(page, "Download interactive HTML")
    assert exported.suggested_filename == "demo-reconstruction-reconstruction-change-steps5-29-class3.html"
    html = tmp_path / exported.suggested_filename
    exported.save_as(html)
    text = html.read_text()
    assert "Plotly.newPlot" in text and not re.search(r"<script[^>]+src=", text)  # plotly.js inside, nothing fetched
    offline = browser.new_context(offline=True)
    try:
        tab = offline.new_page()
        tab.goto(html.as_uri())
        tab.wait_for_selector(".js-plotly-plot .main-svg", timeout=SETTLE_MS)
        drawn = tab.locator(".js-plotly-plot").inner_text()
        assert "True vs reconstructed change" in drawn
        assert "run demo · steps 5–29 · test examples of class 3" in drawn  # the slice, in the figure
    finally:
        offline.close()


def test_server_side_png_svg_and_pdf(page, server, tmp_path):
    open_page(page, server, "components", "?run=demo&level=module")
    stem = "demo-components-component-heatmap-module-signed-w5-steps0-39-all-tests"
    png = download(page, "Download PNG")
    assert png.suggested_filename == f"{stem}.png"
    data = Path(png.path()).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 2 * 1280  # width: 1280 px at twice the pixel density
    svg = Path(download(page, "Download SVG").path()).read_text()
    assert svg.startswith("<svg") and "Influence by component and step window" in svg and "per module" in svg
    pdf = download(page, "Download PDF")
    assert pdf.suggested_filename == f"{stem}.pdf"
    target = tmp_path / "figure.pdf"
    pdf.save_as(target)
    reader = PdfReader(target)
    assert len(reader.pages) == 1
    assert "Influence by component and step window" in reader.pages[0].extract_text()  # vector text


def test_slides_convert_in_libreoffice(page, server, tmp_path):
    soffice = require("soffice", "apt-get install -y libreoffice-impress")
    open_page(page, server, "reconstruction", "?run=demo&steps=0-20")
    page.get_by_text("Export slides", exact=True).click()
    page.get_by_role("button", name="Export slides (.pptx)").wait_for(timeout=SETTLE_MS)
    settle(page)
    with page.expect_download(timeout=120_000) as info:
        page.get_by_role("button", name="Export slides (.pptx)").click()
    deck = info.value
    assert deck.suggested_filename == "demo-reconstruction-slides-steps0-19-all-tests.pptx"
    pptx = tmp_path / "deck.pptx"
    deck.save_as(pptx)
    subprocess.run([soffice, "--headless", f"-env:UserInstallation=file://{tmp_path}/profile", "--convert-to", "pdf",
                    "--outdir", str(tmp_path), str(pptx)], check=True, capture_output=True, timeout=180)  # fmt: skip
    reader = PdfReader(tmp_path / "deck.pdf")
    titles = ("True vs reconstructed change", "Residuals and quadrature nodes per step",
              "Exactness of the reconstruction")
    assert len(reader.pages) == len(titles)  # one slide per figure of the page
    for slide, title in zip(reader.pages, titles, strict=True):
        text = " ".join(slide.extract_text().split())
        assert title in text
        for fact in ("Run demo", "steps 0–19 of 40", "all test examples", "explaining logits",
                     "reconstruction error"):  # fmt: skip
            assert fact in text, (title, fact)


HOSTILE = {
    "level": "`**bold**` [click me](https://evil.example)",
    "measure": "<img src=x onerror=alert(1)><script>alert(2)</script>",
    "window": "\u202egnp.exe\u200b\u2066",
    "steps": ":red[alarm] :material/home: $x^2$ www.evil.example",
    "subset": "x" * 5000,
    "run": "[run](javascript:alert(1))\n# heading",
    "dir": "/etc",
}


def shown_as_text(raw: str) -> str:
    """What a warning must show for ``raw``: its characters, invisible ones as U+XXXX, cut to 60."""
    cut = (raw if len(raw) <= 60 else raw[:59] + "…").replace(":material/", ":materialU+002F")
    return re.sub("[\x00-\x1f\u200b-\u200f\u202a-\u202e\u2066-\u2069]", lambda m: f"U+{ord(m.group()):04X}", cut)


def test_hostile_link_values_stay_text(page, server):
    query = "?" + urllib.parse.urlencode(HOSTILE)
    open_page(page, server, "components", query)
    page.wait_for_function(  # every value's warning drawn (other alerts may come first)
        """(names) => { const text = Array.from(document.querySelectorAll('[data-testid="stAlert"]'))
            .map(a => a.innerText).join(' '); return names.every(n => text.includes(`The link's ${n}=`)); }""",
        arg=list(HOSTILE), timeout=SETTLE_MS)
    alerts = page.locator('[data-testid="stAlert"]')
    texts = " ".join(alerts.all_inner_texts())
    for name, raw in HOSTILE.items():
        assert shown_as_text(f"{name}={raw}") in texts, name
    # each value a code span, nothing else: no link, image, script, bold, heading, emphasis, formula or icon
    markup = "a, img, script, iframe, strong, h1, h2, em, span.katex, [data-testid='stIconMaterial']"
    assert alerts.locator(markup).count() == 0
    assert alerts.locator("code").count() == 2 * len(HOSTILE)  # the value and the default shown instead
    assert "only directories under the ones it was started with" in texts  # dir=/etc is refused
    assert "Components · demo" in page.locator("h1").first.inner_text()  # the launch directory's runs instead
    assert "level=layer" in page.url and "/etc" not in urllib.parse.unquote(page.url)


def test_the_overview_path_resolves(page, server):
    """The default page lives at ``/``; its own path opens it too (the other pages' paths are
    what the other tests open)."""
    page.goto(f"{server}/overview?run=demo")
    settle(page)
    assert "Page not found" not in page.locator("body").inner_text()
    assert page.locator("h1").first.inner_text() == "Overview · demo"


def test_readme_screenshot(page, tmp_path):
    """The README's first screen: the dashboard as ``streamlit run app/main.py`` opens it (shipped samples)."""
    with dashboard(ROOT / "sample_runs", tmp_path / "streamlit.log") as base:
        open_page(page, base, "overview")
        page.wait_for_timeout(500)
        assert "Overview · grokking" in page.locator("h1").first.inner_text()
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(README_SCREENSHOT))
TITLES = """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"]'))
    .map(chart => chart.querySelector('.js-plotly-plot'))
    .map(plot => plot && plot.layout && plot.layout.title ? plot.layout.title.text : '')"""


def chart_index(tab, prefix: str) -> int:
    """Index of the chart whose title starts with ``prefix``, once it is drawn."""
    tab.wait_for_function(f"(prefix) => ({TITLES})().some(t => t.startsWith(prefix))", arg=prefix,
                          timeout=SETTLE_MS)
    settle(tab)  # every chart drawn: one not drawn yet would leave a later one with the same prefix first
    return next(i for i, t in enumerate(tab.evaluate(TITLES)) if t.startswith(prefix))


def test_overview_shows_the_progress_measures(page, server):
    open_page(page, server, "overview", "?run=demo")
    progress = json.loads(figure(page, chart_index(page, "Progress measures (key frequencies 1)")))
    assert {t["name"] for t in progress["data"]} >= {"restricted loss", "excluded loss", "train loss"}
    shoot(page, "overview-progress")


@pytest.mark.parametrize(("partition", "rows"), [("heads", 2), ("neurons", 4), ("embed-fourier", 4)])
def test_components_opens_heads_neurons_and_frequencies(page, server, partition, rows):
    open_page(page, server, "components", f"?run=demo&open={partition}&top=3")
    units = json.loads(figure(page, chart_index(page, f"{partition} of ")))["data"][0]["y"]
    assert len(units) == rows
    if partition == "embed-fourier":
        assert "★ freq 1" in units
    assert f"open={partition}" in page.url
    page.get_by_role("button", name="Download CSV").last.scroll_into_view_if_needed()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download CSV").last.click()
    assert download_info.value.suggested_filename.startswith(f"demo-components-unit-totals-{partition}-")
    shoot(page, f"components-{partition}")


def test_data_page_snaps_the_step_range_and_names_examples(page, server):
    open_page(page, server, "data", "?run=demo&steps=5-25")
    alerts = " ".join(page.locator('[data-testid="stAlert"]').all_inner_texts())
    assert "Steps 5–24 lie within stored windows" in alerts
    assert "steps=0-30" in page.url
    bars = json.loads(figure(page, chart_index(page, "Top proponents")))["data"][0]["y"]
    assert all(" · #" in label or label == "weight decay" for label in bars), bars
    shoot(page, "data-snapped")
