"""Pretraining as a user runs it: loss goes down on 1 and 2 processes and leaves checkpoints,
TensorBoard events and metrics; a two-"node" launch through launch/torchrun.sh trains. (SIGKILL of
one rank and a relaunch with the same command: tests/test_crash_recovery.py, ten times.)"""

import os
import shlex
import socket
import subprocess
import sys

import pytest

from train_helpers import launch, metrics, repo_root, series, write_config

pytestmark = pytest.mark.distributed
LEARN = {"train_steps": 12, "lr": 0.01, "grad_clip": 1.0, "warmup_steps": 1}


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("nproc", [1, 2])
def test_loss_goes_down_and_artifacts_appear(corpus, tmp_path, nproc):
    config = write_config(tmp_path / "run.yaml", corpus,
                          training=dict(LEARN, save_interval=6, eval_interval=6, micro_batch_size=2))
    run_dir = tmp_path / "run"
    result = launch(config, run_dir, nproc=nproc)
    losses = series(run_dir, "train/loss")
    assert len(losses) == 12
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 0.1, losses
    rows = metrics(run_dir)
    assert "valid/loss" in rows[5] and "valid/perplexity" in rows[-1]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device",
                "router/r2/selected_tokens", "router/r2/run_tokens", "router/r3/sampling_accuracy",
                "router/loss_bce"):
        assert key in rows[-1], key
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000012"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if nproc == 1:
        _next_steps_run_as_printed(result.stdout, run_dir)


def _next_steps_run_as_printed(stdout: str, run_dir) -> None:
    """The commands the trainer prints at the end work as printed (from the repo root): decode,
    depth colouring, TensorBoard (its --help: it would serve forever) and a resume (one step)."""
    tail = stdout[stdout.index("Next (checkpoints in"):].splitlines()[1:]
    commands = {line.split(":", 1)[0].strip(): shlex.split(line.split(":", 1)[1].split("   (")[0]) for line in tail}
    assert set(commands) == {"generate text", "recursion depth", "TensorBoard", "train further"}, tail

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=repo_root(),
                              env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))

    generated = run(commands["generate text"])
    assert generated.returncode == 0 and "--- 'def main():'" in generated.stdout, generated.stderr[-2000:]
    depth = run(commands["recursion depth"])
    assert depth.returncode == 0 and (run_dir / "depth.html").is_file(), depth.stderr[-2000:]
    assert commands["TensorBoard"][-2:] == ["--host", "127.0.0.1"]  # localhost only
    assert run(commands["TensorBoard"][:1] + ["--help"]).returncode == 0
    resumed = run(commands["train further"] + ["training.exit_after_steps=1"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "step_00000013").is_dir()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_through_torchrun_sh(corpus, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus, training=dict(LEARN, train_steps=3, micro_batch_size=1))
    run_dir = tmp_path / "two-nodes"
    port = str(_free_port())
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            ["bash", "launch/torchrun.sh", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", port, "--rdzv-id", "two-node-test", "--",
             "--config", str(config), f"logging.dir={run_dir}"],
            cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert len(series(run_dir, "train/loss")) == 3


BAD_INPUTS = {
    "missing data path": (["data.train=/nonexistent/shard"], "/nonexistent/shard"),
    "unknown config key": (["training.micro_batchsize=2"], "did you mean 'micro_batch_size'"),
    "wrong type": (["training.train_steps=many"], "training.train_steps has the wrong type"),
    "batch not divisible": (["training.global_batch_size=3"], "not divisible by micro_batch_size"),
    "tokenizer vocabulary too large": (["model.vocab_size=256"], "vocab"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line(corpus, tmp_path, name):
    overrides, expected = BAD_INPUTS[name]
    config = write_config(tmp_path / "run.yaml", corpus)
    result = launch(config, tmp_path / "run", overrides, check=False, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_empty_shard_is_one_line(corpus, tmp_path):
    from mor_megatron.data.shards import ShardWriter

    empty = tmp_path / "empty"
    ShardWriter(str(empty), vocab_size=512, eos_id=0).close()  # a shard with no documents
    config = write_config(tmp_path / "run.yaml", corpus)
    result = launch(config, tmp_path / "run", [f"data.train={empty}"], check=False, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_missing_rendezvous_variables_is_one_line(corpus, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "mor_megatron.pretrain", "--config", str(config), f"logging.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=repo_root(), env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "MASTER_ADDR, MASTER_PORT not set" in result.stderr
