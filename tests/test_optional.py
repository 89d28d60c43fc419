"""Optional packages stay optional: the engine imports, and its command line starts, without them."""

import subprocess
import sys

MODULES = ("engine.cli", "engine.samples", "engine.decompose.checkpoints", "engine.run.series",
           "engine.run.checkpoints", "engine.model.lm", "engine.model.hf", "engine.tasks.tiny_lm")


def test_the_engine_imports_without_loading_transformers():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
