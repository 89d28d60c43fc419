"""The run database's schema 2 additions against independent polars results: units of
partitions finer than a tensor, the data view at two resolutions, progress measures, and
reading files of schema 1."""

from __future__ import annotations

import dataclasses
import shutil

import duckdb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from engine.errors import BadInputError
from engine.store import RunDB, TestSelector, add_progress, info, write_run
from tests.fixtures_store import make_demo_bundle, synthetic_progress
from tests.test_store import in_steps, selected_tests, snapshot

UNIT_SELECTORS = [TestSelector("all"), TestSelector("correct"), TestSelector("incorrect")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    bundle = dataclasses.replace(make_demo_bundle(), data_test_window=20)
    path = write_run(tmp_path_factory.mktemp("units") / "demo.duckdb", bundle)
    with RunDB.open(path) as db:
        yield bundle, db


def unit_cells(bundle, partition, steps, tests) -> pl.DataFrame:
    units = bundle.units.filter(pl.col("partition") == partition)
    return bundle.unit_components.join(units, on="unit_id").filter(
        pl.col("test").is_in(selected_tests(bundle, tests)) & in_steps("step_lo", steps))


@pytest.mark.parametrize("tests", UNIT_SELECTORS, ids=lambda t: t.kind)
def test_unit_totals_match_polars(demo, tests):
    bundle, db = demo
    for partition, steps in [("heads", None), ("neurons", (10, 30)), ("embed-fourier", None)]:
        want = unit_cells(bundle, partition, steps, tests).group_by("unit", "label", "position").agg(
            pl.col("value").sum(), pl.col("decay").sum(), pl.col("value").abs().sum().alias("absolute")
        ).sort("position").with_columns(share=pl.col("absolute") / pl.col("absolute").sum()).drop("position")
        assert_frame_equal(db.unit_totals(partition, steps, tests), want, check_dtypes=False)


@pytest.mark.parametrize("tests", UNIT_SELECTORS, ids=lambda t: t.kind)
def test_unit_matrix_keeps_the_top_units_and_sums_the_rest(demo, tests):
    bundle, db = demo
    cells = unit_cells(bundle, "neurons", (5, 40), tests)
    ranking = cells.group_by("unit", "unit_id").agg(pl.col("value").abs().sum().alias("abs")).sort(
        ["abs", "unit_id"], descending=[True, False])
    top = ranking["unit"].head(3).to_list()
    named = cells.with_columns(name=pl.when(pl.col("unit").is_in(top)).then(pl.col("unit"))
                               .otherwise(pl.lit(f"other ({ranking.height - 3} units)")),
                               win=pl.col("step_lo") // 10)
    want = named.group_by("win", "name").agg(pl.col("value").sum().alias("signed"),
                                             pl.col("value").abs().sum().alias("absolute"))
    want = want.with_columns(share=pl.col("absolute") / pl.col("absolute").sum().over("win"))
    for measure in ("signed", "absolute", "share"):
        got = db.unit_matrix("neurons", window=10, steps=(5, 40), tests=tests, measure=measure, top=3)
        assert set(got["unit"]) == {*top, f"other ({ranking.height - 3} units)"}
        joined = got.with_columns(win=pl.col("step_lo") // 10).join(want, left_on=["win", "unit"],
                                                                     right_on=["win", "name"])
        assert joined.height == got.height == 4 * 4
        np.testing.assert_allclose(joined["value"].to_numpy(), joined[measure].to_numpy(), rtol=1e-12)
    # without top every unit keeps its row, in the partition's order
    every = db.unit_matrix("embed-fourier")
    assert every.filter(pl.col("step_lo") == 0)["unit"].to_list() == ["freq 0", "freq 1", "freq 2", "freq 3"]
    assert every["label"].to_list()[:4] == [0, 1, 2, 3]


def test_units_are_not_stored_per_class_or_example(demo):
    _, db = demo
    for tests in (TestSelector("class", 1), TestSelector("example", 2)):
        with pytest.raises(BadInputError, match="stored summed over all, correct or incorrect"):
            db.unit_matrix("heads", tests=tests)
    with pytest.raises(BadInputError, match="unknown partition 'layers'; this run has heads, neurons"):
        db.unit_totals("layers")
    with pytest.raises(BadInputError, match="top must be at least 1"):
        db.unit_matrix("heads", top=0)


def test_partitions_list_their_units(demo):
    _, db = demo
    parts = db.partitions()
    assert parts["partition"].to_list() == ["heads", "neurons", "embed-fourier"]
    assert parts["units"].to_list() == [2, 9, 4] and parts["kind"].to_list() == ["groups", "groups", "basis"]
    assert parts["layer"].to_list() == ["attn", "mlp", "embed"]


def test_data_is_stored_fine_per_part_and_coarse_per_test(demo):
    bundle, db = demo
    assert db.windows("data")["step_lo"].to_list() == list(range(0, 40, 10))
    assert db.windows("data_tests")["step_lo"].to_list() == [0, 20]
    assert db.data_windows(TestSelector("correct"))["step_hi"].to_list() == [10, 20, 30, 40]
    assert db.data_windows(TestSelector("class", 2))["step_hi"].to_list() == [20, 40]
    for tests in (TestSelector("example", 3), TestSelector("class", 2), TestSelector("all")):
        coarse = tests.kind != "all"
        data = bundle.data.filter(pl.col("test").is_in(selected_tests(bundle, tests)) & (pl.col("train") == 4))
        data = data.with_columns(pl.col("step_lo") // 20 * 20, pl.col("step_hi") + pl.col("step_hi") % 20) \
            if coarse else data
        want = data.group_by("step_lo", "step_hi").agg(pl.col("value").sum()).sort("step_lo")
        assert_frame_equal(db.train_example_over_time(4, tests), want, check_dtypes=False)
        for steps in (None, (0, 20)):
            totals = bundle.data.filter(pl.col("test").is_in(selected_tests(bundle, tests))
                                        & in_steps("step_lo", steps) & (pl.col("train") >= 0))
            want = totals.group_by("train").agg(pl.col("value").sum()).sort("train")
            assert_frame_equal(db.data_distribution(tests, steps), want, check_dtypes=False)


def test_a_coarse_window_must_be_a_multiple_of_the_data_window(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError, match="data_test_window 15 is not a multiple of the data view's window of 10"):
        write_run(tmp_path / "x.duckdb", dataclasses.replace(make_demo_bundle(), data_test_window=15))
    with pytest.raises(BadInputError, match="must be a positive number of steps with a data view"):
        write_run(tmp_path / "x.duckdb", dataclasses.replace(make_demo_bundle(), data=None, data_test_window=20))
    with pytest.raises(BadInputError, match=r"units and RunBundle\.unit_components come together"):
        write_run(tmp_path / "x.duckdb", dataclasses.replace(make_demo_bundle(), units=None))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b.unit_components.with_columns(unit_id=pl.col("unit_id") + 100), "names units missing"),
    (lambda b: b.unit_components.with_columns(test=pl.col("test") + 50), "test ids missing"),
    (lambda b: b.unit_components.with_columns(step_hi=pl.col("step_lo")), "empty windows"),
])
def test_bad_unit_components_are_refused(tmp_path, change, message):
    bundle = make_demo_bundle()
    with pytest.raises(BadInputError, match=message):
        write_run(tmp_path / "x.duckdb", dataclasses.replace(bundle, unit_components=change(bundle)))
    assert not list(tmp_path.iterdir())


