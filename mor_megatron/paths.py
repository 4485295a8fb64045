"""Output places checked before any work starts, and the one-run-per-directory lock.

A tool that finds out its output folder is a file, or not writable, only when it first writes
(after a model was built or a corpus read) wastes that work and leaves a half-written output;
`writable_dir` is called first instead. `RunLock` keeps a second trainer out of a run directory a
live run holds: two runs would interleave their metrics and resume from each other's checkpoints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Optional, Union

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
