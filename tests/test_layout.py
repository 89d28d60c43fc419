"""The engine's import boundaries: imports point one way through its parts, and never to the app.

    cli, samples → tasks, analysis, parallel, importers → decompose → run → model
    store and errors use nothing of the engine but errors

Every ``import`` statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"

# what each part may import from the engine besides itself
BELOW = {
    "errors": set(),
    "store": {"errors"},
    "model": {"errors"},
    "run": {"errors", "model"},
    "decompose": {"errors", "model", "run", "store"},
}
for top in ("tasks", "analysis", "parallel", "importers"):
    BELOW[top] = {"errors", "model", "run", "decompose", "store"}
for top in ("cli", "samples", "__main__", "__init__"):
    BELOW[top] = {"errors", "model", "run", "decompose", "store", "tasks", "analysis", "parallel", "importers",
                  "samples", "cli"}
FOREIGN = ("app", "streamlit", "plotly")


def part_of(path: Path) -> str:
    rel = path.relative_to(ENGINE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "engine" \
                else [node.module]
            found += [(node.lineno, name) for name in names]
    return found


MODULES = sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ENGINE)))
def test_imports_point_one_way(path: Path) -> None:
    part = part_of(path)
    assert part in BELOW, f"{path}: engine part {part!r} has no place in the layout; add it to BELOW"
    wrong = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top in FOREIGN:
            wrong.append(f"line {line}: {module} (the engine never imports the app or its libraries)")
        if top != "engine" or module == "engine":
            continue
        target = module.split(".")[1]
        if target != part and target not in BELOW[part]:
            wrong.append(f"line {line}: {module} ({part} may use {sorted(BELOW[part]) or 'nothing'})")
    assert not wrong, f"{path.relative_to(ENGINE)} imports against the layout:\n" + "\n".join(wrong)


def test_the_layout_is_checked_against_real_imports() -> None:
    """The checker sees imports inside functions and ``from engine import x`` forms."""
    sample = ENGINE / "model" / "task.py"
    assert ("engine.errors" in {m for _, m in imported_modules(sample)})
    assert part_of(ENGINE / "decompose" / "api.py") == "decompose"
    assert part_of(ENGINE / "cli.py") == "cli"
    assert len(MODULES) > 30


def test_a_command_does_not_load_what_only_one_task_needs() -> None:
    """scikit-learn (140 MiB resident, 2 s to import) is for reading the digits; `explain`, `info`
    and the dashboard's engine imports do without it."""
    probe = ("import sys, engine.cli, engine.decompose, engine.store; engine.cli.build_parser(); "
             "print(sorted(m for m in ('sklearn', 'scipy', 'streamlit', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ENGINE.parent).stdout
    assert out.strip() == "[]", out
