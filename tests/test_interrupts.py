"""Signals, pipes and concurrent writers, with real processes.

SIGINT and SIGTERM stop a command at start-up, while it computes and while it publishes, with
exit status 130 / 143, one line, and the previous run database intact; output cut short by
``| head`` ends quietly; two writers of one database take turns and lose nothing; a database
held open by another program, or unreadable for its permissions, is named as such.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import store
from engine.cli import main
from tests.corpus import record, run_cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# big enough that explaining it takes seconds, so that a signal can be sent while it computes
SPEC = {"task": "modular-addition", "config": {"p": 11, "d_model": 8, "n_heads": 2, "d_mlp": 16, "train_frac": 0.5,
                                              "steps": 20}}
EXPLAIN = ["--test", "val:12", "--views", "components,importance"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path]:
    """A recording and its run database (every view, so that it can be pruned)."""
    base = tmp_path_factory.mktemp("interrupts")
    run = record(SPEC, base / "run", steps=20)
    code, _, err = run_cli(["explain", str(run), "--out", str(base / "run.duckdb"), *EXPLAIN, "--json"])
    assert code == 0, err
    return run, base / "run.duckdb"


class Command:
    """``python -m engine ARGV`` in a process of its own, its output collected as it comes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
        self.out = self.err = b""
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in ("out", "err")]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        stream = self.proc.stdout if name == "out" else self.proc.stderr
        while chunk := stream.read1(4096):
            setattr(self, name, getattr(self, name) + chunk)

    def wait_for(self, condition, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"finished first: {self.finish()}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.002)

    def finish(self) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=300)
        for reader in self._readers:
            reader.join()
        return code, self.out.decode(), self.err.decode()


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (``python -m engine`` sets one first thing;
    the interpreter alone has none)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def last_line(err: str) -> str:
    return err.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_start_up_stops_cleanly(published, signum):
    run, db = published
    before = state(db)
    command = Command(["explain", str(run), "--out", str(db), *EXPLAIN, "--json"])
    command.wait_for(lambda: catches_sigterm(command.proc.pid))  # its handlers are in; the libraries are loading
    command.proc.send_signal(signum)
    code, out, err = command.finish()
    assert code == 128 + signum and out == "", (code, err)
    assert err.count("\n") == 1 and err.startswith(f"interrupted by {signal.Signals(signum).name}: "), err
    assert state(db) == before and leftovers(db.parent) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_computing_publishes_nothing(published, signum):
    run, db = published
    before = state(db)
    command = Command(["explain", str(run), "--out", str(db), *EXPLAIN])   # progress bars on stderr
    command.wait_for(lambda: b"explain:" in command.err)
    command.proc.send_signal(signum)
    code, out, err = command.finish()
    assert code == 128 + signum and out == "" and "Traceback" not in err, err
    assert last_line(err) == f"interrupted by {signal.Signals(signum).name}: nothing was published; {db} is as it was"
    assert state(db) == before and leftovers(db.parent) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_publishing_leaves_the_old_or_the_new_database_whole(published, signum):
    run, db = published
    before = state(db)
    command = Command(["explain", str(run), "--out", str(db), *EXPLAIN, "--json"])
    command.wait_for(lambda: any(".tmp-" in name for name in leftovers(db.parent)))
    command.proc.send_signal(signum)
    code, out, err = command.finish()
    assert code == 128 + signum and out == ""
    name = signal.Signals(signum).name
    assert err.count("\n") == 1, err
    if state(db) == before:
        assert err == f"interrupted by {name}: nothing was published; {db} is as it was\n"
    else:
        assert err == f"interrupted by {name}: {db} had already been published completely\n"
    with store.RunDB.open(db) as reader:
        assert reader.views()["importance"] > 0
    assert leftovers(db.parent) == []


