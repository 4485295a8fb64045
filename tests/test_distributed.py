"""Distributed training matches a single process (CPU, gloo, 2 processes).

Every run starts from the same layout-free initial weights and reads the same global batches;
loss and gradient norm (clipping active) must agree within 1e-5 relative for 5 optimizer steps.
"""

import pytest

from train_helpers import launch, metrics, series

pytestmark = pytest.mark.distributed
REL = 1e-5


def assert_same_series(run_dir, reference_dir, keys=("train/loss", "train/grad_norm"), rel=REL):
    for key in keys:
        ours, theirs = series(run_dir, key), series(reference_dir, key)
        assert len(ours) == len(theirs) == 5, key
        assert ours == pytest.approx(theirs, rel=rel), key


@pytest.fixture(params=["expert_choice", "token_choice"])
def setup(request):
    return request.getfixturevalue("expert_setup" if request.param == "expert_choice" else "token_setup")


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
    if layout == ["training.micro_batch_size=1"]:
        row = metrics(run_dir)[-1]
        spread = [(row[f"router/r{r}/selected_tokens_dp_min"], row[f"router/r{r}/selected_tokens_dp_max"])
                  for r in (1, 2, 3)]
        if root.name.startswith("expert_choice"):  # expert-choice: equal work on every DP rank
            assert all(low == high for low, high in spread), spread
        assert all(low <= high for low, high in spread)


def test_zero_stages_match(expert_setup):
    """ZeRO-2 (data parallel, partitioned gradients), ZeRO-1 at one data-parallel rank, ZeRO-0 at
    two, and ZeRO-3 (with TP=2) match the reference (one process in fp32, where the unset
    zero_stage is 0)."""
    config, overrides, reference, root = expert_setup
    zero2 = root / "zero2"
    skipped = "DeepSpeed's gradient all-reduce is skipped"
    result = launch(config, zero2, overrides + ["training.zero_stage=2", "training.micro_batch_size=1"], nproc=2)
    assert_same_series(zero2, reference)
    assert skipped not in result.stdout and "partitions nothing" not in result.stdout
    zero1 = root / "zero1"  # one data-parallel rank: ZeRO-1 partitions nothing, the run says so
    result = launch(config, zero1, overrides + ["training.zero_stage=1"])
    assert_same_series(zero1, reference)
    assert skipped not in result.stdout and "training.zero_stage=1 at one data-parallel rank partitions nothing" in result.stdout
    zero0_dp2 = root / "zero0-dp2"  # two data-parallel ranks: their gradients must be averaged
    result = launch(config, zero0_dp2, overrides + ["training.zero_stage=0", "training.micro_batch_size=1"], nproc=2)
    assert_same_series(zero0_dp2, reference)
    assert skipped not in result.stdout
    zero3 = root / "zero3-tp2"  # ZeRO-3 partitions megatron's tensor-parallel linears too
    result = launch(config, zero3, overrides + ["training.zero_stage=3", "parallel.tensor_model_parallel_size=2"], nproc=2)
    assert_same_series(zero3, reference)
    assert "training.zero_stage=3 at one data-parallel rank partitions nothing" in result.stdout  # DP=1 under TP=2


@pytest.mark.parametrize(
    "first,first_nproc,second,second_nproc,rel",
    [
        ([], 1, [], 1, 0.0),  # same layout: exactly the uninterrupted run
        (["parallel.tensor_model_parallel_size=2"], 2, ["training.micro_batch_size=1"], 2, REL),
        (["parallel.pipeline_model_parallel_size=2"], 2, [], 1, REL),
    ],
    ids=["same-layout", "tp2-to-dp2", "pp2-to-single"],
)
def test_resume_matches_uninterrupted(expert_setup, first, first_nproc, second, second_nproc, rel):
    config, overrides, reference, root = expert_setup
    run_dir = root / ("resume-" + "-".join(first + second + ["x"]).replace("=", "_"))
    launch(config, run_dir, overrides + first + ["training.exit_after_steps=3"], nproc=first_nproc)
    assert len(series(run_dir, "train/loss")) == 3
    result = launch(config, run_dir, overrides + second, nproc=second_nproc)
    assert "resumed from" in result.stdout
    if rel:  # another layout: the layout-free copy
        assert "loading its layout-free form" in result.stdout
    if second_nproc == 1:  # pp2-to-single also goes from ZeRO-1 (PP) to ZeRO-0 (one fp32 process)
        assert ("'zero_stage': 1}" in result.stdout) == bool(first) and "ZeRO stage 0" in result.stdout
    for key in ("train/loss", "train/grad_norm"):
        ours, theirs = series(run_dir, key), series(reference, key)
        assert len(ours) == 5, key
        if rel == 0.0:
            assert ours[3:] == theirs[3:], key
        else:
            assert ours[3:] == pytest.approx(theirs[3:], rel=rel), key


@pytest.mark.parametrize("num_recursions,depth", [(2, 8), (4, 10)])
def test_pipeline_parallel_with_two_and_four_recursions(corpus, tmp_path_factory, num_recursions, depth):
    from conftest import training_setup

    config, overrides, reference, root = training_setup(
        "expert_choice", corpus, tmp_path_factory, num_recursions=num_recursions, effective_layers=depth
    )
    run_dir = root / "pp2"
    result = launch(config, run_dir, overrides + ["parallel.pipeline_model_parallel_size=2"], nproc=2)
    assert "pipeline stage 1:" in result.stdout
    assert_same_series(run_dir, reference)
