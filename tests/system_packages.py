"""Debian packages a test needs, installed when their programs are missing (CI runs as root and
reaches Debian's packages); the .debs are kept under /tmp/mor-apt-cache so a rerun installs
without downloading. Nothing is written outside the system's package tree and /tmp."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import pytest

APT_CACHE = Path("/tmp/mor-apt-cache")
_SBIN = "/usr/sbin:/sbin"


def which(program: str) -> Optional[str]:
    """`program` on PATH or in the sbin folders (daemons live there; a non-login PATH may lack them)."""
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}{os.pathsep}{_SBIN}")


def _apt_install(packages: Sequence[str]) -> subprocess.CompletedProcess:
    APT_CACHE.joinpath("partial").mkdir(parents=True, exist_ok=True)
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", f"Dir::Cache::archives={APT_CACHE}", "-o", "DPkg::Lock::Timeout=300", *packages]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def ensure_programs(programs: Sequence[str], packages: Sequence[str]) -> Optional[str]:
    """Install `packages` if one of `programs` is missing. Returns why they cannot be had (one
    line: the caller skips), or None; a failed install as root fails the test."""
    missing = [p for p in programs if which(p) is None]
    if not missing:
        return None
    why = f"programs missing ({', '.join(missing)})"
    if os.geteuid() != 0:
        return f"{why} and not root: cannot apt-get install {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        return f"{why} and no apt-get: install {' '.join(packages)}"
    done = _apt_install(packages)
    if done.returncode != 0:  # stale or missing package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, timeout=600)
        done = _apt_install(packages)
    if done.returncode != 0:
        pytest.fail(f"apt-get install {' '.join(packages)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    still = [p for p in programs if which(p) is None]
    if still:
        pytest.fail(f"installed {' '.join(packages)} but still missing: {', '.join(still)}")
    return None
