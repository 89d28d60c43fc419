"""Outputs never overwrite inputs or data the tool did not write; every output and option is
checked before the work starts; files get the user's umask; non-finite values are input
errors; ``--json`` is always valid JSON."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from engine import store
from engine.cli import main
from engine.errors import BadInputError, StoreError
from engine.run.history import History
from engine.run.record import Recorder
from engine.store.writer import _check_space
from tests.corpus import ADAM_SPEC, record, snapshot
from tests.helpers import TinyMLP, tiny_data, tiny_spec
from tests.test_store import hand_bundle

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--p", "5", "--d-model", "4", "--n-heads", "1", "--d-mlp", "4", "--train-frac", "0.6", "--steps", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return record(ADAM_SPEC, tmp_path_factory.mktemp("outputs") / "run")


def refused(argv: list[str], capsys, *phrases: str) -> str:
    """Run the command line; it must exit 2 with one error line holding every phrase."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- inputs are never outputs
def test_explain_never_writes_into_the_recording(run, capsys):
    before = snapshot(run)
    for out in (run / "manifest.json", run / "chunks" / "chunk-00000000.safetensors", run / "new.duckdb", run):
        refused(["explain", str(run), "--out", str(out), "--json"], capsys, "an input of this command")
    assert snapshot(run) == before


def test_explain_refuses_a_file_that_is_not_a_run_database(run, tmp_path, capsys):
    notes = tmp_path / "notes.duckdb"
    notes.write_text("my notes\n")
    other = tmp_path / "other.duckdb"
    import duckdb

    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE mine AS SELECT 1 AS x")
    con.close()
    before = snapshot(tmp_path)
    refused(["explain", str(run), "--out", str(notes), "--json"], capsys, "is not a run database")
    refused(["explain", str(run), "--out", str(other), "--json"], capsys, "is not a run database")
    assert snapshot(tmp_path) == before


def test_output_locations_and_options_are_checked_before_the_run_is_read(tmp_path, capsys):
    """Each bad output or option is reported although the run does not even exist: nothing was computed."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.duckdb").mkdir()
    missing = str(tmp_path / "no-such-run")
    cases = {
        "a folder": (["--out", str(tmp_path / "folder.duckdb")], "is not a file"),
        "below a file": (["--out", str(tmp_path / "afile" / "run.duckdb")], "afile is a file"),
        "an exactness rule": (["--out", str(tmp_path / "r.duckdb"), "--exactness", "midpoint:0"], "node count"),
        "a quadrature": (["--out", str(tmp_path / "r.duckdb"), "--quadrature", "simpson"], "simpson"),
        "a view": (["--out", str(tmp_path / "r.duckdb"), "--views", "pictures"], "pictures"),
    }
    for options, phrase in cases.values():
        line = refused(["explain", missing, *options, "--json"], capsys, phrase)
        assert "does not exist" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.duckdb"]


def test_train_overwrite_replaces_only_a_run_directory(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    refused(["train", "modular-addition", "--out", str(folder), "--overwrite", *TINY_TRAIN, "--json"], capsys,
            "is not a run directory")
    assert (folder / "precious.txt").read_text() == "keep me"

    run = tmp_path / "run"
    assert main(["train", "modular-addition", "--out", str(run), *TINY_TRAIN, "--json"]) == 0
    capsys.readouterr()
    (run / "precious.txt").write_text("keep me")
    before = snapshot(run)
    refused(["train", "modular-addition", "--out", str(run), "--overwrite", *TINY_TRAIN, "--json"], capsys,
            "precious.txt", "which the recording did not write")
    assert snapshot(run) == before
    (run / "precious.txt").unlink()
    assert main(["train", "modular-addition", "--out", str(run), "--overwrite", *TINY_TRAIN, "--json"]) == 0
    capsys.readouterr()
    refused(["train", "modular-addition", "--out", str(tmp_path / "mine" / "precious.txt" / "run"), *TINY_TRAIN],
            capsys, "is a file")


def test_sample_work_folder_is_replaced_only_when_it_is_a_run(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "digits").mkdir(parents=True)
    (work / "digits" / "precious.txt").write_text("keep me")
    refused(["sample", "digits", "--out", str(tmp_path / "out"), "--work", str(work), "--json"], capsys,
            "is not a run directory")
    assert (work / "digits" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_recorded_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        run = record(ADAM_SPEC, tmp_path / "run")
    finally:
        os.umask(previous)
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes


# ---------------------------------------------------------------------------- publishing
def test_publishing_checks_free_space_first(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    _check_space(tmp_path, free // 2, tmp_path / "run.duckdb")
    with pytest.raises(StoreError, match=r"not enough free space to write .*run\.duckdb: about \d+ MiB"):
        _check_space(tmp_path, 2 * free + 2**30, tmp_path / "run.duckdb")


WRITE_UNDER_A_LIMIT = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
from engine.errors import ExplaindError
from engine.store import write_run
from tests.fixtures_store import synthetic_bundle
bundle = synthetic_bundle(seed=1, marker="new", windows=40, window=4, tensors=10, n_test=150, n_train=60,
                          data_window=16, data_tests=40)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
try:
    write_run(sys.argv[1], bundle, threads=1)
except ExplaindError as exc:
    print(f"error: {exc}")
"""


