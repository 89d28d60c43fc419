"""A corpus of hostile inputs, generated from real files: a small recording and its run database.

Every case damages one thing in a copy of the pristine files: a manifest key dropped or given
the wrong type, a file truncated, emptied, replaced by random bytes or deleted, a tensor
dropped, retyped, reshaped or filled with NaN, a Parquet column dropped, retyped, emptied or
set out of range, a database table or column dropped or retyped, a metadata value removed,
mistyped or malformed. One recording is of a model with a BatchNorm buffer and dropout, so
that buffers and random states are damaged too. The cases walk whatever keys, files, tensors, columns and tables the
real files contain, so a format that grows is covered without a change here; which manifest
keys and metadata keys may be absent comes from the format declarations
(``engine.run.schema``, ``engine.store.schema``).

``run_cli`` runs the command line in this process (a real subprocess costs seconds of imports
per case); ``outcome`` checks the promise: exit status 2, nothing on stdout, one ``error:``
line on stderr, every file as it was.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from engine.cli import main
from engine.model.task import get_task
from engine.run import schema as run_schema
from engine.run.record import Recorder
from engine.store import schema as store_schema

Damage = Callable[[Path], None]

# Built-in tasks, so that rebuilding them runs no code named by the run; tiny, so that a case takes milliseconds.
ADAM_SPEC = {"task": "modular-addition", "config": {"p": 5, "d_model": 4, "n_heads": 1, "d_mlp": 4,
                                                    "train_frac": 0.6, "steps": 5}}
SGD_SPEC = {"task": "digits-cnn", "config": {"channels": [2, 2], "hidden": 4, "steps": 5, "batch_size": 8}}
# The test suite's own model (so every command takes --trust-run): its recording holds buffers
# (buffers.safetensors, buffer/ and buffer_end/ chunk tensors, final buffers) and random states.
NOISY_SPEC = {"model": "tests.corpus:NoisyNormMLP", "model_kwargs": {}, "data": "tests.fidelity_models:vectors",
              "data_kwargs": {}, "loss": "cross_entropy"}
STEPS = 5
CHUNK_STEPS = 2          # three chunks: steps 0-1, 2-3, 4


class NoisyNormMLP(nn.Module):
    """Linear → BatchNorm → ReLU → dropout → Linear: a buffer that changes every step and a random forward."""

    def __init__(self, n_in: int = 6, hidden: int = 8, n_out: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(n_in, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.norm(self.fc(x)))))


def record(spec: dict, out: Path, steps: int = STEPS) -> Path:
    """Record ``steps`` steps of a task (AdamW for modular addition, SGD with momentum otherwise)."""
    task = get_task(spec)
    model = task.build_model()
    train = task.dataset("train")
    if spec.get("task") == "modular-addition":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=1.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    with Recorder(model, optimizer, out, model_spec=task.spec(), train_data=(train.inputs, train.labels),
                  chunk_steps=CHUNK_STEPS) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(train), generator=generator)[:8]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(train.inputs[ids]), train.labels[ids])
            loss.backward()
            rec.batch(ids)
            optimizer.step()
            rec.log(train_loss=float(loss.detach()))
    return out


# ---------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Case:
    """One hostile input: ``damage`` applied to a copy of the pristine folder, then ``commands`` run on it."""

    name: str
    damage: Damage
    commands: tuple[tuple[str, ...], ...]   # argv with {run} and {db} standing for the paths in the copy


def run_cli(argv: list[str]) -> tuple[int | str, str, str]:
    """(exit status or the escaped exception, stdout, stderr) of the command line run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code: int | str = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else str(exc.code)
        except BaseException as exc:  # the promise is broken: report it, do not stop the corpus
            code = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every entry under ``folder``: relative path → (inode, mode, size, modification time in ns).

    Any write changes the modification time, any replacement the inode, so this sees every
    change without reading the files."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        entries[str(path.relative_to(folder))] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return entries


