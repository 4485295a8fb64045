"""The launch scripts: syntax, the torchrun command lines they build, their input checks, and a
real two-"node" c10d launch on loopback through launch/torchrun.sh (a gloo all_reduce)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import fake_slurm_env, install_fake_slurm, srun_calls

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
QUICKSTART = ROOT / "launch" / "quickstart.sh"

# Variables the scripts read: cleared so the caller's shell cannot steer a test.
_LAUNCH_VARS = ("NNODES", "NPROC_PER_NODE", "GPUS_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                "RDZV_ID", "LOCAL_ADDR", "MOR_IFACE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MAX_RESTARTS",
                "DRY_RUN", "MOR_ENTRY", "DS_ACCELERATOR",
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "CUDA_VISIBLE_DEVICES", "CONFIG", "RUN_DIR", "MOR_REPO",
                "RDZV_ADDR", "RDZV_PORT", "SRUN_EXTRA_ARGS", "AUTO_REQUEUE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _no_gpu_path(tmp_path: Path) -> str:
    """PATH without nvidia-smi: a fake one that lists no GPU comes first."""
    fake = tmp_path / "nogpu"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    return f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"


def _run(cmd: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _parse(line: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Split a dry-run line into (env assignments, torchrun options, [entry module, trainer args...])."""
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith("-") and "/" not in words[0].split("=")[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[1:3] == ["-m", "mor_megatron.torchrun"], words  # torch.distributed.run, one-line failures
    rest = words[3:]
    cut = rest.index("-m")
    return env, rest[:cut], rest[cut + 1:]


def _opts(torchrun_args: list[str]) -> dict[str, str]:
    return {torchrun_args[i]: torchrun_args[i + 1] for i in range(0, len(torchrun_args), 2)}


def _dry(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run(["bash", str(TORCHRUN_SH), "--dry-run", *args], _env(PATH=_no_gpu_path(tmp_path), **env))


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH, QUICKSTART], ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    assert script.exists(), script
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = _run(["bash", str(script), "-h"], _env())
    assert out.returncode == 0 and "Usage" in out.stdout, out.stderr


def test_torchrun_single_node_cpu(tmp_path: Path) -> None:
    out = _dry(tmp_path, "--", "--config", "configs/tiny.yaml", "training.train_steps=5", "a b=c d", "--debug")
    assert out.returncode == 0, out.stderr
    env, targs, entry = _parse(out.stdout.strip())
    opts = _opts(targs)
    assert env["DS_ACCELERATOR"] == "cpu"
    assert opts["--nnodes"] == "1" and opts["--nproc-per-node"] == "1" and opts["--node-rank"] == "0"
    assert opts["--rdzv-backend"] == "c10d"
    assert opts["--rdzv-endpoint"] == "127.0.0.1:29500"  # one node: loopback, never a wildcard
    assert "--rdzv-conf" not in opts
    assert entry == ["mor_megatron.pretrain", "--config", "configs/tiny.yaml", "training.train_steps=5",
                     "a b=c d", "--debug"]
    assert shlex.split(out.stdout)[len(env)] == sys.executable


def test_torchrun_env_fallbacks_and_gpu_count(tmp_path: Path) -> None:
    fake = tmp_path / "gpus"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    smi.chmod(0o755)
    path = f"{fake}{os.pathsep}{os.environ['PATH']}"
    out = _run(["bash", str(TORCHRUN_SH), "--dry-run", "--", "--config", "c.yaml"], _env(PATH=path))
    env, targs, _ = _parse(out.stdout.strip())
    assert _opts(targs)["--nproc-per-node"] == "4" and "DS_ACCELERATOR" not in env
    # GPU nodes get the NCCL defaults (an exported value wins); CPU launches get none of them
    assert env == {**env, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_IB_TIMEOUT": "22",
                   "NCCL_IB_RETRY_CNT": "7", "NCCL_DEBUG": "WARN", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    out = _run(["bash", str(TORCHRUN_SH), "--dry-run", "--"], _env(PATH=path, NCCL_DEBUG="INFO"))
    assert _parse(out.stdout.strip())[0]["NCCL_DEBUG"] == "INFO"
    assert "NCCL_DEBUG" not in _parse(_dry(tmp_path, "--").stdout.strip())[0]
    out = _run(["bash", str(TORCHRUN_SH), "--dry-run", "--"], _env(PATH=path, CUDA_VISIBLE_DEVICES="2,3"))
    assert _opts(_parse(out.stdout.strip())[1])["--nproc-per-node"] == "2"
    # Environment instead of flags; a flag beats the environment.
    out = _run(["bash", str(TORCHRUN_SH), "--dry-run", "--nproc-per-node=3", "--"],
               _env(PATH=_fake_net(fake, {"eth0": ["10.1.2.9/16"]}, own="10.1.2.9"), NNODES="2", NODE_RANK="1",
                    MASTER_ADDR="10.1.2.3", MASTER_PORT="31000", GPUS_PER_NODE="8", RDZV_ID="job7"))
    assert out.returncode == 0, out.stderr
    opts = _opts(_parse(out.stdout.strip())[1])
    assert opts == {**opts, "--nnodes": "2", "--node-rank": "1", "--nproc-per-node": "3",
                    "--rdzv-endpoint": "10.1.2.3:31000", "--rdzv-id": "job7", "--rdzv-conf": "is_host=0"}
    assert opts["--local-addr"] == "10.1.2.9"  # this node's own address, not torch's guess from its name


def test_torchrun_two_nodes(tmp_path: Path) -> None:
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "10.0.0.5", "--master-port", "29400",
              "--rdzv-id", "run42"]
    lines = {}
    for rank in (0, 1):
        out = _dry(tmp_path, *common, "--node-rank", str(rank), "--", "--config", "configs/tiny.yaml", "x=1")
        assert out.returncode == 0, out.stderr
        lines[rank] = _parse(out.stdout.strip())
    for rank, (_, targs, entry) in lines.items():
        opts = _opts(targs)
        assert opts["--nnodes"] == "2" and opts["--nproc-per-node"] == "2" and opts["--node-rank"] == str(rank)
        assert opts["--rdzv-backend"] == "c10d" and opts["--rdzv-endpoint"] == "10.0.0.5:29400"
        assert opts["--rdzv-id"] == "run42"
        assert opts["--rdzv-conf"] == f"is_host={int(rank == 0)}"  # node rank 0 hosts the store
        assert entry == ["mor_megatron.pretrain", "--config", "configs/tiny.yaml", "x=1"]
    # Rank 0 without an address uses its own (not a wildcard); IPv6 gets brackets.
    out = _dry(tmp_path, "--nnodes", "2", "--node-rank", "0")
    endpoint = _opts(_parse(out.stdout.strip())[1])["--rdzv-endpoint"]
    host = endpoint.rsplit(":", 1)[0]
    assert out.returncode == 0 and host not in ("0.0.0.0", "", "[::]"), out
    out = _dry(tmp_path, "--nnodes", "2", "--node-rank", "1", "--master-addr", "fd00::7")
    assert _opts(_parse(out.stdout.strip())[1])["--rdzv-endpoint"] == "[fd00::7]:29500"


_FAKE_IP = r'''
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
ifaces = json.load(open(os.path.join(here, "ifaces.json")))  # name -> ["addr/len", ...]
args = [a for a in sys.argv[1:] if a != "-o"]
family = {"-4": ".", "-6": ":"}.get(args[0], "") if args and args[0] in ("-4", "-6") else ""
args = args[1:] if family else args
dev = args[args.index("dev") + 1] if "dev" in args else None
if dev is not None and dev not in ifaces:
    sys.exit(f'Device "{dev}" does not exist.')
names = [dev] if dev else list(ifaces)
for i, name in enumerate(names, 1):
    shown = name + "@if9" if name.startswith("veth") else name
    if args[0] == "link":
        print(f"{i}: {shown}: <BROADCAST,UP> mtu 1500 state UP\\    link/ether 02:00:00:00:00:0{i}")
        continue
    for addr in ifaces[name]:
        if family and family not in addr or ("global" in args and (addr.startswith("fe80") or addr == "::1/128")):
            continue
        kind = "inet6" if ":" in addr else "inet"
        print(f"{i}: {name}    {kind} {addr} scope global {name}\\       valid_lft forever")
'''


def _fake_net(bin_dir: Path, ifaces: dict[str, list[str]], own: str = "") -> str:
    """PATH with a fake `ip` (these interfaces and addresses) and `hostname` (-I prints `own`) first,
    so the launcher's address lookups run without touching this machine's network."""
    import json

    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ifaces.json").write_text(json.dumps(ifaces))
    (bin_dir / "ip").write_text(f"#!{sys.executable}\n{_FAKE_IP}")
    (bin_dir / "hostname").write_text(f"#!/bin/sh\necho {shlex.quote(own)}\n")
    for name in ("ip", "hostname"):
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}{os.pathsep}{_no_gpu_path(bin_dir)}"


