"""A dashboard server in a subprocess and a headless Chromium page on it.

Shared by the browser tests and ``docs/figures.py``; Chromium is the Debian package at
``/usr/bin/chromium`` (``apt-get install -y chromium``), driven by Playwright.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
STARTUP_SECONDS = 60
SETTLE_MS = 90_000  # a ceiling, not a wait: generous for a shared 2-core machine under load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def dashboard(runs: Path, log: Path) -> Iterator[str]:
    """``streamlit run app/main.py -- --runs RUNS`` on a free port; yields its base URL.

    Raises ``RuntimeError`` with the end of the server log when it does not come up.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EXPLAIND_RUNS"}
    command = [
        sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
        "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--", "--runs", str(runs),
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# the app's own record of its script run (streamlit sets it on the root element), and every chart drawn
_IDLE = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return app && app.getAttribute('data-test-script-state') === 'notRunning'
        && app.getAttribute('data-test-connection-state') === 'CONNECTED'
        && !document.querySelector('[data-testid="stStatusWidget"]')
        && document.querySelector('[data-testid="stPlotlyChart"], [data-testid="stAlert"]') !== null
        && Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"]'))
               .every(chart => { const plot = chart.querySelector('.js-plotly-plot'); return plot && plot.data; });
}"""


def settle(tab) -> None:
    """Wait until the script has run and stays idle for 300 ms with a chart or message drawn.

    Idle once is not enough: a run that rewrites the URL or a widget that syncs its value asks
    for another run right after, and on a loaded machine that request can come late."""
    deadline = time.monotonic() + SETTLE_MS / 1000
    while True:
        tab.wait_for_function(_IDLE, timeout=max(1.0, deadline - time.monotonic()) * 1000)
        tab.wait_for_timeout(300)
        if tab.evaluate(_IDLE):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page at {tab.url} kept rerunning for {SETTLE_MS / 1000:.0f} s")


def open_page(tab, server: str, name: str, query: str = "") -> None:
    """Load a page by its URL (the default page, Overview, lives at ``/``)."""
    tab.goto(f"{server}/{'' if name == 'overview' else name}{query}")
    settle(tab)
