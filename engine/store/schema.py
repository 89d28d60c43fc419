"""Run database schema: tables, the bundle contract the engine writes, selectors and run names.

One DuckDB file holds one explained run. ``engine.store`` is the only package that speaks
SQL: the schema here, bulk writes and atomic publish in ``writer``, the dashboard's read
queries (polars frames back) in ``reader``.

Schema (version 2; version 1 files, which lack the tables marked *v2*, stay readable).
Names are stored once (``groups``, ``units``, ENUM types); the large tables carry integer
keys. Rows are inserted sorted by the columns queries filter on, so DuckDB's zone maps skip
row groups. Test examples fall into *parts*: 0 = all tests, 1 = correctly and 2 =
incorrectly predicted, 3 = without a prediction, 4… = one per (label, correct), in label
order. The ``*_summary`` tables hold the large tables summed within each part, so every test
selector but a single example reads a few contiguous rows of a summary; the large tables are
sorted by test and serve single examples.

Resolutions. The data view may be stored at two: its own windows (``windows`` view
``data``) for the parts 0–3, and windows of ``RunBundle.data_test_window`` steps (view
``data_tests``) for the per-test ``data`` rows and the per-class parts, so that a fine time
resolution costs rows per part, not per test. Units of partitions finer than a tensor
(heads, neurons, embedding rows, Fourier frequencies; ``engine.model.units``) are stored
summed within the parts 0–3 only (``unit_summary``), at the components' windows.

| table | one row per | columns | sorted by |
|---|---|---|---|
| schema_version | file | version INTEGER, created_by VARCHAR | — |
| meta | metadata key | key VARCHAR, value JSON | key |
| steps | training step (of a checkpoint series: each checkpoint and logged step; null where unknown) | step BIGINT, lr, weight_decay, train_loss, val_loss, train_acc, val_acc, update_norm, param_norm, loss_change DOUBLE | step |
| groups | parameter tensor (hierarchy tensor → module → layer) | tensor_id INTEGER, tensor VARCHAR, module_id INTEGER, module VARCHAR, layer_id INTEGER, layer VARCHAR, size BIGINT, position INTEGER | tensor_id (= model order) |
| examples | train or test example | split ENUM(train, test), example INTEGER, label INTEGER (null for floating-point targets, rendered in text), text VARCHAR, predicted INTEGER, correct BOOLEAN, part INTEGER (test: its (label, correct) part) | split, example |
| test_parts | part of the test split | part INTEGER, grain ENUM(all, correct, class), label INTEGER, correct BOOLEAN, tests INTEGER | part |
| windows | stored step window of a view | view ENUM(components, data, data_tests), step_lo INTEGER, step_hi INTEGER | view, step_lo |
| components | window × tensor × test × output | test, tensor_id, step_lo, step_hi, output INTEGER, value, decay DOUBLE | test |
| component_summary | level × part × window × group | level ENUM(tensor, module, layer), part, step_lo, step_hi, group_id INTEGER, value, decay, abs_value, abs_decay DOUBLE | level, part, step_lo, group_id |
| data | window × test × train × output | test, step_lo, step_hi, train, output INTEGER, value DOUBLE | test |
| data_summary | part × train × window | part, train, step_lo, step_hi INTEGER, value DOUBLE | part, train, step_lo |
| importance | parameter element | tensor_id INTEGER, index BIGINT, importance, gradient, decay, balance, taylor, magnitude DOUBLE (gradient, decay, balance, taylor nullable) | tensor_id, index |
| completeness | step × test × output | test, output, step INTEGER, true_change, reconstructed, quadrature_residual, optimizer_residual DOUBLE, nodes INTEGER | test |
| completeness_summary | part × step | part, step INTEGER, true_change, reconstructed, quadrature_residual, optimizer_residual, abs_residual DOUBLE, nodes INTEGER | part, step |
| completeness_totals | test × output (sums over steps) | test, output INTEGER, true_change, reconstructed, quadrature_residual DOUBLE | test, output |
| predictions | test × output | test, output INTEGER, initial, true_final, reconstructed_final DOUBLE | test, output |
| exactness | quadrature rule compared | quadrature VARCHAR, agreement, kl DOUBLE, gradient_evaluations BIGINT, max_rel_residual DOUBLE | quadrature |
| pruning | method × scope × seed × sparsity | method, scope VARCHAR, sparsity DOUBLE, seed BIGINT, agreement, accuracy, kl, achieved_sparsity DOUBLE | method, scope, seed, sparsity |
| units (v2) | unit of a partition finer than a tensor | unit_id INTEGER, partition, kind (groups, basis), unit VARCHAR, label INTEGER, position INTEGER, layer, module, tensors VARCHAR, size BIGINT | unit_id |
| unit_summary (v2) | part (0–3) × unit × window | part, step_lo, step_hi, unit_id INTEGER, value, decay, abs_value, abs_decay DOUBLE | part, unit_id, step_lo |
| progress (v2) | measure × logged step | measure VARCHAR, step INTEGER, value DOUBLE | measure, step |
| frequency_norms (v2) | frequency of the final token embedding | tensor VARCHAR, frequency INTEGER, norm DOUBLE, key BOOLEAN | frequency |

Versions. Version 2 added the importance table's ``gradient``, ``decay``, ``balance`` and
``taylor`` columns, the tables marked *v2* and the ``data_tests`` window kind; readers open
version 1 files too: their importance rows read null in these columns and their new views
are empty.
"""  # noqa: E501

