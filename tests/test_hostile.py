"""Hostile input: every damaged recording and run database of a generated corpus is refused with
exit status 2 and one ``error:`` line, and leaves every file as it was (``tests/corpus.py``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from safetensors import safe_open

from engine.run import schema as run_schema
from engine.store import schema as store_schema
from tests.corpus import (
    ADAM_SPEC,
    NOISY_SPEC,
    SGD_SPEC,
    database_cases,
    database_folder,
    outcome,
    recorded_folder,
    run_directory_cases,
    walk,
)

VERIFY = ("verify", "{run}", "--json")
EXPLAIN = ("explain", "{run}", "--out", "{db}", "--test", "val:2", "--views", "components,data", "--json")
INFO = ("info", "{db}", "--json")
PRUNE = ("prune", "{db}", "--sparsities", "0.5", "--seeds", "1", "--min-eval", "1", "--json")
# the model with buffers and dropout is the test suite's own code: its commands trust the run
TRUSTED = {"noisy": ((*VERIFY, "--trust-run"), (*EXPLAIN, "--trust-run"))}


@pytest.fixture(scope="module")
def adam(tmp_path_factory) -> Path:
    return recorded_folder(tmp_path_factory.mktemp("adam"), ADAM_SPEC)


@pytest.fixture(scope="module")
def sgd(tmp_path_factory) -> Path:
    return recorded_folder(tmp_path_factory.mktemp("sgd"), SGD_SPEC)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    return recorded_folder(tmp_path_factory.mktemp("noisy"), NOISY_SPEC)


@pytest.fixture(scope="module")
def database(tmp_path_factory, adam) -> Path:
    return database_folder(tmp_path_factory.mktemp("db"), adam / "run")


def _report(problems: list[str], total: int) -> str:
    return f"{len(problems)} broken promises in {total} cases:\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["adam", "sgd", "noisy"])
def test_every_damaged_recording_is_refused(folder, request, tmp_path):
    pristine = request.getfixturevalue(folder)
    cases = run_directory_cases(pristine / "run", *TRUSTED.get(folder, (VERIFY, EXPLAIN)))
    problems = [p for i, case in enumerate(cases) for p in outcome(case, pristine, tmp_path / f"case{i}")]
    assert not problems, _report(problems, len(cases))


@pytest.mark.slow
def test_every_damaged_database_is_refused(database, tmp_path):
    cases = database_cases(database / "run.duckdb", (INFO,), (PRUNE,))
    problems = [p for i, case in enumerate(cases) for p in outcome(case, database, tmp_path / f"case{i}")]
    assert not problems, _report(problems, len(cases))


def test_the_corpus_walks_every_part_of_the_formats(adam, sgd, noisy, database):
    """Every kind of damage is generated, and the declarations cover everything a real recording
    and database hold: a key, tensor, column or metadata key added to a format without its
    declaration fails here."""
    names = [case.name for folder in (adam, sgd, noisy)
             for case in run_directory_cases(folder / "run", VERIFY, EXPLAIN)]
    kinds = Counter(name.split(":")[0] for name in names)
    kinds.update(case.name.split(":")[0] for case in database_cases(database / "run.duckdb", (INFO,)))
    for kind in ("manifest key dropped", "manifest value mistyped", "manifest inconsistent", "file truncated",
                 "tensor retyped", "tensor reshaped", "tensor value out of range", "column dropped", "column retyped",
                 "cell not finite", "cell out of range", "rows missing", "table dropped", "metadata mistyped",
                 "metadata malformed", "schema version"):
        assert kinds[kind] > 0, kind
    assert sum(kinds.values()) > 1000

    for part in ("buffers.safetensors", ":buffer/", ":buffer_end/", ":random", ":rng_cpu", "a chunk listing"):
        assert any(part in name for name in names), part

    for folder in (adam, sgd, noisy):
        run = folder / "run"
        manifest = json.loads((run / "manifest.json").read_text())
        undeclared = [p for p, _ in walk(manifest) if p[0] not in ("model", "import")
                      and run_schema.declared(p) is None]
        assert not undeclared, f"manifest keys without a declaration in engine/run/schema.py: {undeclared}"
        first = manifest["chunks"][0]
        expected = run_schema.expected_tensors(run_schema.CHUNK_TENSORS, manifest, 2, first["buffers"])
        required = {name for name, spec in expected.items() if spec.rule.required}
        with safe_open(str(run / "chunks" / f"{first['stem']}.safetensors"), "pt") as handle:
            assert required <= set(handle.keys()) <= set(expected)
        for file, rules in (("final.safetensors", run_schema.FINAL_TENSORS),
                            ("buffers.safetensors", run_schema.BUFFER_TENSORS)):
            if (run / file).exists():
                with safe_open(str(run / file), "pt") as handle:
                    assert set(handle.keys()) == set(run_schema.expected_tensors(rules, manifest)), file
        for suffix, columns in run_schema.TABLES.items():
            frame = pl.read_parquet(run / "chunks" / f"{manifest['chunks'][0]['stem']}.{suffix}.parquet")
            assert set(frame.columns) == set(columns), suffix
    import duckdb

    con = duckdb.connect(str(database / "run.duckdb"), read_only=True)
    keys = {r[0] for r in con.execute("SELECT key FROM meta").fetchall()}
    con.close()
    assert keys <= set(store_schema.META_TYPES), f"undeclared metadata keys: {keys - set(store_schema.META_TYPES)}"
