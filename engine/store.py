"""Run database: schema, bulk writes, atomic publish and the read queries of the dashboard.

This is the only module that speaks SQL. One DuckDB file holds one explained run. Writers
build the file under a temporary name beside the target and rename it into place, so a
reader sees either the previous complete file or the new complete file, never a half-run.
Readers attach files read-only and get polars frames back.

Schema (version 1). Names are stored once (``groups``, ENUM types); the large tables carry
integer keys. Rows are inserted sorted by the columns queries filter on, so DuckDB's zone
maps skip row groups. Test examples fall into *parts*: 0 = all tests, 1 = correctly and
2 = incorrectly predicted, 3 = without a prediction, 4… = one per (label, correct), in label
order. The ``*_summary`` tables hold the large tables summed within each part, so every test
selector but a single example reads a few contiguous rows of a summary; the large tables are
sorted by test and serve single examples.

| table | one row per | columns | sorted by |
|---|---|---|---|
| schema_version | file | version INTEGER, created_by VARCHAR | — |
| meta | metadata key | key VARCHAR, value JSON | key |
| steps | training step | step BIGINT, lr, weight_decay, train_loss, val_loss, train_acc, val_acc, update_norm, param_norm, loss_change DOUBLE | step |
| groups | parameter tensor (hierarchy tensor → module → layer) | tensor_id INTEGER, tensor VARCHAR, module_id INTEGER, module VARCHAR, layer_id INTEGER, layer VARCHAR, size BIGINT, position INTEGER | tensor_id (= model order) |
| examples | train or test example | split ENUM(train, test), example INTEGER, label INTEGER, text VARCHAR, predicted INTEGER, correct BOOLEAN, part INTEGER (test: its (label, correct) part) | split, example |
| test_parts | part of the test split | part INTEGER, grain ENUM(all, correct, class), label INTEGER, correct BOOLEAN, tests INTEGER | part |
| windows | stored step window of a view | view ENUM(components, data), step_lo INTEGER, step_hi INTEGER | view, step_lo |
| components | window × tensor × test × output | test, tensor_id, step_lo, step_hi, output INTEGER, value, decay DOUBLE | test |
| component_summary | level × part × window × group | level ENUM(tensor, module, layer), part, step_lo, step_hi, group_id INTEGER, value, decay, abs_value, abs_decay DOUBLE | level, part, step_lo, group_id |
| data | window × test × train × output | test, step_lo, step_hi, train, output INTEGER, value DOUBLE | test |
| data_summary | part × train × window | part, train, step_lo, step_hi INTEGER, value DOUBLE | part, train, step_lo |
| importance | parameter element | tensor_id INTEGER, index BIGINT, importance, magnitude DOUBLE | tensor_id, index |
| completeness | step × test × output | test, output, step INTEGER, true_change, reconstructed, quadrature_residual, optimizer_residual DOUBLE, nodes INTEGER | test |
| completeness_summary | part × step | part, step INTEGER, true_change, reconstructed, quadrature_residual, optimizer_residual, abs_residual DOUBLE, nodes INTEGER | part, step |
| completeness_totals | test × output (sums over steps) | test, output INTEGER, true_change, reconstructed, quadrature_residual DOUBLE | test, output |
| predictions | test × output | test, output INTEGER, initial, true_final, reconstructed_final DOUBLE | test, output |
| exactness | quadrature rule compared | quadrature VARCHAR, agreement, kl DOUBLE, gradient_evaluations BIGINT, max_rel_residual DOUBLE | quadrature |
| pruning | method × scope × seed × sparsity | method, scope VARCHAR, sparsity DOUBLE, seed BIGINT, agreement, accuracy, kl, achieved_sparsity DOUBLE | method, scope, seed, sparsity |

Measures. A *cell* is one stored step window × one group × one test × one output; its value
is the sum of the ``components`` rows of the group's tensors. ``signed`` sums cell values;
``absolute`` sums |cell value| (cancellation between tests, outputs and stored windows is
removed, cancellation between the tensors of a group is kept); ``share`` is a group's
absolute divided by the absolute of all groups in the same window. ``decay`` gets the same
treatment as ``value``; its share is divided by the total absolute of ``value``. Step ranges
``steps=(lo, hi)`` select the stored windows (or steps) with ``lo <= step_lo < hi``.
"""  # noqa: E501

