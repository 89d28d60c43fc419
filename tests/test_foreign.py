"""Code named in a run runs only when the user says so: a run's model, data and loss import paths
are imported for the built-in tasks, or with ``--trust-run`` (``trust_run=True``); the dashboard
imports no code from a run at all."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import store
from engine.cli import main
from engine.errors import UntrustedRunError
from engine.run.verify import verify
from tests.corpus import ADAM_SPEC, record
from tests.helpers import record_tiny_run
from tests.test_prune import bundle, random_importance

ROOT = Path(__file__).resolve().parents[1]

# a module that leaves a mark when it is imported, as a foreign run's code could do anything
MARKING_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.txt").write_text("the run's code ran")
from tests.helpers import TinyMLP, tiny_data
"""


@pytest.fixture
def foreign_run(tmp_path) -> Path:
    """A tiny run whose manifest names the model and data of a module that marks its import."""
    run = record_tiny_run(tmp_path / "run", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=3)
    (tmp_path / "marking.py").write_text(MARKING_MODULE)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"].update(model="marking:TinyMLP", data="marking:tiny_data")
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    return subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


@pytest.mark.slow
def test_a_foreign_run_is_not_imported_without_trust(foreign_run, tmp_path):
    """The import is refused with what the run names and how to allow it; with --trust-run it runs."""
    done = _run(["verify", str(foreign_run), "--json"], tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "model 'marking:TinyMLP'" in done.stderr and "data 'marking:tiny_data'" in done.stderr
    assert "--trust-run" in done.stderr
    assert not (tmp_path / "imported.txt").exists()
    done = _run(["verify", str(foreign_run), "--trust-run", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["max_rel_error"] < 1e-6
    assert (tmp_path / "imported.txt").exists()


@pytest.mark.parametrize("command", ["verify", "explain", "prune"])
def test_every_command_that_opens_a_run_asks_for_trust(foreign_run, tmp_path, monkeypatch, capsys, command):
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = {"verify": ["verify", str(foreign_run), "--json"],
            "explain": ["explain", str(foreign_run), "--out", str(tmp_path / "out.duckdb"), "--json"]}.get(command)
    if command == "prune":  # a database of the same recording, pruned with the foreign run directory
        twin = record_tiny_run(tmp_path / "twin", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=3)
        db = store.write_run(tmp_path / "db.duckdb", bundle(twin, random_importance(twin)))
        argv = ["prune", str(db), "--run", str(foreign_run), "--min-eval", "1", "--json"]
    assert main(argv) == 2
    assert "is not a built-in task" in capsys.readouterr().err
    assert not (tmp_path / "imported.txt").exists()
    assert not (tmp_path / "out.duckdb").exists()


def test_python_api_takes_trust_run(foreign_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "marking", raising=False)
    with pytest.raises(UntrustedRunError, match=r"run .* is not a built-in task.*trust_run=True"):
        verify(foreign_run, progress=False)
    assert not (tmp_path / "imported.txt").exists()
    assert verify(foreign_run, progress=False, trust_run=True).steps == 3
    assert (tmp_path / "imported.txt").exists()
    sys.modules.pop("marking", None)


def test_a_run_naming_a_shell_function_runs_nothing(tmp_path):
    """The case that started it: a manifest naming ``subprocess:getoutput`` ran a shell command."""
    run = record(ADAM_SPEC, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    marker = tmp_path / "shell-ran"
    manifest["model"] = {"model": "subprocess:getoutput", "model_kwargs": {"cmd": f"touch {marker}"},
                         "data": "subprocess:getoutput", "data_kwargs": {"cmd": f"touch {marker}"}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(run), "--json"]) == 2
    assert not marker.exists()


def test_built_in_tasks_need_no_trust(tmp_path, capsys):
    run = record(ADAM_SPEC, tmp_path / "run")
    assert main(["verify", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 5


def test_the_dashboard_imports_nothing_that_rebuilds_a_run():
    """The app reads run databases only: of the engine it imports the store and the errors."""
    found = set()
    for path in sorted((ROOT / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("engine")}
    assert found and found <= {"engine.store", "engine.errors"}, found


@pytest.mark.parametrize(("change", "named"), [
    ({"loss": "marking:per_example_loss"}, "loss 'marking:per_example_loss'"),
    ({"model": "engine.model.hf:causal_lm", "model_kwargs": {"config": {"model_type": "gpt2"}}},
     "model 'engine.model.hf:causal_lm'"),
], ids=["loss", "hugging-face"])
def test_every_import_path_of_a_run_spec_asks_for_trust(foreign_run, tmp_path, monkeypatch, capsys, change, named):
    """A loss named by import path and a Hugging Face model spec are code the run names, like its model."""
    monkeypatch.syspath_prepend(str(tmp_path))
    manifest = json.loads((foreign_run / "manifest.json").read_text())
    manifest["model"].update(change)
    (foreign_run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(foreign_run), "--json"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "imported.txt").exists()


def test_a_quantity_named_on_the_command_line_needs_no_trust(tmp_path, monkeypatch, capsys):
    """``--quantity pkg.mod:fn`` is the user's own choice of code: a built-in run explains with it as is."""
    run = record(ADAM_SPEC, tmp_path / "run")
    (tmp_path / "quantities.py").write_text("def top(output, labels):\n    return output.max(dim=1).values\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "top.duckdb"
    assert main(["explain", str(run), "--out", str(out), "--test", "val:2", "--quantity", "quantities:top",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    with store.RunDB.open(out) as db:
        assert db.meta()["quantity"] == "quantities:top"
