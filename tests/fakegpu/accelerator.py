"""DeepSpeed's accelerator for the fake device: DeepSpeed moves the model, its ZeRO buffers and
its own control tensors to `current_device_name()`, so with this one they land on fakegpu as they
land on CUDA with DeepSpeed's CUDA accelerator. Everything else (RNG, memory, op builders) is the
CPU accelerator's, since the fake device computes on the CPU."""

from __future__ import annotations

import torch
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

from .backend import DEVICE_TYPE, NAME


class FakeGpuAccelerator(CPU_Accelerator):
    def __init__(self) -> None:
        super().__init__()
        self._name = DEVICE_TYPE
        self._communication_backend_name = NAME

    def device_name(self, device_index=None) -> str:
        # DeepSpeed asks for device LOCAL_RANK; every rank shares the one fake device, as
        # mor_megatron.device.compute_device() counts (LOCAL_RANK % device_count)
        return DEVICE_TYPE if device_index is None else f"{DEVICE_TYPE}:{int(device_index) % self.device_count()}"

    def device(self, device_index=None):
        return torch.device(self.device_name(device_index))

    def current_device(self) -> int:
        return torch.fakegpu.current_device()

    def current_device_name(self) -> str:
        return f"{DEVICE_TYPE}:{self.current_device()}"

    def device_count(self) -> int:
        return torch.fakegpu.device_count()

    def on_accelerator(self, tensor) -> bool:
        return tensor.device.type == DEVICE_TYPE

    def pin_memory(self, tensor, *args, **kwargs):
        return tensor  # the "device" is host memory: nothing to pin

    def is_pinned(self, tensor) -> bool:
        return False

    def get_op_builder(self, class_name):
        # no shared-memory collectives (DeepSpeed builds those for CPU ranks only, not for GPUs)
        return None if class_name == "ShareMemCommBuilder" else super().get_op_builder(class_name)
