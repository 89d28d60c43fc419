"""Session plumbing of the dashboard: where runs are, which one is open, the URL, caching.

- Runs are DuckDB files (``*.duckdb``) in a runs directory: the ``--runs DIR`` script
  argument (``streamlit run app/main.py -- --runs DIR``), else ``$EXPLAIND_RUNS``, else the
  shipped ``sample_runs/``; the sidebar can point to another directory.
- Every slice control is a *URL control* (``url_widget``): its value is seeded from the
  query parameter of the same name, validated by a ``Codec``, and written back, so a
  copied link reopens the same view. A malformed value gives a ``st.warning`` and the
  default. Parameters no control used in a run are dropped from the URL (``finish_url_run``).
- ``Run`` opens a database through ``st.cache_resource`` (keyed by path and
  modification time) and caches every frame it reads with ``st.cache_data``.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import plotly.graph_objects as go
import polars as pl
import streamlit as st

from app import export
from app.charts import Style
from engine.errors import RunNotFoundError
from engine.store import ALL_TESTS, RunDB, TestSelector, list_runs

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RUNS = ROOT / "sample_runs"
ENV_RUNS = "EXPLAIND_RUNS"
ENV_ROOTS = "EXPLAIND_ROOTS"
SHOWN_CHARS = 60  # longest outside value repeated in a message

T = TypeVar("T")
_SAVED = "_url_saved"  # name -> last formatted value of each URL control in this session
_USED = "_url_used"  # names of the URL controls drawn in the current script run
_PAGE = "_url_page"  # page of the current script run
_LIVE = "_url_live"  # (page, names) of the controls drawn in the last complete run
_RUN = "_current_run"
_CHOICES = "_run_choices"
_STYLE = "_style"
_IMAGE_FORMAT = "_image_format"
_SLICE = "_slice"  # (words, token) of each slice control drawn so far in this script run
_FIGURES = "_figures"  # figures drawn so far in this script run, for the slide export
_STEPS = "_slice_steps"  # the page's step interval, when it has one
_TESTS = "_slice_tests"  # the page's test selection and its words, when it has one


# ── process ─────────────────────────────────────────────────────────────────────────


def freeze_startup_heap() -> None:
    """Once per server process: move the objects alive now — the imported libraries
    (streamlit, plotly, polars, duckdb), about 170 000 of them — out of the collector's
    reach (``gc.freeze``). Streamlit runs a full collection after every script run
    (``runner.postScriptGC``, kept on for memory's sake); walking that heap took 70–160 ms
    per interaction, holding the lock the server needs to send the page. Afterwards it walks
    only what the runs themselves allocate."""
    if not getattr(freeze_startup_heap, "done", False):
        gc.collect()
        gc.freeze()
        freeze_startup_heap.done = True  # type: ignore[attr-defined]


# ── runs ────────────────────────────────────────────────────────────────────────────


def _script_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs", default=None)
    parser.add_argument("--root", action="append", default=[])
    known, _ = parser.parse_known_args(list(argv))
    return known


def runs_dir_from_args(argv: Sequence[str]) -> Path | None:
    """The ``--runs DIR`` script argument, if given (unknown arguments are ignored)."""
    known = _script_args(argv)
    return Path(known.runs).expanduser() if known.runs else None


def default_runs_dir(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Path:
    """Where to look for runs: ``--runs`` argument, else ``$EXPLAIND_RUNS``, else ``sample_runs/``."""
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    from_args = runs_dir_from_args(argv)
    if from_args is not None:
        return from_args
    if environ.get(ENV_RUNS):
        return Path(environ[ENV_RUNS]).expanduser()
    return SAMPLE_RUNS


def allowed_roots(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> list[Path]:
    """Directories a link's ``dir=`` may point into: the launch runs directory, every
    ``--root DIR`` script argument and the entries of ``$EXPLAIND_ROOTS`` (``os.pathsep``-separated)."""
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    extra = [*_script_args(argv).root, *environ.get(ENV_ROOTS, "").split(os.pathsep)]
    roots = [default_runs_dir(argv, environ), *(Path(r).expanduser() for r in extra if r.strip())]
    return list(dict.fromkeys(r.resolve() for r in roots))


def check_directory(raw: str, roots: Sequence[Path]) -> Path:
    """The directory ``raw`` names, if it exists and lies under one of ``roots``; else ``ValueError`` saying why."""
    directory = Path(raw.strip()).expanduser().resolve()
    if not any(directory.is_relative_to(root) for root in roots):
        raise ValueError(
            "the dashboard opens only directories under the ones it was started with "
            "(start it with --root DIR to allow another)"
        )
    if not directory.is_dir():
        raise ValueError("it is not a directory")
    return directory


def find_runs(directory: Path) -> list[Path]:
    """Run databases in ``directory`` (``engine.store.list_runs``); none when it does not exist."""
    try:
        return list_runs(directory)
    except RunNotFoundError:
        return []


# ── URL controls ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Codec(Generic[T]):
    """Text form of a control value: ``parse`` (raises ``ValueError`` saying why) and ``fmt``."""

    parse: Callable[[str], T]
    fmt: Callable[[T], str]


def choice(options: Sequence[str]) -> Codec[str]:
    """One of ``options``, written as itself."""
    allowed = list(options)

    def parse(raw: str) -> str:
        if raw not in allowed:
            shown = ", ".join(allowed[:8]) + (", …" if len(allowed) > 8 else "")
            raise ValueError(f"it is not one of {shown}")
        return raw

    return Codec(parse, str)


def integer(lo: int, hi: int) -> Codec[int]:
    """An integer in ``[lo, hi]``."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("it is not a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"it is outside {lo}…{hi}")
        return value

    return Codec(parse, str)