NET = {"lo": ["127.0.0.1/8", "::1/128"], "eth7": ["10.9.0.7/24", "fd00::7/64"], "ib6": ["fe80::6/64", "fd00::6/64"],
       "veth3": ["10.213.0.3/24"], "dummy0": ["fe80::1/64"]}


def _net_dry(tmp_path: Path, *args: str, own: str = "192.0.2.50", **env: str) -> subprocess.CompletedProcess:
    path = _fake_net(tmp_path / "net", NET, own)
    return _run(["bash", str(TORCHRUN_SH), "--dry-run", "--nnodes", "2", *args], _env(PATH=path, **env))


@pytest.mark.parametrize("args, env, endpoint, local, gloo", [
    # named interface: its IPv4 address is the rendezvous (rank 0) and the advertised address; gloo binds there
    (["--node-rank", "0", "--iface", "eth7"], {}, "10.9.0.7", "10.9.0.7", "eth7"),
    (["--node-rank", "0", "--iface=veth3"], {}, "10.213.0.3", "10.213.0.3", "veth3"),
    (["--node-rank", "1", "--master-addr", "10.9.0.1"], {"MOR_IFACE": "eth7"}, "10.9.0.1", "10.9.0.7", "eth7"),
    # no IPv4: the global IPv6 address, never the link-local one
    (["--node-rank", "0", "--iface", "ib6"], {}, "[fd00::6]", "fd00::6", "ib6"),
    # the interface gloo or NCCL were told (first of a list; NCCL's =exact, prefix, ^exclusion); an exported
    # GLOO_SOCKET_IFNAME is left as it is
    (["--node-rank", "0"], {"GLOO_SOCKET_IFNAME": "veth3,eth7"}, "10.213.0.3", "10.213.0.3", None),
    (["--node-rank", "0"], {"NCCL_SOCKET_IFNAME": "=eth7"}, "10.9.0.7", "10.9.0.7", "eth7"),
    (["--node-rank", "0"], {"NCCL_SOCKET_IFNAME": "vet"}, "10.213.0.3", "10.213.0.3", "veth3"),
    (["--node-rank", "0"], {"NCCL_SOCKET_IFNAME": "^docker,lo"}, "192.0.2.50", "192.0.2.50", None),
    # no interface named: this node's own address; gloo gets the interface that holds it
    (["--node-rank", "0"], {}, "192.0.2.50", "192.0.2.50", None),
    (["--node-rank", "1", "--master-addr", "10.213.0.1"], {"OWN": "10.213.0.3"}, "10.213.0.1", "10.213.0.3", "veth3"),
    # an explicit --local-addr wins over the interface
    (["--node-rank", "1", "--master-addr", "10.9.0.1", "--local-addr", "10.9.0.99", "--iface", "eth7"], {},
     "10.9.0.1", "10.9.0.99", "eth7"),
])
def test_torchrun_node_address(tmp_path: Path, args: list[str], env: dict[str, str], endpoint: str, local: str,
                               gloo: str | None) -> None:
    own = env.pop("OWN", "192.0.2.50")
    out = _net_dry(tmp_path, *args, own=own, **env)
    assert out.returncode == 0, out.stderr
    shown, targs, _ = _parse(out.stdout.strip())
    opts = _opts(targs)
    assert opts["--rdzv-endpoint"] == f"{endpoint}:29500" and opts["--local-addr"] == local, opts
    assert shown.get("GLOO_SOCKET_IFNAME") == gloo, shown


