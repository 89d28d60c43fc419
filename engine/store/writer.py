"""Writing a run database: the bundle contract, bulk loads sorted for zone maps, atomic publish.

A database is built under a temporary name beside the target, checkpointed, closed, synced
and renamed into place, so a reader sees the previous complete file or the new one, never
half a run. One writer at a time: publishing holds a lock (``.NAME.duckdb.lock`` beside the
target, removed afterwards); a second writer waits for it, saying so. Before it starts,
publishing checks the target (``check_target``: never a folder or a file that is not a run
database) and the free space; on any failure the temporary file is removed. The tables and
their columns are described in ``engine.store.schema``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.errors import BadInputError, StoreError
from engine.store.reader import RunDB
from engine.store.schema import (
    _ALIAS,
    _ANALYSIS_FRAMES,
    _DDL,
    _FRAMES,
    _LEVEL_COLUMNS,
    _MAGIC,
    _REQUIRED_FRAMES,
    DEFAULT_THREADS,
    FIRST_CLASS_PART,
    LEVELS,
    PART_ALL,
    PART_CORRECT,
    PART_INCORRECT,
    PART_UNKNOWN,
    REGULARIZER,
    SCHEMA_VERSION,
    RunBundle,
    as_int,
    first_line,
    meta_problem,
)

log = logging.getLogger(__name__)
SPACE_MARGIN = 16 * 2**20  # bytes beyond the data that a new database file needs (catalog, free blocks)


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")


def _temp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.tmp-(\d+)-[0-9a-f]+(?:\.wal)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(target: Path) -> list[Path]:
    """Delete temporary files of ``target`` left by writers that no longer run."""
    pattern = _temp_pattern(target)
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove_quietly(entry)
            removed.append(entry)
    return removed


def _remove_quietly(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind_ok(dtype: pl.DataType, kind: str, nullable: bool) -> bool:
    if nullable and dtype == pl.Null:
        return True
    if kind == "int":
        return dtype.is_integer()
    if kind == "float":
        return dtype.is_numeric()
    if kind == "str":
        return dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum)
    return dtype == pl.Boolean


def _check_frame(name: str, frame: Any, required: bool) -> None:
    """Raise BadInputError unless ``frame`` has the columns, kinds and nulls of the contract."""
    if frame is None:
        if required:
            raise BadInputError(f"RunBundle.{name} is required but is None")
        return
    if not isinstance(frame, pl.DataFrame):
        raise BadInputError(f"RunBundle.{name} must be a polars DataFrame, got {type(frame).__name__}")
    columns = {**_FRAMES, **_ANALYSIS_FRAMES}[name]
    missing = [c.name for c in columns if c.name not in frame.columns]
    if missing:
        raise BadInputError(f"RunBundle.{name} lacks columns {missing}; it has {frame.columns}")
    for col in columns:
        dtype = frame.schema[col.name]
        if not _kind_ok(dtype, col.kind, col.nullable):
            raise BadInputError(f"RunBundle.{name}.{col.name} must hold {col.kind} values, got {dtype}")
        if not col.nullable and frame[col.name].null_count():
            raise BadInputError(f"RunBundle.{name}.{col.name} has missing values; every row needs one")


def _check_meta(meta: Any) -> list[tuple[str, str]]:
    """Validate ``meta`` and return its (key, JSON text) rows."""
    if not isinstance(meta, dict):
        raise BadInputError(f"RunBundle.meta must be a dict, got {type(meta).__name__}")
    problem = meta_problem(meta)
    if problem is not None:
        raise BadInputError(f"RunBundle.meta {problem}")
    rows = []
    for key, value in meta.items():
        if not isinstance(key, str) or key == "schema_version":
            raise BadInputError(f"RunBundle.meta key {key!r} is not allowed (keys are strings; "
                                "schema_version is set by the store)")
        try:
            rows.append((key, json.dumps(value, sort_keys=True, allow_nan=False)))
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"RunBundle.meta[{key!r}] is not JSON-serialisable: {exc}") from None
    return sorted(rows)


def _check_bundle(bundle: RunBundle) -> list[tuple[str, str]]:
    if not isinstance(bundle, RunBundle):
        raise BadInputError(f"write_run needs a RunBundle, got {type(bundle).__name__}")
    for name in _FRAMES:
        _check_frame(name, getattr(bundle, name), name in _REQUIRED_FRAMES)
    if (bundle.units is None) != (bundle.unit_components is None):
        raise BadInputError("RunBundle.units and RunBundle.unit_components come together: give both or neither")
    if bundle.data_test_window is not None:
        window = as_int(bundle.data_test_window, "RunBundle.data_test_window")
        if window < 1 or bundle.data is None:
            raise BadInputError(f"RunBundle.data_test_window must be a positive number of steps with a data view, "
                                f"got {window}")
    return _check_meta(bundle.meta)


class _Writer:
    """Loads one bundle into an open, empty, writable connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def run(self, sql: str, what: str, params: dict | None = None) -> list[tuple]:
        start = time.perf_counter()
        try:
            rows = self.con.execute(sql, params or {}).fetchall()
        except (duckdb.ConversionException, duckdb.ConstraintException, duckdb.InvalidInputException,
                duckdb.OutOfRangeException) as exc:
            raise BadInputError(f"{what}: {first_line(exc)}") from None
        log.debug("%s: %.2f s", what, time.perf_counter() - start)
        return rows

    def load(self, frame: pl.DataFrame, sql: str, what: str) -> None:
        """Run ``sql`` (an INSERT ... SELECT ... FROM src ORDER BY ...) with ``frame`` as ``src``."""
        self.con.register("src", frame.to_arrow())
        try:
            self.run(sql, what)
        finally:
            self.con.unregister("src")

    def refuse(self, sql: str, message: str) -> None:
        """Raise BadInputError(message: rows) if the diagnostic query ``sql`` returns rows."""
        rows = self.run(sql, message)
        if rows:
            raise BadInputError(f"{message}: {', '.join(str(r[0]) for r in rows)}")

    def write(self, bundle: RunBundle, meta_rows: list[tuple[str, str]]) -> None:
        self.con.execute(_DDL)
        self.con.execute("INSERT INTO schema_version VALUES ($v, $by)",
                         {"v": SCHEMA_VERSION, "by": "explaind-studio engine.store"})
        meta = pl.DataFrame(meta_rows, schema={"key": pl.String, "value": pl.String}, orient="row")
        self.load(meta, "INSERT INTO meta SELECT key, CAST(value AS JSON) FROM src ORDER BY key", "RunBundle.meta")
        self.load(bundle.steps, "INSERT INTO steps SELECT step::BIGINT, lr, weight_decay, train_loss, val_loss, "
                  "train_acc, val_acc, update_norm, param_norm, loss_change FROM src ORDER BY 1", "RunBundle.steps")
        self._groups(bundle.groups)
        self._examples(bundle.examples)
        if bundle.components is not None:
            self._components(bundle.components)
        if bundle.units is not None:
            self._units(bundle.units, bundle.unit_components)
        if bundle.data is not None:
            self._data(bundle.data, bundle.data_test_window)
        if bundle.importance is not None:
            self._importance(bundle.importance)
        self._completeness(bundle.completeness)
        if bundle.predictions is not None:
            self.load(bundle.predictions, "INSERT INTO predictions SELECT test::INTEGER, output::INTEGER, initial, "
                      "true_final, reconstructed_final FROM src ORDER BY 1, 2", "RunBundle.predictions")
        if bundle.exactness is not None:
            self.load(bundle.exactness, "INSERT INTO exactness SELECT quadrature::VARCHAR, agreement, kl, "
                      "gradient_evaluations, max_rel_residual FROM src ORDER BY 1", "RunBundle.exactness")
        if bundle.pruning is not None:
            self.load(bundle.pruning, _PRUNING_INSERT, "RunBundle.pruning")

    def _groups(self, frame: pl.DataFrame) -> None:
        self.load(frame, """
            INSERT INTO groups
            WITH g AS (SELECT tensor::VARCHAR AS tensor, module::VARCHAR AS module, layer::VARCHAR AS layer,
                              size, position FROM src),
                 m AS (SELECT module, ROW_NUMBER() OVER (ORDER BY MIN(position), module) - 1 AS module_id
                       FROM g GROUP BY module),
                 l AS (SELECT layer, ROW_NUMBER() OVER (ORDER BY MIN(position), layer) - 1 AS layer_id
                       FROM g GROUP BY layer)
            SELECT ROW_NUMBER() OVER (ORDER BY g.position, g.tensor) - 1, g.tensor, m.module_id, g.module,
                   l.layer_id, g.layer, g.size, g.position
            FROM g JOIN m USING (module) JOIN l USING (layer) ORDER BY 1""", "RunBundle.groups")
        self.refuse("SELECT tensor FROM groups GROUP BY tensor HAVING COUNT(*) > 1 ORDER BY 1 LIMIT 5",
                    "RunBundle.groups lists tensors more than once")
        self.refuse("SELECT module FROM groups GROUP BY module HAVING COUNT(DISTINCT layer) > 1 ORDER BY 1 LIMIT 5",
                    "RunBundle.groups puts modules in more than one layer")

    def _examples(self, frame: pl.DataFrame) -> None:
        self.load(frame, f"""
            INSERT INTO examples
            WITH e AS (SELECT CAST(split::VARCHAR AS split_kind) AS split, example::INTEGER AS example,
                              label::INTEGER AS label, text::VARCHAR AS text, predicted::INTEGER AS predicted,
                              correct::BOOLEAN AS correct FROM src)
            SELECT split, example, label, text, predicted, correct,
                   CASE WHEN split = 'test' THEN {FIRST_CLASS_PART} - 1
                        + DENSE_RANK() OVER (PARTITION BY split ORDER BY label, correct NULLS LAST) END
            FROM e ORDER BY split, example""", "RunBundle.examples (split must be 'train' or 'test')")
        self.refuse("SELECT split::VARCHAR || ' ' || example FROM examples GROUP BY split, example "
                    "HAVING COUNT(*) > 1 ORDER BY 1 LIMIT 5", "RunBundle.examples lists examples more than once")
        self.run(f"""
            INSERT INTO test_parts
            SELECT {PART_ALL}, 'all', NULL, NULL, COUNT(*) FROM examples WHERE split = 'test' HAVING COUNT(*) > 0
            UNION ALL
            SELECT CASE WHEN correct THEN {PART_CORRECT} WHEN NOT correct THEN {PART_INCORRECT}
                        ELSE {PART_UNKNOWN} END AS p, 'correct', NULL, correct, COUNT(*)
            FROM examples WHERE split = 'test' GROUP BY correct
            UNION ALL
            SELECT part, 'class', ANY_VALUE(label), ANY_VALUE(correct), COUNT(*)
            FROM examples WHERE split = 'test' GROUP BY part
            ORDER BY 1""", "test parts")
        # each (label, correct) part rolls up into the 'all' part and its 'correct' part
        self.run(f"""
            CREATE TEMP TABLE rollup AS
            SELECT part AS fine, {PART_ALL} AS coarse FROM test_parts WHERE grain = 'class'
            UNION ALL
            SELECT part, CASE WHEN correct THEN {PART_CORRECT} WHEN NOT correct THEN {PART_INCORRECT}
                              ELSE {PART_UNKNOWN} END
            FROM test_parts WHERE grain = 'class'""", "part roll-up")

    def _refuse_unknown_tests(self, table: str, frame_name: str) -> None:
        # ``table`` is one of this class's fixed table names, never user input
        self.refuse(f"""SELECT DISTINCT t.test FROM {table} t ANTI JOIN examples e
                        ON e.split = 'test' AND e.example = t.test ORDER BY 1 LIMIT 5""",
                    f"RunBundle.{frame_name} has test ids missing from the test examples")

    def _refuse_unknown_tensors(self, frame: pl.DataFrame, name: str) -> None:
        known = {r[0] for r in self.con.execute("SELECT tensor FROM groups").fetchall()}
        unknown = sorted(set(frame["tensor"].cast(pl.String).unique().to_list()) - known)
        if unknown:
            raise BadInputError(f"RunBundle.{name} names tensors missing from groups: {unknown[:5]}")

    def _components(self, frame: pl.DataFrame) -> None:
        try:
            self.load(frame, """
                INSERT INTO components
                SELECT s.test::INTEGER, g.tensor_id, s.step_lo::INTEGER, s.step_hi::INTEGER, s.output::INTEGER,
                       s.value::DOUBLE, s.decay::DOUBLE
                FROM src s LEFT JOIN groups g ON g.tensor = s.tensor::VARCHAR
                ORDER BY 1""", "RunBundle.components")
        except BadInputError:
            self._refuse_unknown_tensors(frame, "components")
            raise
        self._refuse_unknown_tests("components", "components")
        self.run("""CREATE TEMP TABLE fine (level level_kind, part INTEGER, step_lo INTEGER, step_hi INTEGER,
                    group_id INTEGER, value DOUBLE, decay DOUBLE, abs_value DOUBLE, abs_decay DOUBLE)""", "temp")
        for level in LEVELS:
            self._fine_component_summary(level)
        self.run("""
            INSERT INTO component_summary
            SELECT * FROM fine
            UNION ALL
            SELECT f.level, r.coarse, f.step_lo, MAX(f.step_hi), f.group_id, SUM(f.value), SUM(f.decay),
                   SUM(f.abs_value), SUM(f.abs_decay)
            FROM fine f JOIN rollup r ON r.fine = f.part GROUP BY f.level, r.coarse, f.step_lo, f.group_id
            ORDER BY level, part, step_lo, group_id""", "component summary")
        self.run("DROP TABLE fine", "temp")
        self.run(f"""INSERT INTO windows SELECT DISTINCT 'components', step_lo, step_hi FROM component_summary
                     WHERE level = 'tensor' AND part = {PART_ALL} ORDER BY step_lo""", "component windows")
        self.refuse("SELECT step_lo FROM windows WHERE view = 'components' GROUP BY step_lo "
                    "HAVING COUNT(*) > 1 ORDER BY 1 LIMIT 5", "RunBundle.components has windows with several step_hi")

    def _fine_component_summary(self, level: str) -> None:
        """Sum the cells of ``level`` within each (label, correct) part into the temp table ``fine``."""
        gid, _ = _LEVEL_COLUMNS[level]  # fixed identifier
        one_tensor_groups = self.run(f"SELECT COUNT(DISTINCT {gid}) = COUNT(*) FROM groups", "groups")[0][0]
        if one_tensor_groups:  # each stored row is already a cell
            cells = f"""SELECT g.{gid} AS group_id, c.step_lo, c.step_hi, c.test, c.value, c.decay
                        FROM components c JOIN groups g USING (tensor_id)"""
        else:
            cells = f"""SELECT g.{gid} AS group_id, c.step_lo, MAX(c.step_hi) AS step_hi, c.test,
                               SUM(c.value) AS value, SUM(c.decay) AS decay
                        FROM components c JOIN groups g USING (tensor_id)
                        GROUP BY g.{gid}, c.step_lo, c.test, c.output"""
        self.run(f"""
            INSERT INTO fine
            SELECT CAST($level AS level_kind), e.part, cell.step_lo, MAX(cell.step_hi), cell.group_id,
                   SUM(cell.value), SUM(cell.decay), SUM(ABS(cell.value)), SUM(ABS(cell.decay))
            FROM ({cells}) cell JOIN examples e ON e.split = 'test' AND e.example = cell.test
            GROUP BY e.part, cell.step_lo, cell.group_id""", f"component cells ({level})", {"level": level})

    def _data(self, frame: pl.DataFrame, test_window: int | None) -> None:
        """Per-test rows and the per-class parts in windows of ``test_window`` steps (merged from
        the frame's windows, counted from its first), the parts 0–3 at the frame's own windows."""
        self.run("""CREATE TEMP TABLE cells (test INTEGER, step_lo INTEGER, step_hi INTEGER, train INTEGER,
                    output INTEGER, value DOUBLE)""", "temp")
        self.load(frame, """
            INSERT INTO cells SELECT test::INTEGER, step_lo::INTEGER, step_hi::INTEGER, train::INTEGER,
                                     output::INTEGER, value::DOUBLE
            FROM src""", "RunBundle.data")
        self.refuse("SELECT step_lo FROM cells WHERE step_hi <= step_lo ORDER BY 1 LIMIT 5",
                    "RunBundle.data has empty windows (step_hi <= step_lo) starting at")
        self.refuse("SELECT step_lo FROM cells GROUP BY step_lo HAVING COUNT(DISTINCT step_hi) > 1 ORDER BY 1 LIMIT 5",
                    "RunBundle.data has windows with several step_hi")
        ((first, width),) = self.run("SELECT MIN(step_lo), MAX(step_hi - step_lo) FROM cells", "data windows")
        merge = test_window or width or 1
        if width and merge % width:
            raise BadInputError(f"RunBundle.data_test_window {merge} is not a multiple of the data view's window "
                                f"of {width} steps")
        # the start of each row's merged window (its own start when nothing is merged)
        coarse = "($first + (c.step_lo - $first) // $merge * $merge)" if test_window else "c.step_lo"
        merging = {"first": first or 0, "merge": merge} if test_window else {}
        self.run(f"""
            INSERT INTO data
            SELECT c.test, {coarse} AS lo, MAX(c.step_hi), c.train, c.output, SUM(c.value)
            FROM cells c GROUP BY c.test, lo, c.train, c.output ORDER BY c.test, lo, c.train, c.output""",
                 "data rows", merging)
        self._refuse_unknown_tests("data", "data")
        self.run("""
            CREATE TEMP TABLE fine AS
            SELECT e.part, c.train, c.step_lo, MAX(c.step_hi) AS step_hi, SUM(c.value) AS value
            FROM cells c JOIN examples e ON e.split = 'test' AND e.example = c.test
            GROUP BY e.part, c.train, c.step_lo""", "data cells")
        self.run(f"""
            INSERT INTO data_summary
            SELECT c.part, c.train, {coarse} AS lo, MAX(c.step_hi), SUM(c.value)
            FROM fine c GROUP BY c.part, c.train, lo
            UNION ALL
            SELECT r.coarse, f.train, f.step_lo, MAX(f.step_hi), SUM(f.value)
            FROM fine f JOIN rollup r ON r.fine = f.part GROUP BY r.coarse, f.train, f.step_lo
            ORDER BY 1, 2, 3""", "data summary", merging)
        self.run("DROP TABLE fine", "temp")
        self.run("DROP TABLE cells", "temp")
        self.refuse(f"""SELECT DISTINCT s.train FROM data_summary s ANTI JOIN examples e
                        ON e.split = 'train' AND e.example = s.train
                        WHERE s.part = {PART_ALL} AND s.train <> {REGULARIZER} ORDER BY 1 LIMIT 5""",
                    f"RunBundle.data has train ids missing from the train examples (other than {REGULARIZER})")
        self.run(f"""INSERT INTO windows SELECT DISTINCT 'data', step_lo, step_hi FROM data_summary
                     WHERE part = {PART_ALL} ORDER BY step_lo""", "data windows")
        self.run("""INSERT INTO windows SELECT DISTINCT 'data_tests', step_lo, step_hi FROM data
                    ORDER BY step_lo""", "per-test data windows")
        self.refuse("SELECT view::VARCHAR || ' ' || step_lo FROM windows WHERE view IN ('data', 'data_tests') "
                    "GROUP BY view, step_lo HAVING COUNT(*) > 1 ORDER BY 1 LIMIT 5",
                    "RunBundle.data has windows with several step_hi")

    def _units(self, units: pl.DataFrame, values: pl.DataFrame) -> None:
        """The units of the partitions, and their values summed within the parts 0–3."""
        self.load(units, """
            INSERT INTO units SELECT unit_id::INTEGER, partition::VARCHAR, kind::VARCHAR, unit::VARCHAR,
                                     label::INTEGER, position::INTEGER, layer::VARCHAR, module::VARCHAR,
                                     tensors::VARCHAR, size::BIGINT
            FROM src ORDER BY 1""", "RunBundle.units")
        self.refuse("SELECT unit_id FROM units GROUP BY unit_id HAVING COUNT(*) > 1 ORDER BY 1 LIMIT 5",
                    "RunBundle.units lists unit ids more than once")
        self.refuse("SELECT partition || ' ' || unit FROM units GROUP BY partition, unit HAVING COUNT(*) > 1 "
                    "ORDER BY 1 LIMIT 5", "RunBundle.units names a unit twice in one partition")
        self.load(values, """
            CREATE TEMP TABLE fine AS
            SELECT e.part, c.step_lo::INTEGER AS step_lo, MAX(c.step_hi)::INTEGER AS step_hi,
                   c.unit_id::INTEGER AS unit_id, SUM(c.value) AS value, SUM(c.decay) AS decay,
                   SUM(ABS(c.value)) AS abs_value, SUM(ABS(c.decay)) AS abs_decay,
                   COUNT(*) FILTER (WHERE e.example IS NULL) AS unknown
            FROM src c LEFT JOIN examples e ON e.split = 'test' AND e.example = c.test
            GROUP BY e.part, c.step_lo, c.unit_id""", "RunBundle.unit_components")
        self.refuse("SELECT step_lo FROM fine WHERE step_hi <= step_lo ORDER BY 1 LIMIT 5",
                    "RunBundle.unit_components has empty windows (step_hi <= step_lo) starting at")
        self.refuse("SELECT DISTINCT unit_id FROM fine WHERE unknown > 0 ORDER BY 1 LIMIT 5",
                    "RunBundle.unit_components has test ids missing from the test examples, for units")
        self.refuse("SELECT DISTINCT f.unit_id FROM fine f ANTI JOIN units u USING (unit_id) ORDER BY 1 LIMIT 5",
                    "RunBundle.unit_components names units missing from RunBundle.units")
        self.run("""
            INSERT INTO unit_summary
            SELECT r.coarse, f.step_lo, MAX(f.step_hi), f.unit_id, SUM(f.value), SUM(f.decay), SUM(f.abs_value),
                   SUM(f.abs_decay)
            FROM fine f JOIN rollup r ON r.fine = f.part GROUP BY r.coarse, f.step_lo, f.unit_id
            ORDER BY 1, 4, 2""", "unit summary")
        self.run("DROP TABLE fine", "temp")

    def _importance(self, frame: pl.DataFrame) -> None:
        try:
            self.load(frame, """
                INSERT INTO importance
                SELECT g.tensor_id, s."index"::BIGINT, s.importance::DOUBLE, s.gradient::DOUBLE, s.decay::DOUBLE,
                       s.balance::DOUBLE, s.taylor::DOUBLE, s.magnitude::DOUBLE
                FROM src s LEFT JOIN groups g ON g.tensor = s.tensor::VARCHAR
                ORDER BY 1, 2""", "RunBundle.importance")
        except BadInputError:
            self._refuse_unknown_tensors(frame, "importance")
            raise

    def _completeness(self, frame: pl.DataFrame) -> None:
        self.load(frame, """
            INSERT INTO completeness
            SELECT test::INTEGER, output::INTEGER, step::INTEGER, true_change::DOUBLE, reconstructed::DOUBLE,
                   quadrature_residual::DOUBLE, optimizer_residual::DOUBLE, nodes::INTEGER
            FROM src ORDER BY 1""", "RunBundle.completeness")
        self._refuse_unknown_tests("completeness", "completeness")
        self.run("""
            CREATE TEMP TABLE fine AS
            SELECT e.part, c.step, SUM(c.true_change) AS true_change, SUM(c.reconstructed) AS reconstructed,
                   SUM(c.quadrature_residual) AS quadrature_residual, SUM(c.optimizer_residual) AS optimizer_residual,
                   SUM(ABS(c.quadrature_residual)) AS abs_residual, MAX(c.nodes) AS nodes
            FROM completeness c JOIN examples e ON e.split = 'test' AND e.example = c.test
            GROUP BY e.part, c.step""", "completeness cells")
        self.run("""
            INSERT INTO completeness_summary
            SELECT * FROM fine
            UNION ALL
            SELECT r.coarse, f.step, SUM(f.true_change), SUM(f.reconstructed), SUM(f.quadrature_residual),
                   SUM(f.optimizer_residual), SUM(f.abs_residual), MAX(f.nodes)
            FROM fine f JOIN rollup r ON r.fine = f.part GROUP BY r.coarse, f.step
            ORDER BY part, step""", "completeness summary")
        self.run("DROP TABLE fine", "temp")
        self.run("""
            INSERT INTO completeness_totals
            SELECT test, output, SUM(true_change), SUM(reconstructed), SUM(quadrature_residual)
            FROM completeness GROUP BY test, output ORDER BY test, output""", "completeness totals")