def integer_choice(options: Sequence[int]) -> Codec[int]:
    """One of the integers ``options``."""
    allowed = list(options)

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("it is not a whole number") from None
        if value not in allowed:
            raise ValueError(f"it is not one of {', '.join(map(str, allowed[:10]))}")
        return value

    return Codec(parse, str)


def interval(lo: int, hi: int) -> Codec[tuple[int, int]]:
    """A step interval ``a-b`` with ``lo ≤ a < b ≤ hi``."""

    def parse(raw: str) -> tuple[int, int]:
        first, sep, second = raw.partition("-")
        try:
            a, b = int(first), int(second)
        except ValueError:
            raise ValueError("it is not of the form START-END (two whole numbers)") from None
        if not sep or not lo <= a < b <= hi:
            raise ValueError(f"it must satisfy {lo} ≤ START < END ≤ {hi}")
        return a, b

    return Codec(parse, lambda v: f"{int(v[0])}-{int(v[1])}")


def flag() -> Codec[bool]:
    """A boolean, written ``1``/``0`` (``true``/``false`` accepted)."""

    def parse(raw: str) -> bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("it is not 1 or 0")

    return Codec(parse, lambda v: "1" if v else "0")


def text() -> Codec[str]:
    """Free text (a directory path)."""
    return Codec(lambda raw: raw, str)


_INVISIBLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def _visible(text: str, limit: int) -> str:
    """Cut to ``limit``; invisible characters, and the slash of streamlit's icon syntax
    ``:material/`` (which it rewrites anywhere, even in code), as ``U+XXXX``."""
    cut = text if len(text) <= limit else text[: limit - 1] + "…"
    return _INVISIBLE.sub(lambda m: f"U+{ord(m.group()):04X}", cut).replace(":material/", ":materialU+002F")


