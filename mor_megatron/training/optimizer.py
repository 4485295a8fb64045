"""DeepSpeed owns the optimizer: AdamW, the LR schedule, gradient clipping, bf16 and ZeRO.

Two ways a global batch runs, both ending in one `engine.step()`:
- PP = 1: DeepSpeed's managed gradient accumulation (`engine.backward` per micro-batch), which
  works with ZeRO stages 0-3.
- PP > 1: megatron-core's own 1F1B schedule drives `engine.module`; DeepSpeed runs unmanaged
  (`managed_gradient_accumulation: false`), reducing data-parallel gradients and stepping in
  `engine.step()`. ZeRO-1 only: ZeRO-2/3 cannot take gradients accumulated outside their hooks,
  and ZeRO-0's gradient norm drops a stage's non-tensor-parallel parameters under PP.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import deepspeed
import torch
from megatron.core import parallel_state
from torch import nn

from mor_megatron.device import compute_device, fused_optimizer_kernels
from mor_megatron.parallel.mpu import MegatronMpu
from mor_megatron.training.config import TrainingConfig, zero_stage_for
from mor_megatron.training.grad_clip import scale_gradients_

def lr_multiplier(cfg: TrainingConfig) -> Callable[[int], float]:
    """Step -> LR multiple of the peak, for `torch.optim.lr_scheduler.LambdaLR`."""
    warmup, total, floor = cfg.warmup_steps, max(1, cfg.train_steps), cfg.min_lr_ratio
    decay_start = total - int(round(cfg.decay_fraction * total))

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step < decay_start:  # wsd plateau
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * progress

    return multiplier


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never norms, biases or the 1-D router-free vectors."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(cfg: TrainingConfig, micro_batch_size: int, num_microbatches: int, bf16: bool) -> dict:
    """DeepSpeed's config; `bf16` is the model config's (decided once, by `use_bf16`, when the
    run config was built)."""
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    pipelined = pipeline > 1
    stage = zero_stage_for(cfg.zero_stage, parallel_state.get_data_parallel_world_size(), pipeline, bf16)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config["bf16"]["enabled"] and stage == 1 and not pipelined:
        # gradients summed over micro-batches in fp32, as megatron does (DeepSpeed's bf16 default
        # accumulates in bf16); with ZeRO-1 DeepSpeed then runs its BF16_Optimizer. Not yet with
        # pipeline parallelism, whose unmanaged accumulation is untested with that optimizer
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if pipelined:
        config["managed_gradient_accumulation"] = False
    return config


def use_bf16(cfg: TrainingConfig) -> bool:
    """bf16 where asked, or by default where the compute GPU supports it; fp32 elsewhere."""
    if cfg.bf16 is not None:
        return cfg.bf16
    device = compute_device()
    # native bf16 (compute capability 8.0+) on this rank's own GPU, read from its properties: the
    # run config is built before `bind_device`, and `torch.cuda.is_bf16_supported()` would ask the
    # current device (GPU 0 for every rank) and may allocate there to probe emulation
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def adam_step_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, step: int) -> torch.Tensor:
    """The `step` entry torch AdamW keeps for `param` after `step` updates, where torch keeps it:
    on the parameter's device in float32 for the fused (and capturable) kernels, which read it
    there, else a host scalar (torch's `_init_group` rule). For states a checkpoint load writes
    directly."""
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), optimizer.defaults)
    if group.get("fused") or group.get("capturable"):
        return torch.full((), float(step), dtype=torch.float32, device=param.device)
    return torch.tensor(float(step))  # host: torch's unfused AdamW keeps `step` on the CPU


def build_engine(model: nn.Module, cfg: TrainingConfig, micro_batch_size: int, num_microbatches: int):
    """Wrap `model` in a DeepSpeed engine with torch AdamW (fused where torch has the kernel) and
    our LR schedule."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused_optimizer_kernels(compute_device()) or None,  # None: torch's default
    )
    schedule = lr_multiplier(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        mpu=MegatronMpu(),
        config=deepspeed_config(cfg, micro_batch_size, num_microbatches, model.config.bf16),
        dist_init_required=False,
    )
    if _reduction_is_identity(engine):
        # DeepSpeed would still flatten every gradient, all-reduce it over one rank, scale it by
        # 1/1 and copy it back after each global batch: three passes over the gradients for nothing
        engine.enable_backward_allreduce = False
    if plain_fp32_update(engine):
        engine.clip_fp32_gradients = _clipped_by_the_trainer
    return engine