def test_add_progress_replaces_the_progress_tables(tmp_path, demo):
    _, db = demo
    path = shutil.copyfile(db.path, tmp_path / "run.duckdb")
    progress, norms = synthetic_progress(40, p=5, keys=(2,))
    add_progress(path, progress, norms)
    add_progress(path, progress.with_columns(value=pl.col("value") * 2), norms)
    with RunDB.open(path) as after:
        assert_frame_equal(after.progress(), progress.with_columns(value=pl.col("value") * 2).sort("measure", "step"),
                           check_dtypes=False)
        assert_frame_equal(after.frequency_norms(), norms, check_dtypes=False)
        assert after.views()["progress"] == 80 and after.component_totals("layer").equals(db.component_totals("layer"))
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError, match="lists a \\(measure, step\\) more than once"):
        add_progress(path, pl.concat([progress, progress.head(1)]))
    with pytest.raises(BadInputError, match=r"RunBundle\.progress lacks columns"):
        add_progress(path, progress.drop("value"))
    assert snapshot(tmp_path) == before


def test_schema_1_files_stay_readable(tmp_path, demo):
    _, db = demo
    path = shutil.copyfile(db.path, tmp_path / "old.duckdb")
    con = duckdb.connect(str(path))
    for statement in ("UPDATE schema_version SET version = 1", "DELETE FROM windows WHERE view = 'data_tests'",
                      "DROP TABLE units", "DROP TABLE unit_summary", "DROP TABLE progress",
                      "DROP TABLE frequency_norms"):
        con.execute(statement)
    con.close()
    with RunDB.open(path) as old:
        assert old.schema_version == 1
        assert old.units().is_empty() and old.partitions().is_empty() and old.progress().is_empty()
        assert old.frequency_norms().is_empty()
        assert old.views()["unit_summary"] == 0 and old.views()["progress"] == 0
        assert old.windows("data_tests").equals(old.windows("data"))
        assert old.train_example_over_time(4, TestSelector("class", 2)).height == 4
        with pytest.raises(BadInputError, match="unknown partition 'heads'; this run has no partitions"):
            old.unit_totals("heads")
    assert info(path)["schema_version"] == 1
    with pytest.raises(BadInputError, match="schema version 1, which has no progress table"):
        add_progress(path, synthetic_progress(4)[0])
