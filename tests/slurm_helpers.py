"""A fake SLURM allocation for testing launch/slurm.sbatch without SLURM.

`install_fake_slurm(bin_dir, hosts)` writes four executables into bin_dir (put it first on PATH):

* scontrol: `scontrol show hostnames LIST` prints the fake hosts, one a line; `scontrol requeue`
  is recorded and succeeds.
* srun: runs its command once per selected node (`--nodelist` or the first `--nodes` hosts), one
  after the other, with SLURM_NODEID / SLURM_PROCID / SLURMD_NODENAME set as real srun sets them.
  Every call's argv goes, one JSON list a line, to bin_dir/srun.calls. With FAKE_SRUN_HOLD=1 a
  step other than `hostname` runs nothing: it writes its pid to bin_dir/step.pid and waits for
  SIGTERM (as trainers that checkpoint and exit), then exits 0.
* scancel: records its arguments in bin_dir/scancel.calls; `--signal=TERM` SIGTERMs the held step.
* hostname: `--ip-address` / `-I` print the address of the node in SLURMD_NODENAME (so the head
  node's IP can only come from a command that srun ran on that node); no argument prints its name.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

_SCONTROL = r'''
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
hosts = json.load(open(os.path.join(here, "hosts.json")))
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    print("\n".join(hosts))
elif args[:1] == ["requeue"]:
    open(os.path.join(here, "requeue.calls"), "a").write(" ".join(args) + "\n")
else:
    sys.exit(f"fake scontrol: unsupported {args}")
'''

_SRUN = r'''
import json, os, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
hosts = list(json.load(open(os.path.join(here, "hosts.json"))))
args = sys.argv[1:]
with open(os.path.join(here, "srun.calls"), "a") as f:
    f.write(json.dumps(args) + "\n")
with_value = {"-N": "nodes", "--nodes": "nodes", "-n": "ntasks", "--ntasks": "ntasks",
              "-w": "nodelist", "--nodelist": "nodelist", "--ntasks-per-node": "ntasks_per_node",
              "--kill-on-bad-exit": "kill", "-c": "cpus", "--cpus-per-task": "cpus",
              "--cpu-bind": "cpu_bind", "-W": "wait", "--wait": "wait"}
flags = {"--kill-on-bad-exit", "-l", "--label", "--overlap", "--exact"}
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
    a = args[i]
    if "=" in a and a.split("=", 1)[0] in with_value:
        k, v = a.split("=", 1)
        opts[with_value[k]] = v
        i += 1
    elif a in flags:
        i += 1
    elif a in with_value:
        opts[with_value[a]] = args[i + 1]
        i += 2
    else:
        sys.exit(f"fake srun: unsupported option {a}")
command = args[i:]
if not command:
    sys.exit("fake srun: no command")
if os.environ.get("FAKE_SRUN_HOLD") == "1" and command[0] != "hostname":
    import signal, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(os.path.join(here, "step.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(here, "step.pid.tmp"), os.path.join(here, "step.pid"))
    time.sleep(30)
    sys.exit(99)
if "nodelist" in opts:
    selected = opts["nodelist"].split(",")
    unknown = [h for h in selected if h not in hosts]
    if unknown:
        sys.exit(f"fake srun: {unknown} not in the allocation")
else:
    selected = hosts[: int(opts.get("nodes", len(hosts)))]
rc = 0
for procid, host in enumerate(selected):
    env = dict(os.environ, SLURM_NODEID=str(hosts.index(host)), SLURM_PROCID=str(procid),
               SLURM_LOCALID="0", SLURMD_NODENAME=host, SLURM_STEP_NUM_NODES=str(len(selected)))
    rc = max(rc, subprocess.call(command, env=env))
sys.exit(rc)
'''

_SCANCEL = r'''
import os, signal, sys
here = os.path.dirname(os.path.abspath(__file__))
open(os.path.join(here, "scancel.calls"), "a").write(" ".join(sys.argv[1:]) + "\n")
if "--signal=TERM" in sys.argv[1:]:
    os.kill(int(open(os.path.join(here, "step.pid")).read()), signal.SIGTERM)
'''

_HOSTNAME = r'''
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
hosts = json.load(open(os.path.join(here, "hosts.json")))
node = os.environ.get("SLURMD_NODENAME")
if node is None:
    sys.exit("fake hostname: not inside a (fake) srun step")
if sys.argv[1:] in (["--ip-address"], ["-i"], ["-I"]):
    print(hosts[node])
elif not sys.argv[1:]:
    print(node)
else:
    sys.exit(f"fake hostname: unsupported {sys.argv[1:]}")
'''


def install_fake_slurm(bin_dir: Path, hosts: dict[str, str]) -> Path:
    """Write fake scontrol/srun/scancel/hostname for the allocation `hosts` (name -> IP, in node order)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "hosts.json").write_text(json.dumps(hosts))
    for name, body in (("scontrol", _SCONTROL), ("srun", _SRUN), ("scancel", _SCANCEL), ("hostname", _HOSTNAME)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def srun_calls(bin_dir: Path) -> list[list[str]]:
    """The argv of every fake srun call so far."""
    path = bin_dir / "srun.calls"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def fake_slurm_env(bin_dir: Path, nodelist: str, nnodes: int, job_id: int = 4242, **extra: str) -> dict[str, str]:
    """The environment of a batch script in the fake allocation (fake tools first on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", SLURM_JOB_NODELIST=nodelist,
               SLURM_NNODES=str(nnodes), SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="mor-pretrain",
               SLURM_NODEID="0", SLURM_PROCID="0")
    env.update(extra)
    return env
