"""The dashboard end to end in streamlit's AppTest: every page, URL round trips, bad input."""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import controls, state
from engine.errors import RunNotFoundError
from engine.store import ALL_TESTS, RunDB, TestSelector, write_run
from tests.fixtures_store import make_demo_bundle, synthetic_bundle

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
PAGES = ("overview", "components", "data", "reconstruction", "pruning", "compare")
TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def _close_connections():
    """Close the dashboard's cached database connections when the module is done."""
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> Path:
    """Two demo run databases (different seeds) in one directory."""
    directory = tmp_path_factory.mktemp("runs")
    write_run(directory / "demo.duckdb", make_demo_bundle())
    write_run(directory / "demo-seed1.duckdb", make_demo_bundle(seed=1))
    return directory


@pytest.fixture
def runs(demo_runs, monkeypatch) -> Path:
    monkeypatch.setenv(state.ENV_RUNS, str(demo_runs))
    return demo_runs


def app(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    at.query_params = dict(query or {})
    return at


def on_page(page: str, query: dict | None = None) -> AppTest:
    """Open ``page`` directly, as a browser does for ``/page?query``."""
    return app(query).switch_page(f"views/{page}.py").run()


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def array(value) -> list:
    """A figure array from the chart's JSON: plotly writes numpy arrays as base64 ``bdata``."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:  # written as "rows, cols"
            return flat.reshape([int(n) for n in str(value["shape"]).split(",")]).tolist()
        return flat.tolist()
    return list(value)


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def warnings(at: AppTest) -> str:
    return " ".join(w.value for w in at.warning)


# ── every page ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("page", "charts", "tables"),
    [("overview", 2, 2), ("components", 3, 1), ("data", 3, 1), ("reconstruction", 3, 2), ("pruning", 1, 1),
     ("compare", 2, 2)],
)  # fmt: skip
def test_every_page_renders_its_figures_and_downloads(runs, page, charts, tables):
    at = on_page(page)
    no_errors(at)
    assert titles(at)[0].startswith(page.capitalize()) or page == "compare"
    specs = figures(at)
    assert len(specs) == charts
    for spec in specs:  # titled figures with titled axes
        assert spec["layout"]["title"]["text"]
        axes = [v for k, v in spec["layout"].items() if k.startswith(("xaxis", "yaxis"))]
        assert any(axis.get("title", {}).get("text") for axis in axes)
    buttons = [b.proto for b in at.get("download_button")]
    for label in ("Download interactive HTML", "Download PNG", "Download SVG", "Download PDF"):
        assert sum(b.label == label for b in buttons) == charts, label
    assert sum(b.label == "Download CSV" for b in buttons) == tables
    assert sum(b.label == "Export slides (.pptx)" for b in buttons) == 1
    assert all(b.ignore_rerun for b in buttons)
    assert len(at.dataframe) + len(at.table) == tables
    configs = [json.loads(c.proto.config) for c in at.get("plotly_chart")]
    assert all(c["toImageButtonOptions"]["format"] == "png" for c in configs)
    assert all(c["toImageButtonOptions"]["filename"].startswith(f"demo-seed1-{page}-") for c in configs)
    # every figure says which run and slice it shows
    assert all(spec["layout"]["title"]["subtitle"]["text"].startswith("run demo-seed1") for spec in specs)


def test_app_opens_on_the_first_run_and_writes_the_view_to_the_url(runs):
    at = app().run()
    no_errors(at)
    assert at.selectbox(key="url:run").value == "demo-seed1"  # file names sort "demo-seed1" before "demo."
    assert titles(at) == [f"Overview · {state.escaped('demo-seed1')}"]
    assert at.query_params == {"run": "demo-seed1", "present": "0", "img": "png", "logx": "0"}


def test_run_selector_switches_runs_and_other_runs_directory(runs, tmp_path, monkeypatch):
    monkeypatch.setenv(state.ENV_ROOTS, str(tmp_path))
    at = app().run()
    at.selectbox(key="url:run").select("demo").run()
    no_errors(at)
    assert titles(at) == ["Overview · demo"]
    assert at.query_params["run"] == "demo"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_run(elsewhere / "zeta.duckdb", make_demo_bundle(seed=2))
    at.text_input(key="url:dir").input(str(elsewhere)).run()
    no_errors(at)
    assert titles(at) == ["Overview · zeta"]
    assert at.query_params["dir"] == str(elsewhere)


def test_runs_directory_from_command_line_argument_wins(tmp_path):
    assert state.default_runs_dir(["--runs", str(tmp_path)], {state.ENV_RUNS: "x"}) == tmp_path
    assert state.default_runs_dir([], {state.ENV_RUNS: str(tmp_path)}) == tmp_path
    assert state.default_runs_dir(["--server.port", "1"], {}) == state.SAMPLE_RUNS


def test_no_runs_found_is_a_friendly_message(tmp_path, monkeypatch):
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    at = app().run()
    no_errors(at)
    assert "No run databases" in at.info[0].value and str(tmp_path) in at.info[0].value
    missing = app({"dir": str(tmp_path / "nope")}).run()
    no_errors(missing)
    assert "is not a directory" in warnings(missing)


def test_app_without_configuration_opens_the_grokking_sample(monkeypatch):
    monkeypatch.delenv(state.ENV_RUNS, raising=False)
    at = app().run()
    no_errors(at)
    assert titles(at) == ["Overview · grokking"]


def test_a_directory_without_grokking_opens_its_first_run(tmp_path, monkeypatch):
    for name in ("b-run", "a-run"):
        shutil.copy(state.SAMPLE_RUNS / "digits.duckdb", tmp_path / f"{name}.duckdb")
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    at = app().run()
    no_errors(at)
    assert titles(at) == [f"Overview · {state.escaped('a-run')}"]


def test_foreign_and_broken_files_show_the_store_message(tmp_path, monkeypatch):
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    (tmp_path / "a-notes.duckdb").write_text("these are my notes, not a database")
    con = duckdb.connect(str(tmp_path / "b-foreign.duckdb"))
    con.execute("CREATE TABLE sales (id INTEGER)")
    con.close()
    at = app().run()
    assert not at.exception
    assert "not a DuckDB file" in at.error[0].value and "a-notes" in at.error[0].value
    at.selectbox(key="url:run").select("b-foreign").run()
    assert not at.exception
    assert "not an ExPLAIND run database" in at.error[0].value
    for page in PAGES[1:]:
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception and at.error


# ── URL round trips ─────────────────────────────────────────────────────────────────


def test_components_controls_round_trip_through_the_url(runs):
    at = on_page("components", {"run": "demo"})
    no_errors(at)
    before = figures(at)[0]["data"][0]["y"]
    assert before == ["embed", "attn", "mlp", "unembed"]
    at.segmented_control(key="url:level").set_value("module").run()
    at.segmented_control(key="url:measure").set_value("share").run()
    at.select_slider(key="url:window").set_value(10).run()
    at.slider(key="url:steps").set_value((10, 40)).run()
    at.selectbox(key="url:subset").select("class").run()
    at.selectbox(key="url:class").select(3).run()
    no_errors(at)
    heat = figures(at)[0]["data"][0]
    assert heat["y"] == ["embed", "pos_embed", "blocks.0.attn", "blocks.0.mlp", "unembed"]
    assert len(array(heat["x"])) == 3 and heat["zmax"] == 1  # windows 10-19, 20-29, 30-39; share scale
    query = dict(at.query_params)
    assert {k: query[k] for k in ("level", "measure", "window", "steps", "subset", "class")} == {
        "level": "module", "measure": "share", "window": "10", "steps": "10-40", "subset": "class", "class": "3"
    }
    again = on_page("components", query)
    no_errors(again)
    assert not again.warning
    assert again.segmented_control(key="url:level").value == "module"
    assert again.slider(key="url:steps").value == (10, 40)
    assert again.selectbox(key="url:class").value == 3
    assert array(figures(again)[0]["data"][0]["z"]) == array(heat["z"])


def test_a_copied_link_reopens_the_page_view(runs):
    query = {"run": "demo", "steps": "0-20", "subset": "example", "example": "4", "k": "3", "train": "2"}
    at = on_page("data", query)
    no_errors(at)
    assert not at.warning
    assert at.number_input(key="url:example").value == 4
    assert at.number_input(key="url:k").value == 3
    top = figures(at)[0]["data"][0]
    assert len(array(top["x"])) <= 6
    db = RunDB.open(runs / "demo.duckdb")
    expected = db.top_train_examples(TestSelector("example", 4), (0, 20), 3)
    db.close()
    assert sorted(array(top["x"])) == pytest.approx(sorted(expected["value"].to_list()))
    assert figures(at)[1]["layout"]["title"]["text"] == "Influence of training example #2 over time"


def test_switching_pages_keeps_the_shared_slice_and_drops_other_parameters(runs):
    at = on_page("components")
    at.slider(key="url:steps").set_value((5, 30)).run()
    at.switch_page("views/reconstruction.py").run()
    no_errors(at)
    assert at.slider(key="url:steps").value == (5, 30)
    params = set(at.query_params)
    assert "steps" in params and "level" not in params and "window" not in params
    completeness = array(figures(at)[0]["data"][0]["x"])
    assert completeness[0] == 5 and completeness[-1] == 29


def test_overview_log_axis_and_presentation_mode_via_url(runs):
    at = app({"logx": "1", "present": "1", "img": "svg"}).run()
    no_errors(at)
    spec = figures(at)[0]
    assert spec["layout"]["xaxis"]["type"] == "log"
    assert spec["layout"]["font"]["size"] == 20
    config = json.loads(at.get("plotly_chart")[0].proto.config)
    assert config["toImageButtonOptions"]["format"] == "svg" and config["toImageButtonOptions"]["scale"] == 3
    assert not at.caption  # hints are hidden while presenting
    assert any("font-size: 22px" in h.proto.body for h in at.get("html"))
    at.toggle(key="url:present").set_value(False).run()
    assert figures(at)[0]["layout"]["font"]["size"] == 13 and at.caption


# ── invalid parameters ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("page", "query", "invalid"),
    [
        ("overview", {"run": "does-not-exist", "logx": "maybe", "present": "2"}, ["run", "logx", "present"]),
        ("components", {"level": "atoms", "window": "abc", "steps": "30-10", "measure": ""},
         ["level", "window", "steps", "measure"]),
        ("components", {"window": "7", "subset": "class", "class": "99"}, ["window", "class"]),
        ("data", {"subset": "example", "example": "1e9", "k": "-3", "train": "x"}, ["example", "k", "train"]),
        ("reconstruction", {"steps": "0-999999", "subset": "everything"}, ["steps", "subset"]),
        ("pruning", {"scope": "<script>alert(1)</script>"}, ["scope"]),
        ("compare", {"other": "../../etc/passwd", "level": "1"}, ["other", "level"]),
    ],
)  # fmt: skip
def test_invalid_parameters_warn_and_fall_back_to_defaults(runs, page, query, invalid):
    at = on_page(page, query)
    no_errors(at)
    text = warnings(at)
    for name in invalid:
        assert f"{state.inert(f'{name}={query[name]}')} was ignored" in text
        assert at.query_params[name] != query[name]  # the URL now holds the default
    assert len(at.warning) == len(invalid)
    assert figures(at)  # the page still draws


def test_defaults_replace_invalid_values(runs):
    at = on_page("components", {"level": "atoms", "steps": "30-10"})
    assert at.segmented_control(key="url:level").value == "layer"
    assert at.slider(key="url:steps").value == (0, 40)


# ── optional views ──────────────────────────────────────────────────────────────────


@pytest.fixture
def bare_run(tmp_path, monkeypatch) -> Path:
    """A run without data view, pruning curves or exactness table, and without predictions."""
    bundle = synthetic_bundle(with_data=False, marker="bare", task="modular-addition")
    examples = bundle.examples.with_columns(predicted=pl.lit(None, pl.Int64), correct=pl.lit(None, pl.Boolean))
    bare = type(bundle)(**{**bundle.__dict__, "pruning": None, "exactness": None, "examples": examples})
    write_run(tmp_path / "bare.duckdb", bare)
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    return tmp_path


def test_missing_views_are_explained_not_failed(bare_run):
    at = app().run()
    no_errors(at)
    for page, message in (
        ("data", "no data view"),
        ("pruning", "no pruning curves"),
        ("reconstruction", "no exactness table"),
        ("compare", "only one run"),
    ):
        at.switch_page(f"views/{page}.py").run()
        no_errors(at)
        assert any(message in i.value for i in at.info), page
    at.switch_page("views/components.py").run()
    assert at.selectbox(key="url:subset").options == ["all test examples", "one class", "one example"]


def test_a_checkpoint_series_renders_and_says_it_has_no_data_axis(tmp_path, monkeypatch):
    """A series run: one steps row per checkpoint (no learning rate, no update after the last one),
    no data view, no importance; every page draws and the Data page says how to get a data axis."""
    bundle = synthetic_bundle(with_data=False, with_importance=False, marker="series")
    checkpoints = bundle.steps.filter(pl.col("step") % 5 == 0).with_columns(
        lr=pl.lit(None, pl.Float64), weight_decay=pl.lit(None, pl.Float64), train_loss=pl.lit(None, pl.Float64),
        update_norm=pl.when(pl.col("step") < pl.col("step").max()).then(pl.col("update_norm")))
    examples = bundle.examples.filter(pl.col("split") == "test").with_columns(
        predicted=pl.lit(None, pl.Int64), correct=pl.lit(None, pl.Boolean))
    series = type(bundle)(**{**bundle.__dict__, "steps": checkpoints, "examples": examples, "pruning": None,
                             "meta": {**bundle.meta, "kind": "checkpoints"}})
    write_run(tmp_path / "series.duckdb", series)
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    for page in ("overview", "components", "reconstruction"):
        at = on_page(page)
        no_errors(at)
        assert figures(at), page
    at = on_page("data")
    no_errors(at)
    assert any("series of checkpoints" in i.value and "Recorder" in i.value for i in at.info)


def test_component_totals_table_matches_the_store(runs):
    at = on_page("components", {"run": "demo", "level": "layer"})
    shown = at.dataframe[0].value
    db = RunDB.open(runs / "demo.duckdb")
    expected = db.component_totals("layer", (0, 40), ALL_TESTS)
    db.close()
    assert list(shown["group"]) == expected["group"].to_list()
    assert list(shown["value"]) == pytest.approx(expected["value"].to_list())


# ── pure helpers behind the controls ────────────────────────────────────────────────


def test_codecs_round_trip_and_explain_rejections():
    assert state.interval(0, 40).parse("5-30") == (5, 30) and state.interval(0, 40).fmt((5, 30)) == "5-30"
    for raw, reason in (("30-5", "0 ≤ START < END ≤ 40"), ("5", "START-END"), ("a-b", "START-END"), ("0-41", "≤ 40")):
        with pytest.raises(ValueError, match=reason):
            state.interval(0, 40).parse(raw)
    assert state.flag().parse("TRUE") is True and state.flag().parse("0") is False and state.flag().fmt(True) == "1"
    with pytest.raises(ValueError, match="not 1 or 0"):
        state.flag().parse("maybe")
    assert state.integer(-1, 9).parse("-1") == -1
    with pytest.raises(ValueError, match="outside -1…9"):
        state.integer(-1, 9).parse("10")
    with pytest.raises(ValueError, match="not a whole number"):
        state.integer_choice([1, 2]).parse("1.5")
    with pytest.raises(ValueError, match="not one of layer, module"):
        state.choice(["layer", "module"]).parse("Layer")


def test_window_options_are_multiples_of_the_stored_window():
    assert controls.window_options(5, 40) == [5, 10, 25]
    assert controls.window_options(8, 4000) == [8, 16, 40, 80, 160, 400, 800, 1600, 4000]
    assert controls.window_options(50, 20) == [50]  # a run shorter than one stored window
    assert controls.default_window([8, 16, 40, 80], 4000) == 40  # at most 100 heatmap columns
    assert controls.default_window([5, 10], 10_000) == 10


def test_a_run_file_removed_after_listing_is_reported(tmp_path):
    gone = state.Run.at(tmp_path / "gone.duckdb")
    assert gone.mtime_ns == 0 and gone.name == "gone"
    with pytest.raises(RunNotFoundError, match="does not exist"):
        gone.open()


# ── values from outside ─────────────────────────────────────────────────────────────

HOSTILE = [
    "`**bold**` [click](https://evil.example)", "``x``` `", "<img src=x onerror=alert(1)>", "\u202egnp.exe\u200b",
    ":red[x] :material/home: $x^2$ www.evil.example", "a\n# heading", "x" * 5000, "",
]  # fmt: skip


@pytest.mark.parametrize("raw", HOSTILE)
def test_inert_values_are_one_code_span_of_visible_characters(raw):
    shown = state.inert(raw)
    fence = re.match("`+", shown).group()
    body = shown[len(fence) : -len(fence)]
    assert shown.endswith(fence) and f"`{fence}" not in body and f"{fence}`" not in body.strip()
    assert fence not in body  # the fence cannot close early: no equally long backtick run inside
    assert not re.search("[\u0000-\u001f\u200b-\u200f\u202a-\u202e\u2066-\u2069]", body)
    assert len(body) <= state.SHOWN_CHARS + 2
    visible = re.sub(r"U\+([0-9A-F]{4})", lambda m: chr(int(m.group(1), 16)), body.strip())
    assert visible == (raw[: state.SHOWN_CHARS - 1] + "…" if len(raw) > state.SHOWN_CHARS else raw) or raw == ""


def test_escaped_names_have_no_active_markdown():
    assert state.escaped("a-run_[x](y)") == r"a\-run\_\[x\]\(y\)"


def test_dir_accepts_only_directories_under_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = [root.resolve()]
    assert state.check_directory(str(root / "sub"), roots) == (root / "sub").resolve()
    for raw in (str(outside), str(root / "sub" / ".." / ".." / "outside"), str(root / "escape"), "/etc"):
        with pytest.raises(ValueError, match="started with"):
            state.check_directory(raw, roots)
    with pytest.raises(ValueError, match="not a directory"):
        state.check_directory(str(root / "missing"), roots)
    env = {state.ENV_ROOTS: f"{outside}{os.pathsep}"}
    assert state.allowed_roots(["--runs", str(root), "--root", "/srv"], env) == [
        root.resolve(), Path("/srv").resolve(), outside.resolve()]  # fmt: skip


def test_a_link_to_a_directory_outside_the_roots_is_refused(runs):
    at = app({"dir": "/etc"}).run()
    no_errors(at)
    assert "only directories under the ones it was started with" in warnings(at)
    assert titles(at) == [f"Overview · {state.escaped('demo-seed1')}"]  # the launch directory's runs


# ── compare ─────────────────────────────────────────────────────────────────────────


def test_compare_defaults_to_a_run_of_the_same_task(tmp_path, monkeypatch):
    write_run(tmp_path / "a-grok.duckdb", make_demo_bundle())
    shutil.copy(state.SAMPLE_RUNS / "digits.duckdb", tmp_path / "b-digits.duckdb")
    write_run(tmp_path / "c-grok.duckdb", make_demo_bundle(seed=1))
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    at = on_page("compare", {"run": "a-grok"})
    no_errors(at)
    assert at.selectbox(key="url:other").value == "c-grok"  # not the first file, the first of the same task
    assert at.selectbox(key="url:other").options[1].startswith("c-grok")
    assert not at.warning
    at.selectbox(key="url:other").select("b-digits").run()
    no_errors(at)
    assert "share no layer" in warnings(at) and state.escaped("digits-cnn") in warnings(at)


def test_compare_asks_when_no_run_has_the_same_task(tmp_path, monkeypatch):
    write_run(tmp_path / "a-grok.duckdb", make_demo_bundle())
    shutil.copy(state.SAMPLE_RUNS / "digits.duckdb", tmp_path / "b-digits.duckdb")
    monkeypatch.setenv(state.ENV_RUNS, str(tmp_path))
    at = on_page("compare", {"run": "a-grok"})
    no_errors(at)
    assert at.selectbox(key="url:other").value == ""
    assert "No other run here is of the task" in at.info[0].value and not figures(at)
