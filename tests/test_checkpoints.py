"""Checkpoint integrity: replicas and routers stay bitwise equal, damaged checkpoints are refused
with one line naming the file, and auto-resume falls back to the newest complete checkpoint."""

import subprocess
import sys

import pytest
import torch

from train_helpers import launch, one_error_line, repo_root, series, tree_digest

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
    result = launch(config, run_dir, overrides + ["training.save_interval=2", "training.exit_after_steps=4"])
    # one process in fp32: the unset zero_stage is 0, and DeepSpeed's one-rank all-reduce is skipped
    assert "ZeRO stage 0 (training.zero_stage unset: one data-parallel rank in fp32" in result.stdout
    assert "DeepSpeed's gradient all-reduce is skipped" in result.stdout
    step4 = run_dir / "checkpoints" / "step_00000004"
    victim = step4 / "mp_rank_00_model_states.pt"  # ZeRO-0: the weights and the optimizer state
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
    launch(config, run_dir, overrides + ["training.exit_after_steps=2", "training.save_interval=1"])
    checkpoints = run_dir / "checkpoints"
    next((checkpoints / "step_00000002").glob("mp_rank_00_model_states.pt")).unlink()
    info = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(checkpoints / "step_00000002")],
                          capture_output=True, text=True, cwd=repo_root())
    assert info.returncode != 0 and "mp_rank_00_model_states.pt is missing" in info.stderr
    (checkpoints / "latest").write_text("step_00000099\n")
    result = launch(config, run_dir, overrides + ["training.exit_after_steps=1"])
    assert "skipping incomplete checkpoint" in result.stdout and "mp_rank_00_model_states.pt is missing" in result.stdout
    assert "names step_00000099, which does not exist; using the newest complete checkpoint step_00000001" in result.stdout
    assert "resumed from" in result.stdout and "at step 1" in result.stdout

    # every checkpoint damaged: refused in one line, nothing overwritten by a fresh start
    for step_dir in checkpoints.glob("step_*"):
        for victim in step_dir.glob("mp_rank_00_model_states.pt"):
            victim.unlink()
    before = tree_digest(checkpoints)
    result = launch(config, run_dir, overrides, check=False)
    line = one_error_line(result.returncode, result.stdout, result.stderr)
    assert f"no complete checkpoint in {checkpoints}" in line and "training.resume=false" in line
    assert tree_digest(checkpoints) == before


def _refused_on_a_copy(expert_setup, run_dir, overrides: list[str]) -> str:
    """Relaunch a copy of the reference run with `overrides`: it must stop with one error line
    (returned) and leave the copied checkpoints byte for byte as they were."""
    import shutil

    config, _, reference, _ = expert_setup
    shutil.copytree(reference, run_dir)
    before = tree_digest(run_dir / "checkpoints")
    result = launch(config, run_dir, overrides, check=False)
    line = one_error_line(result.returncode, result.stdout, result.stderr)
    assert tree_digest(run_dir / "checkpoints") == before
    return line


def test_checkpoint_of_another_model_is_refused_before_loading(expert_setup, tmp_path):
    line = _refused_on_a_copy(expert_setup, tmp_path / "other", ["model.ffn_hidden_size=96", "training.train_steps=6"])
    assert "holds another model (ffn_hidden_size 128 in the checkpoint, 96 in the config)" in line
    assert "training.save_dir" in line


def test_init_weights_of_another_shape_are_refused_before_loading(expert_setup, parallel):
    import dataclasses

    from mor_megatron.model import MoRGPTModel
    from mor_megatron.checkpoint_files import CheckpointError
    from mor_megatron.weights import load_weights
    from mor_megatron.training.config import load_run_config

    config, overrides, _, _ = expert_setup
    init = overrides[0].split("=", 1)[1]
    model_config = load_run_config(config).model
    wider = MoRGPTModel(dataclasses.replace(model_config, ffn_hidden_size=96))
    untouched = {k: v.clone() for k, v in wider.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(CheckpointError) as raised:
        load_weights(wider, init)
    message = str(raised.value)
    assert "\n" not in message and "has shape" in message and "this model needs" in message and "96" in message
    after = wider.state_dict()
    assert all(torch.equal(after[k], v) for k, v in untouched.items())
    load_weights(MoRGPTModel(model_config), init)  # the matching model loads


def test_zero3_resume_at_another_layout_is_refused(expert_setup, tmp_path):
    """A layout change is loaded through the layout-free copy, which ZeRO-3 cannot take: one line
    naming both ways out, and the checkpoint untouched."""
    line = _refused_on_a_copy(expert_setup, tmp_path / "zero3", ["training.zero_stage=3", "training.train_steps=6"])
    assert "resuming at another layout is supported for ZeRO stages 0-2" in line and "zero_stage 1 or 2" in line
