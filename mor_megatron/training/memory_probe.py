"""Memory probe, for rehearsals (`tools/rehearse.py`): `MOR_MEMORY_PROBE=DIR` makes every rank
write `DIR/rank_R.json` with the bytes its parameters, gradients and optimizer state hold during
the optimizer update, and its peak resident memory (`VmHWM`), rewritten at exit. Unset (the
default), nothing is installed and nothing is measured.

The bytes are measured before and after each call of the torch optimizer's `step` (ZeRO steps it
once per parameter group, freeing a group's gradients as it goes) and the largest figure of each
kind is kept. They are counted per distinct storage (ZeRO's parameters are views into flat
buffers; a storage is counted once, under the first kind it is found as):
- parameters: the model's parameters;
- gradients: the parameters' `.grad`, the optimizer's own parameters' `.grad` (ZeRO's flat fp32
  partitions) and DeepSpeed's gradient buffers (`_GRAD_BUFFERS`);
- optimizer: the optimizer's own parameters that are not the model's (fp32 master copies, also
  those DeepSpeed keeps in `_MASTER_BUFFERS`) and every tensor of its state (AdamW's moments, step).
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

ENV = "MOR_MEMORY_PROBE"
# DeepSpeed optimizer attributes holding gradients outside `.grad` (ZeRO-1/2, BF16_Optimizer)
_GRAD_BUFFERS = ("averaged_gradients", "ipg_buffer", "fp32_groups_gradients_flat", "fp32_groups_gradients")
_MASTER_BUFFERS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition")

_record: dict[str, Any] = {}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested lists, tuples and dicts."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _count(tensors: Iterable[Optional[torch.Tensor]], seen: set[int]) -> int:
    """Bytes of the storages of `tensors` not in `seen` (which they are added to)."""
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def measure(model: torch.nn.Module, engine: Any, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds now."""
    seen: set[int] = set()
    params = list(model.parameters())
    # the optimizer's parameters: every group's (ZeRO swaps `param_groups` to one group per step)
    own = list(optimizer.state) + [p for group in optimizer.param_groups for p in group["params"]]
    wrapper = getattr(engine, "optimizer", None)  # DeepSpeed's ZeRO / bf16 optimizer, or the torch one
    grads = list(_tensors([getattr(wrapper, name, None) for name in _GRAD_BUFFERS]))
    masters = list(_tensors([getattr(wrapper, name, None) for name in _MASTER_BUFFERS]))
    return {
        "parameters": _count(params, seen),
        "gradients": _count([p.grad for p in params + own + masters] + grads, seen),
        "optimizer": _count(own + masters + list(_tensors(list(optimizer.state.values()))), seen),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (`VmHWM` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource  # no /proc: getrusage's kilobytes (Linux) serve

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write(directory: Path, rank: int) -> None:
    _record["peak_rss_bytes"] = peak_rss_bytes()
    tmp = directory / f"rank_{rank}.json.tmp"
    tmp.write_text(json.dumps(_record, indent=1))
    os.replace(tmp, directory / f"rank_{rank}.json")


def install(model: torch.nn.Module, engine: Any) -> None:
    """Arm the probe when `MOR_MEMORY_PROBE` names a directory (a hook on every optimizer step,
    and a last write at exit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    directory = Path(spec)
    directory.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    _record.update(rank=rank, steps=0, bytes=None)  # steps: probe calls (two per optimizer step call)

    def probe(optimizer, args, kwargs) -> None:
        now = measure(model, engine, optimizer)
        _record["bytes"] = {kind: max(value, (_record["bytes"] or {}).get(kind, 0)) for kind, value in now.items()}
        _record["steps"] += 1
        _write(directory, rank)

    register_optimizer_step_pre_hook(probe)
    register_optimizer_step_post_hook(probe)
    atexit.register(_write, directory, rank)