def test_a_write_that_fails_midway_leaves_the_old_database_and_no_temporary_file(tmp_path):
    """A file-size limit makes the disk 'full' in the middle of publishing."""
    target = store.write_run(tmp_path / "run.duckdb", hand_bundle(marker="old"))
    limit = target.stat().st_size + 2**20
    done = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_LIMIT, str(target), str(ROOT), str(limit)],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("error: writing run database") and "unchanged" in done.stdout, done
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.duckdb"]
    with store.RunDB.open(target) as db:
        assert db.meta()["marker"] == "old"


# ---------------------------------------------------------------------------- non-finite values
def test_non_finite_options_are_refused_before_training(tmp_path, capsys):
    for value in ("inf", "nan", "-inf"):
        refused(["train", "modular-addition", "--out", str(tmp_path / "r"), f"--lr={value}", *TINY_TRAIN], capsys,
                "config 'lr' must be a finite number")
    assert not (tmp_path / "r").exists()


def test_a_diverging_recording_stops_at_the_step_and_stays_readable(tmp_path):
    """Parameters that turn NaN end the record before the step that made them so."""
    model = TinyMLP()
    x, y = tiny_data()["train"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(BadInputError, match=r"step 3: parameter 'out.bias' holds NaN or Inf: the update of step 2"), \
            Recorder(model, optimizer, tmp_path / "run", model_spec=tiny_spec(), train_data=(x, y),
                     chunk_steps=2) as rec:
        for step in range(6):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(range(len(y)))
            optimizer.step()
            if step == 2:
                with torch.no_grad():
                    model.out.bias[0] = float("nan")   # as if this step's update had diverged
    history = History.open(tmp_path / "run", allow_incomplete=True)
    assert not history.complete and history.num_steps == 2
    assert all(torch.isfinite(t).all() for t in history.params(2).values())
    assert all(torch.isfinite(t).all() for r in history.iter_steps() for t in r.params.values())


def test_a_non_finite_learning_rate_is_refused_at_its_step(tmp_path):
    model = TinyMLP()
    x, y = tiny_data()["train"]
    optimizer = torch.optim.SGD(model.parameters(), lr=float("nan"))
    with pytest.raises(BadInputError, match=r"step 0: lr of parameter group 0 is nan"), \
            Recorder(model, optimizer, tmp_path / "run", model_spec=tiny_spec(), train_data=(x, y)) as rec:
        F.cross_entropy(model(x), y).backward()
        rec.batch(range(len(y)))
        optimizer.step()


def test_json_output_is_valid_json_even_with_non_finite_numbers(tmp_path, capsys):
    bundle = hand_bundle(marker="nan")
    steps = bundle.steps.with_columns(val_acc=pl.lit(float("nan")), train_acc=pl.lit(float("inf")))
    db = store.write_run(tmp_path / "nan.duckdb", type(bundle)(**{**bundle.__dict__, "steps": steps}))
    assert main(["info", str(db), "--json"]) == 0

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in --json output")

    result = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert result["final_val_acc"] is None and result["final_train_acc"] is None
