"""Figures as files: self-contained HTML, PNG/SVG/PDF rendered by Chromium, PowerPoint slides.

Nothing here touches streamlit, so every export is tested without the dashboard.

- HTML embeds plotly.js (about 4.7 MB), so a file opens without network.
- Images are drawn by plotly.js itself in a headless Chromium (the system browser at
  ``/usr/bin/chromium``, or ``$EXPLAIND_CHROMIUM``), driven by Playwright: PNG and SVG
  through ``Plotly.toImage``, PDF by printing the drawn figure (vector text and lines).
- Slides (python-pptx): one 16:9 slide per figure with its title, the figure as a PNG at
  twice its pixel size, and a caption; they open in PowerPoint, Keynote and LibreOffice.
"""

from __future__ import annotations

import atexit
import base64
import io
import os
import queue
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

IMAGE_FORMATS = ("png", "svg", "pdf")
MIME = {"html": "text/html", "png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf",
        "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation"}  # fmt: skip
WIDTH = 1280  # pixel width of an exported figure (its height is the figure's own)
PNG_SCALE = 2  # PNG pixels per figure pixel
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
SLIDE_WIDTH_IN, SLIDE_HEIGHT_IN = 13.333, 7.5  # 16:9
RENDER_TIMEOUT_S = 120


class ExportError(RuntimeError):
    """An export cannot be made here; the message says what to install."""


def chromium() -> Path:
    return Path(os.environ.get("EXPLAIND_CHROMIUM", "/usr/bin/chromium"))


def unavailable() -> str | None:
    """Why images cannot be rendered on this machine (``None`` when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "image export needs Playwright: pip install 'explaind-studio[export]'"
    if not chromium().exists():
        return f"image export needs Chromium at {chromium()} (apt-get install chromium, or set EXPLAIND_CHROMIUM)"
    return None


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def standalone_html(fig: go.Figure) -> str:
    """The figure as one HTML file with plotly.js embedded: interactive, and no network needed."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False, "responsive": True})


def _size(fig: go.Figure) -> tuple[int, int]:
    return int(fig.layout.width or WIDTH), int(fig.layout.height or 500)


_TO_IMAGE = """async ([spec, format, width, height, scale]) =>
    Plotly.toImage(JSON.parse(spec), {format, width, height, scale})"""
_DRAW = """async ([spec, width, height]) => {
    const figure = JSON.parse(spec);
    Plotly.purge('figure');
    await Plotly.newPlot('figure', figure.data, {...figure.layout, width, height}, {staticPlot: true});
}"""


def _decode(data_url: str) -> bytes:
    head, _, body = data_url.partition(",")
    return base64.b64decode(body) if head.endswith(";base64") else urllib.parse.unquote(body).encode()


def _draw(page, fig: go.Figure, fmt: str, scale: float) -> bytes:
    width, height = _size(fig)
    spec = fig.to_json()
    if fmt == "pdf":
        page.set_viewport_size({"width": width, "height": height})
        page.evaluate(_DRAW, [spec, width, height])
        return page.pdf(width=f"{width}px", height=f"{height + 2}px", print_background=True, page_ranges="1")
    return _decode(page.evaluate(_TO_IMAGE, [spec, fmt, width, height, scale if fmt == "png" else 1]))


class _Renderer:
    """One headless Chromium with plotly.js loaded, owned by one thread, kept for later exports.

    Starting Chromium and compiling plotly.js takes seconds; drawing a figure in the open
    page takes a fraction of one. Playwright objects belong to the thread that made them,
    so every job goes through this thread's queue. A failed job closes the browser; the
    next job starts a new one.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def render(self, figures: Sequence[go.Figure], fmt: str, scale: float) -> list[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="figure-export", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._jobs.put((list(figures), fmt, scale, done))
        return done.result(timeout=RENDER_TIMEOUT_S)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        from playwright.sync_api import sync_playwright

        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
            page_file = Path(tmp) / "export.html"
            page_file.write_text(f"<!doctype html><html><head><meta charset='utf-8'><script src='"
                                 f"{_plotly_js().as_uri()}'></script></head><body style='margin:0'>"
                                 "<div id='figure'></div></body></html>")  # fmt: skip
            browser = playwright.chromium.launch(executable_path=str(chromium()), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(page_file.as_uri())
                while (job := self._jobs.get()) is not None:
                    figures, fmt, scale, done = job
                    try:
                        done.set_result([_draw(page, fig, fmt, scale) for fig in figures])
                    except Exception as exc:  # handed to the caller; this browser is not trusted again
                        done.set_exception(exc)
                        return
            finally:
                browser.close()


_RENDERER = _Renderer()
atexit.register(_RENDERER.stop)


def render(figures: Sequence[go.Figure], fmt: str, scale: float = PNG_SCALE) -> list[bytes]:
    """Each figure as a ``png``, ``svg`` or ``pdf`` file, drawn by plotly.js in headless Chromium."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    reason = unavailable()
    if reason:
        raise ExportError(reason)
    return _RENDERER.render(figures, fmt, scale)


@dataclass(frozen=True)
class Slide:
    """One slide: a title, a figure and a caption (run, slice, explained quantity, error)."""

    title: str
    figure: go.Figure
    caption: str


def slides(deck: Sequence[Slide]) -> bytes:
    """A PowerPoint file (16:9) with one slide per entry of ``deck``, figures as PNG."""
    from pptx import Presentation
    from pptx.util import Inches, Pt

    images = render([s.figure for s in deck], "png", scale=PNG_SCALE)
    presentation = Presentation()
    presentation.slide_width, presentation.slide_height = Inches(SLIDE_WIDTH_IN), Inches(SLIDE_HEIGHT_IN)
    blank = presentation.slide_layouts[6]
    margin = 0.4
    for entry, image in zip(deck, images, strict=True):
        slide = presentation.slides.add_slide(blank)
        _text(slide, entry.title, Inches(margin), Inches(0.25), Inches(SLIDE_WIDTH_IN - 2 * margin), Inches(0.8),
              Pt(28), bold=True)  # fmt: skip
        width, height = _size(entry.figure)
        box_w, box_h = SLIDE_WIDTH_IN - 2 * margin, SLIDE_HEIGHT_IN - 1.15 - 1.0
        fit = min(box_w / width, box_h / height)
        left = (SLIDE_WIDTH_IN - width * fit) / 2
        picture = (Inches(left), Inches(1.1), Inches(width * fit), Inches(height * fit))
        slide.shapes.add_picture(io.BytesIO(image), *picture)
        _text(slide, entry.caption, Inches(margin), Inches(SLIDE_HEIGHT_IN - 0.95), Inches(box_w), Inches(0.8), Pt(14))
    buffer = io.BytesIO()
    presentation.save(buffer)
    return buffer.getvalue()


def _text(slide, text: str, left, top, width, height, size, bold: bool = False) -> None:
    frame = slide.shapes.add_textbox(left, top, width, height).text_frame
    frame.word_wrap = True
    frame.text = text
    for paragraph in frame.paragraphs:
        for run in paragraph.runs:
            run.font.size = size
            run.font.bold = bold

