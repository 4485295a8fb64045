"""`training.grad_clip.clip_grad_norm_` (the trainer's norm and clip at ZeRO-0) gives DeepSpeed's
`deepspeed.runtime.utils.clip_grad_norm_`, whose rule it mirrors: the same norm and the same
clipped gradients (1e-6 relative: the foreach kernels sum in another order), without model
parallelism, on a model-parallel rank 0 and on another rank, which counts only the
tensor-parallel parameters. Across real ranks (TP=2 against one process, clipping active):
tests/test_distributed.py."""

from __future__ import annotations

import math

import deepspeed
import pytest
import torch
from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip_grad_norm_

from mor_megatron.device import compute_device, process_group_backend
from mor_megatron.parallel.mpu import MegatronMpu
from mor_megatron.training.grad_clip import clip_grad_norm_

REL = 1e-6


class SecondRankMpu(MegatronMpu):
    """Megatron's groups (a world of one), but answering as model-parallel rank 1: the rank whose
    norm leaves out the parameters every model-parallel rank holds alike."""

    def get_model_parallel_rank(self) -> int:
        return 1


@pytest.fixture(scope="module")
def comm(parallel):
    deepspeed.comm.init_distributed(dist_backend=process_group_backend(), dist_init_required=False)


def parameters(seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """A model's worth of shapes; every other matrix tensor-parallel, one without a gradient."""
    generator = torch.Generator().manual_seed(seed)  # host generator: the same values on any device
    shapes = [(64, 32), (32,), (48, 32), (32, 48), (32,), (16, 32), (7,)]
    params = []
    for index, shape in enumerate(shapes):
        param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(compute_device(), dtype))
        if len(shape) == 2 and index % 2 == 0:
            param.tensor_model_parallel = True
        if index != 4:
            param.grad = (scale * torch.randn(shape, generator=generator)).to(compute_device(), dtype)
        params.append(param)
    return params


@pytest.mark.parametrize("mpu", [None, MegatronMpu(), SecondRankMpu()], ids=["no-mpu", "mp-rank-0", "mp-rank-1"])
@pytest.mark.parametrize("max_norm", [math.inf, 1.0, 1e4], ids=["measure-only", "clipping", "not-clipping"])
def test_matches_deepspeed(comm, mpu, max_norm):
    ours, theirs = parameters(seed=3), parameters(seed=3)
    norm = clip_grad_norm_(ours, max_norm, mpu)
    expected = float(deepspeed_clip_grad_norm_(theirs, max_norm, mpu=mpu))
    assert norm == pytest.approx(expected, rel=REL)
    for mine, reference in zip(ours, theirs):
        if reference.grad is None:
            assert mine.grad is None
        else:
            torch.testing.assert_close(mine.grad, reference.grad, rtol=REL, atol=0.0)
    if mpu is not None and math.isinf(max_norm):  # the rank's selection matters to the norm
        other = SecondRankMpu() if type(mpu) is MegatronMpu else MegatronMpu()
        assert clip_grad_norm_(parameters(seed=3), max_norm, other) != pytest.approx(norm, rel=1e-3)


@pytest.mark.parametrize("max_norm", [math.inf, 1.0], ids=["measure-only", "clipping"])
def test_bf16_gradients_are_measured_in_fp32(comm, max_norm):
    """bf16 gradients (bf16 weights at ZeRO-0): each norm in fp32, as DeepSpeed's `.float()`;
    a bf16 norm would be off by up to 0.4%."""
    ours, theirs = parameters(seed=7, dtype=torch.bfloat16), parameters(seed=7, dtype=torch.bfloat16)
    norm = clip_grad_norm_(ours, max_norm, MegatronMpu())
    assert norm == pytest.approx(float(deepspeed_clip_grad_norm_(theirs, max_norm, mpu=MegatronMpu())), rel=REL)
    for mine, reference in zip(ours, theirs):
        if reference.grad is not None:
            assert mine.grad.dtype == torch.bfloat16
            torch.testing.assert_close(mine.grad, reference.grad, rtol=0.0, atol=0.0)


def test_non_finite_gradients_give_a_non_finite_norm(comm):
    ours, theirs = parameters(seed=5), parameters(seed=5)
    for params in (ours, theirs):
        params[1].grad[0] = float("nan")
    assert math.isnan(clip_grad_norm_(ours, 1.0, MegatronMpu()))
    assert math.isnan(float(deepspeed_clip_grad_norm_(theirs, 1.0, mpu=MegatronMpu())))