_PRUNING_INSERT = """
    INSERT INTO pruning SELECT method::VARCHAR, scope::VARCHAR, sparsity::DOUBLE, seed::BIGINT, agreement::DOUBLE,
                               accuracy::DOUBLE, kl::DOUBLE, achieved_sparsity::DOUBLE
    FROM src ORDER BY 1, 2, 4, 3"""


def _connect_writable(path: Path, threads: int) -> duckdb.DuckDBPyConnection:
    threads = as_int(threads, "threads")
    if threads < 1:
        raise BadInputError(f"threads must be at least 1, got {threads}")
    return duckdb.connect(str(path), config={"threads": threads})


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Hold the lock of the writers of ``target``; wait, with one message, while another process holds it.

    The lock is an ``flock`` on ``.NAME.lock`` beside the target. The holder removes the file
    when it is done; a waiter that then finds it gone (or replaced) takes the new one.
    """
    lock = _lock_path(target)
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise StoreError(f"cannot lock {target} for writing ({exc.strerror}: {lock})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not announced:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    log.warning("waiting for another process (pid %s) that is writing %s", holder, target)
                    announced = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file before we got it: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        _remove_quietly(lock)
        os.close(fd)


def _replaceable(path: Path) -> bool:
    """Whether an existing file may be replaced by a run database: empty, a run database, or a damaged
    DuckDB file; never a foreign file or another program's DuckDB database."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror}); choose another path") from None
    if not head:
        return True
    if head[8:12] != _MAGIC:
        return False
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS {_ALIAS} (READ_ONLY)")
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = $db",
                                            {"db": _ALIAS}).fetchall()}
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise StoreError(f"{path} is open for writing in another program; close it there, or wait until "
                             "it finishes, and try again") from None
        return True
    except duckdb.Error:
        return True   # damaged: re-creating it is what the reader advises
    finally:
        con.close()
    return "schema_version" in tables


