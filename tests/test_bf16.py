"""bf16 training, the default on GPUs, run on CPU: DeepSpeed's bf16 engine with ZeRO-1 over a bf16
model, validation, a save and an exact resume. (The same on a GPU: `tools/gpu_check.py`, step b.)"""

import pytest

from train_helpers import launch, metrics, series, write_config

pytestmark = pytest.mark.distributed


def test_bf16_trains_and_resumes_exactly(corpus, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus,
                          training={"train_steps": 4, "bf16": True, "zero_stage": 1, "eval_interval": 2})
    whole = tmp_path / "whole"
    launch(config, whole)
    resumed = tmp_path / "resumed"
    first = launch(config, resumed, ["training.exit_after_steps=2"])
    assert "exit_after_steps reached at step 2" in first.stdout + first.stderr
    second = launch(config, resumed)
    assert "resumed from" in second.stdout + second.stderr
    losses = series(whole, "train/loss")
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)
    # same process layout, same CPU kernels: bf16 rounding is the same on both paths, so exact
    assert series(resumed, "train/loss") == losses
    valid = [[row.get("valid/loss") for row in metrics(run)] for run in (whole, resumed)]
    assert valid[0] == valid[1] and valid[0][1] is not None
    # at another layout (data parallel 2) through the layout-free copy: DeepSpeed's BF16_Optimizer
    # state (fp32 weights and moments) is restored. Gradients sum in fp32 (two micro-batches in
    # one process or over two ranks: equal here), held to the layout tests' 1e-5
    moved = tmp_path / "moved"
    launch(config, moved, ["training.exit_after_steps=2"])
    assert "layout-free" in launch(config, moved, nproc=2).stdout
    assert series(moved, "train/loss") == pytest.approx(losses, rel=1e-5)