def outcome(case: Case, pristine: Path, work: Path) -> list[str]:
    """Apply the case to a copy of ``pristine`` in ``work`` and return the broken promises (empty: kept)."""
    shutil.copytree(pristine, work)
    case.damage(work)
    before = snapshot(work)
    problems = []
    for template in case.commands:
        argv = [part.format(run=work / "run", db=work / "run.duckdb") for part in template]
        code, out, err = run_cli(argv)
        lines = err.strip().splitlines()
        if code != 2 or out or len(lines) != 1 or not lines[0].startswith("error: "):
            shown = " | ".join(lines)[:300] or out.strip()[:200]
            problems.append(f"{case.name} [{template[0]}]: exit {code}: {shown}")
        after = snapshot(work)
        if after != before:
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            problems.append(f"{case.name} [{template[0]}]: changed {changed[:3]}")
            before = after
    shutil.rmtree(work)
    return problems


# ---------------------------------------------------------------------------------- values
def mistypes(value: Any) -> list[Any]:
    """Two values of another JSON type than ``value``, invalid wherever ``value`` is valid."""
    if isinstance(value, dict):
        return ["text", [1]]
    if isinstance(value, list):
        return ["text", {"k": 1}]
    if isinstance(value, str):
        return [7, {"k": 1}]
    if isinstance(value, bool):
        return ["text", 7]
    if isinstance(value, (int, float)):
        return ["text", {"k": 1}]
    return [{"k": 1}, [1]]   # null: valid only where null is


