"""Process trees read from Linux /proc: who started whom, and the memory a tree holds together.

The standard library only: `tools/gpu_check.py` imports this before torch, and the tests that
start launchers (torchrun, Slurm's daemons, network-namespace hosts) find their processes with it.
Where /proc is missing (not Linux) every tree is just its root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PROC = Path("/proc")


def children(live: bool = False) -> dict[int, list[int]]:
    """parent pid -> the pids of its children, from /proc/<pid>/stat; with `live`, without the
    ended ones not yet reaped (zombies)."""
    tree: dict[int, list[int]] = {}
    for pid, (parent, state) in _table().items():
        if not (live and state == "Z"):
            tree.setdefault(parent, []).append(pid)
    return tree


def pids() -> list[int]:
    """Every process's pid."""
    return list(_table())


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process."""
    table: dict[int, tuple[int, str]] = {}
    if not PROC.is_dir():
        return table
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name (field 2) may hold spaces and parentheses: split after the last ")"
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), fields[0])
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
    return table


def descendants(*roots: int, live: bool = False) -> list[int]:
    """Every descendant of `roots`, the roots themselves left out; with `live`, zombies and what is
    under them are left out too."""
    tree, found, todo = children(live), [], list(roots)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (an ended process not yet reaped, a zombie, does not)."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def environment(pid: int) -> dict[str, str]:
    """The environment `pid` was started with; empty when it has ended or is not ours to read."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def tree_pss_bytes(root: int, attempts: int = 5) -> Optional[int]:
    """Proportional set size of `root` and its descendants together: pages they share (a forked
    checkpoint writer and its trainer) count once. None when no consistent reading was had.

    A reading is consistent only if the tree's live processes are the same before and after it: a
    process that ends between the reads hands its share of the pages back to its parent, so a child read before its
    exit and the parent read after it would count those pages about twice (a trainer forking its
    writers read that way as 23 GiB on a 24 GB machine that held 17). Such a reading is retaken, as
    is one where a process had no memory left to read (it was ending: its parent's share grows).
    """
    for _ in range(attempts):
        before = {root, *descendants(root, live=True)}
        shares = [_pss_bytes(pid) for pid in before]
        if None not in shares and {root, *descendants(root, live=True)} == before:
            return sum(shares)
    return None


def _pss_bytes(pid: int) -> Optional[int]:
    """None when `pid` has no memory to read: it ended, or is ending (its pages already went back)."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None
