"""Two hosts with their own addresses: one launch/torchrun.sh per network namespace (joined by a
veth pair, tests/netns_hosts.py), c10d rendezvous on the first host's address, a tiny MoR trained
by two gloo processes across them. Each launcher's address choice (named interface, else the
node's own address) must be its own host's address, never loopback or a wildcard. The second host
is then killed (SIGKILL, torchrun and its workers) after a checkpoint; relaunching both resumes
from the newest complete checkpoint, and every loss equals a 2-process run on one machine's
loopback (the same math on gloo: a two-rank sum is exact in any transport)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from subprocess import Popen

import pytest

import netns_hosts

from mor_megatron import processes
from train_helpers import launch, metrics, repo_root, series, write_config

pytestmark = pytest.mark.distributed

TRAIN_STEPS, SAVE_EVERY = 6, 2
PORT, RDZV_ID = 29400, "twohosts"  # fresh namespaces: every port is free there
TIMEOUT_S = 150  # per launch of both hosts


@pytest.fixture
def hosts():
    reason = netns_hosts.why_not()
    if reason:
        pytest.skip(reason)
    with netns_hosts.two_hosts() as pair:
        yield pair


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each worker in a session of its own, so a
    process group does not hold them)."""
    return [pid, *processes.descendants(pid)]


class Node:
    """One host's launcher, its output in a log file."""

    def __init__(self, host: netns_hosts.Host, rank: int, launcher_args: list[str], config: Path,
                 run_dir: Path, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "LOCAL_ADDR", "MOR_IFACE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                            "NNODES", "NODE_RANK", "NPROC_PER_NODE", "GPUS_PER_NODE", "MASTER_PORT", "RDZV_ID")}
        env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", MOR_DEVICE="cpu", MOR_DIST_BACKEND="gloo",
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        command = [*host.prefix(), "bash", str(repo_root() / "launch" / "torchrun.sh"), "--nnodes", "2",
                   "--node-rank", str(rank), "--nproc-per-node", "1", "--master-port", str(PORT),
                   "--rdzv-id", RDZV_ID, *launcher_args, "--", "--config", str(config), f"logging.dir={run_dir}"]
        with open(log, "w") as out:
            self.proc = Popen(command, env=env, cwd=repo_root(), stdout=out, stderr=out, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL torchrun and everything it started, by pid: what losing the host looks like."""
        for pid in _tree(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def _tails(nodes: list[Node]) -> str:
    return "\n".join(f"--- {node.log.name} (exit {node.proc.poll()}):\n{node.text()[-4000:]}" for node in nodes)


def _wait(nodes: list[Node], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except Exception:
        for node in nodes:
            if node.proc.poll() is None:
                node.kill()
        raise AssertionError(f"the launch did not end within {timeout:.0f} s\n{_tails(nodes)}")


def _chosen(node: Node) -> tuple[dict[str, str], dict[str, str]]:
    """The environment and torchrun options in the launcher's `[torchrun.sh] ...: COMMAND` line."""
    (line,) = [line for line in node.text().splitlines() if line.startswith("[torchrun.sh] ")]
    words = shlex.split(line.split(": ", 1)[1])
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    options = words[3:words.index("-m", 3)]  # after PYTHON -m mor_megatron.torchrun, before -m ENTRY
    return env, dict(zip(options[::2], options[1::2]))


def _check_addresses(nodes: list[Node], hosts: tuple[netns_hosts.Host, netns_hosts.Host]) -> None:
    for node, host in zip(nodes, hosts):
        env, options = _chosen(node)
        assert options["--rdzv-endpoint"] == f"{hosts[0].addr}:{PORT}", options  # the first host's address
        assert options["--local-addr"] == host.addr, options  # what this host advertises: its own address
        assert env.get("GLOO_SOCKET_IFNAME") == host.iface, env  # gloo binds there too, not to loopback
        assert f"rendezvous {hosts[0].addr}:{PORT}" in node.text()


def _newest_complete(run_dir: Path) -> int:
    """Independent of the code under test: complete saves are renamed from step_N.partial."""
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if re.fullmatch(r"step_\d{8}", p.name)]
    return max(steps, default=0)


def test_two_hosts_train_lose_one_and_resume(hosts, corpus, tmp_path):
    first, second = hosts
    config = write_config(tmp_path / "run.yaml", corpus, training={
        "train_steps": TRAIN_STEPS, "save_interval": SAVE_EVERY, "keep_checkpoints": 0, "micro_batch_size": 1},
        logging={"tensorboard": False})
    launch(config, tmp_path / "reference", nproc=2, timeout=TIMEOUT_S)  # one machine, loopback
    reference = series(tmp_path / "reference", "train/loss")
    assert len(reference) == TRAIN_STEPS

    # Launch 1: the first host finds its own address (no interface named), the second is told its
    # interface and the first host's address.
    run_dir = tmp_path / "run"
    nodes = [Node(first, 0, [], config, run_dir, tmp_path / "host0.log"),
             Node(second, 1, ["--iface", second.iface, "--master-addr", first.addr], config, run_dir,
                  tmp_path / "host1.log")]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run_dir / "checkpoints" / f"step_{SAVE_EVERY:08d}").is_dir():
            assert all(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline, \
                f"no checkpoint of step {SAVE_EVERY} came\n{_tails(nodes)}"
            time.sleep(0.02)
        nodes[1].kill()  # lose the second host mid-run, after a checkpoint
        _wait(nodes[:1], 60)  # its peer's collectives fail: the first host's launch ends too
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.kill()
    assert nodes[0].proc.returncode != 0, _tails(nodes)
    _check_addresses(nodes, hosts)
    done = metrics(run_dir)
    assert len(done) < TRAIN_STEPS, "the run ended before the kill: nothing was tested"
    assert [row["train/loss"] for row in done] == reference[:len(done)], _tails(nodes)
    resumed = _newest_complete(run_dir)
    assert resumed >= SAVE_EVERY

    # Launch 2, the same commands but the other way round: the first host names its interface,
    # the second finds its own address.
    nodes = [Node(first, 0, ["--iface", first.iface], config, run_dir, tmp_path / "host0-again.log"),
             Node(second, 1, ["--master-addr", first.addr], config, run_dir, tmp_path / "host1-again.log")]
    _wait(nodes, TIMEOUT_S)
    assert [n.proc.returncode for n in nodes] == [0, 0], _tails(nodes)
    _check_addresses(nodes, hosts)
    assert any("resumed from " in n.text() and f"at step {resumed}" in n.text() for n in nodes), _tails(nodes)
    rows = metrics(run_dir)[len(done):]
    assert [row["step"] for row in rows] == list(range(resumed + 1, TRAIN_STEPS + 1))
    assert [row["train/loss"] for row in rows] == reference[resumed:]
