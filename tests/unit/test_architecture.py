"""The arrows between the layers (pyproject.toml [tool.importlinter]): cli → workers → services →
models | db and never back, and no new import circle inside a package. A wrong import fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_imports_keep_the_layer_contracts():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.is_file(), f"{lint_imports} missing: install the test extra (pip install -e '.[test]')"
    run = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    report = run.stdout[run.stdout.find("Contracts"):] + run.stderr
    assert run.returncode == 0, f"lint-imports found an import that crosses a layer the wrong way:\n{report}"
    assert "0 broken" in run.stdout, report
