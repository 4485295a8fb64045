"""mor_megatron.processes: process trees from /proc, and the memory a tree holds together while its
processes fork and exit (as a trainer's checkpoint writers do)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mor_megatron import processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux /proc")

MIB = 2**20
HELD_MIB = 256
# holds HELD_MIB of its own pages, then forks three writers at a time that exit 50 ms later, as
# megatron's checkpoint writers do: each shares every page until it ends
FORKING = f"""
import os, sys, time
held = bytearray(b"x") * ({HELD_MIB} * 2**20)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    kids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            time.sleep(0.05)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    time.sleep(0.02)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_forking_tree_is_never_counted_over_what_it_holds():
    proc = _start(FORKING, "4")
    try:
        readings = []
        while proc.poll() is None:
            held = processes.tree_pss_bytes(proc.pid)
            if held is not None:
                readings.append(held)
        # the interpreter adds ~10 MiB; a child read before its exit and the parent after it
        # would add up to three quarters of the held pages again (the reading before: 1.5-1.9x)
        assert len(readings) >= 10 and max(readings) < (HELD_MIB + 64) * MIB, [r // MIB for r in sorted(readings)[-5:]]
        assert max(readings) > 0.95 * HELD_MIB * MIB  # and it counts what the tree does hold
    finally:
        proc.kill()
        proc.wait()


def test_descendants_children_environment_and_alive():
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env={'MOR_MARK': 'x1'})\n"
            "print('ready', child.pid, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        ready, child = proc.stdout.readline().split()
        child = int(child)
        assert processes.descendants(proc.pid) == [child]
        assert child in processes.children()[proc.pid]
        assert processes.environment(child).get("MOR_MARK") == "x1"
        assert processes.alive(child) and processes.alive(proc.pid)
        proc.kill()
        proc.wait()
        assert not processes.alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["kill", "-9", str(child)], check=False)
    for _ in range(100):
        if not processes.alive(child):
            break
        time.sleep(0.05)
    assert not processes.alive(child)
