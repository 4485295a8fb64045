"""`tools/gpu_check.py`'s process layer: the steps' context, their commands run under the step's
deadline (killed with every process they started), the outcomes and the errors a step ends with.
Standard library only, like the rest of the check."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mor_megatron.processes import descendants

REPO = Path(__file__).resolve().parent.parent
TAG = "[gpu_check]"
TAIL_LINES = 30


# -- results -------------------------------------------------------------------------------------


class StepTimeout(Exception):
    """The step ran past its limit; its processes were killed. `output`: what the killed
    command had printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class StepFailed(Exception):
    """A command of the step failed; the message is one line."""


@dataclass
class Outcome:
    status: str  # passed | failed | skipped
    reason: str = ""
    findings: list[str] = field(default_factory=list)


@dataclass
class Proc:
    rc: int
    output: str
    seconds: float


class Context:
    """What every step gets: settings, paths, the environment of its commands, its log."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path, env: dict[str, str]) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.out = out
        self.work = work
        self.env = env
        self.python = sys.executable
        self.environment: dict[str, Any] = {}
        self.log = out / "setup.log"
        self.deadline = float("inf")
        self.figures: dict[str, Any] = {}  # filled as a step goes, kept even if it times out

    @property
    def cuda(self) -> bool:
        return bool(self.environment.get("cuda_available")) and not self.dry

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: Sequence[str], *, what: str, env: Optional[dict[str, str]] = None,
            check: bool = True) -> Proc:
        """Run `cmd` from the repo root, output appended to the step's log, killed (with every
        process it started) at the step's deadline."""
        timeout = self.remaining()
        if timeout <= 1:
            raise StepTimeout(f"no time left for {what}")
        full_env = dict(self.env, **(env or {}))
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n$ {shlex.join(str(c) for c in cmd)}\n")
            log.flush()
            start_offset = log.tell()
            started = time.monotonic()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                rc = None
            seconds = time.monotonic() - started
            log.write(f"\n{TAG} {'killed at the step limit' if rc is None else f'exit {rc}'} after {seconds:.1f} s\n")
        with open(self.log, encoding="utf-8", errors="replace") as log:
            log.seek(start_offset)
            output = log.read()
        if rc is None:
            raise StepTimeout(f"{what} ran past the step's limit", output)
        if check and rc != 0:
            raise StepFailed(f"{what} exited {rc}: {error_line(output)}")
        return Proc(rc, output, seconds)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every descendant (torchrun starts its workers in
    sessions of their own, so the group alone would leave them running)."""
    victims = [proc.pid] + descendants(proc.pid)
    for pid in victims:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def error_line(output: str) -> str:
    """The most telling line of a failed command: its `error: ...` line, else the last
    exception line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(TAG)]
    for pattern in (r"^error: ", r"^(\w+\.)*\w*(Error|Exception)\b", r"^FAILED "):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "(no output)"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
