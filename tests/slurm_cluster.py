"""A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd "nodes".

`slurm_cluster` (a module-scoped pytest fixture) installs Debian's Slurm and munge packages when
they are missing (root and apt-get needed; the .debs are kept under /tmp/mor-apt-cache so a rerun
does not download them again), writes a munge key, slurm.conf and cgroup.conf into a fresh
directory under /tmp, starts the daemons there and waits until `sinfo` shows both nodes idle. It
yields a `SlurmCluster`: `env` is what Slurm's clients (sbatch, scontrol, ...) need, SLURM_CONF
first; nothing is exported into the test process itself. Teardown cancels the jobs, stops the
processes the fixture started, by pid (the daemons, their descendants, and every process that
carries the cluster's MOR_SLURM_ROOT marker in its environment: slurmstepd and the jobs' own
processes are not the daemons' children) and removes the directory.

The traps a home-made cluster meets, handled here:
* node names do not resolve: every node has NodeAddr=127.0.0.1 and its own SlurmdPort, and each
  slurmd is started as `slurmd -N <name>` (Debian's slurmd accepts several per host);
* clients find neither the configuration nor munge's socket: SLURM_CONF (in `env`) names the
  file, and slurm.conf's AuthInfo names our munged's socket (no system munged is used);
* a job whose begin time has passed waits for the scheduler's periodic pass (60 s by default;
  2 s here). A requeued job is held about 2 minutes by Slurm itself: tests that requeue run
  `scontrol update JobId=N StartTime=now`;
* finished jobs vanish from `scontrol show job` after MinJobAge (300 s by default; kept at 600 so a
  test can read the final state and requeue a finished job without slurmdbd/sacct);
* no cgroups in a container: proctrack/linuxproc, task/none, no cgroup plugin.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

from system_packages import ensure_programs, which

from mor_megatron import processes

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")  # Debian's slurm-wlm minus its docs/extras
PROGRAMS = ("sbatch", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
NODES = ("mor1", "mor2")


def ensure_slurm() -> Optional[str]:
    """Install the packages if a program is missing. Returns why the cluster cannot run, or None."""
    return ensure_programs(PROGRAMS, PACKAGES)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int], munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={os.cpu_count() or 1} "
        "RealMemory=1000 State=UNKNOWN"
        for name, port in node_ports.items()
    )
    return f"""\
ClusterName=mor
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/ctld
SlurmctldPidFile={root}/ctld/slurmctld.pid
SlurmctldLogFile={root}/ctld/slurmctld.log
SlurmdSpoolDir={root}/%n/spool
SlurmdPidFile={root}/%n/slurmd.pid
SlurmdLogFile={root}/%n/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
JobRequeue=1
PreemptType=preempt/none
KillWait=30
{nodes}
PartitionName=mor Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    """A running cluster: `env` for its clients, the daemons' processes, their log files."""

    root: Path
    env: dict[str, str]
    nodes: tuple[str, ...] = NODES
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def marker(self) -> str:
        """MOR_SLURM_ROOT=<root>: in the environment of every process of this cluster (`env`)."""
        return f"MOR_SLURM_ROOT={self.root}"

    def run(self, *args: str, timeout: float = 30, check: bool = True, **popen) -> subprocess.CompletedProcess:
        """A Slurm client command with the cluster's environment."""
        result = subprocess.run(list(args), env=popen.pop("env", self.env), capture_output=True, text=True,
                                timeout=timeout, **popen)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}\n"
                                 f"{self.log_tails()}")
        return result

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = {}
        for word in out.split():
            if "=" in word:
                key, value = word.split("=", 1)
                fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; fail with the daemons' log tails."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}\n{self.log_tails()}")

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon's log, for failure messages."""
        parts = []
        for log in sorted(self.root.glob("*/*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.relative_to(self.root)} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def _start(self, name: str, command: list[str], log: Path) -> None:
        # Own session: a signal to the test's process group does not reach the daemons.
        with open(log, "ab") as out:
            self.procs[name] = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"{what}: {'daemon died: ' + ', '.join(dead) if dead else 'timed out'}\n"
                                     f"{self.log_tails()}")
            time.sleep(0.2)

    def start(self) -> None:
        munge = self.root / "munge"
        self.root.chmod(0o755)  # munged wants every directory above its socket searchable by all
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = munge / "munge.socket"
        self._start("munged", [which("munged"), "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}", "--num-threads=2"],
                    munge / "stdout.log")
        self._wait("munged did not create its socket", munge_socket.exists, 20)

        ctld_port, *ports = _free_ports(1 + len(self.nodes))
        (self.root / "ctld").mkdir()
        for name in self.nodes:
            (self.root / name / "spool").mkdir(parents=True)
        conf = self.root / "slurm.conf"
        conf.write_text(_slurm_conf(self.root, ctld_port, dict(zip(self.nodes, ports)), munge_socket))
        (self.root / "cgroup.conf").write_text("# no cgroup plugin is used (proctrack/linuxproc, task/none)\n")
        self.env["SLURM_CONF"] = str(conf)

        self._start("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(conf)], self.root / "ctld" / "stdout.log")
        self._wait("slurmctld does not answer", lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30)
        for name in self.nodes:
            self._start(name, [which("slurmd"), "-D", "-N", name, "-f", str(conf)], self.root / name / "stdout.log")

        self.wait_idle(60)

    def wait_idle(self, timeout: float) -> None:
        """Until sinfo shows every node idle: no job, and none still completing (its processes
        killed, its credential revoked on the node)."""
        def all_idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return dict(zip(out[::2], out[1::2])) == {name: "idle" for name in self.nodes}

        self._wait("the nodes are not idle in sinfo", all_idle, timeout)

    def stop(self) -> None:
        """Cancel every job, then stop our daemons and whatever they started (slurmstepd, job
        steps), by pid: nothing else on the machine is touched."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user=root", "--full", check=False, timeout=10)  # only this cluster's jobs
            time.sleep(1)
        pids = [p.pid for p in self.procs.values() if p.poll() is None]
        # slurmstepd and job processes are not the daemons' children (slurmd double-forks): they
        # are found by the marker in their environment, inherited from the daemons or the job
        pids += [pid for pid in _marked(self.marker) + processes.descendants(*pids) if pid not in pids]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(processes.alive(pid) for pid in pids):
            for proc in self.procs.values():
                proc.poll()
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _marked(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (a NAME=value of this cluster alone)."""
    name, value = marker.split("=", 1)
    return [pid for pid in processes.pids() if pid != os.getpid() and processes.environment(pid).get(name) == value]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def client_env(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The caller's environment minus any SLURM_* of an enclosing allocation, with sbin on PATH."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM")}
    env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}/usr/sbin:/sbin"  # the daemons' folders
    return env


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="mor-slurm-", dir="/tmp"))  # short: munge's socket path
    cluster = SlurmCluster(root=root, env=client_env())
    cluster.env["MOR_SLURM_ROOT"] = str(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
