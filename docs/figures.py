"""Export a run's figures from the running dashboard, exactly as a user sees them (for slides).

    .venv/bin/python docs/figures.py --run digits                 # sample_runs/digits.duckdb → docs/figures/
    .venv/bin/python docs/figures.py --runs DIR --run NAME --out DIR
    .venv/bin/python docs/figures.py --run tiny-lm --only training,layers,layers-cumulative,modules,reconstruction

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

# (figure name, page, link query after ?run=NAME&present=1, index of the chart on that page)
FIGURES = [
    ("training", "overview", "", 0),
    ("modules", "components", "&level=module&measure=share", 0),
    ("modules-cumulative", "components", "&level=module&cumulative=1", 1),
    ("layers", "components", "&level=layer", 0),
    ("layers-cumulative", "components", "&level=layer&cumulative=1", 1),
    ("decay", "components", "&level=module", 2),
    ("reconstruction", "reconstruction", "", 0),
    ("pruning", "pruning", "", 0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "sample_runs")
    parser.add_argument("--run", required=True, help="run name (its database is RUNS/NAME.duckdb)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--only", default=None, help="comma-separated figure names (default: every one)")
    args = parser.parse_args()
    names = [f[0] for f in FIGURES]
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        sys.exit(f"error: unknown figures {', '.join(unknown)}; choose from {', '.join(names)}")
    if not (args.runs / f"{args.run}.duckdb").is_file():
        sys.exit(f"error: {args.runs / (args.run + '.duckdb')} does not exist; choose a run of {args.runs}")
    if not CHROMIUM.exists():
        sys.exit(f"error: {CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory() as tmp, dashboard(args.runs, Path(tmp) / "streamlit.log") as server,
          sync_playwright() as playwright):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        for name, page, extra, index in (f for f in FIGURES if f[0] in chosen):
            query = f"?run={args.run}&present=1{extra}"
            open_page(tab, server, page, query)
            chart = tab.locator('[data-testid="stPlotlyChart"]').nth(index)
            chart.scroll_into_view_if_needed()
            tab.wait_for_timeout(500)
            path = args.out / f"{args.run}-{name}.png"
            chart.screenshot(path=str(path))
            print(f"{path}  ←  /{'' if page == 'overview' else page}{query}")
        browser.close()


if __name__ == "__main__":
    main()
