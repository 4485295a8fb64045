"""Checkpoint directories on disk: names, the manifest, completeness checks, the `latest` pointer.

Standard library only, so tools can inspect checkpoints without importing torch or megatron.
Below training and inference both: the trainer writes these directories (`training/checkpoint.py`),
decoding and export read them (`weights.py` holds the weights' format).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from mor_megatron.errors import UserError
from mor_megatron.json_files import read_json

LATEST = "latest"
# What a checkpoint's meta.json holds (`training.checkpoint.save_checkpoint` writes it last);
# one without any of them is a partial or foreign file, not a checkpoint.
META_KEYS = ("format", "tag", "train_state", "layout", "model_hash", "config", "files")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used, in one line naming the file and the fix."""


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
        meta = read_json(meta_path, "the save did not finish", required=META_KEYS)
    except UserError as err:
        return str(err)
    for name, size in meta["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def read_meta(directory: Path) -> dict:
    """A checkpoint's `meta.json` (call `checkpoint_problem` first for the whole check)."""
    return read_json(Path(directory) / "meta.json", "the save did not finish", META_KEYS, CheckpointError)


def checkpoint_dirs(save_dir: str) -> list[Path]:
    """Every `step_N` directory under `save_dir` (complete or not, not `.partial`), newest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")), reverse=True)


def find_latest(save_dir: str, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest complete checkpoint (each rejected newer one is reported in one line).

    The `latest` pointer is written last by a save, so a crash between the rename and the
    pointer update leaves it one checkpoint behind: the newest complete directory wins, and a
    pointer that disagrees is reported.
    """
    pointer = Path(save_dir) / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    for directory in checkpoint_dirs(save_dir):
        problem = checkpoint_problem(directory)
        if problem is not None:
            log(f"skipping incomplete checkpoint: {problem}")
            continue
        if named is not None and named != directory.name:
            exists = (Path(save_dir) / named).is_dir()
            log(f"checkpoint pointer {pointer} names {named}, which "
                + ("is older: a save stopped before updating it" if exists and named < directory.name
                   else "does not exist" if not exists else "is not the newest")
                + f"; using the newest complete checkpoint {directory.name}")
        return directory
    return None


def exit_with_parent(parent: int) -> None:
    """Initializer of checkpoint helper processes: exit as soon as `parent` is gone (here because
    this module imports only the standard library, so a spawned helper starts fast). SIGTERM and
    SIGINT are ignored: torchrun and Slurm send them to the trainer's whole process group, and a
    helper that died on them would fail the very checkpoint the trainer writes on SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
