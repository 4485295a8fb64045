"""Distributed training matches a single process (CPU, gloo, 2 processes).

Every run starts from the same layout-free initial weights and reads the same global batches;
loss and gradient norm (clipping active) must agree within 1e-5 relative for 5 optimizer steps.
"""

import subprocess
import sys

import pytest

from train_helpers import launch, repo_root, series, write_config

pytestmark = pytest.mark.distributed
REL = 1e-5


def assert_same_series(run_dir, reference_dir, keys=("train/loss", "train/grad_norm"), rel=REL):
    for key in keys:
        ours, theirs = series(run_dir, key), series(reference_dir, key)
        assert len(ours) == len(theirs) == 5, key
        assert ours == pytest.approx(theirs, rel=rel), key


@pytest.fixture(scope="module", params=["expert_choice", "token_choice"])
def setup(request, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = {"router": request.param}
    config = write_config(root / "run.yaml", corpus, model=model)
    init = root / "init"
    subprocess.run([sys.executable, "tools/init_weights.py", "--config", str(config), "--output", str(init)],
                   check=True, capture_output=True, cwd=repo_root())
    overrides = [f"training.init_from={init}"]
    reference = root / "single"
    launch(config, reference, overrides)
    return config, overrides, reference, root


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor_model_parallel_size=2"],
        ["parallel.pipeline_model_parallel_size=2"],
        ["training.micro_batch_size=1"],  # data parallel 2: each rank 1 row per micro-batch
    ],
    ids=["tp2", "pp2", "dp2"],
)
def test_two_process_layout_matches_single_process(setup, layout):
    config, overrides, reference, root = setup
    run_dir = root / "-".join(layout).replace("=", "_")
    launch(config, run_dir, overrides + layout, nproc=2)
    assert_same_series(run_dir, reference)
