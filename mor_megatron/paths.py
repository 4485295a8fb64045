"""Output places checked before any work starts, outputs never clobbered, one run per directory.

A tool that finds out its output folder is a file, or not writable, only when it first writes
(after a model was built or a corpus read) wastes that work and leaves a half-written output;
`writable_dir` is called first instead. `replaced_output` writes a tool's output folder whole:
a folder that already holds something is refused unless the user said `--overwrite`, and then the
new contents replace the old only once they are complete (an export into another model's folder
used to leave a mix of both). `RunLock` keeps a second trainer out of a run directory a live run
holds: two runs would interleave their metrics and resume from each other's checkpoints.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional, Union

from mor_megatron.errors import UserError

LOCK_FILE = ".run.lock"


def writable_dir(path: Union[str, Path], setting: str) -> Path:
    """`path` as a directory this process can write, created if missing; otherwise one
    `UserError` line naming the setting (`setting`, e.g. "logging.dir" or "--output") and the fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{setting} {path} is a file, not a directory: choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"{setting} {path} cannot be written ({reason}): choose a writable place") from None
    return path


def output_file(path: Union[str, Path], what: str, setting: str = "--output",
                overwrite: Optional[bool] = None) -> Path:
    """`path` as a file to write `what` into, checked before any work: never a folder, in a
    folder this process can write; an existing file is refused unless `overwrite` (None: a tool
    that always replaces its output file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{setting} {path} is a directory: give a file path for {what}")
    if path.exists() and overwrite is False:
        raise UserError(f"{setting} {path} already exists: choose a new file, or pass --overwrite to replace it")
    writable_dir(path.resolve().parent, f"{setting}'s folder")
    return path


@contextmanager
def replaced_output(path: Union[str, Path], setting: str = "--output", overwrite: bool = False) -> Iterator[Path]:
    """Check `path` first, then yield a new folder beside it to write the output into; when the
    block completes that folder becomes `path` (the old contents, with `overwrite`, go only
    then). A block that fails leaves `path` as it was and its partial folder removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{setting} {path} is a file, not a directory: choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"{setting} {path} already holds files: choose a new or empty folder, or pass --overwrite "
            "to replace its contents"
        )
    parent = writable_dir(path.resolve().parent, f"{setting}'s parent folder")
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp's folder is private)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(partial, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """An exclusive `flock` on `DIR/.run.lock` while a run lives. The kernel drops it when the
    process ends, however it ends, so a crashed run never leaves the directory locked; the file
    keeps the holder's pid, host and start time for the message a second run prints."""

    def __init__(self, directory: Union[str, Path], setting: str = "logging.dir") -> None:
        self.directory = writable_dir(directory, setting)
        self.setting = setting
        self._handle: Optional[IO[str]] = None

    def __enter__(self) -> "RunLock":
        handle = open(self.directory / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"{self.setting} {self.directory} is in use by a live run ({holder}): wait for it to "
                f"finish or stop it, or set {self.setting} to another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