@pytest.mark.slow
def test_output_cut_short_by_the_reader_ends_quietly(published):
    _, db = published
    proc = subprocess.Popen([sys.executable, "-m", "engine", "info", str(db)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    proc.stdout.close()   # like `| head` that has read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
    assert err == ""


@pytest.mark.slow
def test_two_pruners_take_turns_and_keep_each_others_curves(published, tmp_path):
    """The second writer waits for the first (saying so) and adds its rows to what the first stored."""
    _, source = published
    db = tmp_path / "run.duckdb"
    db.write_bytes(source.read_bytes())
    common = ["prune", str(db), "--sparsities", "0.5", "--seeds", "1", "--min-eval", "1", "--methods",
              "kernel,magnitude,random", "--json"]
    with store.writer_lock(db):   # both must wait: neither can slip in before the other has read
        pruners = [Command([*common, "--scope", scope]) for scope in ("global", "per-tensor")]
        for pruner in pruners:
            pruner.wait_for(lambda p=pruner: b"waiting for another process" in p.err)
    results = [pruner.finish() for pruner in pruners]
    for code, out, err in results:
        assert code == 0, err
        assert json.loads(out)["rows"] == 4   # the dense model, kernel, magnitude, one random seed
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and str(db) in err
    with store.RunDB.open(db) as reader:
        stored = reader.pruning()
    assert sorted(stored["scope"].unique().to_list()) == ["global", "per-tensor"]
    assert stored.height == 8
    assert leftovers(tmp_path) == []


def test_a_database_held_open_by_a_writer_is_named(published, tmp_path):
    _, source = published
    db = tmp_path / "run.duckdb"
    db.write_bytes(source.read_bytes())
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); sys.stdin.read()", str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        code, out, err = run_cli(["info", str(db), "--json"])
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1
        assert "is open for writing in another program" in err and f"PID {holder.pid}" in err
        assert "damaged" not in err
    finally:
        holder.communicate("")


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: root passes every check otherwise."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.slow
def test_unreadable_files_are_named_as_such(published, tmp_path):
    run, source = published
    copy = tmp_path / "run"
    copy.mkdir()
    for path in run.rglob("*"):
        target = copy / path.relative_to(run)
        if path.is_dir():
            target.mkdir()
        else:
            target.write_bytes(path.read_bytes())
    chunk = copy / "chunks" / "chunk-00000002.safetensors"
    chunk.chmod(0)
    db = tmp_path / "run.duckdb"
    db.write_bytes(source.read_bytes())
    db.chmod(0)
    for argv, name in ((["verify", str(copy)], chunk), (["info", str(db)], db)):
        done = subprocess.run([*_unprivileged(), sys.executable, "-m", "engine", *argv, "--json"],
                              capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == f"error: {name} cannot be read: permission denied. " + done.stderr.split(". ", 1)[1]
        assert done.stderr.count("\n") == 1 and "missing" not in done.stderr


def test_import_of_a_missing_folder_names_the_folder(tmp_path, capsys):
    assert main(["import-explaind", str(tmp_path / "nowhere"), "--model", "tests.helpers:TinyMLP", "--out",
                 str(tmp_path / "run"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: explaind checkpoint directory {tmp_path / 'nowhere'} does not exist\n"


def test_random_bytes_as_a_checkpoint_are_not_taken_for_pickles(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    (folder / "dataset").mkdir(parents=True)
    for name in ("model_checkpoint.pt", "optimizer_checkpoint.pt", "data_checkpoint.pt"):
        (folder / name).write_bytes(os.urandom(4096))
    for split in ("train", "val"):
        (folder / "dataset" / f"{split}.csv").write_text("a,b,target\n1,2,3\n2,3,1\n")
    for head in (b"", b"\x80\x02", b"PK\x03\x04"):
        (folder / "model_checkpoint.pt").write_bytes(head + os.urandom(4096))
        assert main(["import-explaind", str(folder), "--model", "tests.helpers:TinyMLP", "--model-kwargs",
                     '{"n_in": 2, "n_out": 4}', "--out", str(tmp_path / f"run{len(head)}"), "--json"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder / 'model_checkpoint.pt'} ") and err.count("\n") == 1, err
        assert "weights_only" not in err and "pickled Python objects" not in err
        assert "truncated or foreign" in err
