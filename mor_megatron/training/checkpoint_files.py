"""Checkpoint directories on disk: names, the manifest, completeness checks, the `latest` pointer.

Standard library only, so tools can inspect checkpoints without importing torch or megatron.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def manifest(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "meta.json"
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoint_problem(directory: Path) -> Optional[str]:
    """Why `directory` is not a complete checkpoint (one line), or None when it is."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return f"{meta_path} is missing: the save did not finish"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return f"{meta_path} is unreadable or truncated"
    for name, size in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def find_latest(save_dir: str, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest complete checkpoint: the `latest` pointer if it is sound, else the newest older
    complete one (each rejection is reported in one line)."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")),
        reverse=True,
    )
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named not in candidates:
            log(f"checkpoint pointer {pointer} names {named.name}, which does not exist; searching older checkpoints")
        else:
            candidates.remove(named)
            candidates.insert(0, named)
    for directory in candidates:
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        log(f"skipping incomplete checkpoint: {problem}")
    return None