def walk(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every key path of a JSON value (list positions as ints) with its value, containers included."""
    if path:
        yield path, value
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from walk(inner, (*path, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from walk(inner, (*path, i))


def _label(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# ---------------------------------------------------------------------------------- run directory
def edit_manifest(change: Callable[[dict], None]) -> Damage:
    def damage(folder: Path) -> None:
        file = folder / "run" / "manifest.json"
        manifest = json.loads(file.read_text())
        change(manifest)
        file.write_text(json.dumps(manifest))
    return damage


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        target = manifest
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return change


def _drop(path: tuple) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        target = manifest
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]
    return change


def edit_file(rel: str, change: Callable[[bytes], bytes | None]) -> Damage:
    def damage(folder: Path) -> None:
        file = folder / "run" / rel
        data = change(file.read_bytes())
        if data is None:
            file.unlink()
        else:
            file.write_bytes(data)
    return damage


def edit_tensors(rel: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Damage:
    def damage(folder: Path) -> None:
        file = folder / "run" / rel
        tensors = load_file(str(file))
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    return damage


def edit_table(rel: str, change: Callable[[pl.DataFrame], pl.DataFrame]) -> Damage:
    def damage(folder: Path) -> None:
        file = folder / "run" / rel
        change(pl.read_parquet(file)).write_parquet(file)
    return damage


def _random_bytes(data: bytes) -> bytes:
    return hashlib.shake_256(data).digest(max(len(data), 64))


def file_damages() -> dict[str, Callable[[bytes], bytes | None]]:
    return {"truncated": lambda d: d[: len(d) // 2], "emptied": lambda d: b"", "random bytes": _random_bytes,
            "deleted": lambda d: None}


def _wrong_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32) if t.is_floating_point() else t.to(torch.float32)


def _first_set(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return change


# kinds of damage whose first case also runs ``explain`` (a second reader of every file, and the
# command that used to write NaN rows from NaN inputs)
EXPLAINED = ("manifest value mistyped", "file truncated", "tensor value out of range", "cell not finite")


def run_directory_cases(run: Path, verify: tuple[str, ...], explain: tuple[str, ...]) -> list[Case]:
    """Every damage of the recording in ``run``; each case runs ``verify``, the first of some kinds ``explain``."""
    cases: list[Case] = []
    seen: set[str] = set()

    def add(kind: str, name: str, damage: Damage) -> None:
        commands = (verify, explain) if kind in EXPLAINED and kind not in seen else (verify,)
        seen.add(kind)
        cases.append(Case(f"{kind}: {name}", damage, commands))

    manifest = json.loads((run / "manifest.json").read_text())
    for path, value in walk(manifest):
        key = run_schema.declared(path)
        if isinstance(path[-1], str) and key is not None and key.required:
            add("manifest key dropped", _label(path), edit_manifest(_drop(path)))
        for bad in mistypes(value):
            add("manifest value mistyped", f"{_label(path)} = {bad!r}", edit_manifest(_set(path, bad)))
    last = len(manifest["chunks"]) - 1
    first_param = manifest["parameters"][0]
    inconsistent = {
        "a gap between chunks": _set(("chunks", 1, "first_step"), manifest["chunks"][1]["first_step"] + 1),
        "a chunk longer than its tensors": _set(("chunks", last, "last_step"),
                                                manifest["chunks"][last]["last_step"] + 1),
        "a chunk stem outside the run": _set(("chunks", 0, "stem"), "../../chunk-00000000"),
        "a chunk stem naming another chunk": _set(("chunks", 0, "stem"), f"chunk-{99:08d}"),
        "more steps than chunks": _set(("steps",), manifest["steps"] + 1),
        "a parameter shape unlike its tensors": _set(("parameters", 0, "shape"), [*first_param["shape"], 1]),
        "a parameter name without tensors": _set(("parameters", 0, "name"), "nowhere.weight"),
        "a parameter listed twice": lambda m: m["parameters"].append(dict(m["parameters"][0])),
        "a parameter group that does not exist": _set(("parameters", 0, "group"), 5),
        "fewer training examples than the batch ids": _set(("data", "n_train"), 1),
        "a newer schema version": _set(("schema_version",), 99),
        "another format": _set(("format",), "something-else"),
        "a storage dtype that is not stored": _set(("dtype",), "float16"),
        "an unknown optimizer family": _set(("optimizer", "family"), "rmsprop"),
        "an unknown status": _set(("status",), "finished"),
        "a non-finite learning rate": _set(("optimizer", "groups", 0, "lr"), float("nan")),
    }
    if "task" in manifest["model"]:
        inconsistent.update({
            "an unknown built-in task": _set(("model", "task"), "no-such-task"),
            "a non-finite task setting": _set(("model", "config", "seed"), float("inf")),
        })
    else:
        inconsistent.update({
            "a model import path that does not exist": _set(("model", "model"), "tests.nowhere:Model"),
            "a loss that is not a function": _set(("model", "loss"), "tests.corpus:STEPS"),
        })
    if manifest.get("buffers"):
        first_buffer = manifest["buffers"][0]
        inconsistent.update({
            "a buffer shape unlike its tensors": _set(("buffers", 0, "shape"), [*first_buffer["shape"], 1]),
            "a buffer listed twice": lambda m: m["buffers"].append(dict(m["buffers"][0])),
            "a chunk listing a buffer the manifest does not": _set(("chunks", 0, "buffers"), ["nowhere.buffer"]),
            "a chunk listing no changed buffer": _set(("chunks", 0, "buffers"), []),
        })
    for name, change in inconsistent.items():
        add("manifest inconsistent", name, edit_manifest(change))

    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    for rel in files:
        for how, change in file_damages().items():
            add(f"file {how}", rel, edit_file(rel, change))

    chunk = f"chunks/{manifest['chunks'][0]['stem']}"
    count = manifest["chunks"][0]["last_step"] - manifest["chunks"][0]["first_step"] + 1
    declared_tensors = {
        f"{chunk}.safetensors": run_schema.expected_tensors(run_schema.CHUNK_TENSORS, manifest, count,
                                                            manifest["chunks"][0].get("buffers", [])),
        "final.safetensors": run_schema.expected_tensors(run_schema.FINAL_TENSORS, manifest),
        "buffers.safetensors": run_schema.expected_tensors(run_schema.BUFFER_TENSORS, manifest),
    }
    for rel, declared_here in declared_tensors.items():
        if not (run / rel).exists():
            continue
        with safe_open(str(run / rel), "pt") as handle:
            names = list(handle.keys())
        for name in names:
            add("tensor dropped", f"{rel}:{name}", edit_tensors(rel, lambda t, n=name: t.pop(n)))
            add("tensor retyped", f"{rel}:{name}",
                edit_tensors(rel, lambda t, n=name: t.update({n: _wrong_dtype(t[n])})))
            add("tensor reshaped", f"{rel}:{name}",
                edit_tensors(rel, lambda t, n=name: t.update({n: t[n].reshape(-1)[:-1]})))
            with safe_open(str(run / rel), "pt") as handle:
                floating = handle.get_slice(name).get_dtype().startswith("F")
            ranged = name in declared_here and declared_here[name].rule.maximum is not None
            # a generator state may hold any bytes: only its layout can be wrong
            bad_values = (float("nan"), float("inf")) if floating else (7.0,) if ranged else ()
            for bad in bad_values:
                add("tensor value out of range", f"{rel}:{name} = {bad}",
                    edit_tensors(rel, lambda t, n=name, b=bad: t.update({n: _first_set(b)(t[n])})))

    for suffix in ("batches", "hparams", "metrics"):
        rel = f"{chunk}.{suffix}.parquet"
        frame = pl.read_parquet(run / rel)
        for column, dtype in frame.schema.items():
            add("column dropped", f"{rel}:{column}", edit_table(rel, lambda f, c=column: f.drop(c)))
            if dtype != pl.String:
                add("column retyped", f"{rel}:{column}",
                    edit_table(rel, lambda f, c=column: f.with_columns(pl.col(c).cast(pl.String))))
            declared = run_schema.TABLES[suffix].get(column)
            if declared is not None and "null" not in declared.kinds:
                add("cell emptied", f"{rel}:{column}", edit_table(rel, lambda f, c=column: _first_cell(f, c, None)))
            if dtype.is_float() and declared is not None and declared.finite:
                for bad in (float("nan"), float("inf")):
                    add("cell not finite", f"{rel}:{column} = {bad}",
                        edit_table(rel, lambda f, c=column, b=bad: _first_cell(f, c, b)))
    n_train = manifest["data"]["n_train"]
    first, last_step = manifest["chunks"][0]["first_step"], manifest["chunks"][0]["last_step"]
    out_of_range = {
        "batches.parquet: an example id past the training set": ("batches", "example", n_train),
        "batches.parquet: a negative example id": ("batches", "example", -1),
        "batches.parquet: a row of a step outside the chunk": ("batches", "step", last_step + 1),
        "hparams.parquet: a parameter group that does not exist": ("hparams", "group", 9),
        "hparams.parquet: a negative learning rate": ("hparams", "lr", -0.1),
    }
    for name, (suffix, column, value) in out_of_range.items():
        add("cell out of range", name, edit_table(f"{chunk}.{suffix}.parquet",
                                                  lambda f, c=column, v=value: _first_cell(f, c, v)))
    for suffix in ("batches", "hparams"):
        add("rows missing", f"{suffix}.parquet: no rows for step {first}",
            edit_table(f"{chunk}.{suffix}.parquet", lambda f: f.filter(pl.col("step") != first)))
    return cases


def _first_cell(frame: pl.DataFrame, column: str, value: Any) -> pl.DataFrame:
    dtype = frame.schema[column]
    cells = frame[column].to_list()
    cells[0] = value
    kind = pl.Float64 if isinstance(value, float) and not dtype.is_float() else dtype
    return frame.with_columns(pl.Series(column, cells, dtype=kind if dtype != pl.Null else None, strict=False))


# ---------------------------------------------------------------------------------- run database
@functools.cache
def _editor() -> duckdb.DuckDBPyConnection:
    """One DuckDB instance that attaches each damaged copy in turn (a new instance costs more than the edit)."""
    return duckdb.connect(":memory:", config={"threads": 1})


def edit_database(sql: str | Callable[[duckdb.DuckDBPyConnection], None]) -> Damage:
    def damage(folder: Path) -> None:
        con = _editor()
        path = str(folder / "run.duckdb").replace("'", "''")
        con.execute(f"ATTACH '{path}' AS damaged")
        try:
            con.execute("USE damaged")
            if callable(sql):
                sql(con)
            else:
                con.execute(sql)
        finally:
            con.execute("USE memory")
            con.execute("DETACH damaged")
    return damage


def edit_database_file(change: Callable[[bytes], bytes | None]) -> Damage:
    def damage(folder: Path) -> None:
        file = folder / "run.duckdb"
        data = change(file.read_bytes())
        if data is None:
            file.unlink()
        else:
            file.write_bytes(data)
    return damage


def _retyped(con: duckdb.DuckDBPyConnection, table: str, column: str, kind: str) -> None:
    other = "length(CAST({c} AS VARCHAR))" if kind in ("VARCHAR", "JSON") else "CAST({c} AS VARCHAR)"
    con.execute(f'CREATE OR REPLACE TABLE {table} AS SELECT * REPLACE ({other.format(c=_q(column))} AS {_q(column)}) '
                f"FROM {table}")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def database_cases(db: Path, commands: tuple[tuple[str, ...], ...],
                   meta_commands: tuple[tuple[str, ...], ...] = ()) -> list[Case]:
    """Every damage of the run database ``db``; each case runs ``commands``, those of the metadata
    also ``meta_commands`` (commands that read metadata keys others do not)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT internal "
                                            "ORDER BY table_name").fetchall()]
        columns = con.execute("SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE NOT internal "
                              "ORDER BY table_name, column_index").fetchall()
        meta = dict(con.execute("SELECT key, value FROM meta ORDER BY key").fetchall())
    finally:
        con.close()
    cases: list[Case] = []

    def add(kind: str, name: str, damage: Damage) -> None:
        extra = meta_commands if kind.startswith("metadata") else ()
        cases.append(Case(f"{kind}: {name}", damage, (*commands, *extra)))

    for table in tables:
        add("table dropped", table, edit_database(f"DROP TABLE {table}"))
    for table, column, kind in columns:
        add("column dropped", f"{table}.{column}",
            edit_database(f"CREATE OR REPLACE TABLE {table} AS SELECT * EXCLUDE ({_q(column)}) FROM {table}"))
        add("column retyped", f"{table}.{column} ({kind})",
            edit_database(lambda c, t=table, n=column, k=kind: _retyped(c, t, n, k)))
    declared = store_schema.META_TYPES
    for key, text in meta.items():
        if key in store_schema.REQUIRED_META:
            add("metadata dropped", key, edit_database(f"DELETE FROM meta WHERE key = '{key}'"))
        if key in declared:
            for bad in mistypes(json.loads(text)):
                if not isinstance(bad, tuple(declared[key])) or isinstance(bad, bool):
                    add("metadata mistyped", f"{key} = {bad!r}", edit_database(
                        f"UPDATE meta SET value = '{json.dumps(bad)}' WHERE key = '{key}'"))
        add("metadata malformed", key, edit_database(
            lambda c, k=key: (_retyped_json(c), c.execute("UPDATE meta SET value = '{\"broken' WHERE key = ?", [k]))))
    add("schema version", "a newer version", edit_database("UPDATE schema_version SET version = 99"))
    add("schema version", "no version row", edit_database("DELETE FROM schema_version"))
    add("schema version", "two version rows", edit_database("INSERT INTO schema_version SELECT * FROM schema_version"))
    for how, change in file_damages().items():
        add(f"file {how}", "run.duckdb", edit_database_file(change))
    add("file replaced", "run.duckdb by a folder", lambda folder: (
        (folder / "run.duckdb").unlink(), (folder / "run.duckdb").mkdir()))
    return cases


def _retyped_json(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE OR REPLACE TABLE meta AS SELECT key, CAST(value AS VARCHAR) AS value FROM meta")


def recorded_folder(base: Path, spec: dict) -> Path:
    """``base`` holding ``run``, a recording of ``spec``."""
    record(spec, base / "run")
    return base


def database_folder(base: Path, run: Path) -> Path:
    """``base`` holding ``run.duckdb``, explained from ``run`` (every view) and pruned."""
    for argv in (["explain", str(run), "--out", str(base / "run.duckdb"), "--test", "val:2",
                  "--views", "components,data,importance", "--json"],
                 ["prune", str(base / "run.duckdb"), "--sparsities", "0.5", "--seeds", "1", "--min-eval", "1",
                  "--json"]):
        code, _, err = run_cli(argv)
        assert code == 0, err
    return base
