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
here they are torch's foreach kernels (`torch.nn.utils.get_total_norm` and
`clip_grads_with_norm_`), and step 4 is left out where the factor is 1: about 1.8x faster measuring
and 1.2x clipping at `bench_train`'s CPU shape (`tools/bench_optimizer.py`, README "Benchmarks").
tests/test_grad_clip.py checks the result against DeepSpeed's function, with and without
tensor-parallel selection.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils import groups
from torch import nn

from mor_megatron.device import collective_device


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, mpu) -> float:
    """Clip the gradients of `parameters` in place to a global norm of `max_norm` (inf: measure
    only) and return the global norm before clipping, as DeepSpeed's `clip_grad_norm_` does.

    `mpu`: DeepSpeed's model-parallel adapter (`parallel.mpu.MegatronMpu`) or None (no model
    parallelism). One host read, of the norm: the trainer logs it and decides the skip on it.
    """
    params = [p for p in parameters if p.grad is not None]
    counted = [
        p.grad.float()  # DeepSpeed's `.float()`: a bf16 gradient's norm in fp32 (a no-op for fp32)
        for p in params
        if mpu is None or mpu.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p)
    ]
    data_parallel = groups._get_data_parallel_group()  # the group DeepSpeed's function averages over
    device = collective_device(data_parallel)  # where the collectives' tensors live (NCCL: the GPU)
    squared = torch.zeros((), dtype=torch.float32, device=device)
    if counted:
        squared = torch.nn.utils.get_total_norm(counted, 2.0).float().square().to(device)
    if mpu is not None:
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    norm = squared.sqrt() / float(dist.get_world_size(group=data_parallel))
    dist.all_reduce(norm, group=data_parallel)
    value = float(norm)
    if params and max_norm / (value + 1e-6) < 1.0:  # a factor of 1 changes nothing: no pass
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(params[0].device))
    return value
