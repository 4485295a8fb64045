"""Checkpoint integrity: replicas and routers stay bitwise equal, damaged checkpoints are refused
with one line naming the file, and auto-resume falls back to the newest complete checkpoint."""

import subprocess
import sys

import pytest
import torch

from train_helpers import launch, repo_root, series

pytestmark = pytest.mark.distributed


def _module_states(step_dir):
    return {
        path.name: torch.load(path, map_location="cpu", weights_only=False)["module"]
        for path in sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    }


def test_tensor_parallel_routers_stay_identical(expert_setup):
    config, overrides, _, root = expert_setup
    run_dir = root / "tp2-routers"
    launch(config, run_dir, overrides + ["parallel.tensor_model_parallel_size=2"], nproc=2)
    states = list(_module_states(run_dir / "checkpoints" / "step_00000005").values())
    assert len(states) == 2
    routers = [k for k in states[0] if ".routers." in k]
    assert len(routers) == 3
    for key in routers:
        assert torch.equal(states[0][key], states[1][key]), key


def test_pipeline_replicas_of_the_shared_block_stay_identical(expert_setup):
    config, overrides, _, root = expert_setup
    run_dir = root / "pp2-replicas"
    result = launch(config, run_dir, overrides + ["parallel.pipeline_model_parallel_size=2"], nproc=2)
    assert "pipeline stage 0:" in result.stdout and "GFLOP/sequence" in result.stdout
    first, second = _module_states(run_dir / "checkpoints" / "step_00000005").values()
    shared = [k for k in first if k in second and ".layers." in k and torch.is_tensor(first[k])]
    assert shared, "no shared-block parameter on both stages"
    for key in shared:
        assert torch.equal(first[key], second[key]), key


def test_damaged_checkpoint_falls_back_to_previous(expert_setup):
    config, overrides, reference, root = expert_setup
    run_dir = root / "damaged"
    launch(config, run_dir, overrides + ["training.save_interval=2", "training.exit_after_steps=4"])
    step4 = run_dir / "checkpoints" / "step_00000004"
    victim = next(step4.glob("zero_pp_rank_0_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])

    info = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(step4)],
                          capture_output=True, text=True, cwd=repo_root())
    assert info.returncode != 0
    assert info.stderr.count("\n") == 1 and victim.name in info.stderr and "truncated" in info.stderr

    result = launch(config, run_dir, overrides)
    assert f"skipping incomplete checkpoint: {victim} is truncated" in result.stdout
    assert "resumed from" in result.stdout and "step_00000002 at step 2" in result.stdout
    # the log holds steps 1-4, then the redone 3-4 and step 5, equal to the uninterrupted run
    assert series(run_dir, "train/loss")[-3:] == series(reference, "train/loss")[2:]


def test_missing_pointer_target_and_missing_rank_file(expert_setup, tmp_path):
    config, overrides, _, root = expert_setup
    run_dir = root / "missing"
    launch(config, run_dir, overrides + ["training.exit_after_steps=2"])
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    next(checkpoint.glob("mp_rank_00_model_states.pt")).unlink()
    info = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(checkpoint)],
                          capture_output=True, text=True, cwd=repo_root())
    assert info.returncode != 0 and "mp_rank_00_model_states.pt is missing" in info.stderr
    (run_dir / "checkpoints" / "latest").write_text("step_00000099\n")
    result = launch(config, run_dir, overrides + ["training.train_steps=3"])
    assert "names step_00000099, which does not exist" in result.stdout
    assert "skipping incomplete checkpoint" in result.stdout
    assert "resumed from" not in result.stdout  # nothing complete left: a fresh start
