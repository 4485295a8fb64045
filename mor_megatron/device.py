"""Devices: where this process computes, and which device each process group's collectives take.

The one owner of that answer; everything else asks here instead of testing `torch.cuda` itself.

- `compute_device()`: `MOR_DEVICE` when set (`cpu`, `cuda:N`, or another registered device type),
  else `cuda:LOCAL_RANK` where CUDA exists, else the CPU.
- `process_group_backend()`: the torch.distributed backend of that device's type (cuda -> nccl,
  cpu -> gloo, a registered out-of-tree device -> the backend registered for it), or
  `MOR_DIST_BACKEND` when set (e.g. `gloo` for several ranks sharing one GPU, where NCCL refuses).
- `collective_device(group)`: the device the group's collectives take tensors on.
- `to_device(batch)`: a host batch onto the compute device (pinned memory, non-blocking copy).

Why one backend (NCCL alone on GPUs) and not `cpu:gloo,cuda:nccl`: with two backends a host
tensor handed to a collective silently takes a second path (gloo over TCP between nodes, a
device-host sync on the way) and nothing shows the cost; with one, such a tensor fails at once,
and megatron's groups, created with `backend=None`, inherit exactly the default group's backend.
So every control tensor of a collective is created on `collective_device(group)`, and the
device tests (tests/test_device_faults.py) refuse a host tensor in a collective as NCCL does.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from mor_megatron.errors import UserError


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def compute_device() -> torch.device:
    """The device this process computes on."""
    named = os.environ.get("MOR_DEVICE")
    if named:
        try:
            device = torch.device(named)
        except RuntimeError:
            device = None
        module = getattr(torch, device.type, None) if device is not None else None  # torch.cuda, ...
        if device is None or (device.type != "cpu" and not hasattr(module, "device_count")):
            raise UserError(
                f"MOR_DEVICE={named} names no device of this torch: use cpu, cuda or cuda:N, or "
                "register the device type first"
            )
        if device.index is None and device.type != "cpu":
            device = torch.device(device.type, _local_rank() % max(1, module.device_count()))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", _local_rank())
    return torch.device("cpu")


def bind_device() -> torch.device:
    """Make the compute device this process's current CUDA device, before any CUDA allocation:
    without it every rank's first allocation (and NCCL's communicator) lands on GPU 0."""
    device = compute_device()
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {_local_rank()} asks for {device} but only {torch.cuda.device_count()} GPU(s) "
                "are visible: launch at most that many processes per node (--nproc-per-node), or set "
                "MOR_DEVICE=cuda:0 with MOR_DIST_BACKEND=gloo to share one GPU"
            )
        torch.cuda.set_device(device)
    return device


def fused_optimizer_kernels(device: torch.device) -> bool:
    """Whether torch's optimizers have fused kernels (`torch.optim.AdamW(fused=True)`: one pass
    over each parameter's weights, moments and gradient) for `device`, as for CUDA and the CPU.
    On the CPU torch's default runs one op at a time per parameter, about 3.4x the fused step's
    time at `bench_train`'s shape (`tools/bench_optimizer.py`, README "Benchmarks")."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # torch.optim's own list

    return device.type in _get_fused_kernels_supported_devices()


def process_group_backend() -> str:
    """The backend the default process group (and so every megatron group) starts with."""
    named = os.environ.get("MOR_DIST_BACKEND")
    if named:
        return named
    device_type = compute_device().type
    backend = dist.Backend.default_device_backend_map.get(device_type)
    if backend is None:
        raise UserError(
            f"no torch.distributed backend is registered for device type '{device_type}' "
            f"(MOR_DEVICE={os.environ.get('MOR_DEVICE')}): register one, or set MOR_DIST_BACKEND"
        )
    return backend


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device whose tensors `group`'s collectives carry: the host for gloo groups, else the
    compute device (NCCL and device-bound backends refuse host tensors)."""
    if dist.is_initialized() and dist.get_backend(group) == dist.Backend.GLOO:
        return torch.device("cpu")
    return compute_device()


def to_device(batch: Mapping[str, torch.Tensor], device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """A micro-batch of host tensors on `device` (default: the compute device). CUDA copies go
    from pinned memory without blocking the host, so the next batch can be read meanwhile."""
    device = compute_device() if device is None else device
    if device.type == "cpu":
        return dict(batch)
    pin = device.type == "cuda"
    return {
        key: (value.pin_memory() if pin and value.device.type == "cpu" else value).to(device, non_blocking=True)
        for key, value in batch.items()
    }
