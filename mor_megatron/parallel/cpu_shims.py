"""Make megatron-core's CUDA hard-codes run where the compute device is not CUDA (the CPU, or
another device named by `MOR_DEVICE`, such as the tests' fake GPU). Never applied on CUDA.

Three shims, named as in the project's platform notes:
  P  `torch.cuda.current_device()` answers the compute device and `torch.cuda.synchronize()` does
     nothing (RoPE's `RotaryEmbedding.get_emb`, p2p receive buffers, dist-checkpointing save).
  M  a `TorchFunctionMode` that maps `device="cuda"` arguments to the compute device and makes
     `.cuda()` a move there (pipeline schedules allocate `torch.zeros(..., device="cuda")` even at
     PP=1).
  R  a CPU RNG tracker in place of megatron's `CudaRNGStatesTracker` (seeding, dropout, recompute):
     the CPU and the fake device draw from the CPU generator.

When the compute device is CUDA `apply_cpu_shims()` does nothing: GPU runs must never see these.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
from torch.overrides import TorchFunctionMode

from mor_megatron.device import compute_device

_MODE = None  # shim M once installed: also the "shims applied" flag


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToComputeDeviceMode(TorchFunctionMode):
    """Shim M: redirect tensor creation on 'cuda' to the compute device; `.cuda()` moves there."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0].to(self.device)
        if not kwargs:
            kwargs = {}
        elif _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device=self.device)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            return func(args[0], self.device, *args[2:], **kwargs)
        return func(*args, **kwargs)


class CpuRNGStatesTracker(CudaRNGStatesTracker):
    """Shim R: megatron's `CudaRNGStatesTracker` interface over CPU generator states."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists in the CPU RNG tracker")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name} already exists in the CPU RNG tracker")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()  # host: shim R, never on CUDA

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} is not added to the CPU RNG tracker")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


@contextlib.contextmanager
def shim_m_suspended():
    """Run a block without shim M: every torch call inside skips its Python dispatch (a few
    microseconds each, a large share of small-batch decoding on CPU). Only for code that never
    names a CUDA device; a no-op where the shim is not installed."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield


def apply_cpu_shims() -> bool:
    """Install shims P, M and R once unless the compute device is CUDA. Returns True when installed."""
    global _MODE
    device = compute_device()
    if device.type == "cuda":
        return False
    if _MODE is not None:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: device  # P
    torch.cuda.synchronize = lambda *args, **kwargs: None  # P
    _MODE = _CudaToComputeDeviceMode(device)
    _MODE.__enter__()  # M: stays entered for the life of the process

    tracker = CpuRNGStatesTracker()  # R
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    return True