@pytest.mark.parametrize("args, env, message", [
    (["--iface", "eth9"], {}, "network interface 'eth9' (from --iface/MOR_IFACE) does not exist on this node; "
                              "name one of: lo, eth7, ib6, veth3, dummy0 (ip -o link)"),
    ([], {"MOR_IFACE": "eth9"}, "network interface 'eth9' (from --iface/MOR_IFACE) does not exist"),
    ([], {"NCCL_SOCKET_IFNAME": "=eth"}, "network interface 'eth' (from NCCL_SOCKET_IFNAME) does not exist"),
    ([], {"GLOO_SOCKET_IFNAME": "eth"}, "network interface 'eth' (from GLOO_SOCKET_IFNAME) does not exist"),
    (["--iface", "dummy0"], {}, "network interface 'dummy0' (from --iface/MOR_IFACE) has no IPv4 or global IPv6 "
                                "address; name an interface that has one"),
    (["--master-addr", "10.9.0.1", "--local-addr", "0.0.0.0"], {}, "local address '0.0.0.0' is a wildcard"),
    (["--master-addr", "10.9.0.1", "--local-addr", "::"], {}, "local address '::' is a wildcard"),
])
def test_torchrun_bad_interface(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    out = _net_dry(tmp_path, "--node-rank", "1" if "--master-addr" in args else "0", *args, **env)
    assert out.returncode == 2 and out.stdout == ""
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("torchrun.sh: error:") and message in err, err


def test_torchrun_entry_override(tmp_path: Path) -> None:
    out = _dry(tmp_path, "--", "--x", MOR_ENTRY="my_pkg.probe")
    assert _parse(out.stdout.strip())[2] == ["my_pkg.probe", "--x"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--nnodes", "two"], {}, "nnodes must be an integer"),
        (["--nnodes", "0"], {}, "nnodes must be an integer"),
        (["--nproc-per-node", "1.5"], {}, "nproc per node"),
        ([], {"GPUS_PER_NODE": "-1"}, "nproc per node"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], {}, "out of range"),
        (["--master-port", "70000"], {}, "master port"),
        (["--master-port", "http"], {}, "master port"),
        (["--nnodes", "2", "--node-rank", "1"], {}, "--master-addr (or MASTER_ADDR) is required"),
        (["--master-addr", "0.0.0.0"], {}, "wildcard"),
        (["--master-addr", "::"], {}, "wildcard"),
        (["--rdzv-id", "a b"], {}, "rendezvous id"),
        (["--nnodes"], {}, "--nnodes needs a value"),
        (["--config", "configs/tiny.yaml"], {}, "unknown option '--config'"),
        ([], {"MOR_ENTRY": "bad-module;rm"}, "MOR_ENTRY"),
        ([], {"PYTHON": "/nonexistent/python"}, "no python interpreter"),
    ],
)
def test_torchrun_bad_input(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    out = _dry(tmp_path, *args, **env)
    assert out.returncode != 0
    assert out.stdout == ""
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("torchrun.sh: error:") and message in err, err


# ---------------------------------------------------------------------------------------------
# slurm.sbatch against a fake allocation

HOSTS = {"gpu-a17": "10.20.0.17", "gpu-a18": "10.20.0.18", "gpu-b03": "10.20.1.3"}


def _sbatch(tmp_path: Path, *args: str, nodelist: str = "gpu-a[17-18],gpu-b03", nnodes: int = 3,
            hosts: dict[str, str] = HOSTS, **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = install_fake_slurm(tmp_path / "fakebin", hosts)
    env = fake_slurm_env(bin_dir, nodelist, nnodes, job_id=4242, **extra)
    env = {k: v for k, v in env.items() if k not in _LAUNCH_VARS or k in extra}
    env.update(PYTHON=sys.executable, DRY_RUN=extra.get("DRY_RUN", "1"), SLURM_SUBMIT_DIR=str(ROOT))
    env["PATH"] = f"{bin_dir}{os.pathsep}{_no_gpu_path(tmp_path)}"
    return _run(["bash", str(SBATCH), *args], env), bin_dir


def test_sbatch_dry_run_builds_one_torchrun_per_node(tmp_path: Path) -> None:
    out, bin_dir = _sbatch(tmp_path, "training.train_steps=10", "--debug", "note=two words",
                           CONFIG="configs/tiny.yaml")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 3, out.stdout
    ranks = []
    for line in lines:
        env, targs, entry = _parse(line)
        opts = _opts(targs)
        ranks.append(int(opts["--node-rank"]))
        assert opts["--nnodes"] == "3"
        assert opts["--rdzv-backend"] == "c10d"
        assert opts["--rdzv-endpoint"] == f"{HOSTS['gpu-a17']}:{20000 + 4242 % 20000}"  # head node's IP
        assert opts["--rdzv-id"] == "4242"
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "100"
        assert entry == ["mor_megatron.pretrain", "--config", "configs/tiny.yaml",
                         "logging.dir=runs/mor-pretrain-4242", "training.train_steps=10", "--debug",
                         "note=two words"]
    assert ranks == [0, 1, 2]
    calls = srun_calls(bin_dir)
    # First srun asks the head node for its address, the second starts one task on every node.
    assert calls[0][-2:] == ["hostname", "--ip-address"] and "--nodelist=gpu-a17" in calls[0]
    assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1"} <= set(calls[1])
    assert not (ROOT / "runs" / "mor-pretrain-4242").exists()  # a dry run creates nothing


def test_sbatch_overrides(tmp_path: Path) -> None:
    out, bin_dir = _sbatch(tmp_path, nodelist="gpu-a17", nnodes=1, hosts={"gpu-a17": "10.20.0.17"},
                           RUN_DIR="runs/custom", RDZV_ADDR="10.9.9.9", RDZV_PORT="23456",
                           GPUS_PER_NODE="2", SRUN_EXTRA_ARGS="--cpu-bind=none")
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    env, targs, entry = _parse(line)
    opts = _opts(targs)
    assert opts["--rdzv-endpoint"] == "10.9.9.9:23456" and opts["--nproc-per-node"] == "2"
    assert entry[1:] == ["--config", "configs/tiny.yaml", "logging.dir=runs/custom"]
    calls = srun_calls(bin_dir)
    assert len(calls) == 1 and "--cpu-bind=none" in calls[0]  # RDZV_ADDR: no address lookup


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nodelist": "gpu-a[17-18]", "nnodes": 3}, "SLURM_NNODES=3 but"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_NNODES": "many"}, "SLURM_NNODES must be a positive integer"),
        ({"CONFIG": "configs/missing.yaml"}, "config 'configs/missing.yaml' not found"),
        ({"hosts": {"gpu-a17": "", "gpu-a18": "10.20.0.18", "gpu-b03": "10.20.1.3"}}, "IP address of head node"),
    ],
)
def test_sbatch_bad_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    if "hosts" not in kwargs:
        kwargs.setdefault("hosts", HOSTS)
    if "nodelist" in kwargs:
        kwargs["hosts"] = dict(list(HOSTS.items())[:2])
    out, _ = _sbatch(tmp_path, **kwargs)
    assert out.returncode != 0
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slurm.sbatch: error:") and message in err, err


