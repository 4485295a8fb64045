"""A fake GPU for CPU-only tests: the device `fakegpu`, whose tensors live in host memory and are
computed by the CPU's kernels but whose device type is not `cpu`, its process-group backend
`fakenccl` (fakegpu tensors only, as NCCL takes CUDA tensors only) and a DeepSpeed accelerator.

On it, the two device faults a CPU-only machine cannot otherwise show fail as they do on CUDA:
a host tensor meeting a device tensor in an op (a batch left on the host), and a host tensor
handed to a collective of a GPU process group.

`install()` is global and cannot be undone (PrivateUse1 is renamed once per process), so tests
call it in subprocesses only: `site/sitecustomize.py` calls it at interpreter start when
`MOR_FAKE_GPU=1`, and `MOR_DEVICE=fakegpu` makes the trainer compute there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

import torch

from . import backend

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE_TYPE = backend.DEVICE_TYPE


def build() -> None:
    """Compile the C++ device once (about 15 s); later loads reuse the build under
    $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), ranks wait on its lock. A plain
    library, not a Python module: loading it runs its registrations."""
    from torch.utils.cpp_extension import load

    load(name="mor_fakegpu", sources=[os.path.join(HERE, "fakegpu.cpp")], extra_cflags=["-O1"],
         is_python_module=False, verbose=False)


def _device_module() -> types.ModuleType:
    """`torch.fakegpu`: what torch, megatron and the project ask a device module (one device; the
    CPU generator, which the C++ hooks also hand out)."""
    module = types.ModuleType(f"torch.{DEVICE_TYPE}")
    module.is_available = lambda: True
    module.is_initialized = lambda: True
    module._lazy_init = lambda: None
    module._is_in_bad_fork = lambda: False
    module.device_count = lambda: 1
    module.current_device = lambda: 0
    module.set_device = _set_device
    module.synchronize = lambda device=None: None
    # torch.manual_seed/seed call these after seeding the CPU generator, which is also this device's
    module.manual_seed = module.manual_seed_all = lambda seed: None
    module.seed = module.seed_all = lambda: None
    module.initial_seed = torch.initial_seed
    module.get_rng_state = lambda device=None: torch.get_rng_state()
    module.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    module.get_amp_supported_dtype = lambda: [torch.float32, torch.bfloat16]
    return module


def _set_device(device) -> None:
    index = device.index if isinstance(device, torch.device) else device
    if index not in (None, 0):
        raise RuntimeError(f"{DEVICE_TYPE}:{index} does not exist: there is one fake device")


class _SetDeepSpeedAccelerator(importlib.abc.MetaPathFinder):
    """Set DeepSpeed's accelerator as soon as DeepSpeed defines it (before any of its modules asks
    for one), without importing DeepSpeed into processes that never use it (torchrun's launcher)."""

    TARGET = "deepspeed.accelerator.real_accelerator"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from .accelerator import FakeGpuAccelerator

            module.set_accelerator(FakeGpuAccelerator())

        spec.loader.exec_module = exec_module
        return spec


def _default_group_on_fake_backend() -> None:
    """The default process group on `fakenccl` whatever backend the code names: what a GPU machine
    gives code that names nccl there. Only for running code from before `mor_megatron.device`
    (85137bf), which names gloo wherever torch.cuda is unavailable."""
    import torch.distributed as dist

    init = dist.init_process_group

    def init_process_group(*args, **kwargs):  # args[0], if given, is the backend named by the code
        return init(*args[1:], **dict(kwargs, backend=backend.NAME))

    dist.init_process_group = init_process_group


def _parameters_move_in_place() -> None:
    """Between the CPU and CUDA a parameter moves in place: torch counts both as compatible, so
    `module.to()` and `param.data = t` keep the Parameter object. Between the CPU and an out-of-tree
    device torch refuses that: `module.to("fakegpu")` would make new Parameter objects (an optimizer
    made before holds the old ones, and DeepSpeed's ZeRO fails on a KeyError) and megatron's
    `weight.data = weight.data.cuda()` (the tied embedding under PP) would raise "incompatible tensor
    type". Here both swap in the moved contents, keeping the object and its attributes, as on CUDA."""
    data = torch._C.TensorBase.data
    compatible = torch._has_compatible_shallow_copy_type

    def crosses(a, b) -> bool:
        return {a.device.type, b.device.type} == {"cpu", DEVICE_TYPE}

    def set_data(self, value):
        if crosses(self, value):
            # the C++ tensors trade places; the Python object keeps its attributes (megatron's
            # tensor_model_parallel, ...) and weakrefs (torch.utils.swap_tensors refuses those)
            torch._C._swap_tensor_impl(self, torch.nn.Parameter(value, requires_grad=self.requires_grad))
        else:
            data.__set__(self, value)

    def has_compatible_shallow_copy_type(input: torch.Tensor, from_: torch.Tensor) -> bool:  # torch's signature
        return compatible(input, from_) or (isinstance(input, torch.nn.Parameter) and crosses(input, from_))

    torch.nn.Parameter.data = property(data.__get__, set_data)
    torch._has_compatible_shallow_copy_type = has_compatible_shallow_copy_type  # read by nn.Module._apply


def install() -> None:
    """Build/load the device and register it, its backend and its DeepSpeed accelerator. Idempotent."""
    if hasattr(torch, DEVICE_TYPE):
        return
    build()
    torch.utils.rename_privateuse1_backend(DEVICE_TYPE)
    torch._register_device_module(DEVICE_TYPE, _device_module())
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
    backend.register()
    _parameters_move_in_place()
    if "deepspeed.accelerator.real_accelerator" in sys.modules:
        from deepspeed.accelerator import set_accelerator

        from .accelerator import FakeGpuAccelerator

        set_accelerator(FakeGpuAccelerator())
    else:
        sys.meta_path.insert(0, _SetDeepSpeedAccelerator())
    if os.environ.get("MOR_FAKE_GPU_DEFAULT_GROUP") == "1":
        _default_group_on_fake_backend()
