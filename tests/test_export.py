"""Figure exports without the dashboard: self-contained HTML, Chromium-drawn images, slides.

The images need Chromium at ``/usr/bin/chromium`` (or ``$EXPLAIND_CHROMIUM``); without it
these tests are skipped, except under ``EXPLAIND_REQUIRE_BROWSER=1`` where they fail.
"""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from pptx import Presentation
from pypdf import PdfReader

from app import charts, export
from app.charts import Style
from tests.test_charts import pruning_rows, steps_frame

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def figure():
    fig = charts.training_curves(steps_frame(), [], Style())
    fig.layout.title.subtitle = {"text": "run demo · steps 0–99"}
    return fig


@pytest.fixture(scope="module", autouse=True)
def chromium():
    reason = export.unavailable()
    if reason:
        if os.environ.get("EXPLAIND_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def test_html_embeds_plotly_js_and_fetches_nothing(figure):
    html = export.standalone_html(figure)
    assert "Plotly.newPlot" in html and len(html) > 3_000_000  # plotly.js itself is inside
    assert not re.search(r"<script[^>]+src=", html)
    assert json.dumps("run demo · steps 0–99")[1:-1] in html  # the subtitle, as the figure's JSON writes it


def test_png_svg_and_pdf_are_drawn_at_the_export_size(figure):
    png, svg, pdf = (export.render([figure], fmt)[0] for fmt in export.IMAGE_FORMATS)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (export.WIDTH * export.PNG_SCALE, figure.layout.height * export.PNG_SCALE)
    text = svg.decode()
    assert text.startswith("<svg") and 'width="1280"' in text and "Training curves" in text
    page = PdfReader(io.BytesIO(pdf)).pages[0]
    assert round(float(page.mediabox.width)) == round(export.WIDTH * 0.75)  # 1280 CSS px at 96 dpi, in points
    assert "Training curves" in page.extract_text() and "run demo" in page.extract_text()


def test_render_rejects_an_unknown_format(figure):
    with pytest.raises(ValueError, match="png, svg, pdf"):
        export.render([figure], "gif")


def test_slides_one_per_figure_with_title_image_and_caption(figure):
    deck = [
        export.Slide("Training curves", figure, "Run demo · steps 0–99 of 100 · reconstruction error 1.2e-07"),
        export.Slide("Pruning", charts.pruning_figure(pruning_rows(), Style()), "Run demo · global pruning"),
    ]
    presentation = Presentation(io.BytesIO(export.slides(deck)))
    assert len(presentation.slides) == 2
    assert presentation.slide_width / presentation.slide_height == pytest.approx(16 / 9, rel=1e-3)
    for slide, entry in zip(presentation.slides, deck, strict=True):
        texts = [shape.text_frame.text for shape in slide.shapes if shape.has_text_frame]
        pictures = [shape for shape in slide.shapes if shape.shape_type == 13]  # MSO_SHAPE_TYPE.PICTURE
        assert texts == [entry.title, entry.caption] and len(pictures) == 1
        assert pictures[0].image.size[0] == export.WIDTH * export.PNG_SCALE  # high resolution
        assert pictures[0].left + pictures[0].width <= presentation.slide_width  # fits on the slide