from __future__ import annotations

import functools
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.errors import BadInputError, RunNotFoundError, StoreNameError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # schema versions this release opens
RUN_SUFFIX = ".duckdb"
DEFAULT_THREADS = 2
LEVELS = ("tensor", "module", "layer")
MEASURES = ("signed", "absolute", "share")
SELECTOR_KINDS = ("all", "correct", "incorrect", "class", "example")
VIEW_TABLES = ("components", "data", "importance", "completeness", "predictions", "exactness", "pruning",
               "unit_summary", "progress")
REGULARIZER = -1  # train id of the weight-decay pseudo-example in the data view

_ALIAS = "run"  # name of the attached database inside a reader's connection
_MAGIC = b"DUCK"  # DuckDB main header: 8 checksum bytes, then this magic
PART_ALL, PART_CORRECT, PART_INCORRECT, PART_UNKNOWN, FIRST_CLASS_PART = 0, 1, 2, 3, 4
_LEVEL_COLUMNS = {"tensor": ("tensor_id", "tensor"), "module": ("module_id", "module"), "layer": ("layer_id", "layer")}

_DDL = """
CREATE TYPE split_kind AS ENUM ('train', 'test');
CREATE TYPE level_kind AS ENUM ('tensor', 'module', 'layer');
CREATE TYPE view_kind AS ENUM ('components', 'data', 'data_tests');
CREATE TYPE grain_kind AS ENUM ('all', 'correct', 'class');
CREATE TABLE schema_version (version INTEGER NOT NULL, created_by VARCHAR NOT NULL);
CREATE TABLE meta (key VARCHAR NOT NULL, value JSON NOT NULL);
CREATE TABLE steps (step BIGINT NOT NULL, lr DOUBLE, weight_decay DOUBLE, train_loss DOUBLE, val_loss DOUBLE,
    train_acc DOUBLE, val_acc DOUBLE, update_norm DOUBLE, param_norm DOUBLE, loss_change DOUBLE);
CREATE TABLE groups (tensor_id INTEGER NOT NULL, tensor VARCHAR NOT NULL, module_id INTEGER NOT NULL,
    module VARCHAR NOT NULL, layer_id INTEGER NOT NULL, layer VARCHAR NOT NULL, size BIGINT NOT NULL,
    position INTEGER NOT NULL);
CREATE TABLE examples (split split_kind NOT NULL, example INTEGER NOT NULL, label INTEGER,
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
    gradient DOUBLE, decay DOUBLE, balance DOUBLE, taylor DOUBLE, magnitude DOUBLE NOT NULL);
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
CREATE TABLE units (unit_id INTEGER NOT NULL, partition VARCHAR NOT NULL, kind VARCHAR NOT NULL,
    unit VARCHAR NOT NULL, label INTEGER, position INTEGER NOT NULL, layer VARCHAR, module VARCHAR,
    tensors VARCHAR NOT NULL, size BIGINT NOT NULL);
CREATE TABLE unit_summary (part INTEGER NOT NULL, step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL,
    unit_id INTEGER NOT NULL, value DOUBLE NOT NULL, decay DOUBLE NOT NULL, abs_value DOUBLE NOT NULL,
    abs_decay DOUBLE NOT NULL);
CREATE TABLE progress (measure VARCHAR NOT NULL, step INTEGER NOT NULL, value DOUBLE NOT NULL);
CREATE TABLE frequency_norms (tensor VARCHAR NOT NULL, frequency INTEGER NOT NULL, norm DOUBLE NOT NULL,
    key BOOLEAN NOT NULL);
"""