def check_target(db_path: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse a path a run database cannot be published to, before any work is done.

    The path must not be a folder or lie under a file, its folder must be writable, an existing
    file there must be a run database (or empty, or a damaged DuckDB file), and it must not be or
    lie inside any of ``protect`` (the inputs of the command: a run directory, a database).
    """
    target = Path(db_path)
    resolved = target.resolve()
    for path in protect:
        inside = Path(path).resolve()
        if resolved == inside or inside in resolved.parents:
            raise BadInputError(f"{target} is {'inside ' if resolved != inside else ''}{path}, an input of this "
                                "command; write the run database somewhere else")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != target and not existing.is_dir():
        raise BadInputError(f"{target} cannot be created: {existing} is a file, not a folder")
    if existing == target and not target.is_file():
        raise BadInputError(f"{target} exists and is not a file; choose another path for the run database")
    folder = existing if existing != target else target.parent
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{target} cannot be written: {folder} is not writable (permission denied)")
    if existing == target and not _replaceable(target):
        raise BadInputError(f"{target} exists and is not a run database; it would be overwritten: remove it "
                            "yourself or choose another path")
    return target


def _check_space(folder: Path, needed: int, target: Path) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StoreError(f"not enough free space to write {target}: about {needed / 2**20:.0f} MiB are needed, "
                         f"{free / 2**20:.0f} MiB are free in {folder}; free some space and try again")


def _bundle_bytes(bundle: RunBundle) -> int:
    frames = [getattr(bundle, name) for name in _FRAMES]
    return sum(frame.estimated_size() for frame in frames if frame is not None)


@contextmanager
def _publishing(target: Path, action: str, threads: int, needed: int,
                copy_of: Path | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A writable connection to a new temporary file beside ``target`` (a copy of ``copy_of``).

    Runs under the writers' lock of ``target``, after checking that ``needed`` bytes are free.
    When the block succeeds the file is checkpointed, closed, synced and renamed over
    ``target``; when it fails (an error, a full disk, an interrupt) the temporary file is
    removed and ``target`` is untouched.
    """
    with writer_lock(target):
        _remove_stale_temps(target)
        _check_space(target.parent, needed + (copy_of.stat().st_size if copy_of is not None else 0), target)
        tmp = _temp_path(target)
        try:
            if copy_of is not None:
                shutil.copyfile(copy_of, tmp)
            con = _connect_writable(tmp, threads)
            try:
                yield con
                con.execute("CHECKPOINT")
            finally:
                con.close()
            _fsync(tmp)
            os.replace(tmp, target)
            _fsync(target.parent, directory=True)
        except BaseException as exc:
            _remove_quietly(tmp)
            _remove_quietly(Path(f"{tmp}.wal"))
            if isinstance(exc, duckdb.Error):
                raise StoreError(f"{action} {target} failed: {first_line(exc)}; {target} is unchanged") from None
            if isinstance(exc, OSError):
                reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                raise StoreError(f"{action} {target} failed: {reason}; {target} is unchanged") from None
            raise


def write_run(db_path: str | os.PathLike, bundle: RunBundle, *, threads: int = DEFAULT_THREADS) -> Path:
    """Write ``bundle`` to ``db_path`` atomically and return the path.

    The database is built in a temporary file beside the target, checkpointed, closed,
    synced and renamed over the target. On any error the temporary file is removed and an
    existing target is left as it was. Temporary files of dead writers of the same target
    are removed first. The target is checked first (``check_target``).
    """
    target = Path(db_path)
    meta_rows = _check_bundle(bundle)
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _publishing(target, "writing run database", threads, _bundle_bytes(bundle) + SPACE_MARGIN) as con:
        _Writer(con).write(bundle, meta_rows)
    return target


def add_pruning(db_path: str | os.PathLike, frame: pl.DataFrame, *, threads: int = DEFAULT_THREADS,
                keep_other_curves: bool = False) -> Path:
    """Replace the pruning table of an existing run database atomically (copy, modify, rename).

    With ``keep_other_curves`` only the rows of the (method, scope) pairs in ``frame`` are
    replaced and the others kept; the stored rows are read under the writers' lock, so two
    processes adding curves to one database never lose each other's rows.
    """
    target = Path(db_path)
    _check_frame("pruning", frame, required=True)
    RunDB.open(target, threads=threads).close()  # refuses missing, corrupt or foreign files untouched
    needed = frame.estimated_size() + SPACE_MARGIN
    with _publishing(target, "adding pruning curves to", threads, needed, copy_of=target) as con:
        con.execute("BEGIN TRANSACTION")
        if keep_other_curves:
            con.register("src", frame.to_arrow())
            con.execute("DELETE FROM pruning WHERE (method, scope) IN (SELECT DISTINCT method, scope FROM src)")
            con.unregister("src")
        else:
            con.execute("DELETE FROM pruning")
        _Writer(con).load(frame, _PRUNING_INSERT, "pruning frame")
        con.execute("COMMIT")
    return target


def add_progress(db_path: str | os.PathLike, progress: pl.DataFrame, norms: pl.DataFrame | None = None, *,
                 threads: int = DEFAULT_THREADS) -> Path:
    """Replace the progress measures (``measure, step, value``) and the final embedding's Fourier
    norms (``tensor, frequency, norm, key``) of an existing run database atomically."""
    target = Path(db_path)
    _check_frame("progress", progress, required=True)
    _check_frame("frequency_norms", norms, required=False)
    with RunDB.open(target, threads=threads) as db:  # refuses missing, corrupt or foreign files untouched
        if db.schema_version < 2:
            raise BadInputError(f"{target} has run database schema version {db.schema_version}, which has no "
                                "progress table; re-create it with `python -m engine explain`")
    needed = progress.estimated_size() + (norms.estimated_size() if norms is not None else 0) + SPACE_MARGIN
    with _publishing(target, "adding progress measures to", threads, needed, copy_of=target) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM progress")
        con.execute("DELETE FROM frequency_norms")
        writer = _Writer(con)
        writer.load(progress, "INSERT INTO progress SELECT measure::VARCHAR, step::INTEGER, value::DOUBLE FROM src "
                    "ORDER BY 1, 2", "progress frame")
        writer.refuse("SELECT measure || ' ' || step FROM progress GROUP BY measure, step HAVING COUNT(*) > 1 "
                      "ORDER BY 1 LIMIT 5", "progress frame lists a (measure, step) more than once")
        if norms is not None:
            writer.load(norms, "INSERT INTO frequency_norms SELECT tensor::VARCHAR, frequency::INTEGER, norm::DOUBLE, "
                        "key::BOOLEAN FROM src ORDER BY 1, 2", "frequency norms frame")
        con.execute("COMMIT")
    return target
