"""In-job restarts (issue #17 item 3): `launch/torchrun.sh --max-restarts K` hands torchrun a
restart budget. A worker of a 2-process run is SIGKILLed from outside after the first complete
checkpoint; torchrun restarts the worker group, the new workers resume from the newest complete
checkpoint with no user action, and every step's loss equals an uninterrupted run's, exactly
(CPU is deterministic)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mor_megatron import processes
from train_helpers import _free_port, launch, metrics, repo_root, series, write_config

pytestmark = pytest.mark.distributed

TRAIN_STEPS, SAVE_EVERY = 12, 3


def _workers(agent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the trainers torchrun (pid `agent`) has started."""
    found = {}
    for pid in processes.children(live=True).get(agent, []):
        rank = processes.environment(pid).get("LOCAL_RANK")
        if rank is not None:
            found[int(rank)] = pid
    return found


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_sigkilled_worker_is_restarted_by_torchrun_and_resumes_exactly(corpus, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus, training={
        "train_steps": TRAIN_STEPS, "save_interval": SAVE_EVERY, "keep_checkpoints": 0, "micro_batch_size": 1,
        "lr": 0.01, "warmup_steps": 1})
    launch(config, tmp_path / "reference", nproc=2)
    reference = series(tmp_path / "reference", "train/loss")

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", MASTER_PORT=str(_free_port()), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="20")
    command = ["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--max-restarts", "1", "--",
               "--config", str(config), f"logging.dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=repo_root(), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        latest = run_dir / "checkpoints" / "latest"
        _wait_for(latest.is_file, 240, "the first checkpoint", proc)
        workers = _workers(proc.pid)  # the script execs torchrun: its pid is the agent's
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = f"{out[-3000:]}\n{err[-5000:]}"
    assert proc.returncode == 0, log
    assert "--max-restarts 1" in err, log  # the launcher's printed command
    resumes = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumes) == 1, log  # the first attempt started fresh; the restarted group resumed
    # torchrun's agent restarted the group (TORCHELASTIC_RESTART_COUNT), not a relaunch by hand
    assert resumes[0].endswith(" (torchrun restart 1 of 1)"), log
    resumed = int(resumes[0].split(" at step ")[1].split()[0])
    assert resumed >= SAVE_EVERY and resumed % SAVE_EVERY == 0 and f"step_{resumed:08d}" in resumes[0], log

    steps = [row["step"] for row in metrics(run_dir)]
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    assert restart is None or steps[restart] == resumed + 1, steps  # steps past the checkpoint ran again
    # the last record of every step: the uninterrupted run's losses
    final = {row["step"]: row["train/loss"] for row in metrics(run_dir)}
    assert sorted(final) == list(range(1, TRAIN_STEPS + 1))
    assert [final[step] for step in sorted(final)] == reference
