"""Benchmark the dashboard as a user meets it: a real Chromium, from a control change to a settled page.

Usage::

    .venv/bin/python bench/bench_browser.py                   # shipped grokking sample + the 10^7-row run
    .venv/bin/python bench/bench_browser.py --scale 0.1       # a tenth of the synthetic run's tests
    .venv/bin/python bench/bench_browser.py --db RUN.duckdb   # reuse a written 10^7-row run database
    .venv/bin/python bench/bench_browser.py --only sample     # one target

Each target is served by ``streamlit run app/main.py`` and driven by Playwright in
``/usr/bin/chromium`` (1600×1000), through the page controls a user touches: toggles,
segmented controls, select boxes, sliders (keyboard), number inputs and page links.
The 10^7-row run is the synthetic run of ``bench/bench_app.py`` (components 500 windows
× 10 tensors × 2000 tests, data ≈10^7 rows), with a small second run for Compare.

For every interaction the page itself records (an init script; no polling error):

- ``t0``: the input event that changes the value (pointer down on a toggle, a segment, an
  option of an opened list or a page link; the key that moves a slider or commits a typed
  number). Opening a list and typing digits are not timed: they change nothing yet;
- the arrival of every websocket message (the server's script run streams its output
  and ends with "script finished"), and every DOM mutation (React and plotly drawing);
- *settled*: no message and no mutation for ``QUIET_MS`` with the status widget gone.

Total = settled − t0 (the last message or mutation); server = last message − t0
(script run plus websocket); browser = total − server (React and plotly after the
last message). Round 1 starts on a fresh server (empty caches); later rounds replay the
same interactions. Target: p95 ≤ 300 ms. Results go to ``bench/results/browser.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from bench.bench_app import build_runs, percentile  # noqa: E402
from tests.dashboard import CHROMIUM, CHROMIUM_ARGS, dashboard  # noqa: E402

TARGET_P95_MS = 300.0
QUIET_MS = 400
SETTLE_S = 60.0
FIRST_LOAD_S = 300.0  # a fresh server opening a 10^7-row run on a busy machine
VIEWPORT = {"width": 1600, "height": 1000}

PROBE = """
(() => {
  window.__bench = {t0: null, lastMessage: 0, lastMutation: 0, messages: 0};
  const mark = () => { if (window.__bench.t0 === null) window.__bench.t0 = performance.now(); };
  for (const type of ["pointerdown", "keydown"]) window.addEventListener(type, mark, true);
  const Native = window.WebSocket;
  window.WebSocket = function (...args) {
    const socket = new Native(...args);
    socket.addEventListener("message", () => {
      window.__bench.lastMessage = performance.now();
      window.__bench.messages += 1;
    });
    return socket;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
  new MutationObserver(() => { window.__bench.lastMutation = performance.now(); })
    .observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
})();
"""
RESET = "() => { window.__bench.t0 = null; window.__bench.messages = 0; }"
SETTLED = f"""() => {{
  const b = window.__bench, now = performance.now();
  const idle = !document.querySelector('[data-testid="stStatusWidget"]');
  return b.t0 !== null && b.messages > 0 && idle
    && now - b.lastMessage >= {QUIET_MS} && now - b.lastMutation >= {QUIET_MS};
}}"""
UNFOLDED = """() => document.querySelector('[data-testid="stSidebar"]').dataset.collapsed === 'false'"""
READ = "() => ({t0: window.__bench.t0, message: window.__bench.lastMessage, mutation: window.__bench.lastMutation})"

Action = Callable[[object], None]


@dataclass(frozen=True)
class Timing:
    total_ms: float
    server_ms: float

    @property
    def browser_ms(self) -> float:
        return self.total_ms - self.server_ms


def control(tab, name: str):
    return tab.locator(f".st-key-url-{name}")


def toggle(name: str) -> Action:
    return lambda tab: control(tab, name).locator("label").first.click()


def present_off(tab) -> None:
    """Presentation mode folded the sidebar away: unfold it (not timed), then switch the mode off."""
    if tab.locator('[data-testid="stSidebar"]').get_attribute("data-collapsed") == "true":
        tab.locator('[data-testid="stExpandSidebarButton"]').dispatch_event("click")
        tab.wait_for_function(UNFOLDED)
        tab.wait_for_timeout(QUIET_MS)
        tab.evaluate(RESET)
    toggle("present")(tab)


def segment(name: str, option: str) -> Action:
    return lambda tab: control(tab, name).get_by_role("radio", name=option, exact=True).click()


def select(name: str, option: str) -> Action:
    """Open the list (not timed: no value changed yet), then choose the option."""
    def act(tab) -> None:
        control(tab, name).get_by_role("button", name="Open").click()
        choice = tab.get_by_role("option", name=option, exact=True)
        choice.wait_for()
        tab.evaluate(RESET)
        choice.click()

    return act


def number(name: str, value: int) -> Action:
    """Type the number (not timed), then commit it with Enter."""
    def act(tab) -> None:
        box = control(tab, name).locator("input")
        box.click()
        box.fill(str(value))
        tab.evaluate(RESET)
        box.press("Enter")

    return act


def slider_key(name: str, key: str, thumb: int = 0) -> Action:
    return lambda tab: control(tab, name).get_by_role("slider").nth(thumb).press(key)


def page_link(title: str) -> Action:
    return lambda tab: tab.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()


def interactions(other_run: str, first_run: str, train_id: int) -> list[tuple[str, str, Action]]:
    """(page, interaction, action) over the page controls a user touches, and page switches."""
    return [
        ("overview", "log step axis on", toggle("logx")),
        ("overview", "log step axis off", toggle("logx")),
        ("overview", "presentation mode on", toggle("present")),
        ("overview", "presentation mode off", present_off),
        ("components", "open page", page_link("Components")),
        ("components", "level module", segment("level", "module")),
        ("components", "level tensor", segment("level", "tensor")),
        ("components", "measure absolute", segment("measure", "absolute")),
        ("components", "measure share", segment("measure", "share")),
        ("components", "window: next size", slider_key("window", "ArrowRight")),
        ("components", "level layer", segment("level", "layer")),
        ("components", "measure signed", segment("measure", "signed")),
        ("components", "steps: later start", slider_key("steps", "PageUp")),
        ("components", "tests: correct", select("subset", "correctly predicted")),
        ("components", "tests: one class", select("subset", "one class")),
        ("components", "running sum on", toggle("cumulative")),
        ("data", "open page", page_link("Data")),
        ("data", "examples per side 25", number("k", 25)),
        ("data", "tests: all", select("subset", "all test examples")),
        ("data", f"training example {train_id}", number("train", train_id)),
        ("reconstruction", "open page", page_link("Reconstruction")),
        ("reconstruction", "steps: later start", slider_key("steps", "PageUp")),
        ("reconstruction", "tests: correct", select("subset", "correctly predicted")),
        ("pruning", "open page", page_link("Pruning")),
        ("compare", "open page", page_link("Compare")),
        ("compare", "level module", segment("level", "module")),
        ("overview", "open page", page_link("Overview")),
        ("overview", f"run: {other_run}", select("run", other_run)),
        ("overview", f"run: {first_run}", select("run", first_run)),
    ]


def timed(tab, action: Action) -> Timing:
    tab.evaluate(RESET)
    action(tab)
    tab.wait_for_function(SETTLED, timeout=SETTLE_S * 1000, polling=50)
    marks = tab.evaluate(READ)
    end = max(marks["message"], marks["mutation"])
    return Timing(end - marks["t0"], max(marks["message"] - marks["t0"], 0.0))


def run_target(runs: Path, first_run: str, other_run: str, train_id: int, rounds: int, log: Path
               ) -> dict[tuple[str, str], list[Timing]]:  # fmt: skip
    """Every interaction ``rounds`` times on a fresh server; round 1 meets empty caches."""
    from playwright.sync_api import sync_playwright

    results: dict[tuple[str, str], list[Timing]] = {}
    with dashboard(runs, log) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for round_ in range(rounds):
            context = browser.new_context(viewport=VIEWPORT)
            context.add_init_script(PROBE)
            tab = context.new_page()
            tab.set_default_timeout(SETTLE_S * 1000)  # clicks wait for a busy browser too
            tab.goto(f"{server}/?run={first_run}")
            tab.evaluate("() => { window.__bench.t0 = 0; }")
            tab.wait_for_function(SETTLED, timeout=FIRST_LOAD_S * 1000, polling=200)
            for page, what, action in interactions(other_run, first_run, train_id):
                timing = timed(tab, action)
                results.setdefault((page, what), []).append(timing)
                print(f"  round {round_ + 1} {page:15s} {what:28s} {timing.total_ms:8.0f} ms "
                      f"(server {timing.server_ms:6.0f}, browser {timing.browser_ms:6.0f})", flush=True)  # fmt: skip
            context.close()
        browser.close()
    return results


def summary(name: str, results: dict[tuple[str, str], list[Timing]]) -> list[str]:
    every = [t for times in results.values() for t in times]
    first = [times[0] for times in results.values()]

    def stats(timings: list[Timing], field: str) -> tuple[float, float]:
        values = [getattr(t, field) for t in timings]
        return statistics.median(values), percentile(values, 0.95)

    lines = [
        f"### {name}",
        "",
        "| interactions | count | total median ms | total p95 ms | server median ms | server p95 ms "
        "| browser median ms | browser p95 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, group in (("round 1 (fresh server, empty caches)", first), ("all rounds", every)):
        cells = [f"{v:.0f}" for field in ("total_ms", "server_ms", "browser_ms") for v in stats(group, field)]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    p95 = stats(every, "total_ms")[1]
    lines += [
        "",
        f"p95 over all rounds: **{p95:.0f} ms** ({'meets' if p95 <= TARGET_P95_MS else 'misses'} the "
        f"{TARGET_P95_MS:.0f} ms target).",
        "",
        "| page | interaction | round 1 total ms | median total ms | median server ms | median browser ms |",
        "|---|---|---|---|---|---|",
    ]
    for (page, what), times in results.items():
        fields = ("total_ms", "server_ms", "browser_ms")
        medians = [statistics.median(getattr(t, field) for t in times) for field in fields]
        lines.append(f"| {page} | {what} | {times[0].total_ms:.0f} | " + " | ".join(f"{m:.0f}" for m in medians) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the synthetic run's tests/train ids")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", type=Path, default=None, help="an existing synthetic run database to reuse")
    parser.add_argument("--only", choices=("sample", "large"), default=None)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the databases (default: temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "browser.md")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"error: {CHROMIUM} is missing; install it with `apt-get install -y chromium`")

    load_before = os.getloadavg()[0]
    sections: list[str] = []

    def write() -> None:
        """The table so far (after each target, so a failure later keeps what was measured)."""
        text = "\n".join([
            "# Dashboard latency in a real browser (`bench/bench_browser.py`)",
            "",
            f"Python {platform.python_version()}, streamlit {st.__version__}, Chromium at {CHROMIUM} (headless, "
            f"{VIEWPORT['width']}×{VIEWPORT['height']}), {os.cpu_count()} CPU cores shared with other jobs: 1-minute "
            f"load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end. {args.rounds} "
            f"rounds per target; one interaction = input event → page settled ({QUIET_MS} ms without websocket "
            "message or DOM change). Server = until the last websocket message (script run + websocket); "
            "browser = the drawing after it.",
            "",
            *sections,
        ])  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print()
        print(text, flush=True)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        if args.only in (None, "sample"):
            print("shipped sample (grokking)…", flush=True)
            results = run_target(ROOT / "sample_runs", "grokking", "digits", 0, args.rounds, tmp_path / "sample.log")
            sections.extend(summary("Shipped sample `grokking` (Compare and run switch: `digits`)", results))
            write()
        if args.only in (None, "large"):
            runs = tmp_path / "large"
            runs.mkdir()
            if args.db is None:
                print("writing the 10^7-row run…", flush=True)
                _, rows, _ = build_runs(runs, args.scale, 113)
                rows_note = f"{rows['components']:,} component rows, {rows['data']:,} data rows"
            else:
                (runs / "bench-large.duckdb").symlink_to(args.db.resolve())
                from engine.store import write_run
                from tests.fixtures_store import synthetic_bundle

                write_run(runs / "bench-small.duckdb",
                          synthetic_bundle(windows=500, window=8, tensors=10, n_test=50, n_train=40, data_window=40,
                                           seed=2, task="synthetic-grokking"))  # fmt: skip
                rows_note = f"{args.db.name}, written by bench_app.build_runs"
            print("10^7-row run…", flush=True)
            results = run_target(runs, "bench-large", "bench-small", 3, args.rounds, tmp_path / "large.log")
            sections.extend(summary(f"Synthetic 10^7-row run `bench-large` ({rows_note}; Compare: `bench-small`)",
                                    results))  # fmt: skip
            write()

if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
