"""Process groups: torch.distributed + megatron-core parallel state, the one place they are set up."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mor_megatron.device import bind_device, process_group_backend
from mor_megatron.errors import UserError
from mor_megatron.parallel.cpu_shims import apply_cpu_shims


class LaunchError(UserError, RuntimeError):
    """The launch environment does not describe a usable process group."""


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """Start torch.distributed (the compute device's backend: nccl on GPU, gloo on CPU, see
    `mor_megatron.device`) and megatron-core's parallel state.

    Under torchrun the rendezvous comes from the environment; a plain `python` process becomes a
    world of one over an in-memory store. Safe to call again: an existing setup is reused when the
    sizes agree.
    """
    bind_device()  # before the first CUDA allocation (NCCL's communicator included)
    apply_cpu_shims()
    if not dist.is_initialized():
        backend = process_group_backend()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
            if missing:
                raise LaunchError(
                    f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the job with "
                    "torchrun (launch/torchrun.sh) or set the rendezvous variables"
                )
            dist.init_process_group(backend=backend)
        else:  # a world of one needs no rendezvous (and no port that another job could take)
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        # checked before any existing parallel state is torn down
        raise LaunchError(
            f"world size {world} is not divisible by TP {tensor_model_parallel_size} x "
            f"PP {pipeline_model_parallel_size}: launch a multiple of "
            f"{tensor_model_parallel_size * pipeline_model_parallel_size} processes or change "
            "parallel.tensor_model_parallel_size / pipeline_model_parallel_size"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size()
            == pipeline_model_parallel_size
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
