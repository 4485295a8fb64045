"""The trainer's optimizer: torch AdamW with its fused kernel wherever torch has one for the compute
device (CPU and CUDA), under every wrapper DeepSpeed puts around it (none at ZeRO-0, a ZeRO
optimizer at stages 1-2, the BF16_Optimizer for bf16), and its update equals torch's default
AdamW's over a few steps (1e-6 relative, or 1e-4 of the LR absolute: m / sqrt(v) of a tiny
gradient carries the kernels' rounding into a weight near zero). Checkpoint loads that write its `step` state:
tests/fakegpu/probe.py (`optimizer.adam_step_state`, device placement as torch's) and the resume
tests (test_distributed, test_bf16, test_checkpoints)."""

from __future__ import annotations

import pytest
import torch

from model_helpers import batch, build, tiny_config
from mor_megatron.device import compute_device, fused_optimizer_kernels
from mor_megatron.training.config import TrainingConfig
from mor_megatron.training.optimizer import build_engine

LR = 1e-2


def engine_for(zero_stage: int, bf16: bool = False):
    config = tiny_config(bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    model = build(config).to(compute_device())
    if bf16:
        model = model.to(torch.bfloat16)
    training = TrainingConfig(micro_batch_size=2, global_batch_size=2, zero_stage=zero_stage, lr=LR)
    return build_engine(model, training, 2, 1), config


@pytest.mark.parametrize("zero_stage,bf16", [(0, False), (1, False), (2, False), (1, True)],
                         ids=["zero0", "zero1", "zero2", "bf16-zero1"])
def test_adamw_is_fused_under_every_wrapper(parallel, zero_stage, bf16):
    assert fused_optimizer_kernels(compute_device())  # CPU here, CUDA on a GPU
    engine, _ = engine_for(zero_stage, bf16)
    torch_optimizer = engine.basic_optimizer
    assert isinstance(torch_optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in torch_optimizer.param_groups)


def backward_once(fused: bool):
    """A fresh ZeRO-0 engine whose AdamW runs the fused kernel or torch's default, after one
    forward and backward of the tiny batch; the engine and its parameters."""
    engine, config = engine_for(0)
    for group in engine.basic_optimizer.param_groups:
        group["fused"] = fused
    tokens, positions = batch(config)
    loss = engine(tokens.to(compute_device()), positions.to(compute_device()), None,
                  labels=tokens.roll(-1, dims=1).to(compute_device())).float().mean()
    engine.backward(loss)
    return engine, list(engine.module.parameters())


def updated(engine, params) -> list[torch.Tensor]:
    """Each parameter and its AdamW moments after the step: the moments carry the gradients the
    update took (AdamW's first step is sign(g) x LR, blind to a gradient's scale)."""
    state = engine.basic_optimizer.state
    return [t.detach().clone() for p in params for t in (p, state[p]["exp_avg"], state[p]["exp_avg_sq"])]


def assert_same_update(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Parameters to 1e-6 relative (or 1e-6 of the LR), moments to 1e-5 relative: one step of
    torch's kernels, which differ in rounding only."""
    for index, (mine, theirs) in enumerate(zip(ours, reference)):
        is_param = index % 3 == 0
        torch.testing.assert_close(mine, theirs, rtol=1e-6 if is_param else 1e-5,
                                   atol=1e-6 * LR if is_param else 0.0)


def test_fused_update_equals_the_default_adamw(parallel, monkeypatch):
    """One step of the same DeepSpeed ZeRO-0 engine with torch's default AdamW kernel in place of
    the fused one: the same update and moments."""
    calls = []
    fused_kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    results = []
    for fused in (True, False):
        engine, params = backward_once(fused)
        before = len(calls)
        engine.step()
        assert (len(calls) > before) == fused  # the kernel each run names, not one twice
        results.append(updated(engine, params))
    assert_same_update(*results)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-in-kernel", "unfused-in-place"])
def test_the_trainers_clip_equals_deepspeeds(parallel, fused):
    """ZeRO-0's clip as the trainer does it (`optimizer.clipped`: the fused AdamW scales the
    gradients in its kernel through `grad_scale`; another optimizer gets them scaled in place)
    against DeepSpeed's own `clip_grad_norm_` in place before the same optimizer's step, clipping
    active (max norm 1e-2): the same update and moments."""
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip_grad_norm_

    from mor_megatron.training.grad_clip import clip_factor, global_grad_norm
    from mor_megatron.training.optimizer import clipped

    results = []
    for trainers in (True, False):
        engine, params = backward_once(fused)
        if trainers:
            factor = clip_factor(global_grad_norm(params, engine.mpu), 1e-2)
            assert factor is not None and factor < 0.5  # clipping active
            with clipped(engine, params, factor):
                assert hasattr(engine.optimizer, "grad_scale") == fused
                engine.step()
            assert not hasattr(engine.optimizer, "grad_scale")
        else:
            deepspeed_clip_grad_norm_(params, 1e-2, mpu=engine.mpu)
            engine.step()
        results.append(updated(engine, params))
    assert_same_update(*results)
