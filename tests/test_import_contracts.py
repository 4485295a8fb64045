"""The import contracts of pyproject.toml's `[tool.importlinter]` hold (issue #14, item 4):
`model/` imports nothing above it, `inference/` neither `training/` nor the CPU shims, and every
top-level module sits in its layer. On failure the message is import-linter's contract report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    """The `lint-imports` of this interpreter's environment (pinned in requirements.txt)."""
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -r requirements.txt (import-linter)")
    return found


def test_import_contracts_hold():
    result = subprocess.run(
        [_lint_imports(), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"import contracts broken:\n{result.stdout}\n{result.stderr}"