from __future__ import annotations

import json
import logging
import operator
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.errors import (
    BadInputError,
    RunNotFoundError,
    StoreCorruptError,
    StoreError,
    StoreNameError,
    StoreSchemaError,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RUN_SUFFIX = ".duckdb"
DEFAULT_THREADS = 2
LEVELS = ("tensor", "module", "layer")
MEASURES = ("signed", "absolute", "share")
SELECTOR_KINDS = ("all", "correct", "incorrect", "class", "example")
VIEW_TABLES = ("components", "data", "importance", "completeness", "predictions", "exactness", "pruning")
REGULARIZER = -1  # train id of the weight-decay pseudo-example in the data view

_ALIAS = "run"  # name of the attached database inside a reader's connection
_MAGIC = b"DUCK"  # DuckDB main header: 8 checksum bytes, then this magic
PART_ALL, PART_CORRECT, PART_INCORRECT, PART_UNKNOWN, FIRST_CLASS_PART = 0, 1, 2, 3, 4
_LEVEL_COLUMNS = {"tensor": ("tensor_id", "tensor"), "module": ("module_id", "module"), "layer": ("layer_id", "layer")}

_DDL = """
CREATE TYPE split_kind AS ENUM ('train', 'test');
CREATE TYPE level_kind AS ENUM ('tensor', 'module', 'layer');
CREATE TYPE view_kind AS ENUM ('components', 'data');
CREATE TYPE grain_kind AS ENUM ('all', 'correct', 'class');
CREATE TABLE schema_version (version INTEGER NOT NULL, created_by VARCHAR NOT NULL);
CREATE TABLE meta (key VARCHAR NOT NULL, value JSON NOT NULL);
CREATE TABLE steps (step BIGINT NOT NULL, lr DOUBLE, weight_decay DOUBLE, train_loss DOUBLE, val_loss DOUBLE,
    train_acc DOUBLE, val_acc DOUBLE, update_norm DOUBLE, param_norm DOUBLE, loss_change DOUBLE);
CREATE TABLE groups (tensor_id INTEGER NOT NULL, tensor VARCHAR NOT NULL, module_id INTEGER NOT NULL,
    module VARCHAR NOT NULL, layer_id INTEGER NOT NULL, layer VARCHAR NOT NULL, size BIGINT NOT NULL,
    position INTEGER NOT NULL);
CREATE TABLE examples (split split_kind NOT NULL, example INTEGER NOT NULL, label INTEGER NOT NULL,
    text VARCHAR NOT NULL, predicted INTEGER, correct BOOLEAN, part INTEGER);
CREATE TABLE test_parts (part INTEGER NOT NULL, grain grain_kind NOT NULL, label INTEGER, correct BOOLEAN,
    tests INTEGER NOT NULL);
CREATE TABLE windows (view view_kind NOT NULL, step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL);
CREATE TABLE components (test INTEGER NOT NULL, tensor_id INTEGER NOT NULL, step_lo INTEGER NOT NULL,
    step_hi INTEGER NOT NULL, output INTEGER NOT NULL, value DOUBLE NOT NULL, decay DOUBLE NOT NULL,
    CHECK (step_hi > step_lo));
CREATE TABLE component_summary (level level_kind NOT NULL, part INTEGER NOT NULL, step_lo INTEGER NOT NULL,
    step_hi INTEGER NOT NULL, group_id INTEGER NOT NULL, value DOUBLE NOT NULL, decay DOUBLE NOT NULL,
    abs_value DOUBLE NOT NULL, abs_decay DOUBLE NOT NULL);
CREATE TABLE data (test INTEGER NOT NULL, step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL,
    train INTEGER NOT NULL, output INTEGER NOT NULL, value DOUBLE NOT NULL, CHECK (step_hi > step_lo));
CREATE TABLE data_summary (part INTEGER NOT NULL, train INTEGER NOT NULL, step_lo INTEGER NOT NULL,
    step_hi INTEGER NOT NULL, value DOUBLE NOT NULL);
CREATE TABLE importance (tensor_id INTEGER NOT NULL, "index" BIGINT NOT NULL, importance DOUBLE NOT NULL,
    magnitude DOUBLE NOT NULL);
CREATE TABLE completeness (test INTEGER NOT NULL, output INTEGER NOT NULL, step INTEGER NOT NULL,
    true_change DOUBLE NOT NULL, reconstructed DOUBLE NOT NULL, quadrature_residual DOUBLE NOT NULL,
    optimizer_residual DOUBLE, nodes INTEGER NOT NULL);
CREATE TABLE completeness_summary (part INTEGER NOT NULL, step INTEGER NOT NULL, true_change DOUBLE NOT NULL,
    reconstructed DOUBLE NOT NULL, quadrature_residual DOUBLE NOT NULL, optimizer_residual DOUBLE,
    abs_residual DOUBLE NOT NULL, nodes INTEGER NOT NULL);
CREATE TABLE completeness_totals (test INTEGER NOT NULL, output INTEGER NOT NULL, true_change DOUBLE NOT NULL,
    reconstructed DOUBLE NOT NULL, quadrature_residual DOUBLE NOT NULL);
CREATE TABLE predictions (test INTEGER NOT NULL, output INTEGER NOT NULL, initial DOUBLE NOT NULL,
    true_final DOUBLE NOT NULL, reconstructed_final DOUBLE NOT NULL);
CREATE TABLE exactness (quadrature VARCHAR NOT NULL, agreement DOUBLE NOT NULL, kl DOUBLE NOT NULL,
    gradient_evaluations BIGINT NOT NULL, max_rel_residual DOUBLE NOT NULL);
CREATE TABLE pruning (method VARCHAR NOT NULL, scope VARCHAR NOT NULL, sparsity DOUBLE NOT NULL,
    seed BIGINT NOT NULL, agreement DOUBLE NOT NULL, accuracy DOUBLE NOT NULL, kl DOUBLE NOT NULL,
    achieved_sparsity DOUBLE NOT NULL);
"""

REQUIRED_TABLES = (
    "schema_version", "meta", "steps", "groups", "examples", "test_parts", "windows", "components",
    "component_summary", "data", "data_summary", "importance", "completeness", "completeness_summary",
    "completeness_totals", "predictions", "exactness", "pruning",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Bundle: what the engine hands to the store
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Col:
    """One column of a bundle frame: name, accepted polars kind, whether nulls are allowed."""

    name: str
    kind: str  # "int" | "float" | "str" | "bool"
    nullable: bool = False


def _cols(spec: str) -> tuple[_Col, ...]:
    """Parse ``"name:kind name:kind?"`` (``?`` = nullable) into column specs."""
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append(_Col(name, kind.rstrip("?"), kind.endswith("?")))
    return tuple(out)


_FRAMES: dict[str, tuple[_Col, ...]] = {
    "steps": _cols(
        "step:int lr:float weight_decay:float train_loss:float? val_loss:float? train_acc:float? "
        "val_acc:float? update_norm:float param_norm:float loss_change:float?"
    ),
    "groups": _cols("tensor:str module:str layer:str size:int position:int"),
    "examples": _cols("split:str example:int label:int text:str predicted:int? correct:bool?"),
    "components": _cols("step_lo:int step_hi:int tensor:str test:int output:int value:float decay:float"),
    "data": _cols("step_lo:int step_hi:int train:int test:int output:int value:float"),
    "importance": _cols("tensor:str index:int importance:float magnitude:float"),
    "completeness": _cols(
        "step:int test:int output:int true_change:float reconstructed:float quadrature_residual:float "
        "optimizer_residual:float? nodes:int"
    ),
    "predictions": _cols("test:int output:int initial:float true_final:float reconstructed_final:float"),
    "exactness": _cols("quadrature:str agreement:float kl:float gradient_evaluations:int max_rel_residual:float"),
    "pruning": _cols(
        "method:str scope:str sparsity:float seed:int agreement:float accuracy:float kl:float "
        "achieved_sparsity:float"
    ),
}
_REQUIRED_FRAMES = ("steps", "groups", "examples", "completeness")
_META_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "steps": (int,),
    "quantity": (str,),
    "quadrature": (str,),
}
_OPTIONAL_META_TYPES: dict[str, tuple[type, ...]] = {
    "data_fingerprint": (str,),
    "model_summary": (dict,),
    "optimizer": (dict,),
}


@dataclass(frozen=True)
class RunBundle:
    """Everything ``explain`` writes into one run database (column contract in the schema table above).

    ``meta`` needs ``task`` (str), ``steps`` (int), ``quantity`` (str) and ``quadrature``
    (str); ``data_fingerprint`` (str), ``model_summary`` and ``optimizer`` (dicts) are typed
    when present; any other JSON-serialisable key is kept as is. Component, data and
    completeness rows are one per (window or step, tensor/train, test, output).
    """

    meta: dict
    steps: pl.DataFrame  # (step,)
    groups: pl.DataFrame  # (tensor,)
    examples: pl.DataFrame  # (split, example)
    components: pl.DataFrame | None  # (window, tensor, test, output)
    data: pl.DataFrame | None  # (window, train, test, output)
    importance: pl.DataFrame | None  # (tensor, index)
    completeness: pl.DataFrame  # (step, test, output)
    predictions: pl.DataFrame | None  # (test, output)
    exactness: pl.DataFrame | None  # (quadrature rule,)
    pruning: pl.DataFrame | None  # (method, scope, seed, sparsity)


@dataclass(frozen=True)
class RunMeta:
    """Typed view of the metadata every run database carries."""

    task: str
    steps: int
    quantity: str
    quadrature: str
    data_fingerprint: str | None
    model_summary: dict
    optimizer: dict
    schema_version: int


@dataclass(frozen=True)
class TestSelector:
    """Which test examples a query sums over.

    ``all``; ``correct`` / ``incorrect`` (final model's prediction; examples without one are
    in neither); ``class`` (label == value); ``example`` (test id == value).
    """

    __test__ = False  # not a pytest test class despite the name

    kind: str = "all"
    value: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SELECTOR_KINDS:
            raise BadInputError(f"test selector kind {self.kind!r} is unknown; use one of {SELECTOR_KINDS}")
        if self.kind in ("class", "example"):
            object.__setattr__(self, "value", _as_int(self.value, f"test selector {self.kind!r} value"))
        elif self.value is not None:
            raise BadInputError(f"test selector {self.kind!r} takes no value (got {self.value!r})")


ALL_TESTS = TestSelector("all")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise BadInputError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise BadInputError(f"{what} must be an integer, got {value!r}") from None


# ----------------------------------------------------------------------------------------------
# Names and paths
# ----------------------------------------------------------------------------------------------

_FORBIDDEN_CHARACTERS = {"'": "a quote", '"': "a quote", "`": "a backquote", ";": "a semicolon"}


def validate_run_name(name: str) -> str:
    """Return ``name`` if it is a plain file name for a run, else raise StoreNameError."""
    if not isinstance(name, str) or not name.strip():
        raise StoreNameError(f"run name {name!r} is empty; give a plain name such as 'grokking-p113'")
    problems = []
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        problems.append("a path separator")
    if ".." in name:
        problems.append("'..'")
    if "\0" in name:
        problems.append("a NUL character")
    problems += sorted({what for ch, what in _FORBIDDEN_CHARACTERS.items() if ch in name})
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name.replace("\0", "")):
        problems.append("a control character")
    if name.startswith("."):
        problems.append("a leading '.' (reserved for temporary files)")
    if name != name.strip():
        problems.append("leading or trailing spaces")
    if len(name) > 128:
        problems.append("more than 128 characters")
    if problems:
        raise StoreNameError(
            f"run name {name!r} contains {', '.join(problems)}; use letters, digits, '-', '_' and '.'"
        )
    return name


