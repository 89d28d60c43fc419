"""Export the README's figures from the running dashboard, exactly as a user sees them.

    .venv/bin/python docs/figures.py                # all figures of sample_runs/ into docs/figures/
    .venv/bin/python docs/figures.py --runs DIR --out DIR

Starts the dashboard on the sample runs, opens each page by its link (presentation mode,
every control in the URL) in headless Chromium (``/usr/bin/chromium``) and saves each chart
as a PNG. The links are printed so the same views can be opened by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dashboard import CHROMIUM, CHROMIUM_ARGS, ROOT, dashboard, open_page

# (file name, page, link query, index of the chart on that page)
FIGURES = [
    ("grokking-training", "overview", "?run=grokking&present=1", 0),
    ("grokking-modules", "components", "?run=grokking&present=1&level=module&measure=share", 0),
    ("grokking-modules-cumulative", "components", "?run=grokking&present=1&level=module&cumulative=1", 1),
    ("grokking-decay", "components", "?run=grokking&present=1&level=module", 2),
    ("grokking-reconstruction", "reconstruction", "?run=grokking&present=1", 0),
    ("grokking-pruning", "pruning", "?run=grokking&present=1", 0),
    ("digits-pruning", "pruning", "?run=digits&present=1", 0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "sample_runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"error: {CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory() as tmp, dashboard(args.runs, Path(tmp) / "streamlit.log") as server,
          sync_playwright() as playwright):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        for name, page, query, index in FIGURES:
            open_page(tab, server, page, query)
            chart = tab.locator('[data-testid="stPlotlyChart"]').nth(index)
            chart.scroll_into_view_if_needed()
            tab.wait_for_timeout(500)
            chart.screenshot(path=str(args.out / f"{name}.png"))
            print(f"{args.out / f'{name}.png'}  ←  /{'' if page == 'overview' else page}{query}")
        browser.close()


if __name__ == "__main__":
    main()
