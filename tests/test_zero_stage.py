"""The ZeRO stage of an unset `training.zero_stage`: 0 where ZeRO-1 would partition nothing (one
data-parallel rank, fp32, no pipeline), else 1; a set stage is kept."""

from pathlib import Path

import pytest

from mor_megatron.training.config import TrainingConfig, load_run_config, zero_stage_for


@pytest.mark.parametrize(
    "zero_stage,dp,pp,bf16,expected",
    [
        (None, 1, 1, False, 0),  # one rank in fp32: nothing to partition
        (None, 2, 1, False, 1),  # data parallel: ZeRO-1 partitions the optimizer state
        (None, 1, 2, False, 1),  # pipeline parallel needs ZeRO-1
        (None, 1, 1, True, 1),  # bf16: DeepSpeed's BF16_Optimizer (fp32 accumulation) at ZeRO-1
        (1, 1, 1, False, 1),
        (3, 1, 1, False, 3),
        (0, 8, 1, True, 0),
    ],
)
def test_zero_stage_for(zero_stage, dp, pp, bf16, expected):
    assert zero_stage_for(zero_stage, dp, pp, bf16) == expected


TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_unset_by_default_and_settable():
    assert TrainingConfig().zero_stage is None
    run = load_run_config(TINY, ["data.train=x", "parallel.pipeline_model_parallel_size=2"])
    assert run.training.zero_stage is None  # auto passes the pipeline's ZeRO-1 rule
    assert load_run_config(TINY, ["data.train=x", "training.zero_stage=2"]).training.zero_stage == 2


def test_deepspeed_config_takes_the_resolved_stage(parallel):
    """In the world of one process (DP=1, PP=1): fp32 gets ZeRO-0, bf16 ZeRO-1 with fp32 gradient
    accumulation, a set stage is passed through."""
    from mor_megatron.training.optimizer import deepspeed_config

    fp32 = deepspeed_config(TrainingConfig(), 2, 4, bf16=False)
    assert fp32["zero_optimization"]["stage"] == 0 and "data_types" not in fp32
    bf16 = deepspeed_config(TrainingConfig(), 2, 4, bf16=True)
    assert bf16["zero_optimization"]["stage"] == 1 and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert deepspeed_config(TrainingConfig(zero_stage=2), 2, 4, bf16=False)["zero_optimization"]["stage"] == 2
