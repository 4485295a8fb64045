"""The installed distribution: only `mor_megatron` at the top of site-packages (`kernels/` and
`tools/` install inside it, through the links `mor_megatron/kernels` and `mor_megatron/tools`), the
licence as an SPDX string (no setuptools deprecation warnings), every console script's entry
point exists and answers `--help`, and the tools print their own output only."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_kernels_and_tools_are_links_into_the_package() -> None:
    for name in ("kernels", "tools"):
        link = ROOT / "mor_megatron" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link
    import mor_megatron.kernels
    import mor_megatron.tools.generate

    assert Path(mor_megatron.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert Path(mor_megatron.tools.generate.__file__).resolve().parent == ROOT / "tools"


def test_wheel_holds_only_the_namespace(tmp_path: Path) -> None:
    """A real wheel build (this environment's setuptools, no index): one top-level package,
    kernels and tools inside it, and no build warnings about the licence."""
    source = tmp_path / "src"  # a copy, so the build leaves no build/ folder in the checkout
    for name in ("mor_megatron", "kernels", "tools"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("mor_megatron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mor_megatron", f"mor_megatron-{PROJECT['version']}.dist-info"}
    for module in ("kernels/gated_scatter.py", "tools/generate.py", "tools/convert_to_hf.py"):
        assert f"mor_megatron/{module}" in names, module
    assert "license" not in (built.stdout + built.stderr).lower(), built.stderr[-3000:]


@pytest.mark.parametrize("script", sorted(PROJECT["scripts"]))
def test_console_script_entry_points(script: str) -> None:
    module, function = PROJECT["scripts"][script].split(":")
    entry = getattr(importlib.import_module(module), function)
    assert callable(entry)
    installed = Path(sys.executable).parent / script  # the editable install of the test command
    if installed.is_file():
        shown = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and "usage:" in shown.stdout, shown.stderr[-2000:]


def test_tools_hide_library_warnings_unless_debug() -> None:
    """megatron's import-time notes (Apex/TE missing, deprecations) stay out of a tool's output;
    `--debug` shows them."""
    command = [sys.executable, "tools/model_report.py", "--config", "configs/tiny.yaml"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert quiet.returncode == 0 and quiet.stdout.startswith("{") and quiet.stderr == "", quiet.stderr[-2000:]
    loud = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert loud.returncode == 0 and "Warning" in loud.stderr
