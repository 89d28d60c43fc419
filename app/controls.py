"""Slice controls shared by several pages, each kept in the URL (see ``state.url_widget``)."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import state
from app.state import Run
from engine.store import ALL_TESTS, TestSelector

LEVELS = ("layer", "module", "tensor")
MEASURES = ("signed", "absolute", "share")
SUBSET_LABELS = {
    "all": "all test examples",
    "correct": "correctly predicted",
    "incorrect": "misclassified",
    "class": "one class",
    "example": "one example",
}
WINDOW_MULTIPLES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
TARGET_COLUMNS = 100  # default window: the smallest giving at most this many heatmap columns


def example_text(text: str | None, caption: str) -> None:
    """Show an example's rendering: monospace block for multi-line (digit) renderings."""
    if text and "\n" in text:
        st.code(text, language=None)
        st.caption(caption)
    else:
        st.markdown(f"`{text}` — {caption}" if text else caption)


def test_subset(run: Run) -> TestSelector:
    """Which test examples to aggregate over: all, correct, incorrect, one class or one example."""
    tests = _choose_tests(run)
    state.note_tests(tests, describe_tests(tests), test_token(tests))
    return tests


def test_token(tests: TestSelector) -> str:
    """The selected test examples in a file name."""
    if tests.kind == "class":
        return f"class{tests.value}"
    if tests.kind == "example":
        return f"test{tests.value}"
    return {"all": "all-tests", "correct": "correct"}.get(tests.kind, "misclassified")


def _choose_tests(run: Run) -> TestSelector:
    examples = run.examples("test")
    if examples.height == 0:
        return ALL_TESTS
    has_predictions = examples.get_column("correct").null_count() < examples.height
    has_labels = examples.get_column("label").null_count() < examples.height  # none with floating-point targets
    kinds = ["all", *(("correct", "incorrect") if has_predictions else ()), *(("class",) if has_labels else ()),
             "example"]
    kind = state.url_widget(
        "subset", state.choice(kinds), "all",
        lambda key: st.selectbox("Test examples", kinds, key=key, format_func=SUBSET_LABELS.__getitem__),
    )  # fmt: skip
    if kind == "class":
        classes = sorted(examples.get_column("label").unique().to_list())
        value = state.url_widget(
            "class", state.integer_choice(classes), classes[0],
            lambda key: st.selectbox("Class (label)", classes, key=key),
        )  # fmt: skip
        return TestSelector("class", value)
    if kind == "example":
        ids = examples.get_column("example")
        lo, hi = int(ids.min()), int(ids.max())
        value = state.url_widget(
            "example", state.integer(lo, hi), lo,
            lambda key: st.number_input("Test example id", min_value=lo, max_value=hi, step=1, key=key),
        )  # fmt: skip
        return TestSelector("example", int(value))
    return TestSelector(kind)


def describe_tests(tests: TestSelector) -> str:
    """The selected test examples in words."""
    if tests.kind == "class":
        return f"test examples of class {tests.value}"
    if tests.kind == "example":
        return f"test example #{tests.value}"
    return {"all": "all test examples", "correct": "correctly predicted test examples"}.get(
        tests.kind, "misclassified test examples"
    )


def describe_example(run: Run, tests: TestSelector) -> None:
    """For a single test example: its rendering, label and the final model's prediction (with
    floating-point targets, the rendering shows the target and the final output)."""
    if tests.kind != "example":
        return
    row = run.examples("test").filter(pl.col("example") == tests.value)
    if row.height == 0:
        st.warning(f"Test example {tests.value} is not in this run's test split.", icon="⚠️")
        return
    r = row.row(0, named=True)
    if r["label"] is None:
        example_text(r["text"], f"test #{r['example']}")
        return
    verdict = "" if r["correct"] is None else (" ✓ correct" if r["correct"] else " ✗ wrong")
    predicted = "—" if r["predicted"] is None else r["predicted"]
    example_text(r["text"], f"test #{r['example']} · label {r['label']} · predicted {predicted}{verdict}")


def step_range(run: Run, label: str = "Steps") -> tuple[int, int]:
    """A step interval ``[lo, hi)`` within ``0 … N`` (URL ``steps=lo-hi``)."""
    n = state.num_steps(run)
    if n < 2:
        steps = (0, max(n, 1))
    else:
        lo, hi = state.url_widget(
            "steps", state.interval(0, n), (0, n),
            lambda key: st.slider(label, min_value=0, max_value=n, key=key, help="Steps from ≤ step < to"),
        )  # fmt: skip
        steps = (lo, hi) if hi > lo else (lo, min(lo + 1, n))
    state.note_steps(steps)
    return steps


def steps_and_tests(run: Run, step_column, test_column) -> tuple[tuple[int, int], TestSelector]:
    """The step range and test subset shared by the slicing pages, drawn in the given columns."""
    with step_column:
        steps = step_range(run)
    with test_column:
        tests = test_subset(run)
    return steps, tests


def window_options(base: int, n: int) -> list[int]:
    """Window sizes offered: multiples of the stored window ``base`` up to the run length ``n``."""
    options = [base * m for m in WINDOW_MULTIPLES if base * m <= max(n, base)]
    return options or [base]


def default_window(options: list[int], span: int) -> int:
    """The smallest window that draws at most ``TARGET_COLUMNS`` columns over ``span`` steps."""
    for w in options:
        if span / w <= TARGET_COLUMNS:
            return w
    return options[-1]


def window_size(run: Run, base: int) -> int:
    """Width of the step windows the component view is summed into (URL ``window``)."""
    n = state.num_steps(run)
    options = window_options(base, n)
    window = state.url_widget(
        "window", state.integer_choice(options), default_window(options, n),
        lambda key: st.select_slider("Window (steps)", options=options, key=key,
                                     help="Stored windows are merged into windows of this many steps."),
    )  # fmt: skip
    state.note_slice(f"windows of {window} steps", f"w{window}")
    return window


def level(default: str = "layer") -> str:
    value = state.url_widget(
        "level", state.choice(LEVELS), default,
        lambda key: st.segmented_control("Level", LEVELS, required=True, key=key),
    )  # fmt: skip
    state.note_slice(f"per {value}", value)
    return value


def measure() -> str:
    value = state.url_widget(
        "measure", state.choice(MEASURES), "signed",
        lambda key: st.segmented_control(
            "Measure", MEASURES, required=True, key=key,
            help="signed influence; absolute influence; share of the total absolute influence in each window",
        ),
    )  # fmt: skip
    state.note_slice(f"{value} influence" if value != "share" else "share of |influence|", value)
    return value


def toggle(name: str, label: str, default: bool = False, help: str | None = None) -> bool:
    return state.url_widget(name, state.flag(), default, lambda key: st.toggle(label, key=key, help=help))