@pytest.mark.parametrize("requeue", [True, False], ids=["requeue", "no-requeue"])
def test_sbatch_time_limit_signal(tmp_path: Path, requeue: bool) -> None:
    """USR1 (sent by --signal=B:USR1@120) -> SIGTERM to the step via scancel -> requeue."""
    bin_dir = install_fake_slurm(tmp_path / "fakebin", HOSTS)
    env = _env(**fake_slurm_env(bin_dir, "gpu-a[17-18],gpu-b03", 3))
    env.update(FAKE_SRUN_HOLD="1", RUN_DIR=str(tmp_path / "run"), SLURM_SUBMIT_DIR=str(ROOT),
               AUTO_REQUEUE="1" if requeue else "0")
    proc = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (bin_dir / "step.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(10)  # SIGUSR1
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "got SIGUSR1" in err
    assert (bin_dir / "scancel.calls").read_text().split() == ["--signal=TERM", "4242"]
    requeued = (bin_dir / "requeue.calls").read_text() if (bin_dir / "requeue.calls").exists() else ""
    assert requeued == ("requeue 4242\n" if requeue else "")
    assert (tmp_path / "run").is_dir()


def test_sbatch_returns_the_step_status(tmp_path: Path) -> None:
    out, _ = _sbatch(tmp_path, GPUS_PER_NODE="lots")  # every node's torchrun.sh rejects it
    assert out.returncode == 2
    assert out.stderr.count("torchrun.sh: error: nproc per node must be an integer") == 3, out.stderr


def test_sbatch_header() -> None:
    text = SBATCH.read_text()
    for directive in ("--ntasks-per-node=1", "--requeue", "--signal=B:USR1@120", "--output=logs/%x-%j.out",
                      "--gpus-per-node=", "--nodes=", "--time="):
        assert f"#SBATCH {directive}" in text, directive


# ---------------------------------------------------------------------------------------------
# A real c10d rendezvous: two "nodes" on loopback, one gloo process each.

_PROBE = '''
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"PROBE rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item():g} "
      f"ds={os.environ.get('DS_ACCELERATOR')}", flush=True)
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_nodes_on_loopback(tmp_path: Path) -> None:
    (tmp_path / "launcher_probe.py").write_text(_PROBE)
    port = _free_port()
    env = _env(PATH=_no_gpu_path(tmp_path), MOR_ENTRY="launcher_probe", PYTHONPATH=str(tmp_path))
    procs = []
    start = time.monotonic()
    for rank in (0, 1):
        cmd = ["bash", str(TORCHRUN_SH), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "--rdzv-id", f"t{port}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(5.0, 90 - (time.monotonic() - start)))[0])
    finally:
        for proc in procs:  # only ours: each runs in its own session, killed by group id
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    probes = sorted(line for out in outputs for line in out.splitlines() if line.startswith("PROBE"))
    # c10d assigns the global ranks; together the two nodes hold ranks 0 and 1.
    assert probes == ["PROBE rank=0 world=2 sum=3 ds=cpu", "PROBE rank=1 world=2 sum=3 ds=cpu"], outputs


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH, QUICKSTART], ids=lambda p: p.name)
def test_nothing_binds_to_every_interface(script: Path) -> None:
    """Rendezvous and TensorBoard bind only to named interfaces: no wildcard address anywhere in
    the launchers, and the TensorBoard command quickstart prints is bound to localhost."""
    import re

    text = script.read_text()
    wildcard = r"(ADDR|addr|endpoint|--host)\W{1,3}(0\.0\.0\.0|\[?::\]?)(\W|$)"
    assert not re.search(wildcard, text) and "--bind_all" not in text
    for line in text.splitlines():
        if "tensorboard --logdir" in line:
            assert "--host 127.0.0.1" in line, line


def test_torchrun_user_error_stays_one_line(tmp_path: Path) -> None:
    """Two real workers fail on a bad config: after the launcher's own command banner the launch
    prints their one error line and nothing of torchrun's traceback or failure table; exit 2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = _run(["bash", str(TORCHRUN_SH), "--nproc-per-node", "2", "--master-port", port, "--",
                "--config", "configs/tiny.yaml", "training.train_steps=many"],
               _env(PATH=_no_gpu_path(tmp_path), OMP_NUM_THREADS="1"), timeout=180)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("[torchrun.sh] ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "training.train_steps has the wrong type" in lines[0], out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_user_error_on_another_rank_is_printed_after_the_grace(monkeypatch, capsys) -> None:
    """Rank 0 prints a user error at once; another rank waits (torchrun stops it once rank 0 has
    exited) and then prints its own, naming the rank, so an error rank 0 did not meet is seen."""
    from mor_megatron import errors

    def fail():
        raise errors.UserError("shard 3 is missing: rerun preprocessing")

    waited = []
    monkeypatch.setattr(errors.time, "sleep", waited.append)
    for rank, expected in (("0", "error: shard 3"), ("1", "error: (rank 1) shard 3")):
        monkeypatch.setenv("RANK", rank)
        assert errors.run_cli(fail) == 2
        assert capsys.readouterr().err.startswith(expected)
    assert waited == [errors.OTHER_RANKS_GRACE_S]


def test_ctrl_c_outside_training_is_one_line_exit_130(monkeypatch, capsys) -> None:
    """Ctrl-C while a CLI builds, reads or converts (no handler asks for a clean stop there) was a
    KeyboardInterrupt traceback; now one line and the shell's SIGINT code; `--debug` re-raises."""
    from mor_megatron import errors

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "0")
    assert errors.run_cli(interrupted) == errors.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted (Ctrl-C): stopped")
    with pytest.raises(KeyboardInterrupt):
        errors.run_cli(interrupted, debug=True)


def test_torchrun_stopped_by_sigterm_ends_in_one_line(tmp_path: Path) -> None:
    """A SIGTERM to torchrun (Slurm preemption signals the step): torchrun forwards it to the
    workers and raises SignalException; `mor_megatron.torchrun` ends in one line, exit 128 + 15,
    after the worker's own output (a trainer saves there)."""
    worker = tmp_path / "worker.py"
    ready = tmp_path / "ready"
    worker.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('worker: got SIGTERM', flush=True), sys.exit(0)))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(120)\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mor_megatron.torchrun", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", str(worker)],
        cwd=ROOT, env=dict(os.environ, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="20"), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(15)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + 15, (out, err)
    assert "worker: got SIGTERM" in out
    assert "Traceback" not in err and "SignalException" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "stopped by SIGTERM" in errors[0] and "resume" in errors[0], err
