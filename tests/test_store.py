"""The run database: round trip, every read query against hand-computed and independent
polars results, schema refusal, bad input, atomic publish and concurrent readers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from engine.errors import (
    BadInputError,
    RunNotFoundError,
    StoreCorruptError,
    StoreError,
    StoreNameError,
    StoreSchemaError,
)
from engine.store import (
    REQUIRED_TABLES,
    SCHEMA_VERSION,
    VIEW_TABLES,
    RunBundle,
    RunDB,
    TestSelector,
    add_pruning,
    info,
    list_runs,
    run_path,
    validate_run_name,
    write_run,
)
from tests.fixtures_store import make_demo_bundle, synthetic_bundle

ALL = TestSelector("all")

# ── a hand-made run whose every aggregate is worked out by hand below ───────────────────────
#
# tensors a.w, a.b (module a, layer L1) and c.w (module c, layer L2); component windows
# [0, 2) and [2, 4); test 0 (label 0, predicted right) and test 1 (label 1, predicted wrong).
COMPONENTS = {  # (step_lo, tensor): (value for test 0, value for test 1); decay = value / 10
    (0, "a.w"): (1.0, -2.0), (0, "a.b"): (-3.0, 1.0), (0, "c.w"): (2.0, 4.0),
    (2, "a.w"): (0.5, 1.0), (2, "a.b"): (0.5, -1.0), (2, "c.w"): (-1.0, 2.0),
}  # fmt: skip
DATA = {  # (step_lo, train): (value for test 0, value for test 1); train 0 is not in window [2, 4)
    (0, 0): (2.0, -1.0), (0, 1): (-3.0, 0.5), (0, -1): (0.25, 0.25),
    (2, 1): (1.0, 1.0), (2, -1): (-0.5, 0.0),
}  # fmt: skip
COMPLETENESS = {  # (step, test): (reconstructed, quadrature residual, optimizer residual, nodes)
    (0, 0): (1.0, 0.01, 0.001, 2), (0, 1): (2.0, -0.02, None, 3),
    (1, 0): (-1.0, 0.0, 0.0, 2), (1, 1): (0.5, 0.01, None, 2),
    (2, 0): (0.5, -0.01, 0.0, 4), (2, 1): (1.0, 0.0, None, 2),
    (3, 0): (0.5, 0.02, 0.001, 2), (3, 1): (-2.0, 0.03, None, 5),
}  # fmt: skip


def hand_bundle(marker: str = "hand") -> RunBundle:
    comp = [(lo, lo + 2, tensor, test, 0, v, v / 10)
            for (lo, tensor), values in COMPONENTS.items() for test, v in enumerate(values)]
    data = [(lo, lo + 2, train, test, 0, v) for (lo, train), values in DATA.items() for test, v in enumerate(values)]
    done = [(s, t, 0, r + e, r, e, o, n) for (s, t), (r, e, o, n) in COMPLETENESS.items()]
    return RunBundle(
        meta={"task": "hand", "steps": 4, "quantity": "logprob", "quadrature": "gauss:2", "marker": marker,
              "data_fingerprint": "abc", "model_summary": {"parameters": 7, "tensors": 3},
              "optimizer": {"class": "SGD", "family": "sgd", "groups": [{"lr": 0.1}]}},
        steps=pl.DataFrame({"step": [0, 1, 2, 3], "lr": [0.1] * 4, "weight_decay": [0.0] * 4,
                            "train_loss": [1.0, 0.8, None, 0.5], "val_loss": [1.1, 0.9, 0.8, 0.7],
                            "train_acc": [0.5, 0.6, 0.9, None], "val_acc": [0.4, 0.5, 0.5, 0.5],
                            "update_norm": [0.1] * 4, "param_norm": [1.0] * 4,
                            "loss_change": [-0.2, None, None, None]}),
        groups=pl.DataFrame({"tensor": ["a.w", "a.b", "c.w"], "module": ["a", "a", "c"], "layer": ["L1", "L1", "L2"],
                             "size": [4, 2, 1], "position": [0, 1, 2]}),
        examples=pl.DataFrame({"split": ["train", "train", "test", "test"], "example": [0, 1, 0, 1],
                               "label": [0, 1, 0, 1], "text": ["zero", "one", "test zero", "test one"],
                               "predicted": [None, None, 0, 0], "correct": [None, None, True, False]}),
        components=pl.DataFrame(comp, schema=["step_lo", "step_hi", "tensor", "test", "output", "value", "decay"],
                                orient="row"),
        data=pl.DataFrame(data, schema=["step_lo", "step_hi", "train", "test", "output", "value"], orient="row"),
        importance=pl.DataFrame({"tensor": ["c.w", "a.w", "a.w"], "index": [0, 1, 0], "importance": [3.0, 2.0, 1.0],
                                 "gradient": [4.0, 2.5, 1.5], "decay": [1.0, 0.5, 0.5], "balance": [3.0, 2.0, 1.0],
                                 "taylor": [0.7, None, 0.9], "magnitude": [0.3, 0.2, 0.1]}),
        completeness=pl.DataFrame(done, schema={"step": pl.Int64, "test": pl.Int64, "output": pl.Int64,
                                                "true_change": pl.Float64, "reconstructed": pl.Float64,
                                                "quadrature_residual": pl.Float64, "optimizer_residual": pl.Float64,
                                                "nodes": pl.Int32}, orient="row"),
        predictions=None,
        exactness=pl.DataFrame({"quadrature": ["gauss:2"], "agreement": [1.0], "kl": [0.0],
                                "gradient_evaluations": [8], "max_rel_residual": [0.02]}),
        pruning=None,
    )


@pytest.fixture(scope="module")
def hand_db(tmp_path_factory):
    path = write_run(tmp_path_factory.mktemp("hand") / "hand.duckdb", hand_bundle())
    with RunDB.open(path) as db:
        yield db


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    bundle = make_demo_bundle()
    path = write_run(tmp_path_factory.mktemp("demo") / "demo.duckdb", bundle)
    with RunDB.open(path) as db:
        yield bundle, db


def rows(frame: pl.DataFrame) -> list[tuple]:
    return [tuple(pytest.approx(v) if isinstance(v, float) else v for v in row) for row in frame.rows()]


# ── hand-computed expectations ─────────────────────────────────────────────────────────────


def test_component_matrix_by_hand(hand_db):
    # layer L1 = a.w + a.b. Window [0,2): test 0 → 1-3 = -2, test 1 → -2+1 = -1; window [2,4): 1.0 and 0.0.
    # layer L2 = c.w: [0,2): 2 and 4; [2,4): -1 and 2.
    assert rows(hand_db.component_matrix("layer")) == [
        (0, 2, "L1", -3.0, -0.3), (0, 2, "L2", 6.0, 0.6), (2, 4, "L1", 1.0, 0.1), (2, 4, "L2", 1.0, 0.1)]
    assert rows(hand_db.component_matrix("layer", measure="absolute")) == [
        (0, 2, "L1", 3.0, 0.3), (0, 2, "L2", 6.0, 0.6), (2, 4, "L1", 1.0, 0.1), (2, 4, "L2", 3.0, 0.3)]
    assert rows(hand_db.component_matrix("layer", measure="share")) == [
        (0, 2, "L1", 3 / 9, 0.3 / 9), (0, 2, "L2", 6 / 9, 0.6 / 9), (2, 4, "L1", 1 / 4, 0.1 / 4),
        (2, 4, "L2", 3 / 4, 0.3 / 4)]
    # one window of 4 steps: absolute adds the stored windows' absolutes (3+1, 6+3)
    assert rows(hand_db.component_matrix("module", window=4)) == [(0, 4, "a", -2.0, -0.2), (0, 4, "c", 7.0, 0.7)]
    assert rows(hand_db.component_matrix("module", window=4, measure="share")) == [
        (0, 4, "a", 4 / 13, 0.4 / 13), (0, 4, "c", 9 / 13, 0.9 / 13)]
    assert rows(hand_db.component_matrix("tensor", steps=(2, 4), measure="absolute")) == [
        (2, 4, "a.w", 1.5, 0.15), (2, 4, "a.b", 1.5, 0.15), (2, 4, "c.w", 3.0, 0.3)]


@pytest.mark.parametrize("tests", [TestSelector("correct"), TestSelector("class", 0), TestSelector("example", 0)])
def test_component_matrix_of_test_zero_by_hand(hand_db, tests):
    assert rows(hand_db.component_matrix("layer", tests=tests, measure="absolute")) == [
        (0, 2, "L1", 2.0, 0.2), (0, 2, "L2", 2.0, 0.2), (2, 4, "L1", 1.0, 0.1), (2, 4, "L2", 1.0, 0.1)]
    assert rows(hand_db.component_matrix("tensor", window=2, tests=tests)) == [
        (0, 2, "a.w", 1.0, 0.1), (0, 2, "a.b", -3.0, -0.3), (0, 2, "c.w", 2.0, 0.2),
        (2, 4, "a.w", 0.5, 0.05), (2, 4, "a.b", 0.5, 0.05), (2, 4, "c.w", -1.0, -0.1)]


def test_component_totals_by_hand(hand_db):
    assert rows(hand_db.component_totals("layer")) == [("L1", -2.0, -0.2, 4.0, 4 / 13), ("L2", 7.0, 0.7, 9.0, 9 / 13)]
    assert rows(hand_db.component_totals("tensor", steps=(0, 2), tests=TestSelector("incorrect"))) == [
        ("a.w", -2.0, -0.2, 2.0, 2 / 7), ("a.b", 1.0, 0.1, 1.0, 1 / 7), ("c.w", 4.0, 0.4, 4.0, 4 / 7)]


def test_data_queries_by_hand(hand_db):
    # totals over both tests: train 0 = 2-1 = 1; train 1 = -3+0.5+1+1 = -0.5; regularizer left out
    assert rows(hand_db.top_train_examples(ALL)) == [
        (0, 1.0, 0, "zero", 1, "proponent"), (1, -0.5, 1, "one", 1, "opponent")]
    assert rows(hand_db.top_train_examples(TestSelector("correct"), k=1)) == [
        (0, 2.0, 0, "zero", 1, "proponent"), (1, -2.0, 1, "one", 1, "opponent")]
    assert rows(hand_db.top_train_examples(ALL, steps=(2, 4))) == [(1, 2.0, 1, "one", 1, "proponent")]
    assert rows(hand_db.data_distribution(ALL)) == [(0, 1.0), (1, -0.5)]
    assert rows(hand_db.data_distribution(TestSelector("example", 1), steps=(0, 2))) == [(0, -1.0), (1, 0.5)]
    # train 0 had no rows in window [2, 4): it reads as zero there
    assert rows(hand_db.train_example_over_time(0, ALL)) == [(0, 2, 1.0), (2, 4, 0.0)]
    assert rows(hand_db.train_example_over_time(1, TestSelector("class", 1))) == [(0, 2, 0.5), (2, 4, 1.0)]
    assert rows(hand_db.train_example_over_time(-1, ALL)) == [(0, 2, 0.5), (2, 4, -0.5)]
    assert rows(hand_db.windows("data")) == [(0, 2), (2, 4)]


def test_completeness_by_hand(hand_db):
    frame = hand_db.completeness()
    assert frame.columns == ["step", "true_change", "reconstructed", "quadrature_residual", "optimizer_residual",
                             "nodes", "abs_residual"]
    assert rows(frame)[0] == (0, 2.99, 3.0, -0.01, 0.001, 3, 0.03)
    assert rows(hand_db.completeness(steps=(3, 4), tests=TestSelector("incorrect"))) == [
        (3, -1.97, -2.0, 0.03, None, 5, 0.03)]
    assert rows(hand_db.completeness(steps=(1, 3), tests=TestSelector("example", 0))) == [
        (1, -1.0, -1.0, 0.0, 0.0, 2, 0.0), (2, 0.49, 0.5, -0.01, 0.0, 4, 0.01)]


def test_info_by_hand(hand_db):
    summary = info(hand_db.path)
    assert json.loads(json.dumps(summary)) == summary
    # Σ residual: test 0 → 0.02 over Σ true change 1.02; test 1 → 0.02 over 1.52
    assert summary["max_abs_residual"] == pytest.approx(0.02)
    assert summary["max_rel_residual"] == pytest.approx(0.02 / 1.02)
    assert summary["final_train_acc"] == 0.9 and summary["final_val_acc"] == 0.5
    assert summary["views"] == {"components": 12, "data": 10, "importance": 3, "completeness": 8, "predictions": 0,
                                "exactness": 1, "pruning": 0}
    assert summary["views_present"] == ["components", "data", "importance", "completeness", "exactness"]
    assert (summary["task"], summary["steps"], summary["quantity"], summary["quadrature"]) == (
        "hand", 4, "logprob", "gauss:2")
    assert summary["schema_version"] == SCHEMA_VERSION


def test_small_tables_by_hand(hand_db):
    assert rows(hand_db.groups()) == [("a.w", "a", "L1", 4, 0), ("a.b", "a", "L1", 2, 1), ("c.w", "c", "L2", 1, 2)]
    assert rows(hand_db.importance()) == [("a.w", 0, 1.0, 1.5, 0.5, 1.0, 0.9, 0.1),
                                         ("a.w", 1, 2.0, 2.5, 0.5, 2.0, None, 0.2),
                                         ("c.w", 0, 3.0, 4.0, 1.0, 3.0, 0.7, 0.3)]
    assert rows(hand_db.importance("c.w")) == [("c.w", 0, 3.0, 4.0, 1.0, 3.0, 0.7, 0.3)]
    assert hand_db.predictions().is_empty() and hand_db.pruning().is_empty()
    meta = hand_db.run_meta()
    assert (meta.task, meta.steps, meta.quantity, meta.quadrature, meta.data_fingerprint) == (
        "hand", 4, "logprob", "gauss:2", "abc")
    assert meta.optimizer["family"] == "sgd" and meta.model_summary == {"parameters": 7, "tensors": 3}
    assert hand_db.meta()["marker"] == "hand" and hand_db.meta()["schema_version"] == SCHEMA_VERSION


# ── the demo run against independent polars computations ──────────────────────────────────

LEVEL_COLUMN = {"tensor": "tensor", "module": "module", "layer": "layer"}


def selected_tests(bundle: RunBundle, tests: TestSelector) -> list[int]:
    ex = bundle.examples.filter(pl.col("split") == "test")
    if tests.kind in ("class", "example"):
        column = "label" if tests.kind == "class" else "example"
        return ex.filter(pl.col(column) == tests.value)["example"].to_list()
    condition = {"all": pl.lit(True), "correct": pl.col("correct"), "incorrect": ~pl.col("correct")}[tests.kind]
    return ex.filter(condition.fill_null(False))["example"].to_list()


def in_steps(column: str, steps: tuple[int, int] | None) -> pl.Expr:
    return pl.lit(True) if steps is None else (pl.col(column) >= steps[0]) & (pl.col(column) < steps[1])


def expected_cells(bundle, level, steps, tests) -> pl.DataFrame:
    comp = bundle.components.join(bundle.groups, on="tensor").filter(
        pl.col("test").is_in(selected_tests(bundle, tests)) & in_steps("step_lo", steps))
    return comp.group_by(["step_lo", LEVEL_COLUMN[level], "test", "output"]).agg(
        pl.col("step_hi").max(), pl.col("value").sum(), pl.col("decay").sum()).rename({LEVEL_COLUMN[level]: "group"})


def expected_matrix(bundle, level, window, steps, tests, measure) -> pl.DataFrame:
    cells = expected_cells(bundle, level, steps, tests).with_columns(
        win=pl.col("step_lo") if window is None else pl.col("step_lo") // window)
    agg = cells.group_by(["win", "group"]).agg(
        pl.col("value").sum(), pl.col("decay").sum(), pl.col("value").abs().sum().alias("abs_value"),
        pl.col("decay").abs().sum().alias("abs_decay"))
    spans = cells.group_by("win").agg(pl.col("step_lo").min(), pl.col("step_hi").max())
    agg = agg.join(spans, on="win").with_columns(total=pl.col("abs_value").sum().over("win"))
    value, decay = {
        "signed": (pl.col("value"), pl.col("decay")),
        "absolute": (pl.col("abs_value"), pl.col("abs_decay")),
        "share": (pl.col("abs_value") / pl.col("total"), pl.col("abs_decay") / pl.col("total")),
    }[measure]
    return agg.select("step_lo", "step_hi", "group", value.alias("value"), decay.alias("decay")).sort(
        "step_lo", "group")


SELECTORS = [TestSelector("all"), TestSelector("correct"), TestSelector("incorrect"), TestSelector("class", 2),
             TestSelector("example", 3)]


@pytest.mark.parametrize("tests", SELECTORS, ids=lambda t: f"{t.kind}{t.value or ''}")
@pytest.mark.parametrize("level", ["tensor", "module", "layer"])
def test_component_matrix_matches_polars(demo, level, tests):
    bundle, db = demo
    for window, steps, measure in [(None, None, "signed"), (10, None, "absolute"), (15, (5, 35), "share"),
                                   (3, (10, 40), "signed")]:
        got = db.component_matrix(level, window=window, steps=steps, tests=tests, measure=measure)
        want = expected_matrix(bundle, level, window, steps, tests, measure)
        assert_frame_equal(got.sort("step_lo", "group"), want, check_dtypes=False)
        assert got["step_lo"].dtype == pl.Int64 and got["value"].dtype == pl.Float64


@pytest.mark.parametrize("tests", SELECTORS, ids=lambda t: f"{t.kind}{t.value or ''}")
def test_component_totals_match_polars(demo, tests):
    bundle, db = demo
    for level, steps in [("layer", None), ("tensor", (10, 30)), ("module", None)]:
        cells = expected_cells(bundle, level, steps, tests)
        want = cells.group_by("group").agg(pl.col("value").sum(), pl.col("decay").sum(),
                                           pl.col("value").abs().sum().alias("absolute"))
        want = want.with_columns(share=pl.col("absolute") / pl.col("absolute").sum()).sort("group")
        got = db.component_totals(level, steps=steps, tests=tests)
        assert_frame_equal(got.sort("group"), want, check_dtypes=False)
        # model order, as in groups
        order = bundle.groups.group_by(LEVEL_COLUMN[level]).agg(pl.col("position").min()).sort("position")
        assert got["group"].to_list() == order[LEVEL_COLUMN[level]].to_list()


def expected_data_totals(bundle, steps, tests) -> pl.DataFrame:
    data = bundle.data.filter(pl.col("test").is_in(selected_tests(bundle, tests)) & in_steps("step_lo", steps))
    return data.filter(pl.col("train") >= 0).group_by("train").agg(pl.col("value").sum()).sort("train")


@pytest.mark.parametrize("tests", SELECTORS, ids=lambda t: f"{t.kind}{t.value or ''}")
def test_data_queries_match_polars(demo, tests):
    bundle, db = demo
    for steps in (None, (10, 30)):
        totals = expected_data_totals(bundle, steps, tests)
        assert_frame_equal(db.data_distribution(tests, steps), totals, check_dtypes=False)
        top = db.top_train_examples(tests, steps, k=4)
        train = bundle.examples.filter(pl.col("split") == "train").select("example", "label", "text")
        pro = totals.filter(pl.col("value") > 0).sort(["value", "train"], descending=[True, False]).head(4)
        con = totals.filter(pl.col("value") < 0).sort(["value", "train"]).head(4)
        want = pl.concat([
            pro.with_columns(rank=pl.int_range(1, pl.len() + 1), side=pl.lit("proponent")),
            con.with_columns(rank=pl.int_range(1, pl.len() + 1), side=pl.lit("opponent")),
        ]).join(train, left_on="train", right_on="example", how="left").select(
            "train", "value", "label", "text", "rank", "side")
        assert_frame_equal(top, want, check_dtypes=False)
    for train in (0, 7, -1):
        data = bundle.data.filter(pl.col("test").is_in(selected_tests(bundle, tests)) & (pl.col("train") == train))
        want = data.group_by("step_lo", "step_hi").agg(pl.col("value").sum()).sort("step_lo")
        assert_frame_equal(db.train_example_over_time(train, tests), want, check_dtypes=False)


@pytest.mark.parametrize("tests", SELECTORS, ids=lambda t: f"{t.kind}{t.value or ''}")
def test_completeness_matches_polars(demo, tests):
    bundle, db = demo
    for steps in (None, (7, 23)):
        done = bundle.completeness.filter(pl.col("test").is_in(selected_tests(bundle, tests)) & in_steps("step", steps))
        want = done.group_by("step").agg(
            pl.col("true_change").sum(), pl.col("reconstructed").sum(), pl.col("quadrature_residual").sum(),
            pl.col("optimizer_residual").sum(), pl.col("nodes").max(),
            pl.col("quadrature_residual").abs().sum().alias("abs_residual")).sort("step")
        assert_frame_equal(db.completeness(steps, tests), want, check_dtypes=False)


def test_round_trip_of_plain_tables(demo):
    bundle, db = demo
    assert_frame_equal(db.steps(), bundle.steps, check_dtypes=False)
    assert_frame_equal(db.groups(), bundle.groups, check_dtypes=False)
    for split in ("train", "test"):
        want = bundle.examples.filter(pl.col("split") == split).sort("example")
        assert_frame_equal(db.examples(split), want, check_dtypes=False)
    assert_frame_equal(db.importance().sort("tensor", "index"), bundle.importance.sort("tensor", "index"),
                       check_dtypes=False)
    assert_frame_equal(db.predictions(), bundle.predictions.sort("test", "output"), check_dtypes=False)
    assert_frame_equal(db.exactness(), bundle.exactness.sort("quadrature"), check_dtypes=False)
    assert_frame_equal(db.pruning(), bundle.pruning.sort("method", "scope", "seed", "sparsity"), check_dtypes=False)
    assert db.views() == {name: getattr(bundle, name).height for name in VIEW_TABLES}
    assert {k: v for k, v in db.meta().items() if k != "schema_version"} == bundle.meta
    assert db.windows("components")["step_lo"].to_list() == list(range(0, 40, 5))
    assert db.windows("data")["step_lo"].to_list() == list(range(0, 40, 10))


def test_demo_bundle_is_consistent(demo):
    """Windows of components sum to the reconstructed change; data sums to components."""
    bundle, db = demo
    by_step = db.completeness()
    assert by_step["reconstructed"].sum() == pytest.approx(db.component_totals("tensor")["value"].sum())
    data_total = bundle.data["value"].sum()
    assert data_total == pytest.approx(bundle.components["value"].sum())
    summary = info(db.path)
    assert summary["max_rel_residual"] < 1e-6


def test_run_without_optional_views(tmp_path):
    full = hand_bundle()
    bare = RunBundle(**{**full.__dict__, "components": None, "data": None, "importance": None, "exactness": None})
    with RunDB.open(write_run(tmp_path / "bare.duckdb", bare)) as db:
        assert db.views() == dict.fromkeys(VIEW_TABLES, 0) | {"completeness": 8}
        matrix = db.component_matrix("layer", window=2, measure="share")
        assert matrix.is_empty() and matrix.columns == ["step_lo", "step_hi", "group", "value", "decay"]
        assert db.component_totals("module").is_empty()
        assert db.top_train_examples(ALL).columns == ["train", "value", "label", "text", "rank", "side"]
        assert db.top_train_examples(ALL).is_empty() and db.data_distribution(ALL).is_empty()
        assert db.train_example_over_time(0, ALL).is_empty()
        assert db.completeness().height == 4


def test_run_opens_from_a_folder_whose_name_needs_quoting(tmp_path):
    folder = tmp_path / "lab's runs; DROP TABLE meta"
    folder.mkdir()
    with RunDB.open(write_run(folder / "hand.duckdb", hand_bundle())) as db:
        assert db.completeness().height == 4


# ── argument checking ──────────────────────────────────────────────────────────────────────


def test_selector_and_argument_validation(hand_db):
    for kind, value in [("some", None), ("class", None), ("example", "1"), ("example", True), ("all", 3),
                        ("class", "1; DROP TABLE components")]:
        with pytest.raises(BadInputError):
            TestSelector(kind, value)
    for call in [
        lambda: hand_db.component_matrix("layer; DROP TABLE groups"),
        lambda: hand_db.component_matrix("layer", measure="max"),
        lambda: hand_db.component_matrix("layer", window=0),
        lambda: hand_db.component_matrix("layer", steps=(0,)),
        lambda: hand_db.component_totals("layer", tests=("class", 1)),
        lambda: hand_db.top_train_examples(ALL, k=0),
        lambda: hand_db.train_example_over_time("0 OR 1=1", ALL),
        lambda: hand_db.examples("validation"),
        lambda: hand_db.windows("importance"),
    ]:
        with pytest.raises(BadInputError):
            call()
    assert TestSelector("class", 1) == TestSelector("class", 1)
    assert hand_db.component_totals("layer", tests=TestSelector("class", 99)).is_empty()
    assert hand_db.importance("no'such\"tensor").is_empty()
    assert hand_db.views()["components"] == 12  # nothing was dropped


@pytest.mark.parametrize("name", ["grokking-p113", "digits_cnn.v2", "run 1", "Ünïcode-run", "a.b.c"])
def test_valid_run_names(name, tmp_path):
    assert validate_run_name(name) == name
    assert run_path(tmp_path, name) == tmp_path / f"{name}.duckdb"


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b", "../up", "..", "x..y", "nul\0byte", "it's", 'say"hi"',
                                  "a;b", "back`tick", ".hidden", " padded", "line\nbreak", "x" * 129])
def test_invalid_run_names(name, tmp_path):
    with pytest.raises(StoreNameError):
        validate_run_name(name)
    with pytest.raises(StoreNameError):
        run_path(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


# ── bad files: specific errors, nothing modified ──────────────────────────────────────────


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


def exercise(db: RunDB) -> None:
    """Call every read query once."""
    db.meta(), db.run_meta(), db.views(), db.steps(), db.groups(), db.examples("test"), db.examples("train")
    db.windows("components"), db.windows("data"), db.importance(), db.predictions(), db.exactness(), db.pruning()
    for tests in (ALL, TestSelector("correct"), TestSelector("class", 1), TestSelector("example", 1)):
        for level in ("tensor", "module", "layer"):
            db.component_matrix(level, window=10, tests=tests, measure="share")
            db.component_totals(level, tests=tests)
        db.top_train_examples(tests), db.train_example_over_time(1, tests), db.data_distribution(tests)
        db.completeness(tests=tests)
    db.max_residuals()


def assert_clean_error(exc: BaseException) -> None:
    """The StoreError does not chain a DuckDB traceback."""
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        RunDB.open(tmp_path / "nope.duckdb")
    with pytest.raises(RunNotFoundError):
        info(tmp_path / "nope.duckdb")
    with pytest.raises(RunNotFoundError):
        add_pruning(tmp_path / "nope.duckdb", make_demo_bundle().pruning)
    (tmp_path / "dir.duckdb").mkdir()
    with pytest.raises(StoreCorruptError, match="not a file"):
        RunDB.open(tmp_path / "dir.duckdb")
    assert not (tmp_path / "nope.duckdb").exists()


def test_not_a_duckdb_file(tmp_path):
    (tmp_path / "notes.duckdb").write_text("these are not the tables you are looking for\n" * 100)
    (tmp_path / "empty.duckdb").write_bytes(b"")
    before = snapshot(tmp_path)
    for name in ("notes.duckdb", "empty.duckdb"):
        with pytest.raises(StoreCorruptError, match="not a DuckDB file"):
            RunDB.open(tmp_path / name)
    assert snapshot(tmp_path) == before


def test_truncated_and_damaged_files(tmp_path, demo):
    _, db = demo
    good = db.path.read_bytes()
    # chop the file at several points, and overwrite a stretch of the middle with garbage
    variants = {f"cut{i}.duckdb": good[: len(good) * i // 8] for i in range(1, 8)}
    variants["cut-header.duckdb"] = good[:4096]
    for i in (3, 5):
        middle = len(good) * i // 8
        variants[f"garbage{i}.duckdb"] = good[:middle] + os.urandom(8192) + good[middle + 8192:]
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
    before = snapshot(tmp_path)
    failures = 0
    for name in variants:
        try:
            with RunDB.open(tmp_path / name) as damaged:
                exercise(damaged)
        except StoreError as exc:
            assert isinstance(exc, StoreCorruptError), exc
            assert name in str(exc) and "truncated or damaged" in str(exc)
            assert_clean_error(exc)
            failures += 1
    assert failures == len(variants)  # DuckDB checksums every block; the store reports each as damaged
    assert snapshot(tmp_path) == before


def copy_and_edit(source: Path, target: Path, *statements: str) -> Path:
    shutil.copyfile(source, target)
    con = duckdb.connect(str(target))
    for sql in statements:
        con.execute(sql)
    con.close()
    return target


def test_newer_schema_version_is_refused(tmp_path, hand_db):
    path = copy_and_edit(hand_db.path, tmp_path / "future.duckdb", "UPDATE schema_version SET version = 7")
    before = snapshot(tmp_path)
    with pytest.raises(StoreSchemaError, match="schema version 7; this release reads versions 1, 2") as excinfo:
        RunDB.open(path)
    assert_clean_error(excinfo.value)
    with pytest.raises(StoreSchemaError):
        info(path)
    with pytest.raises(StoreSchemaError):
        add_pruning(path, make_demo_bundle().pruning)
    assert snapshot(tmp_path) == before


def test_version_1_files_open_with_null_importance_scores(tmp_path, hand_db):
    """Version 1 had only Ψ̄ and the magnitude in the importance table; everything else is the same."""
    drops = [f"ALTER TABLE importance DROP COLUMN {c}" for c in ("gradient", "decay", "balance", "taylor")]
    old = copy_and_edit(hand_db.path, tmp_path / "v1.duckdb", "UPDATE schema_version SET version = 1", *drops)
    with RunDB.open(old) as db:
        assert db.schema_version == 1
        assert rows(db.importance("c.w")) == [("c.w", 0, 3.0, None, None, None, None, 0.3)]
        assert db.importance().columns == hand_db.importance().columns
        assert_frame_equal(db.component_totals("tensor"), hand_db.component_totals("tensor"))
    assert info(old)["schema_version"] == 1 and info(old)["views"] == info(hand_db.path)["views"]
    add_pruning(old, make_demo_bundle().pruning)  # the pruning table is the same in both versions
    with RunDB.open(old) as db:
        assert db.schema_version == 1 and db.pruning().height == make_demo_bundle().pruning.height


def test_missing_tables_are_named(tmp_path, hand_db):
    path = copy_and_edit(hand_db.path, tmp_path / "partial.duckdb", "DROP TABLE data", "DROP TABLE pruning")
    foreign = copy_and_edit(hand_db.path, tmp_path / "foreign.duckdb",
                            *[f"DROP TABLE {t}" for t in REQUIRED_TABLES], "CREATE TABLE t AS SELECT 1 AS x")
    before = snapshot(tmp_path)
    with pytest.raises(StoreSchemaError, match=r"lacks tables \['data', 'pruning'\]"):
        RunDB.open(path)
    with pytest.raises(StoreSchemaError, match="not an ExPLAIND run database: missing tables") as excinfo:
        RunDB.open(foreign)
    assert "'components'" in str(excinfo.value) and "'schema_version'" in str(excinfo.value)
    assert snapshot(tmp_path) == before


def test_closed_database_refuses_queries(hand_db):
    db = RunDB.open(hand_db.path)
    db.close()
    db.close()
    with pytest.raises(StoreError, match="closed"):
        db.steps()


# ── writing: validation, atomic publish ───────────────────────────────────────────────────


def replace(bundle: RunBundle, **changes) -> RunBundle:
    return RunBundle(**{**bundle.__dict__, **changes})


BAD_BUNDLES = {
    "meta lacks task": lambda b: replace(b, meta={k: v for k, v in b.meta.items() if k != "task"}),
    "meta steps not int": lambda b: replace(b, meta={**b.meta, "steps": "4"}),
    "meta not JSON": lambda b: replace(b, meta={**b.meta, "seconds": float("nan")}),
    "steps missing column": lambda b: replace(b, steps=b.steps.drop("lr")),
    "steps not a frame": lambda b: replace(b, steps=b.steps.to_dict()),
    "completeness missing": lambda b: replace(b, completeness=None),
    "test id as text": lambda b: replace(b, components=b.components.with_columns(pl.col("test").cast(pl.String))),
    "null value": lambda b: replace(b, data=b.data.with_columns(value=pl.lit(None, pl.Float64))),
    "unknown tensor": lambda b: replace(b, components=b.components.with_columns(
        tensor=pl.when(pl.col("test") == 1).then(pl.lit("ghost.w")).otherwise(pl.col("tensor")))),
    "unknown test": lambda b: replace(b, components=b.components.with_columns(test=pl.col("test") + 5)),
    "unknown train": lambda b: replace(b, data=b.data.with_columns(train=pl.col("train") + 10)),
    "unknown importance tensor": lambda b: replace(b, importance=b.importance.with_columns(tensor=pl.lit("x"))),
    "duplicate tensor": lambda b: replace(b, groups=pl.concat([b.groups, b.groups.head(1)])),
    "module in two layers": lambda b: replace(b, groups=b.groups.with_columns(layer=pl.col("tensor"))),
    "bad split": lambda b: replace(b, examples=b.examples.with_columns(split=pl.lit("val"))),
    "duplicate example": lambda b: replace(b, examples=pl.concat([b.examples, b.examples.tail(1)])),
    "empty window": lambda b: replace(b, components=b.components.with_columns(step_hi=pl.col("step_lo"))),
    "two ends of a window": lambda b: replace(b, data=b.data.with_columns(
        step_hi=pl.col("step_hi") + pl.col("train").abs())),
    "id beyond int32": lambda b: replace(b, completeness=b.completeness.with_columns(step=pl.col("step") + 2**40)),
}


@pytest.mark.parametrize("problem", list(BAD_BUNDLES))
def test_bad_bundles_are_refused_and_change_nothing(tmp_path, problem, hand_db):
    target = shutil.copyfile(hand_db.path, tmp_path / "run.duckdb")
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError):
        write_run(target, BAD_BUNDLES[problem](hand_bundle(marker="new")))
    assert snapshot(tmp_path) == before  # old run intact, no temporary file left
    with RunDB.open(target) as db:
        assert db.meta()["marker"] == "hand"
    with pytest.raises(BadInputError):
        write_run(tmp_path / "fresh.duckdb", BAD_BUNDLES[problem](hand_bundle()))
    assert snapshot(tmp_path) == before


def test_write_creates_folders_and_refuses_directories(tmp_path):
    target = write_run(tmp_path / "a" / "b" / "run.duckdb", hand_bundle())
    assert target.is_file()
    (tmp_path / "dir.duckdb").mkdir()
    with pytest.raises(BadInputError, match="not a file"):
        write_run(tmp_path / "dir.duckdb", hand_bundle())
    with pytest.raises(BadInputError):
        write_run(tmp_path / "x.duckdb", hand_bundle().__dict__)


def test_reader_keeps_its_version_while_a_writer_replaces_the_file(tmp_path):
    path = write_run(tmp_path / "run.duckdb", hand_bundle(marker="old"))
    with RunDB.open(path) as old:
        write_run(path, hand_bundle(marker="new"))
        with RunDB.open(path) as new:
            assert new.meta()["marker"] == "new"
            assert old.meta()["marker"] == "old"
            assert_frame_equal(old.component_matrix("layer"), new.component_matrix("layer"))
    assert [p.name for p in tmp_path.iterdir()] == ["run.duckdb"]


def test_stale_temporary_files_are_ignored_and_cleaned(tmp_path):
    path = write_run(tmp_path / "run.duckdb", hand_bundle())
    dead_pid = 2**22 + 12345  # above Linux's pid_max default of 2^22
    stale = [tmp_path / f".run.duckdb.tmp-{dead_pid}-abcdef", tmp_path / f".run.duckdb.tmp-{dead_pid}-abcdef.wal"]
    alive = tmp_path / f".run.duckdb.tmp-{os.getppid()}-012345"  # a live writer's file stays
    other = tmp_path / f".other.duckdb.tmp-{dead_pid}-abcdef"  # another target's file stays
    for p in [*stale, alive, other]:
        p.write_bytes(b"half a database")
    assert list_runs(tmp_path) == [path]
    write_run(path, hand_bundle(marker="again"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, alive.name, other.name])
    with pytest.raises(RunNotFoundError):
        list_runs(tmp_path / "missing")


def test_add_pruning_replaces_only_the_pruning_table(tmp_path, demo):
    bundle, db = demo
    path = shutil.copyfile(db.path, tmp_path / "run.duckdb")
    curves = bundle.pruning.with_columns(seed=pl.lit(3, pl.Int64), accuracy=pl.col("accuracy") / 2).head(4)
    add_pruning(path, curves)
    with RunDB.open(path) as after:
        assert_frame_equal(after.pruning(), curves.sort("method", "scope", "seed", "sparsity"), check_dtypes=False)
        assert after.views() == {**db.views(), "pruning": 4}
        assert_frame_equal(after.component_matrix("module", window=10), db.component_matrix("module", window=10))
        assert after.meta() == db.meta()
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError):
        add_pruning(path, curves.drop("kl"))
    with pytest.raises(BadInputError):
        add_pruning(path, curves.with_columns(kl=pl.lit(None, pl.Float64)))
    (tmp_path / "junk.duckdb").write_bytes(b"junk" * 1000)
    with pytest.raises(StoreCorruptError):
        add_pruning(tmp_path / "junk.duckdb", curves)
    assert snapshot(tmp_path) == {**before, "junk.duckdb": snapshot(tmp_path)["junk.duckdb"]}


# ── concurrency ───────────────────────────────────────────────────────────────────────────


def test_concurrent_readers_on_one_connection(demo):
    _, db = demo
    calls = {
        "matrix": lambda: db.component_matrix("layer", window=10, tests=TestSelector("correct"), measure="share"),
        "matrix-example": lambda: db.component_matrix("module", tests=TestSelector("example", 4)),
        "totals": lambda: db.component_totals("tensor", steps=(5, 30)),
        "top": lambda: db.top_train_examples(TestSelector("class", 1), k=5),
        "time": lambda: db.train_example_over_time(3, ALL),
        "dist": lambda: db.data_distribution(TestSelector("incorrect")),
        "done": lambda: db.completeness(tests=TestSelector("class", 3)),
        "steps": db.steps,
    }
    expected = {name: call() for name, call in calls.items()}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reader(offset: int) -> None:
        try:
            start.wait()
            names = list(calls)
            for i in range(16):
                name = names[(i + offset) % len(names)]
                assert_frame_equal(calls[name](), expected[name])
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_many_databases_open_at_once(tmp_path):
    paths = [write_run(tmp_path / f"run{i}.duckdb", synthetic_bundle(seed=i, marker=f"m{i}")) for i in range(3)]
    dbs = [RunDB.open(p) for p in paths] + [RunDB.open(paths[0])]
    try:
        assert [db.meta()["marker"] for db in dbs] == ["m0", "m1", "m2", "m0"]
    finally:
        for db in dbs:
            db.close()
