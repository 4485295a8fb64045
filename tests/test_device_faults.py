"""Device faults on a fake GPU (tests/fakegpu): a second device that computes on the CPU but whose
device type is not `cpu`, with a process-group backend (`fakenccl`) that, like NCCL, takes only
that device's tensors. On it, a batch left on the host and a host tensor handed to a collective of
a GPU group fail on a CPU-only machine as they do on CUDA.

The fake device is installed only in subprocesses (renaming PrivateUse1 is global and cannot be
undone): `tests/fakegpu/site` on PYTHONPATH with MOR_FAKE_GPU=1, and MOR_DEVICE=fakegpu.

Fake-GPU runs equal CPU runs exactly, every logged number but timings (tolerance 0, which holds
at the same process layout): the device runs the CPU's own kernels on the device tensors' own
memory, its scaled-dot-product attention picks the CPU's kernel (flash; a device without a choice
gets the math path, 3e-7 apart) and its silu_backward is the CPU kernel (not the decomposition
other backends get), and its backend sums through gloo as a CPU run does. Without those two kernel
choices the gradients differed by float32 rounding from the first step, which expert-choice top-k
turned into 3e-5 in the validation loss by step 3.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import _free_port, launch, metrics, repo_root, write_config

pytestmark = pytest.mark.distributed
SITE = repo_root() / "tests" / "fakegpu" / "site"
TIMING = ("train/tokens_per_s", "train/tflops_per_device", "train/step_time_s", "train/mfu")


@pytest.fixture(scope="module")
def fake_gpu() -> dict:
    """Environment for subprocesses on the fake GPU. The device is compiled here, once (about 30 s,
    then cached under $TORCH_EXTENSIONS_DIR), so that ranks only load it."""
    built = subprocess.run([sys.executable, "-c", "import fakegpu; fakegpu.build()"], cwd=repo_root(),
                           env=dict(os.environ, PYTHONPATH=str(repo_root() / "tests")), capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "MOR_FAKE_GPU": "1", "MOR_DEVICE": "fakegpu"}


def _logged(env: dict, directory: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    return dict(env, MOR_FAKE_GPU_LOG=str(directory))


def collectives(directory: Path) -> dict:
    """Collective name -> calls, summed over the processes that logged to `directory`."""
    total: dict = {}
    for path in directory.glob("*.json"):
        for name, count in json.loads(path.read_text()).items():
            total[name] = total.get(name, 0) + count
    return total


def deterministic(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(run_dir)]


# -- in-process checks, in two processes on the fake GPU (tests/fakegpu/probe.py) ------------------


@pytest.fixture(scope="module")
def probe(fake_gpu, corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("probe")
    config = write_config(root / "run.yaml", corpus, model={"router": "expert_choice"})
    out = root / "checks.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "tests/fakegpu/probe.py", str(config), str(out)],
        cwd=repo_root(), capture_output=True, text=True, timeout=300,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **fake_gpu),
    )
    assert done.returncode == 0 and out.is_file(), done.stderr[-5000:]
    return json.loads(out.read_text())


def _passed(probe: dict, name: str) -> str:
    assert probe[name]["ok"], f"{name}: {probe[name]['detail']}"
    return probe[name]["detail"]


def test_the_default_group_is_on_the_fake_backend(probe):
    assert _passed(probe, "default group backend") == "fakenccl"


def test_a_host_batch_into_a_model_on_the_fake_gpu_fails(probe):
    line = _passed(probe, "host batch into a model on fakegpu")
    assert "found at least two devices, fakegpu:0 and cpu" in line and "aten::index_select" in line, line


def test_a_host_tensor_in_a_collective_of_a_fake_gpu_group_is_refused(probe):
    line = _passed(probe, "host tensor in a collective")
    assert line.startswith("fakenccl allreduce: Tensors must be fakegpu tensors") and "got a cpu tensor" in line


def test_a_loaded_adamw_step_state_lives_where_the_fused_kernel_reads_it(probe):
    assert _passed(probe, "AdamW step state of a checkpoint load on fakegpu") == "fused: fakegpu:0, unfused: cpu"


def test_fake_gpu_collectives_give_the_values_nccl_gives(probe):
    _passed(probe, "collectives on fakegpu")


@pytest.mark.parametrize("name", ["_first_bad_microbatch", "_reduce_over_data_parallel", "_stop_if_any_write_failed",
                                  "_Preemption.agreed", "expert_choice_losses"])
def test_the_librarys_collectives_take_device_tensors(probe, name):
    _passed(probe, f"library collective: {name}")


@pytest.mark.parametrize("layout", ["DP 2", "PP 2", "TP 2"])
def test_non_finite_steps_are_found_across_ranks_on_the_fake_gpu(probe, layout):
    """The trainer with every LM loss NaN: `_first_bad_microbatch` agrees over the data-parallel
    group (DP 2) or learns the last stage's answer (PP 2) on the fake backend, tensor-parallel
    layers run their collectives there (TP 2), and the run stops naming the samples."""
    line = _passed(probe, f"non-finite steps at {layout}")
    assert "of data-parallel rank 0, global samples 4-5" in line, line


# -- the real CLI, torchrun with 2 processes, fake GPU against plain CPU ------------------------------


def test_data_parallel_on_the_fake_gpu_equals_cpu_and_resumes(fake_gpu, corpus, tmp_path):
    """DP 2, expert-choice routing, validation every 2 steps, a save at step 2, a resume to step 4:
    every logged number except timings equals the uninterrupted CPU run."""
    config = write_config(tmp_path / "run.yaml", corpus, model={"router": "expert_choice"},
                          training={"train_steps": 4, "micro_batch_size": 1, "eval_interval": 2, "eval_batches": 2},
                          logging={"tensorboard": False})
    launch(config, tmp_path / "cpu", nproc=2)
    fake = tmp_path / "fake"
    env = _logged(fake_gpu, tmp_path / "collectives")
    first = launch(config, fake, ["training.exit_after_steps=2"], nproc=2, env=env)
    assert "exit_after_steps reached at step 2" in first.stdout
    second = launch(config, fake, nproc=2, env=env)
    assert "resumed from" in second.stdout
    rows = deterministic(fake)
    assert len(rows) == 4 and rows[1]["valid/loss"] > 0 and rows[3]["valid/loss"] > 0
    assert rows == deterministic(tmp_path / "cpu")
    used = collectives(tmp_path / "collectives")
    assert {"allreduce", "broadcast", "all_gather_single", "barrier"} <= set(used), used


def test_pipeline_parallel_on_the_fake_gpu_equals_cpu(fake_gpu, corpus, tmp_path):
    """PP 2 (p2p activations both ways, the last stage's loss broadcast, pipelined validation)."""
    config = write_config(tmp_path / "run.yaml", corpus, model={"router": "expert_choice"},
                          training={"train_steps": 2, "eval_batches": 2}, parallel={"pipeline_model_parallel_size": 2},
                          logging={"tensorboard": False})
    launch(config, tmp_path / "cpu", nproc=2)
    launch(config, tmp_path / "fake", nproc=2, env=_logged(fake_gpu, tmp_path / "collectives"))
    rows = deterministic(tmp_path / "fake")
    assert len(rows) == 2 and rows[1]["valid/loss"] > 0
    assert rows == deterministic(tmp_path / "cpu")
    used = collectives(tmp_path / "collectives")
    assert {"send", "recv", "broadcast", "allreduce"} <= set(used), used