def plain_fp32_update(engine) -> bool:
    """Whether DeepSpeed steps the torch optimizer itself on fp32 gradients (no ZeRO, fp16 or
    bf16 optimizer: DeepSpeed's own condition for `clip_fp32_gradients`). There DeepSpeed keeps
    no gradient norm and skips no non-finite update, so `train_step` does both: it measures the
    norm by DeepSpeed's rule (`grad_clip.global_grad_norm`), clips in the update (`clipped`; no
    pass of its own where the optimizer is fused) and `skipped_unless_finite` skips the update."""
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def _clipped_by_the_trainer() -> None:
    """DeepSpeed's `clip_fp32_gradients` where `plain_fp32_update`: the trainer clips the step's
    gradients itself, from the norm it measured (`clipped`)."""


def zero_partitions_nothing(engine) -> bool:
    """Whether a ZeRO optimizer runs over one data-parallel rank without pipeline parallelism
    (which needs ZeRO-1): ZeRO-0 gives the same updates (tests/test_distributed.py
    test_zero_stages_match) without the partition copies."""
    return _one_rank_plain_optimizer(engine) and bool(engine.zero_optimization())


def _reduction_is_identity(engine) -> bool:
    """Whether DeepSpeed's gradient all-reduce changes nothing: one data-parallel rank, and no
    ZeRO optimizer (stages 1-3 take their gradients through it)."""
    return _one_rank_plain_optimizer(engine) and not engine.zero_optimization()


def _one_rank_plain_optimizer(engine) -> bool:
    """One data-parallel rank, no pipeline parallelism, and not DeepSpeed's bf16 optimizer (which
    bf16 runs at ZeRO-1 here: it takes its gradients through the all-reduce and keeps the fp32
    master weights bf16 needs anyway)."""
    return (
        parallel_state.get_data_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
        and not hasattr(engine.optimizer, "get_grads_for_reduction")  # DeepSpeed's BF16_Optimizer
    )


@contextlib.contextmanager
def skipped_unless_finite(engine, grad_norm: Optional[float]) -> Iterator[None]:
    """Around `engine.step()` where `plain_fp32_update` (ZeRO-0 in fp32): skip the update where the
    gradient norm (measured before the step) is not finite, as DeepSpeed's ZeRO optimizers do on
    their own. DeepSpeed applies a plain torch optimizer's update whatever the gradients hold, so
    one NaN micro-batch would reach every weight and AdamW moment.

    Here the optimizer's update is left out for this step (its moments and step count stay) and
    its `overflow` flag, which DeepSpeed's engine reads after the update, is raised: the engine
    then counts the step in `skipped_steps`, reports it not applied, holds the LR schedule and
    zeroes the gradients, as after a ZeRO skip. Every rank skips alike: the norm is of the
    data-parallel-reduced gradients (DeepSpeed reduces them in the last backward)."""
    optimizer = engine.optimizer
    if grad_norm is None or not plain_fp32_update(engine):
        yield  # ZeRO and DeepSpeed's own wrappers (BF16_Optimizer) check for themselves
        return
    skip = not math.isfinite(grad_norm)
    optimizer.overflow = skip
    if not skip:
        yield
        return
    # the instance's own `step` (the LR scheduler's counting wrapper), put back afterwards
    own_step = optimizer.__dict__.get("step")
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own_step is None:
            del optimizer.step
        else:
            optimizer.step = own_step


@contextlib.contextmanager
def clipped(engine, params: list[nn.Parameter], factor: Optional[float]) -> Iterator[None]:
    """Around `engine.step()` where `plain_fp32_update`: the update takes the gradients scaled by
    the clip `factor` (`grad_clip.clip_factor`; None: unscaled). A fused torch AdamW scales them
    inside its kernel: torch's fused optimizers divide every gradient by their `grad_scale`
    attribute, the hook `torch.amp.GradScaler` unscales through, so 1 / factor there saves the
    scaling pass over the gradients (about 1.9 ms a step at `bench_train`'s CPU shape). Any other
    optimizer gets them scaled in place first (`grad_clip.scale_gradients_`)."""
    optimizer = engine.optimizer
    if factor is None:
        yield
        return
    fused = isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)
    if not fused:
        scale_gradients_(params, factor)
        yield
        return
    optimizer.grad_scale = torch.full((), 1.0 / factor, dtype=torch.float32, device=params[0].device)
    try:
        yield
    finally:
        del optimizer.grad_scale


def sync_learning_rate(engine, step: int) -> None:
    """Set the scheduler to `step` and the optimizer's LR to this run's schedule at that step.

    A resumed run may change the schedule (e.g. more `train_steps`); the LR stored with the
    optimizer belongs to the old one.
    """
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