def run_path(directory: str | os.PathLike, name: str) -> Path:
    """Path of the run database called ``name`` in ``directory`` (the name is validated)."""
    return Path(directory) / f"{validate_run_name(name)}{RUN_SUFFIX}"


def list_runs(directory: str | os.PathLike) -> list[Path]:
    """Published run databases in ``directory``, sorted; temporary files of writers are ignored."""
    folder = Path(directory)
    if not folder.is_dir():
        raise RunNotFoundError(f"run folder {folder} does not exist; create it or point to another folder")
    return sorted(
        p for p in folder.iterdir() if p.suffix == RUN_SUFFIX and not p.name.startswith(".") and p.is_file()
    )


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


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
    missing = [c.name for c in _FRAMES[name] if c.name not in frame.columns]
    if missing:
        raise BadInputError(f"RunBundle.{name} lacks columns {missing}; it has {frame.columns}")
    for col in _FRAMES[name]:
        dtype = frame.schema[col.name]
        if not _kind_ok(dtype, col.kind, col.nullable):
            raise BadInputError(f"RunBundle.{name}.{col.name} must hold {col.kind} values, got {dtype}")
        if not col.nullable and frame[col.name].null_count():
            raise BadInputError(f"RunBundle.{name}.{col.name} has missing values; every row needs one")


