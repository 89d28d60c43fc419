"""Reading a run database: read-only connections and the dashboard's queries, as polars frames.

Measures. A *cell* is one stored step window × one group × one test × one output; its value
is the sum of the ``components`` rows of the group's tensors. ``signed`` sums cell values;
``absolute`` sums |cell value| (cancellation between tests, outputs and stored windows is
removed, cancellation between the tensors of a group is kept); ``share`` is a group's
absolute divided by the absolute of all groups in the same window. ``decay`` gets the same
treatment as ``value``; its share is divided by the total absolute of ``value``. Step ranges
``steps=(lo, hi)`` select the stored windows (or steps) with ``lo <= step_lo < hi``.

Units of partitions finer than a tensor (heads, neurons, frequencies) are read from
``unit_summary``, stored for all, correctly and incorrectly predicted test examples; other
selectors raise ``BadInputError``. Their ``absolute`` measure is the sum of |cell value| of
each unit, the units summed into ``other`` adding their absolutes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.errors import BadInputError, RunNotFoundError, StoreCorruptError, StoreError, StoreSchemaError
from engine.store.schema import (
    _ALIAS,
    _LEVEL_COLUMNS,
    _MAGIC,
    ALL_TESTS,
    COLUMN_SINCE,
    COLUMN_WIDENED,
    DEFAULT_THREADS,
    LEVELS,
    MEASURES,
    PART_ALL,
    PART_CORRECT,
    PART_INCORRECT,
    READABLE_VERSIONS,
    REGULARIZER,
    REQUIRED_TABLES,
    SCHEMA_VERSION,
    VIEW_TABLES,
    RunMeta,
    TestSelector,
    as_int,
    first_line,
    meta_problem,
    required_tables,
    table_columns,
)

UNIT_SELECTORS = ("all", "correct", "incorrect")  # the test selectors unit summaries are stored for


def _translate(path: Path, exc: duckdb.Error) -> StoreError:
    """A StoreError for a DuckDB error raised while reading ``path``."""
    if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
        holder = str(exc).split("Conflicting lock is held in", 1)[-1].split(". See also")[0].strip()
        return StoreError(
            f"{path} is open for writing in another program ({holder}); close it there, or wait until it "
            "finishes, and try again"
        )
    if isinstance(exc, (duckdb.CatalogException, duckdb.BinderException)):
        return StoreSchemaError(
            f"{path} lacks a table or column of run database schema {SCHEMA_VERSION} ({first_line(exc)}); "
            "re-create it with `python -m engine explain`"
        )
    return StoreCorruptError(
        f"{path} cannot be read ({first_line(exc)}); the file is truncated or damaged: "
        "re-create it with `python -m engine explain`"
    )


def _sql_string(text: str) -> str:
    """``text`` as an SQL string literal (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RunNotFoundError(f"run database {path} does not exist; create it with `python -m engine explain`")
    if not path.is_file():
        raise StoreCorruptError(f"{path} is not a file; a run database is a single DuckDB file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except PermissionError:
        raise StoreError(f"{path} cannot be read: permission denied. Ask its owner to make it readable "
                         "(chmod a+r)") from None
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if head[8:12] != _MAGIC:
        raise StoreCorruptError(f"{path} is not a DuckDB file; point to a run database written by `explain`")


def _window_expr(window: int | None) -> tuple[str, dict]:
    if window is None:
        return "step_lo", {}
    window = as_int(window, "window")
    if window < 1:
        raise BadInputError(f"window must be a positive number of steps, got {window}")
    return "(step_lo // $window)", {"window": window}


def _step_filter(steps: tuple[int, int] | None, column: str) -> tuple[str, dict]:
    """``AND lo <= column < hi``; ``column`` is a fixed identifier of this module."""
    if steps is None:
        return "", {}
    try:
        lo, hi = steps
    except (TypeError, ValueError):
        raise BadInputError(f"steps must be a (lo, hi) pair or None, got {steps!r}") from None
    return f" AND {column} >= $lo AND {column} < $hi", {"lo": as_int(lo, "steps lo"), "hi": as_int(hi, "steps hi")}


def _check_selector(tests: Any) -> TestSelector:
    if not isinstance(tests, TestSelector):
        raise BadInputError(f"tests must be a TestSelector, got {tests!r}")
    return tests


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise BadInputError(f"{what} {value!r} is unknown; use one of {choices}")
    return value


class RunDB:
    """A read-only run database. Thread-safe: each query runs on its own cursor."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection) -> None:
        self.path = path
        self._con: duckdb.DuckDBPyConnection | None = con
        self._lock = threading.Lock()
        self.schema_version = self._check_schema()
        self._meta = self._read_meta()
        present = [name for name in VIEW_TABLES if name in required_tables(self.schema_version)]
        counts = ", ".join(f"(SELECT COUNT(*) FROM {name})" for name in present)  # fixed table names
        self._views = dict.fromkeys(VIEW_TABLES, 0) | dict(zip(present, self._rows(f"SELECT {counts}")[0],
                                                               strict=True))
        self._class_parts = {label: (lo, hi) for label, lo, hi in self._rows(
            "SELECT label, MIN(part), MAX(part) FROM test_parts WHERE grain = 'class' GROUP BY label")}

    @classmethod
    def open(cls, path: str | os.PathLike, *, threads: int = DEFAULT_THREADS) -> RunDB:
        """Open a run database read-only; raises a StoreError subclass naming the problem."""
        path = Path(path)
        _check_file(path)
        threads = as_int(threads, "threads")
        con = duckdb.connect(":memory:", config={"threads": max(threads, 1)})
        try:
            # a literal, not a parameter: DuckDB before 2.0 takes no parameters in ATTACH
            con.execute(f"ATTACH {_sql_string(str(path))} AS {_ALIAS} (READ_ONLY)")
            return cls(path, con)
        except duckdb.Error as exc:
            con.close()
            raise _translate(path, exc) from None
        except BaseException:
            con.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            if self._con is None:
                raise StoreError(f"run database {self.path} is closed; open it again with RunDB.open")
            cur = self._con.cursor()
        try:
            cur.execute(f"USE {_ALIAS}")
            yield cur
        except duckdb.Error as exc:
            raise _translate(self.path, exc) from None
        finally:
            cur.close()

    def _rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        with self._cursor() as cur:
            return cur.execute(sql, params or {}).fetchall()

    def _frame(self, sql: str, params: dict | None = None) -> pl.DataFrame:
        with self._cursor() as cur:
            return cur.sql(sql, params=params or None).pl()

    def _check_schema(self) -> int:
        tables = {r[0] for r in self._rows(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = $db", {"db": _ALIAS})}
        if "schema_version" not in tables:
            missing = [t for t in REQUIRED_TABLES if t not in tables]
            raise StoreSchemaError(f"{self.path} is not an ExPLAIND run database: missing tables {missing}")
        self._check_columns(("schema_version",))
        versions = self._rows("SELECT version FROM schema_version")
        found = versions[0][0] if len(versions) == 1 else None
        if found not in READABLE_VERSIONS:
            shown = found if found is not None else f"{len(versions)} version rows"
            readable = " and ".join(map(str, READABLE_VERSIONS))
            raise StoreSchemaError(
                f"{self.path} has run database schema version {shown}; this release reads versions {readable}. "
                "Use a matching ExPLAIND Studio or re-create it with `python -m engine explain`"
            )
        missing = [t for t in required_tables(found) if t not in tables]
        if missing:
            raise StoreSchemaError(f"{self.path} lacks tables {missing} of run database schema {found}; "
                                   "re-create it with `python -m engine explain`")
        self._check_columns(required_tables(found), found)
        return found

    def _check_columns(self, tables: tuple[str, ...], version: int = SCHEMA_VERSION) -> None:
        """Each of ``tables`` has the columns and types of the schema (extra columns are ignored; a
        column added after ``version`` may be absent)."""
        found: dict[str, dict[str, str]] = {}
        for table, column, kind in self._rows(
                "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = $db",
                {"db": _ALIAS}):
            found.setdefault(table, {})[column] = kind
        for table in tables:
            for column, kind in table_columns()[table]:
                have = found.get(table, {}).get(column)
                if have is None and COLUMN_SINCE.get((table, column), 1) > version:
                    continue
                widened, earlier = COLUMN_WIDENED.get((table, column), (1, None))
                if version < widened and have == earlier:
                    continue
                if have != kind:
                    state = "lacks the column" if have is None else f"has the column {table}.{column} as {have}, not"
                    what = f"{table}.{column} ({kind})" if have is None else kind
                    raise StoreSchemaError(f"{self.path} {state} {what} of run database schema {SCHEMA_VERSION}; "
                                           "re-create it with `python -m engine explain`")

    def _read_meta(self) -> dict:
        """The metadata, each value parsed and the declared keys typed (``engine.store.schema.META_TYPES``)."""
        meta = {}
        for key, text in self._rows("SELECT key, value FROM meta ORDER BY key"):
            try:
                meta[key] = json.loads(text)
            except (TypeError, ValueError, RecursionError):
                raise StoreSchemaError(f"{self.path}: metadata {key!r} is not valid JSON; re-create the run "
                                       "database with `python -m engine explain`") from None
        problem = meta_problem(meta)
        if problem is not None:
            raise StoreSchemaError(f"{self.path} {problem}; re-create it with `python -m engine explain`")
        return meta

    def _part_filter(self, tests: TestSelector, column: str) -> tuple[str, dict]:
        """``AND column BETWEEN ...``: the summary parts of ``tests`` (any kind but 'example')."""
        if tests.kind == "class":
            lo, hi = self._class_parts.get(tests.value, (1, 0))  # no such label: an empty range
        else:
            lo = hi = {"all": PART_ALL, "correct": PART_CORRECT, "incorrect": PART_INCORRECT}[tests.kind]
        return f" AND {column} BETWEEN $part_lo AND $part_hi", {"part_lo": lo, "part_hi": hi}

    # -- metadata and small tables --------------------------------------------------------------

    def meta(self) -> dict:
        """The run metadata as written, plus ``schema_version``."""
        return {**json.loads(json.dumps(self._meta)), "schema_version": self.schema_version}

    def run_meta(self) -> RunMeta:
        """Typed accessors for the metadata every run carries."""
        meta = self._meta  # typed when the database was opened
        return RunMeta(
            task=meta["task"],
            steps=meta["steps"],
            quantity=meta["quantity"],
            quadrature=meta["quadrature"],
            data_fingerprint=meta.get("data_fingerprint"),
            model_summary=dict(meta.get("model_summary", {})),
            optimizer=dict(meta.get("optimizer", {})),
            schema_version=self.schema_version,
        )

    def views(self) -> dict[str, int]:
        """Row count of every view table (0 when the view was not computed)."""
        return dict(self._views)

    def steps(self) -> pl.DataFrame:
        return self._frame("SELECT * FROM steps ORDER BY step")

    def groups(self) -> pl.DataFrame:
        """tensor, module, layer, size, position in model order."""
        return self._frame("SELECT tensor, module, layer, size, position FROM groups ORDER BY tensor_id")

    def examples(self, split: str) -> pl.DataFrame:
        """split, example, label, text, predicted, correct of one split, by example id."""
        split = _check_choice(split, ("train", "test"), "split")
        return self._frame(
            """SELECT split::VARCHAR AS split, example::BIGINT AS example, label::BIGINT AS label, text,
                      predicted::BIGINT AS predicted, correct
               FROM examples WHERE split = $split ORDER BY example""", {"split": split})

    def windows(self, view: str = "components") -> pl.DataFrame:
        """Stored step windows [step_lo, step_hi) of the components view, the data view (its own
        windows: all, correct and incorrect test examples) or ``data_tests`` (the windows of
        single test examples and classes; the data view's own in a version 1 file)."""
        view = _check_choice(view, ("components", "data", "data_tests"), "view")
        if view == "data_tests" and self.schema_version < 2:
            view = "data"
        return self._frame("SELECT step_lo::BIGINT AS step_lo, step_hi::BIGINT AS step_hi FROM windows "
                           "WHERE view = $view ORDER BY step_lo", {"view": view})

    def data_windows(self, tests: TestSelector = ALL_TESTS) -> pl.DataFrame:
        """The windows at which the data view of ``tests`` is stored."""
        return self.windows("data" if _check_selector(tests).kind in UNIT_SELECTORS else "data_tests")

    def importance(self, tensor: str | None = None) -> pl.DataFrame:
        """tensor, index, importance, gradient, decay, balance, taylor, magnitude (of one tensor, or all in
        model order); the scores a version-1 file lacks read null."""
        where, params = ("WHERE g.tensor = $tensor", {"tensor": str(tensor)}) if tensor is not None else ("", {})
        scores = ("i.gradient, i.decay, i.balance, i.taylor" if self.schema_version >= 2 else
                  "NULL::DOUBLE AS gradient, NULL::DOUBLE AS decay, NULL::DOUBLE AS balance, NULL::DOUBLE AS taylor")
        return self._frame(f"""SELECT g.tensor, i."index", i.importance, {scores}, i.magnitude
                               FROM importance i JOIN groups g USING (tensor_id) {where}
                               ORDER BY i.tensor_id, i."index" """, params)

    def predictions(self) -> pl.DataFrame:
        return self._frame("""SELECT test::BIGINT AS test, output::BIGINT AS output, initial, true_final,
                                     reconstructed_final FROM predictions ORDER BY test, output""")

    def exactness(self) -> pl.DataFrame:
        return self._frame("SELECT * FROM exactness ORDER BY quadrature")

    def pruning(self) -> pl.DataFrame:
        return self._frame("SELECT * FROM pruning ORDER BY method, scope, seed, sparsity")

    # -- component view ----------------------------------------------------------------------

    def _component_source(self, level: str, steps: tuple[int, int] | None,
                          tests: TestSelector) -> tuple[str, dict]:
        """SQL of (step_lo, step_hi, group_id, value, decay, abs_value, abs_decay) per stored window."""
        if tests.kind != "example":
            step_sql, params = _step_filter(steps, "s.step_lo")
            part_sql, part_params = self._part_filter(tests, "s.part")
            sql = f"""SELECT s.step_lo, s.step_hi, s.group_id, s.value, s.decay, s.abs_value, s.abs_decay
                      FROM component_summary s
                      WHERE s.level = CAST($level AS level_kind){part_sql}{step_sql}"""
            return sql, {**params, **part_params, "level": level}
        gid, _ = _LEVEL_COLUMNS[level]
        step_sql, params = _step_filter(steps, "c.step_lo")
        sql = f"""SELECT step_lo, MAX(step_hi) AS step_hi, group_id, SUM(value) AS value, SUM(decay) AS decay,
                         SUM(ABS(value)) AS abs_value, SUM(ABS(decay)) AS abs_decay
                  FROM (SELECT c.step_lo, MAX(c.step_hi) AS step_hi, g.{gid} AS group_id, c.output,
                               SUM(c.value) AS value, SUM(c.decay) AS decay
                        FROM components c JOIN groups g USING (tensor_id)
                        WHERE c.test = $test{step_sql}
                        GROUP BY c.step_lo, g.{gid}, c.output)
                  GROUP BY step_lo, group_id"""
        return sql, {**params, "test": tests.value}

    @staticmethod
    def _names(level: str) -> str:
        gid, name = _LEVEL_COLUMNS[level]
        return f"""SELECT {gid} AS group_id, ANY_VALUE({name}) AS name, MIN(position) AS position
                   FROM groups GROUP BY {gid}"""

    def component_matrix(
        self,
        level: str = "layer",
        window: int | None = None,
        steps: tuple[int, int] | None = None,
        tests: TestSelector = ALL_TESTS,
        measure: str = "signed",
    ) -> pl.DataFrame:
        """step_lo, step_hi, group, value, decay per window of ``window`` steps and group.

        Stored windows are merged by ``floor(step_lo / window)`` (``None`` keeps them);
        a window's span is the union of its stored windows.
        """
        level = _check_choice(level, LEVELS, "level")
        measure = _check_choice(measure, MEASURES, "measure")
        tests = _check_selector(tests)
        source, params = self._component_source(level, steps, tests)
        win, win_params = _window_expr(window)
        value, decay = {
            "signed": ("c.value", "c.decay"),
            "absolute": ("c.abs_value", "c.abs_decay"),
            "share": ("COALESCE(c.abs_value / NULLIF(SUM(c.abs_value) OVER w, 0), 0.0)",
                      "COALESCE(c.abs_decay / NULLIF(SUM(c.abs_value) OVER w, 0), 0.0)"),
        }[measure]
        return self._frame(f"""
            WITH src AS ({source}),
                 c AS (SELECT {win} AS win, group_id, MIN(step_lo) AS lo, MAX(step_hi) AS hi,
                              SUM(value) AS value, SUM(decay) AS decay, SUM(abs_value) AS abs_value,
                              SUM(abs_decay) AS abs_decay
                       FROM src GROUP BY win, group_id),
                 n AS ({self._names(level)})
            SELECT (MIN(c.lo) OVER w)::BIGINT AS step_lo, (MAX(c.hi) OVER w)::BIGINT AS step_hi,
                   n.name AS "group", {value} AS value, {decay} AS decay
            FROM c JOIN n USING (group_id)
            WINDOW w AS (PARTITION BY c.win)
            ORDER BY step_lo, n.position""", {**params, **win_params})

    def component_totals(
        self, level: str = "layer", steps: tuple[int, int] | None = None, tests: TestSelector = ALL_TESTS
    ) -> pl.DataFrame:
        """group, value, decay, absolute, share summed over the selected steps and tests."""
        level = _check_choice(level, LEVELS, "level")
        tests = _check_selector(tests)
        source, params = self._component_source(level, steps, tests)
        return self._frame(f"""
            WITH src AS ({source}),
                 c AS (SELECT group_id, SUM(value) AS value, SUM(decay) AS decay, SUM(abs_value) AS absolute
                       FROM src GROUP BY group_id),
                 n AS ({self._names(level)})
            SELECT n.name AS "group", c.value, c.decay, c.absolute,
                   COALESCE(c.absolute / NULLIF(SUM(c.absolute) OVER (), 0), 0.0) AS share
            FROM c JOIN n USING (group_id) ORDER BY n.position""", params)

    # -- data view ---------------------------------------------------------------------------

    def _data_source(self, steps: tuple[int, int] | None, tests: TestSelector) -> tuple[str, dict]:
        """SQL of (train, step_lo, step_hi, value) summed over the selected tests and outputs."""
        if tests.kind != "example":
            step_sql, params = _step_filter(steps, "s.step_lo")
            part_sql, part_params = self._part_filter(tests, "s.part")
            return (f"SELECT s.train, s.step_lo, s.step_hi, s.value FROM data_summary s WHERE TRUE{part_sql}{step_sql}",
                    {**params, **part_params})
        step_sql, params = _step_filter(steps, "d.step_lo")
        return (f"SELECT d.train, d.step_lo, d.step_hi, d.value FROM data d WHERE d.test = $test{step_sql}",
                {**params, "test": tests.value})

    def top_train_examples(
        self, tests: TestSelector = ALL_TESTS, steps: tuple[int, int] | None = None, k: int = 10
    ) -> pl.DataFrame:
        """train, value, label, text, rank, side: the k largest positive (proponent) and negative
        (opponent) total influences of single training examples (the regularizer is left out)."""
        tests = _check_selector(tests)
        k = as_int(k, "k")
        if k < 1:
            raise BadInputError(f"k must be at least 1, got {k}")
        source, params = self._data_source(steps, tests)
        return self._frame(f"""
            WITH src AS ({source}),
                 a AS (SELECT train, SUM(value) AS value FROM src WHERE train <> {REGULARIZER} GROUP BY train),
                 r AS (SELECT train, value, CASE WHEN value > 0 THEN 'proponent' ELSE 'opponent' END AS side,
                              ROW_NUMBER() OVER (PARTITION BY value > 0 ORDER BY ABS(value) DESC, train) AS rank
                       FROM a WHERE value <> 0 QUALIFY rank <= $k)
            SELECT r.train::BIGINT AS train, r.value, e.label::BIGINT AS label, e.text, r.rank::BIGINT AS rank,
                   r.side
            FROM r LEFT JOIN examples e ON e.split = 'train' AND e.example = r.train
            ORDER BY r.side DESC, r.rank""", {**params, "k": k})

    def train_example_over_time(self, train: int, tests: TestSelector = ALL_TESTS) -> pl.DataFrame:
        """step_lo, step_hi, value of one training example (or -1, the regularizer) in every
        stored data window (0 where it had no influence)."""
        tests = _check_selector(tests)
        train = as_int(train, "train example id")
        source, params = self._data_source(None, tests)
        view = "data" if tests.kind in UNIT_SELECTORS or self.schema_version < 2 else "data_tests"
        return self._frame(f"""
            WITH src AS ({source}),
                 a AS (SELECT step_lo, SUM(value) AS value FROM src WHERE train = $train GROUP BY step_lo)
            SELECT w.step_lo::BIGINT AS step_lo, w.step_hi::BIGINT AS step_hi, COALESCE(a.value, 0.0) AS value
            FROM windows w LEFT JOIN a USING (step_lo)
            WHERE w.view = $view ORDER BY w.step_lo""", {**params, "train": train, "view": view})

    def data_distribution(
        self, tests: TestSelector = ALL_TESTS, steps: tuple[int, int] | None = None
    ) -> pl.DataFrame:
        """train, value: total influence of every training example (regularizer left out)."""
        tests = _check_selector(tests)
        source, params = self._data_source(steps, tests)
        return self._frame(f"""
            WITH src AS ({source})
            SELECT train::BIGINT AS train, SUM(value) AS value FROM src WHERE train <> {REGULARIZER}
            GROUP BY train ORDER BY train""", params)

    # -- units of partitions finer than a tensor -----------------------------------------------

    def units(self) -> pl.DataFrame:
        """unit_id, partition, kind, unit, label, position, layer, module, tensors, size by unit_id
        (empty for a version 1 file)."""
        if self.schema_version < 2:
            return pl.DataFrame(schema={"unit_id": pl.Int64, "partition": pl.String, "kind": pl.String,
                                        "unit": pl.String, "label": pl.Int64, "position": pl.Int64,
                                        "layer": pl.String, "module": pl.String, "tensors": pl.String,
                                        "size": pl.Int64})
        return self._frame("""SELECT unit_id::BIGINT AS unit_id, partition, kind, unit, label::BIGINT AS label,
                                     position::BIGINT AS position, layer, module, tensors, size
                              FROM units ORDER BY unit_id""")

    def partitions(self) -> pl.DataFrame:
        """partition, kind, layer, module, tensors, units (count) — in the order they were computed."""
        units = self.units()
        return units.group_by("partition", maintain_order=True).agg(
            pl.col("kind", "layer", "module", "tensors").first(), pl.len().cast(pl.Int64).alias("units"))

    def _unit_range(self, partition: str) -> tuple[int, int]:
        rows = self._rows("SELECT MIN(unit_id), MAX(unit_id) FROM units WHERE partition = $p",
                          {"p": str(partition)}) if self.schema_version >= 2 else [(None, None)]
        if rows[0][0] is None:
            known = ", ".join(self.partitions()["partition"].to_list()) or "no partitions"
            raise BadInputError(f"unknown partition {partition!r}; this run has {known}")
        return rows[0]

    def _unit_source(self, partition: str, steps: tuple[int, int] | None, tests: TestSelector) -> tuple[str, dict]:
        tests = _check_selector(tests)
        if tests.kind not in UNIT_SELECTORS:
            raise BadInputError(f"units are stored summed over all, correct or incorrect test examples, not per "
                                f"{tests.kind}; choose one of {', '.join(UNIT_SELECTORS)}")
        first, last = self._unit_range(partition)
        step_sql, params = _step_filter(steps, "s.step_lo")
        part_sql, part_params = self._part_filter(tests, "s.part")
        sql = f"""SELECT s.step_lo, s.step_hi, s.unit_id, s.value, s.decay, s.abs_value, s.abs_decay
                  FROM unit_summary s WHERE s.unit_id BETWEEN $first AND $last{part_sql}{step_sql}"""
        return sql, {**params, **part_params, "first": first, "last": last}

    def unit_matrix(
        self,
        partition: str,
        window: int | None = None,
        steps: tuple[int, int] | None = None,
        tests: TestSelector = ALL_TESTS,
        measure: str = "signed",
        top: int | None = None,
    ) -> pl.DataFrame:
        """step_lo, step_hi, unit, label, value, decay per window and unit of one partition.

        With ``top`` only the ``top`` units of largest absolute influence over the selected
        steps keep their rows; the others are summed into one unit ``other (N units)``
        (label null). ``share`` divides by the partition's absolute total in each window.
        """
        measure = _check_choice(measure, MEASURES, "measure")
        source, params = self._unit_source(partition, steps, tests)
        win, win_params = _window_expr(window)
        keep = self._top_param(top)
        value, decay = {
            "signed": ("c.value", "c.decay"),
            "absolute": ("c.abs_value", "c.abs_decay"),
            "share": ("COALESCE(c.abs_value / NULLIF(SUM(c.abs_value) OVER w, 0), 0.0)",
                      "COALESCE(c.abs_decay / NULLIF(SUM(c.abs_value) OVER w, 0), 0.0)"),
        }[measure]
        return self._frame(f"""
            WITH src AS ({source}),
                 ranked AS (SELECT unit_id, ROW_NUMBER() OVER (ORDER BY SUM(abs_value) DESC, unit_id) AS r,
                                   COUNT(*) OVER () AS n
                            FROM src GROUP BY unit_id),
                 named AS (SELECT s.*, CASE WHEN k.r <= $keep THEN u.unit
                                            ELSE 'other (' || (k.n - $keep) || ' units)' END AS name,
                                  CASE WHEN k.r <= $keep THEN u.position ELSE 2147483647 END AS position,
                                  CASE WHEN k.r <= $keep THEN u.label END AS label
                           FROM src s JOIN ranked k USING (unit_id) JOIN units u USING (unit_id)),
                 c AS (SELECT {win} AS win, name, MIN(position) AS position, ANY_VALUE(label) AS label,
                              MIN(step_lo) AS lo, MAX(step_hi) AS hi, SUM(value) AS value, SUM(decay) AS decay,
                              SUM(abs_value) AS abs_value, SUM(abs_decay) AS abs_decay
                       FROM named GROUP BY win, name)
            SELECT (MIN(c.lo) OVER w)::BIGINT AS step_lo, (MAX(c.hi) OVER w)::BIGINT AS step_hi, c.name AS unit,
                   c.label::BIGINT AS label, {value} AS value, {decay} AS decay
            FROM c WINDOW w AS (PARTITION BY c.win)
            ORDER BY step_lo, c.position""", {**params, **win_params, "keep": keep})

    def unit_totals(
        self, partition: str, steps: tuple[int, int] | None = None, tests: TestSelector = ALL_TESTS
    ) -> pl.DataFrame:
        """unit, label, value, decay, absolute, share of every unit of one partition, summed over
        the selected steps, in the partition's order."""
        source, params = self._unit_source(partition, steps, tests)
        return self._frame(f"""
            WITH src AS ({source}),
                 c AS (SELECT unit_id, SUM(value) AS value, SUM(decay) AS decay, SUM(abs_value) AS absolute
                       FROM src GROUP BY unit_id)
            SELECT u.unit, u.label::BIGINT AS label, c.value, c.decay, c.absolute,
                   COALESCE(c.absolute / NULLIF(SUM(c.absolute) OVER (), 0), 0.0) AS share
            FROM c JOIN units u USING (unit_id) ORDER BY u.position""", params)

    @staticmethod
    def _top_param(top: int | None) -> int:
        if top is None:
            return 2147483647
        top = as_int(top, "top")
        if top < 1:
            raise BadInputError(f"top must be at least 1, got {top}")
        return top

    # -- progress measures -------------------------------------------------------------------

    def progress(self) -> pl.DataFrame:
        """measure, step, value of the stored progress measures (empty when none were computed)."""
        if self.schema_version < 2:
            return pl.DataFrame(schema={"measure": pl.String, "step": pl.Int64, "value": pl.Float64})
        return self._frame("SELECT measure, step::BIGINT AS step, value FROM progress ORDER BY measure, step")

    def frequency_norms(self) -> pl.DataFrame:
        """tensor, frequency, norm, key: the Fourier norms of the final token embedding."""
        if self.schema_version < 2:
            return pl.DataFrame(schema={"tensor": pl.String, "frequency": pl.Int64, "norm": pl.Float64,
                                        "key": pl.Boolean})
        return self._frame("""SELECT tensor, frequency::BIGINT AS frequency, norm, key FROM frequency_norms
                              ORDER BY tensor, frequency""")

    # -- completeness ------------------------------------------------------------------------

    def completeness(
        self, steps: tuple[int, int] | None = None, tests: TestSelector = ALL_TESTS
    ) -> pl.DataFrame:
        """Per step, sums over the selected tests and outputs: step, true_change, reconstructed,
        quadrature_residual, optimizer_residual, nodes (max), abs_residual (sum of |residual|)."""
        tests = _check_selector(tests)
        if tests.kind != "example":
            step_sql, params = _step_filter(steps, "s.step")
            part_sql, part_params = self._part_filter(tests, "s.part")
            source = f"""SELECT step, true_change, reconstructed, quadrature_residual, optimizer_residual,
                                nodes, abs_residual FROM completeness_summary s WHERE TRUE{part_sql}{step_sql}"""
            params = {**params, **part_params}
        else:
            step_sql, params = _step_filter(steps, "c.step")
            source = f"""SELECT step, true_change, reconstructed, quadrature_residual, optimizer_residual,
                                nodes, ABS(quadrature_residual) AS abs_residual
                         FROM completeness c WHERE c.test = $test{step_sql}"""
            params = {**params, "test": tests.value}
        return self._frame(f"""
            SELECT step::BIGINT AS step, SUM(true_change) AS true_change, SUM(reconstructed) AS reconstructed,
                   SUM(quadrature_residual) AS quadrature_residual, SUM(optimizer_residual) AS optimizer_residual,
                   MAX(nodes)::INTEGER AS nodes, SUM(abs_residual) AS abs_residual
            FROM ({source}) GROUP BY step ORDER BY step""", params)

    def max_residuals(self) -> dict[str, float | None]:
        """Worst completeness: ``max_rel_residual`` = max over test examples of ‖Σ_steps residual‖ /
        ‖Σ_steps true_change‖ (norms over outputs, zero changes skipped); ``max_rel_residual_output``
        the same ratio for the worst single output; ``max_abs_residual`` = max |Σ_steps residual|."""
        ((max_abs, max_rel, max_rel_output),) = self._rows("""
            SELECT MAX(max_abs), MAX(residual_norm / NULLIF(true_norm, 0)), MAX(max_rel_output)
            FROM (SELECT test, MAX(ABS(quadrature_residual)) AS max_abs,
                         SQRT(SUM(quadrature_residual * quadrature_residual)) AS residual_norm,
                         SQRT(SUM(true_change * true_change)) AS true_norm,
                         MAX(ABS(quadrature_residual) / NULLIF(ABS(true_change), 0)) AS max_rel_output
                  FROM completeness_totals GROUP BY test)""")
        return {"max_rel_residual": max_rel, "max_rel_residual_output": max_rel_output, "max_abs_residual": max_abs}


def _last_value(frame: pl.DataFrame, column: str) -> float | None:
    values = frame.sort("step")[column].drop_nulls()
    return float(values[-1]) if len(values) else None


def _series_info(meta: dict) -> dict:
    """What a run explaining a checkpoint series adds: the checkpoints' steps, the worst residual of
    one interval and input, and why there is no data view."""
    if meta.get("kind") != "checkpoints":
        return {}
    return {"checkpoints": [c.get("step") for c in meta.get("checkpoints") or []],
            "max_rel_residual_interval": meta.get("max_rel_residual_interval"),
            "data_axis_reason": meta.get("data_axis_reason")}


def info(db_path: str | os.PathLike) -> dict:
    """JSON-serialisable summary of a run database (for ``python -m engine info PATH --json``)."""
    with RunDB.open(db_path) as db:
        meta = db.run_meta()
        steps = db.steps()
        views = db.views()
        residuals = db.max_residuals()
        series = _series_info(db.meta())
        return {
            "path": str(db.path),
            "kind": "checkpoints" if series else "recording",
            **series,
            "task": meta.task,
            "steps": meta.steps,
            "final_train_acc": _last_value(steps, "train_acc"),
            "final_val_acc": _last_value(steps, "val_acc"),
            "views": views,
            "views_present": [name for name, rows in views.items() if rows],
            "max_rel_residual": residuals["max_rel_residual"],
            "max_rel_residual_output": residuals["max_rel_residual_output"],
            "max_abs_residual": residuals["max_abs_residual"],
            "max_rel_split_residual": db.meta().get("max_rel_split_residual"),
            "split_residual_cause": db.meta().get("split_residual_cause"),
            "data_split": db.meta().get("data_split"),
            "buffer_groups": db.meta().get("buffer_groups", []),
            "quantity": meta.quantity,
            "quadrature": meta.quadrature,
            "schema_version": meta.schema_version,
            "notes": list(db.meta().get("notes") or []),
        }