# columns that a file of an earlier schema version lacks: (table, column) → the version that added it
COLUMN_SINCE: dict[tuple[str, str], int] = {("importance", c): 2 for c in ("gradient", "decay", "balance", "taylor")}
# columns whose type a later schema version widened: (table, column) → (that version, the earlier type)
COLUMN_WIDENED: dict[tuple[str, str], tuple[int, str]] = {("windows", "view"): (2, "ENUM('components', 'data')")}

REQUIRED_TABLES = (
    "schema_version", "meta", "steps", "groups", "examples", "test_parts", "windows", "components",
    "component_summary", "data", "data_summary", "importance", "completeness", "completeness_summary",
    "completeness_totals", "predictions", "exactness", "pruning", "units", "unit_summary", "progress",
    "frequency_norms",
)  # fmt: skip
TABLES_SINCE = {"units": 2, "unit_summary": 2, "progress": 2, "frequency_norms": 2}  # tables newer than version 1


def required_tables(version: int) -> tuple[str, ...]:
    """The tables a file of schema ``version`` has."""
    return tuple(t for t in REQUIRED_TABLES if TABLES_SINCE.get(t, 1) <= version)


@functools.cache
def table_columns() -> dict[str, tuple[tuple[str, str], ...]]:
    """(column, DuckDB type) of every table, in order, as the schema above creates them."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(_DDL)
        rows = con.execute("SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE NOT internal "
                           "ORDER BY table_name, column_index").fetchall()
    finally:
        con.close()
    columns: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in rows:
        columns.setdefault(table, []).append((column, kind))
    return {table: tuple(cols) for table, cols in columns.items()}


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
        "step:int lr:float? weight_decay:float? train_loss:float? val_loss:float? train_acc:float? "
        "val_acc:float? update_norm:float? param_norm:float? loss_change:float?"
    ),
    "groups": _cols("tensor:str module:str layer:str size:int position:int"),
    "examples": _cols("split:str example:int label:int? text:str predicted:int? correct:bool?"),
    "components": _cols("step_lo:int step_hi:int tensor:str test:int output:int value:float decay:float"),
    "data": _cols("step_lo:int step_hi:int train:int test:int output:int value:float"),
    "importance": _cols(
        "tensor:str index:int importance:float gradient:float? decay:float? balance:float? taylor:float? "
        "magnitude:float"
    ),
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
    "units": _cols("unit_id:int partition:str kind:str unit:str label:int? position:int layer:str? module:str? "
                   "tensors:str size:int"),
    "unit_components": _cols("step_lo:int step_hi:int unit_id:int test:int output:int value:float decay:float"),
}
# frames that analyses add to a written run (``add_progress``), not part of a bundle
_ANALYSIS_FRAMES: dict[str, tuple[_Col, ...]] = {
    "progress": _cols("measure:str step:int value:float"),
    "frequency_norms": _cols("tensor:str frequency:int norm:float key:bool"),
}
_REQUIRED_FRAMES = ("steps", "groups", "examples", "completeness")
_NUMBER = (int, float)
_NONE = type(None)
# The metadata keys of a run database and the JSON types of their values. The first four are
# required; the others are typed when present; keys not listed here are kept as they are.
META_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "steps": (int,),
    "quantity": (str,),
    "quadrature": (str,),
    "data_fingerprint": (str,),
    "model_summary": (dict,),
    "optimizer": (dict,),
    "model_spec": (dict,),
    "run_dir": (str,),
    "explained_steps": (list,),
    "test_split": (str,),
    "outputs": (int,),
    "dtype": (str,),
    "rtol": (*_NUMBER, _NONE),
    "escalated": (int,),
    "device": (str,),
    "engine": (str,),
    "window": (int, _NONE),
    "subsample": _NUMBER,
    "views": (list,),
    "decay_split": (bool,),
    "seconds": _NUMBER,
    "gradient_evaluations": (int,),
    "max_rel_residual": _NUMBER,
    "max_rel_residual_output": _NUMBER,
    "max_abs_residual": _NUMBER,
    "max_optimizer_residual": (*_NUMBER, _NONE),
    "partial": (bool,),
    "notes": (list,),
    "recipe": (dict,),
    "replay_max_rel_error": _NUMBER,
    "data_window": (int,),
    "data_tests": (int,),
    # recorded runs: the data view's own error and the buffer terms
    "targets": (str,),
    "max_rel_split_residual": (*_NUMBER, _NONE),
    "split_residual_cause": (str, _NONE),
    "data_split": (str, _NONE),
    "buffer_groups": (list,),
    # checkpoint series (``kind`` = "checkpoints")
    "kind": (str,),
    "checkpoints": (list,),
    "max_rel_residual_interval": _NUMBER,
    "data_axis_reason": (str, _NONE),
    "source": (str,),
    "inputs": (dict,),
    "granularity": (str,),
    "recomputed_inputs": (int,),
    "resumed_intervals": (int,),
    # partitions finer than a tensor and the data view stored per test at coarser windows
    "partitions": (list,),
    "data_test_window": (int, _NONE),
}
REQUIRED_META = ("task", "steps", "quantity", "quadrature")


def _type_words(types: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
             list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(words[t] for t in types))


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, types)


def meta_problem(meta: dict) -> str | None:
    """What is wrong with run metadata (a missing required key or a value of the wrong type), or None."""
    for key in REQUIRED_META:
        if key not in meta:
            return f"lacks the metadata key {key!r} ({_type_words(META_TYPES[key])})"
    for key, types in META_TYPES.items():
        if key in meta and not _fits(meta[key], types):
            shown = repr(meta[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"has metadata {key!r} = {shown}; expected {_type_words(types)}"
    return None


@dataclass(frozen=True)
class RunBundle:
    """Everything ``explain`` writes into one run database (column contract in the schema table above).

    ``meta`` needs ``task`` (str), ``steps`` (int), ``quantity`` (str) and ``quadrature``
    (str); ``data_fingerprint`` (str), ``model_summary`` and ``optimizer`` (dicts) are typed
    when present; any other JSON-serialisable key is kept as is. ``explain`` also writes the
    data view's own error, ``max_rel_split_residual`` (float or null), ``split_residual_cause``
    and ``data_split`` (str or null), and ``buffer_groups`` (list of str): the ``groups`` rows
    named ``<module>.<buffers>`` that hold buffer terms rather than parameter tensors. Component, data and
    completeness rows are one per (window or step, tensor/train, test, output).

    ``units`` lists the units of partitions finer than a tensor and ``unit_components`` their
    values per (window, unit, test, output); only their sums within the parts 0–3 are
    stored. ``data_test_window`` (a multiple of the data view's window) stores the per-test
    data rows and the per-class parts in windows of that many steps (None: the data view's
    own windows).
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
    units: pl.DataFrame | None = None  # (unit,)
    unit_components: pl.DataFrame | None = None  # (window, unit, test, output)
    data_test_window: int | None = None


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
            object.__setattr__(self, "value", as_int(self.value, f"test selector {self.kind!r} value"))
        elif self.value is not None:
            raise BadInputError(f"test selector {self.kind!r} takes no value (got {self.value!r})")


ALL_TESTS = TestSelector("all")


def as_int(value: Any, what: str) -> int:
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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (DuckDB's messages run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