def inert(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` from outside (a link) as a markdown code span that shows exactly its characters.

    Cut to ``limit`` characters, control, bidirectional-override and invisible characters
    shown as ``U+XXXX`` (``_visible``). Inside a code span nothing is markup: no emphasis, link, autolink,
    HTML, directive, icon or formula. The fence is one backtick longer than the longest run
    of backticks in the text.
    """
    shown = _visible(text, limit) or "(empty)"
    fence = "`" * (max((len(run) for run in re.findall("`+", shown)), default=0) + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def escaped(text: str, limit: int = 200) -> str:
    """A name from the machine (a run's file name) as markdown text: every ASCII punctuation
    character backslash-escaped, invisible characters shown as ``U+XXXX``."""
    return _PUNCTUATION.sub(r"\\\1", _visible(text, limit))


def warn_param(name: str, raw: str, reason: str, default_text: str) -> None:
    """Say that the link's ``name=raw`` was ignored, and why; every outside value is made inert."""
    st.warning(
        f"The link's {inert(f'{name}={raw}')} was ignored because {escaped(reason, limit=400)}; "
        f"showing {inert(default_text)} instead.",
        icon="⚠️",
    )


def _valid(codec: Codec[T], value: Any) -> bool:
    try:
        codec.parse(codec.fmt(value))
    except (ValueError, TypeError, IndexError):
        return False
    return True


def url_widget(name: str, codec: Codec[T], default: T, make: Callable[[str], T]) -> T:
    """A widget whose value lives in the URL parameter ``name``.

    A widget drawn in the previous complete run of the same page keeps its live value.
    Otherwise (first visit, page switch, reappearing control) the value is this session's
    last value of ``name``, else the URL's (a malformed one is warned about), else
    ``default``. ``make(key)`` draws the widget with that session-state key.
    """
    state = st.session_state
    key = f"url:{name}"
    page, drawn = state.get(_LIVE, ("", frozenset()))
    live = page == state.get(_PAGE) and name in drawn and key in state and _valid(codec, state[key])
    if not live:
        state[key] = _initial(name, codec, default, state.setdefault(_SAVED, {}))
    value = make(key)
    publish(name, codec.fmt(value))
    return value


def _initial(name: str, codec: Codec[T], default: T, saved: dict[str, str]) -> T:
    if name in saved:  # remembered from earlier in this session; silently reset if no longer valid
        try:
            return codec.parse(saved[name])
        except ValueError:
            return default
    raw_values = st.query_params.get_all(name)
    if raw_values:
        raw = raw_values[-1]
        try:
            return codec.parse(raw)
        except ValueError as exc:
            warn_param(name, raw, str(exc), codec.fmt(default) or "the default")
    return default


def remembered(name: str) -> str | None:
    """The text of URL control ``name`` as last set in this session (on any page), else the URL's."""
    saved = st.session_state.get(_SAVED, {})
    if name in saved:
        return saved[name]
    values = st.query_params.get_all(name)
    return values[-1] if values else None


def publish(name: str, formatted: str) -> None:
    """Write a control's value to the URL (an empty value is left out) and mark it as in use this run."""
    st.session_state.setdefault(_SAVED, {})[name] = formatted
    st.session_state.setdefault(_USED, set()).add(name)
    if not formatted:
        if name in st.query_params:
            del st.query_params[name]
    elif st.query_params.get(name) != formatted:
        st.query_params[name] = formatted


def begin_url_run(page: str) -> None:
    """Start a script run of ``page``: no URL control is drawn yet."""
    st.session_state[_PAGE] = page
    st.session_state[_USED] = set()
    for key in (_SLICE, _FIGURES, _STEPS, _TESTS):
        st.session_state.pop(key, None)


def finish_url_run() -> None:
    """End a complete run: remember which controls were drawn, drop URL parameters no control used.

    Not called for a run that a newer one interrupted, so controls it did not reach stay live.
    """
    used = st.session_state.get(_USED, set())
    st.session_state[_LIVE] = (st.session_state.get(_PAGE), frozenset(used))
    for name in [n for n in st.query_params if n not in used]:
        del st.query_params[name]


# ── the open run ────────────────────────────────────────────────────────────────────


@st.cache_resource(max_entries=8, show_spinner=False, on_release=RunDB.close)
def _open_db(path: str, mtime_ns: int) -> RunDB:
    """One read-only connection per run file version (a rewritten file gets a new one);
    connections evicted from the cache are closed."""
    return RunDB.open(path)


@st.cache_data(max_entries=512, show_spinner=False)
def _query(path: str, mtime_ns: int, method: str, kwargs: tuple) -> Any:
    """``RunDB.<method>(**kwargs)`` of one run file version, cached by its arguments."""
    return getattr(_open_db(path, mtime_ns), method)(**dict(kwargs))


@dataclass(frozen=True)
class Run:
    """An open run database: cached reads of the store API (``engine.store.RunDB``)."""

    path: str
    mtime_ns: int

    @classmethod
    def at(cls, path: Path) -> Run:
        """The run file as it is now; a file removed meanwhile gets mtime 0 and fails on ``open``."""
        try:
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = 0
        return cls(str(path), mtime_ns)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def open(self) -> RunDB:
        """Open (or reuse) the connection; raises the store's errors for bad files."""
        return _open_db(self.path, self.mtime_ns)

    def _get(self, method: str, **kwargs: Any) -> Any:
        return _query(self.path, self.mtime_ns, method, tuple(sorted(kwargs.items())))

    def meta(self) -> dict:
        return self._get("meta")

    def steps(self) -> pl.DataFrame:
        return self._get("steps")

    def groups(self) -> pl.DataFrame:
        return self._get("groups")

    def examples(self, split: str) -> pl.DataFrame:
        return self._get("examples", split=split)

    def views(self) -> dict[str, int]:
        return self._get("views")

    def windows(self, view: str) -> pl.DataFrame:
        return self._get("windows", view=view)

    def component_matrix(
        self, level: str, window: int, steps: tuple[int, int], tests: TestSelector, measure: str
    ) -> pl.DataFrame:
        return self._get("component_matrix", level=level, window=window, steps=steps, tests=tests, measure=measure)

    def component_totals(self, level: str, steps: tuple[int, int] | None, tests: TestSelector) -> pl.DataFrame:
        return self._get("component_totals", level=level, steps=steps, tests=tests)

    def top_train_examples(self, tests: TestSelector, steps: tuple[int, int] | None, k: int) -> pl.DataFrame:
        return self._get("top_train_examples", tests=tests, steps=steps, k=k)

    def train_example_over_time(self, train: int, tests: TestSelector) -> pl.DataFrame:
        return self._get("train_example_over_time", train=train, tests=tests)

    def data_distribution(self, tests: TestSelector, steps: tuple[int, int] | None) -> pl.DataFrame:
        return self._get("data_distribution", tests=tests, steps=steps)

    def completeness(self, steps: tuple[int, int] | None, tests: TestSelector) -> pl.DataFrame:
        return self._get("completeness", steps=steps, tests=tests)

    def exactness(self) -> pl.DataFrame:
        return self._get("exactness")

    def pruning(self) -> pl.DataFrame:
        return self._get("pruning")

    def data_windows(self, tests: TestSelector) -> pl.DataFrame:
        return self._get("data_windows", tests=tests)

    def partitions(self) -> pl.DataFrame:
        return self._get("partitions")

    def unit_matrix(self, partition: str, window: int, steps: tuple[int, int], tests: TestSelector, measure: str,
                    top: int | None) -> pl.DataFrame:
        return self._get("unit_matrix", partition=partition, window=window, steps=steps, tests=tests,
                         measure=measure, top=top)

    def unit_totals(self, partition: str, steps: tuple[int, int] | None, tests: TestSelector) -> pl.DataFrame:
        return self._get("unit_totals", partition=partition, steps=steps, tests=tests)

    def progress(self) -> pl.DataFrame:
        return self._get("progress")

    def frequency_norms(self) -> pl.DataFrame:
        return self._get("frequency_norms")


def set_current_run(run: Run | None) -> None:
    st.session_state[_RUN] = run


def current_run() -> Run | None:
    """The run chosen in the sidebar (``None`` when there is none to show)."""
    return st.session_state.get(_RUN)


def set_run_choices(runs: Sequence[Run]) -> None:
    st.session_state[_CHOICES] = list(runs)


def run_choices() -> list[Run]:
    """Every run of the sidebar's directory (for the Compare page)."""
    return st.session_state.get(_CHOICES, [])


def num_steps(run: Run) -> int:
    """Number of recorded steps ``N`` (step ids run over ``0 … N-1``)."""
    meta_steps = run.meta().get("steps")
    if isinstance(meta_steps, int) and meta_steps > 0:
        return meta_steps
    steps = run.steps()
    return int(steps["step"].max()) + 1 if steps.height else 1


def regression(meta: dict) -> bool:
    """The run's targets are floating-point numbers (no classes, no correct or incorrect)."""
    return meta.get("targets") == "float"


def quantity_label(meta: dict) -> str:
    """Short name of the explained quantity for axis titles."""
    quantity = meta.get("quantity")
    if isinstance(quantity, dict):
        return str(quantity.get("name") or quantity.get("kind") or "quantity")
    return str(quantity or "quantity")


# ── display ─────────────────────────────────────────────────────────────────────────


def set_style(style: Style, image_format: str) -> None:
    st.session_state[_STYLE] = style
    st.session_state[_IMAGE_FORMAT] = image_format


def style() -> Style:
    return st.session_state.get(_STYLE, Style())


def presenting() -> bool:
    return style().presentation


def hint(body: str) -> None:
    """A caption that presentation mode hides."""
    if not presenting():
        st.caption(body)


# ── the slice, figures and exports ──────────────────────────────────────────────────


def note_slice(words: str, token: str, *, extra: bool = True) -> None:
    """Record a slice control's value: ``words`` for captions, ``token`` for file names.

    ``extra``: a control beyond the steps and tests (level, measure, …), which a slide
    caption lists after them.
    """
    st.session_state.setdefault(_SLICE, []).append((words, token, extra))


def note_steps(steps: tuple[int, int]) -> None:
    """Record the page's step interval ``[lo, hi)``."""
    st.session_state[_STEPS] = steps
    note_slice(f"steps {steps[0]}–{steps[1] - 1}", f"steps{steps[0]}-{steps[1] - 1}", extra=False)


def note_tests(tests: TestSelector, words: str, token: str) -> None:
    """Record the page's test selection."""
    st.session_state[_TESTS] = (tests, words)
    note_slice(words, token, extra=False)


def page_name() -> str:
    """The page of this script run as in its URL (the default page is the Overview)."""
    return st.session_state.get(_PAGE) or "overview"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
STEM_CHARS = 160


def file_stem(name: str) -> str:
    """``run-page-figure-slice…``: what a downloaded file shows, in its name (safe characters only)."""
    run = current_run()
    tokens = [token for _, token, _ in st.session_state.get(_SLICE, [])]
    parts = [run.name if run is not None else "", page_name(), name, *tokens]
    return _UNSAFE.sub("_", "-".join(p for p in parts if p))[:STEM_CHARS].strip("-_")


def slice_caption() -> str:
    """The run and the slice in words, as a figure's subtitle: ``run grokking · steps 0–999 · …``."""
    run = current_run()
    words = [w for w, _, _ in st.session_state.get(_SLICE, [])]
    return " · ".join([f"run {run.name}" if run is not None else "", *words]).strip(" ·")


@dataclass(frozen=True)
class SlideSlice:
    """What a slide caption states about the page: its steps, tests and other controls in words."""

    steps: tuple[int, int] | None
    tests: TestSelector
    tests_words: str
    extra: tuple[str, ...]

    @classmethod
    def current(cls) -> SlideSlice:
        tests, words = st.session_state.get(_TESTS, (ALL_TESTS, "all test examples"))
        extra = tuple(w for w, _, more in st.session_state.get(_SLICE, []) if more)
        return cls(st.session_state.get(_STEPS), tests, words, extra)


def slide_caption(run: Run, where: SlideSlice) -> str:
    """A slide's caption: run, steps, test examples, explained quantity and reconstruction error.

    Steps and tests are the page's slice, or the whole run where the page has none; the error
    is Σ true change − Σ reconstructed change over that slice (the completeness view).
    """
    n = num_steps(run)
    steps = where.steps or (0, n)
    comp = run.completeness(steps, where.tests)
    if comp.height:
        true = float(comp["true_change"].sum())
        error = f"reconstruction error {true - float(comp['reconstructed'].sum()):.2e} (true Δ {true:.4g})"
    else:
        error = "no completeness rows in this slice"
    parts = [
        f"Run {run.name}", f"steps {steps[0]}–{steps[1] - 1} of {n}",
        f"{where.tests_words} ({selected_tests(run, where.tests):,} test examples)",
        f"explaining {quantity_label(run.meta())}", error, *where.extra,
    ]  # fmt: skip
    return " · ".join(parts)


def selected_tests(run: Run, tests: TestSelector) -> int:
    """How many of the run's test examples ``tests`` selects."""
    examples = run.examples("test")
    if tests.kind == "correct":
        return examples.filter(pl.col("correct")).height
    if tests.kind == "incorrect":
        return examples.filter(~pl.col("correct")).height
    if tests.kind == "class":
        return examples.filter(pl.col("label") == tests.value).height
    if tests.kind == "example":
        return examples.filter(pl.col("example") == tests.value).height
    return examples.height


def _download(label: str, make: Callable[[], bytes | str], stem: str, kind: str, key: str,
              disabled: str | None = None) -> None:
    st.download_button(
        label, data=make, file_name=f"{stem}.{kind}", mime=export.MIME[kind], on_click="ignore",
        key=key, disabled=disabled is not None, help=disabled, use_container_width=True,
    )  # fmt: skip


def show_figure(fig: go.Figure, name: str) -> None:
    """Draw a figure, subtitled with the run and slice, with its downloads.

    Downloads: interactive HTML with plotly.js embedded (opens offline), and PNG, SVG and
    PDF rendered server-side by Chromium (``app.export``); every file is named
    ``run-page-figure-slice``. The chart toolbar's camera saves the same view too.
    """
    stem = file_stem(name)
    fig.layout.title.subtitle = {"text": slice_caption(), "font": {"color": "#5F6B7A", "size": style().font_size}}
    st.session_state.setdefault(_FIGURES, []).append((name, fig))
    st.plotly_chart(fig, theme=None, config=style().image_config(stem, st.session_state.get(_IMAGE_FORMAT, "png")))
    missing = export.unavailable()
    with st.popover("Download", icon=":material/download:"):
        _download("Download interactive HTML", lambda: export.standalone_html(fig), stem, "html", f"html:{name}")
        for fmt in export.IMAGE_FORMATS:
            _download(f"Download {fmt.upper()}", lambda f=fmt: export.render([fig], f)[0], stem, fmt,
                      f"{fmt}:{name}", missing)  # fmt: skip


def page_figures() -> list[tuple[str, go.Figure]]:
    """(name, figure) of every figure drawn so far in this script run."""
    return list(st.session_state.get(_FIGURES, []))


def slides_panel(run: Run) -> None:
    """Choose figures of this page and download them as PowerPoint slides (one per figure)."""
    figures = page_figures()
    if not figures:
        return
    titles = [f"{fig.layout.title.text}" for _, fig in figures]
    chosen = st.multiselect(
        "Figures", list(range(len(figures))), default=list(range(len(figures))), format_func=titles.__getitem__,
        key=f"slides:{page_name()}", help="One slide per figure, for the run and slice shown on this page.",
    )  # fmt: skip
    where = SlideSlice.current()

    def deck() -> bytes:
        caption = slide_caption(run, where)
        return export.slides([export.Slide(titles[i], figures[i][1], caption) for i in chosen])

    missing = export.unavailable() if chosen else "choose at least one figure"
    _download("Export slides (.pptx)", deck, file_stem("slides"), "pptx", f"slides-pptx:{page_name()}", missing)


TABLE_ROWS = 40  # most rows of a table shown as text (presentation mode)


def _readable(frame: pl.DataFrame) -> pl.DataFrame:
    """A table as text cells (which streamlit reads as markdown): floats to 4 significant
    digits, text escaped and on one line."""
    floats = [c for c, t in frame.schema.items() if t.is_float()]
    texts = [c for c, t in frame.schema.items() if t == pl.String]
    return frame.with_columns(
        *(pl.col(c).map_elements(lambda v: f"{v:.4g}", return_dtype=pl.String, skip_nulls=True) for c in floats),
        *(pl.col(c).map_elements(lambda v: escaped(v.replace("\n", " / ")), return_dtype=pl.String, skip_nulls=True)
          for c in texts),
    )


def show_table(
    frame: pl.DataFrame, name: str, column_config: dict | None = None, height: int | str = "auto",
    wrap: bool = False,
) -> None:
    """Draw a table with a CSV download of all its rows.

    ``wrap`` (and presentation mode) draws it as text that wraps and scales with the page
    (at most ``TABLE_ROWS`` rows); otherwise as a scrollable, sortable grid.
    """
    if wrap or presenting():
        st.table(_readable(frame.head(TABLE_ROWS)))
        if frame.height > TABLE_ROWS:
            st.caption(f"First {TABLE_ROWS} of {frame.height:,} rows; the CSV has all of them.")
    else:
        st.dataframe(frame, hide_index=True, column_config=column_config, height=height)
    st.download_button(
        "Download CSV",
        data=lambda: frame.write_csv(),
        file_name=f"{file_stem(name)}.csv",
        mime="text/csv",
        on_click="ignore",
        icon=":material/table:",
        key=f"csv:{name}",
    )
