"""Two test "hosts" with their own addresses: network namespaces joined by a veth pair.

`two_hosts()` makes namespaces NAME-0 and NAME-1 (unique per process), one end of a veth pair
in each with an address of 10.213.N.1/24 and .2/24, loopback up in each, and no route to
anything else (no end of the pair stays on the machine's own network). Deleting a namespace
deletes its end of the pair, and with it the other end. Needs root and iproute2's `ip netns`.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from system_packages import ensure_programs


@dataclass(frozen=True)
class Host:
    netns: str  # namespace name
    iface: str  # its end of the veth pair
    addr: str  # that end's address

    def prefix(self) -> list[str]:
        """Prepend to a command to run it on this host."""
        return ["ip", "netns", "exec", self.netns]


def why_not() -> Optional[str]:
    """Why namespaces cannot be made here (one line), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = ensure_programs(["ip"], ["iproute2"])
    if missing:
        return missing
    name = f"mor-probe-{os.getpid()}"
    try:  # a container without CAP_SYS_ADMIN / CAP_NET_ADMIN fails here, not in the test
        for args in (["add", name], ["exec", name, "true"]):
            probe = subprocess.run(["ip", "netns", *args], capture_output=True, text=True, timeout=10)
            if probe.returncode != 0:
                return f"`ip netns {args[0]}` does not work here: {probe.stderr.strip()[:120]}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")


@contextmanager
def two_hosts(tag: str = "mor") -> Iterator[tuple[Host, Host]]:
    pid = os.getpid()
    subnet = 10 + pid % 240  # 10.213.10-249.0/24: a private range, varied so parallel runs differ
    hosts = tuple(Host(f"{tag}-{pid}-{i}", f"{tag}{pid % 100000}v{i}", f"10.213.{subnet}.{i + 1}") for i in (0, 1))
    made: list[str] = []
    try:
        for host in hosts:
            _ip("netns", "add", host.netns)
            made.append(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        a, b = hosts
        _ip("link", "add", a.iface, "netns", a.netns, "type", "veth", "peer", "name", b.iface, "netns", b.netns)
        for host in hosts:
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.iface)
            _ip("-n", host.netns, "link", "set", host.iface, "up")
        yield hosts
    finally:
        for name in made:  # only the namespaces made here; their veth ends go with them
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