def _check_meta(meta: Any) -> list[tuple[str, str]]:
    """Validate ``meta`` and return its (key, JSON text) rows."""
    if not isinstance(meta, dict):
        raise BadInputError(f"RunBundle.meta must be a dict, got {type(meta).__name__}")
    for key in _META_TYPES:
        if key not in meta:
            raise BadInputError(f"RunBundle.meta lacks {key!r}; required keys are {sorted(_META_TYPES)}")
    for key, types in {**_META_TYPES, **_OPTIONAL_META_TYPES}.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or isinstance(value, bool)):
            wanted = " or ".join(t.__name__ for t in types)
            raise BadInputError(f"RunBundle.meta[{key!r}] must be {wanted}, got {value!r}")
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
            raise BadInputError(f"{what}: {_first_line(exc)}") from None
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
        if bundle.data is not None:
            self._data(bundle.data)
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

    def _data(self, frame: pl.DataFrame) -> None:
        self.load(frame, """
            INSERT INTO data SELECT test::INTEGER, step_lo::INTEGER, step_hi::INTEGER, train::INTEGER,
                                    output::INTEGER, value::DOUBLE
            FROM src ORDER BY 1""", "RunBundle.data")
        self._refuse_unknown_tests("data", "data")
        self.run("""
            CREATE TEMP TABLE fine AS
            SELECT e.part, d.train, d.step_lo, MAX(d.step_hi) AS step_hi, SUM(d.value) AS value
            FROM data d JOIN examples e ON e.split = 'test' AND e.example = d.test
            GROUP BY e.part, d.train, d.step_lo""", "data cells")
        self.run("""
            INSERT INTO data_summary
            SELECT * FROM fine
            UNION ALL
            SELECT r.coarse, f.train, f.step_lo, MAX(f.step_hi), SUM(f.value)
            FROM fine f JOIN rollup r ON r.fine = f.part GROUP BY r.coarse, f.train, f.step_lo
            ORDER BY part, train, step_lo""", "data summary")
        self.run("DROP TABLE fine", "temp")
        self.refuse(f"""SELECT DISTINCT s.train FROM data_summary s ANTI JOIN examples e
                        ON e.split = 'train' AND e.example = s.train
                        WHERE s.part = {PART_ALL} AND s.train <> {REGULARIZER} ORDER BY 1 LIMIT 5""",
                    f"RunBundle.data has train ids missing from the train examples (other than {REGULARIZER})")
        self.run(f"""INSERT INTO windows SELECT DISTINCT 'data', step_lo, step_hi FROM data_summary
                     WHERE part = {PART_ALL} ORDER BY step_lo""", "data windows")
        self.refuse("SELECT step_lo FROM windows WHERE view = 'data' GROUP BY step_lo HAVING COUNT(*) > 1 "
                    "ORDER BY 1 LIMIT 5", "RunBundle.data has windows with several step_hi")

    def _importance(self, frame: pl.DataFrame) -> None:
        try:
            self.load(frame, """
                INSERT INTO importance
                SELECT g.tensor_id, s."index"::BIGINT, s.importance::DOUBLE, s.magnitude::DOUBLE
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
    threads = _as_int(threads, "threads")
    if threads < 1:
        raise BadInputError(f"threads must be at least 1, got {threads}")
    return duckdb.connect(str(path), config={"threads": threads})


@contextmanager
def _publishing(target: Path, action: str, threads: int, copy_of: Path | None = None) -> Iterator[
        duckdb.DuckDBPyConnection]:
    """A writable connection to a new temporary file beside ``target`` (a copy of ``copy_of``).

    When the block succeeds the file is checkpointed, closed, synced and renamed over
    ``target``; when it fails the temporary file is removed and ``target`` is untouched.
    """
    _remove_stale_temps(target)
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
            raise StoreError(f"{action} {target} failed: {_first_line(exc)}") from None
        raise


def write_run(db_path: str | os.PathLike, bundle: RunBundle, *, threads: int = DEFAULT_THREADS) -> Path:
    """Write ``bundle`` to ``db_path`` atomically and return the path.

    The database is built in a temporary file beside the target, checkpointed, closed,
    synced and renamed over the target. On any error the temporary file is removed and an
    existing target is left as it was. Temporary files of dead writers of the same target
    are removed first.
    """
    target = Path(db_path)
    meta_rows = _check_bundle(bundle)
    if target.exists() and not target.is_file():
        raise BadInputError(f"{target} exists and is not a file; choose another path for the run database")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _publishing(target, "writing run database", threads) as con:
        _Writer(con).write(bundle, meta_rows)
    return target


def add_pruning(db_path: str | os.PathLike, frame: pl.DataFrame, *, threads: int = DEFAULT_THREADS) -> Path:
    """Replace the pruning table of an existing run database atomically (copy, modify, rename)."""
    target = Path(db_path)
    _check_frame("pruning", frame, required=True)
    RunDB.open(target, threads=threads).close()  # refuses missing, corrupt or foreign files untouched
    with _publishing(target, "adding pruning curves to", threads, copy_of=target) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM pruning")
        _Writer(con).load(frame, _PRUNING_INSERT, "pruning frame")
        con.execute("COMMIT")
    return target


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _translate(path: Path, exc: duckdb.Error) -> StoreError:
    """A StoreError for a DuckDB error raised while reading ``path``."""
    if isinstance(exc, (duckdb.CatalogException, duckdb.BinderException)):
        return StoreSchemaError(
            f"{path} lacks a table or column of run database schema {SCHEMA_VERSION} ({_first_line(exc)}); "
            "re-create it with `python -m engine explain`"
        )
    return StoreCorruptError(
        f"{path} cannot be read ({_first_line(exc)}); the file is truncated or damaged: "
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
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head[8:12] != _MAGIC:
        raise StoreCorruptError(f"{path} is not a DuckDB file; point to a run database written by `explain`")


def _window_expr(window: int | None) -> tuple[str, dict]:
    if window is None:
        return "step_lo", {}
    window = _as_int(window, "window")
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
    return f" AND {column} >= $lo AND {column} < $hi", {"lo": _as_int(lo, "steps lo"), "hi": _as_int(hi, "steps hi")}


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
        self._meta = {k: json.loads(v) for k, v in self._rows("SELECT key, value FROM meta ORDER BY key")}
        counts = ", ".join(f"(SELECT COUNT(*) FROM {name})" for name in VIEW_TABLES)  # fixed table names
        self._views = dict(zip(VIEW_TABLES, self._rows(f"SELECT {counts}")[0], strict=True))
        self._class_parts = {label: (lo, hi) for label, lo, hi in self._rows(
            "SELECT label, MIN(part), MAX(part) FROM test_parts WHERE grain = 'class' GROUP BY label")}

    @classmethod
    def open(cls, path: str | os.PathLike, *, threads: int = DEFAULT_THREADS) -> RunDB:
        """Open a run database read-only; raises a StoreError subclass naming the problem."""
        path = Path(path)
        _check_file(path)
        threads = _as_int(threads, "threads")
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
        versions = self._rows("SELECT version FROM schema_version")
        found = versions[0][0] if len(versions) == 1 else None
        if found != SCHEMA_VERSION:
            shown = found if found is not None else f"{len(versions)} version rows"
            raise StoreSchemaError(
                f"{self.path} has run database schema version {shown}; this release reads version "
                f"{SCHEMA_VERSION}. Use a matching ExPLAIND Studio or re-create it with `python -m engine explain`"
            )
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            raise StoreSchemaError(f"{self.path} lacks tables {missing} of run database schema {SCHEMA_VERSION}; "
                                   "re-create it with `python -m engine explain`")
        return found

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
        meta = self._meta
        for key, types in {**_META_TYPES, **_OPTIONAL_META_TYPES}.items():
            if (key in meta or key in _META_TYPES) and not isinstance(meta.get(key), types):
                raise StoreSchemaError(f"{self.path}: metadata {key!r} is {meta.get(key)!r}, not "
                                       f"{' or '.join(t.__name__ for t in types)}; re-create the run database")
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
        """Stored step windows [step_lo, step_hi) of the components or data view."""
        view = _check_choice(view, ("components", "data"), "view")
        return self._frame("SELECT step_lo::BIGINT AS step_lo, step_hi::BIGINT AS step_hi FROM windows "
                           "WHERE view = $view ORDER BY step_lo", {"view": view})

    def importance(self, tensor: str | None = None) -> pl.DataFrame:
        """tensor, index, importance, magnitude (of one tensor, or all in model order)."""
        where, params = ("WHERE g.tensor = $tensor", {"tensor": str(tensor)}) if tensor is not None else ("", {})
        return self._frame(f"""SELECT g.tensor, i."index", i.importance, i.magnitude
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
        k = _as_int(k, "k")
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
        train = _as_int(train, "train example id")
        source, params = self._data_source(None, tests)
        return self._frame(f"""
            WITH src AS ({source}),
                 a AS (SELECT step_lo, SUM(value) AS value FROM src WHERE train = $train GROUP BY step_lo)
            SELECT w.step_lo::BIGINT AS step_lo, w.step_hi::BIGINT AS step_hi, COALESCE(a.value, 0.0) AS value
            FROM windows w LEFT JOIN a USING (step_lo)
            WHERE w.view = 'data' ORDER BY w.step_lo""", {**params, "train": train})

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


def info(db_path: str | os.PathLike) -> dict:
    """JSON-serialisable summary of a run database (for ``python -m engine info PATH --json``)."""
    with RunDB.open(db_path) as db:
        meta = db.run_meta()
        steps = db.steps()
        views = db.views()
        residuals = db.max_residuals()
        return {
            "path": str(db.path),
            "task": meta.task,
            "steps": meta.steps,
            "final_train_acc": _last_value(steps, "train_acc"),
            "final_val_acc": _last_value(steps, "val_acc"),
            "views": views,
            "views_present": [name for name, rows in views.items() if rows],
            "max_rel_residual": residuals["max_rel_residual"],
            "max_rel_residual_output": residuals["max_rel_residual_output"],
            "max_abs_residual": residuals["max_abs_residual"],
            "quantity": meta.quantity,
            "quadrature": meta.quadrature,
            "schema_version": meta.schema_version,
        }
