"""The dashboard in a real Chromium: every page, a slice change per page, links and downloads.

Starts ``streamlit run app/main.py -- --runs DIR`` on a free port with two demo runs,
drives it with Playwright and saves a screenshot of every page to
``artifacts/screenshots/``. Needs Chromium at ``/usr/bin/chromium``
(``apt-get install -y chromium``). Without it the tests are skipped, except where
``EXPLAIND_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a missing browser fails them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.store import add_progress, write_run
from tests.dashboard import CHROMIUM, CHROMIUM_ARGS, ROOT, SETTLE_MS, dashboard, settle
from tests.dashboard import open_page as load_page
from tests.fixtures_store import make_demo_bundle, synthetic_progress

pytestmark = pytest.mark.browser

SCREENSHOTS = ROOT / "artifacts" / "screenshots"
PAGES = ("overview", "components", "data", "reconstruction", "pruning", "compare")

FIGURE_DATA = """(index) => {
    const plots = document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot');
    const plot = plots[index];
    return plot && plot.data ? JSON.stringify({data: plot.data, layout: plot.layout}) : null;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A running dashboard on two demo runs; yields its base URL."""
    runs = tmp_path_factory.mktemp("browser-runs")
    add_progress(write_run(runs / "demo.duckdb", make_demo_bundle()), *synthetic_progress(40))
    write_run(runs / "demo-seed1.duckdb", make_demo_bundle(seed=1))
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
    yield tab
    context.close()


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


def test_presentation_mode_and_html_download(page, server):
    open_page(page, server, "reconstruction", "?run=demo&present=1")
    spec = figure(page)
    assert '"size":20' in spec.replace(" ", "")
    shoot(page, "reconstruction-presentation")
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download interactive HTML").first.click()
    download = download_info.value
    assert download.suggested_filename == "demo-reconstruction-change.html"
    html = Path(download.path()).read_text()
    assert "cdn.plot.ly" in html and "True vs reconstructed change" in html


TITLES = """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot'))
    .map(plot => plot.layout && plot.layout.title ? plot.layout.title.text : '')"""


def chart_index(tab, prefix: str) -> int:
    """Index of the chart whose title starts with ``prefix``, once it is drawn."""
    tab.wait_for_function(f"(prefix) => ({TITLES})().some(t => t.startsWith(prefix))", arg=prefix,
                          timeout=SETTLE_MS)
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
    assert download_info.value.suggested_filename == f"demo-unit-totals-{partition}.csv"
    shoot(page, f"components-{partition}")


def test_data_page_snaps_the_step_range_and_names_examples(page, server):
    open_page(page, server, "data", "?run=demo&steps=5-25")
    alerts = " ".join(page.locator('[data-testid="stAlert"]').all_inner_texts())
    assert "Steps 5–24 lie within stored windows" in alerts
    assert "steps=0-30" in page.url
    bars = json.loads(figure(page, 0))["data"][0]["y"]
    assert all(" · #" in label or label == "weight decay" for label in bars)
    shoot(page, "data-snapped")
