"""The gradient norm and clip of a plain fp32 update (ZeRO-0), over all gradients at once.

DeepSpeed keeps no gradient norm without a ZeRO, fp16 or bf16 optimizer
(`optimizer.plain_fp32_update`), so the trainer measures and clips it here. The rule is DeepSpeed's
`deepspeed.runtime.utils.clip_grad_norm_` (0.19.8, pinned in requirements.txt), mirrored
step by step:

1. a tensor-parallel parameter (`is_model_parallel_parameter`, DeepSpeed's own predicate) counts
   on every rank, any other once per model-parallel group, on its rank 0;
2. the squared norms are summed, all-reduced over the model-parallel group, and rooted;
3. that norm is averaged over the data-parallel group (equal on every rank for reduced
   gradients; DeepSpeed averages because of MoE parameters);
4. every gradient is scaled by min(1, max_norm / (norm + 1e-6)).

DeepSpeed does steps 1 and 4 one kernel per parameter, and step 4 even where the factor is 1;
here they are torch's foreach kernels (`torch.nn.utils.get_total_norm`, `torch._foreach_mul_`),
step 4 is left out where the factor is 1, and collectives over one rank are left out. The trainer
runs step 4 inside a fused AdamW's update where it can (`optimizer.clipped`).
`clip_grad_norm_` is the whole of DeepSpeed's function; `tools/bench_optimizer.py` times it
against DeepSpeed's (README "Benchmarks"), and tests/test_grad_clip.py checks it against
DeepSpeed's, with and without tensor-parallel selection.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils import groups
from torch import nn

from mor_megatron.device import collective_device


def global_grad_norm(parameters: Iterable[nn.Parameter], mpu) -> float:
    """Steps 1-3: the global gradient norm of `parameters` (one host read, of the norm: the
    trainer logs it and decides the skip and the clip on it).

    `mpu`: DeepSpeed's model-parallel adapter (`parallel.mpu.MegatronMpu`) or None (no model
    parallelism)."""
    model_parallel_rank = 0 if mpu is None else mpu.get_model_parallel_rank()
    counted = [
        p.grad.float()  # DeepSpeed's `.float()`: a bf16 gradient's norm in fp32 (a no-op for fp32)
        for p in parameters
        if p.grad is not None and (model_parallel_rank == 0 or is_model_parallel_parameter(p))
    ]
    data_parallel = groups._get_data_parallel_group()  # the group DeepSpeed's function averages over
    device = collective_device(data_parallel)  # where the collectives' tensors live (NCCL: the GPU)
    squared = torch.zeros((), dtype=torch.float32, device=device)
    if counted:
        squared = torch.nn.utils.get_total_norm(counted, 2.0).float().square().to(device)
    if mpu is not None and dist.get_world_size(group=mpu.get_model_parallel_group()) > 1:
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    norm = squared.sqrt()
    data_parallel_size = dist.get_world_size(group=data_parallel)
    if data_parallel_size > 1:  # over one rank the average is the norm itself
        norm = norm / float(data_parallel_size)
        dist.all_reduce(norm, group=data_parallel)
    return float(norm)


def clip_factor(norm: float, max_norm: float) -> Optional[float]:
    """Step 4's factor, min(1, max_norm / (norm + 1e-6)); None where it is 1 (nothing to scale) or
    the norm is not finite (the trainer skips that update)."""
    if not math.isfinite(norm):
        return None
    factor = max_norm / (norm + 1e-6)
    return factor if factor < 1.0 else None


def scale_gradients_(parameters: Iterable[nn.Parameter], factor: float) -> None:
    """Step 4 in place, one foreach multiply per device and dtype."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:  # an fp32 factor, as DeepSpeed's (a Python float would round to bf16 for bf16 gradients)
        torch._foreach_mul_(grads, torch.full((), factor, dtype=torch.float32, device=grads[0].device))


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, mpu) -> float:
    """DeepSpeed's `clip_grad_norm_` whole: clip the gradients of `parameters` in place to a global
    norm of `max_norm` (inf: measure only) and return the global norm before clipping. (The
    trainer runs the pieces, to clip inside a fused optimizer's update: `optimizer.clipped`.)"""
    params = list(parameters)
    norm = global_grad_norm(params, mpu)
    factor = clip_factor(norm, max_norm)
    if factor is not None:
        scale_gradients_(params, factor)
    return norm
