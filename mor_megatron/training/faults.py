"""Fault injection, for testing recovery: `MOR_FAULT_INJECT=RANK:STEP:POINT` makes global rank
RANK kill itself with SIGKILL (what a lost node looks like to the others) when it reaches POINT
during step STEP. Unset (the default), nothing is installed and nothing is checked.

Points inside a training step: `forward` (in the decoder's forward), `backward` (in the backward
pass, after the output layer's), `optimizer` (inside the optimizer's update). Points inside the
checkpoint save that ends step STEP: `checkpoint-deepspeed` (DeepSpeed's files written, the rest
not), `checkpoint-universal` (the layout-free copy written too), `checkpoint-meta` (manifest
written, directory not yet renamed), `checkpoint-latest` (renamed, `latest` not yet updated); the
last two happen on rank 0 only.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mor_megatron.errors import UserError

ENV = "MOR_FAULT_INJECT"
STEP_POINTS = ("forward", "backward", "optimizer")
CHECKPOINT_POINTS = ("checkpoint-deepspeed", "checkpoint-universal", "checkpoint-meta", "checkpoint-latest")
POINTS = STEP_POINTS + CHECKPOINT_POINTS


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    point: str


_planned: Optional[Fault] = None
_step = 0


def planned_fault() -> Optional[Fault]:
    """The fault `MOR_FAULT_INJECT` asks for, or None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in POINTS:
        raise UserError(f"{ENV}={spec!r} is not RANK:STEP:POINT with POINT one of {', '.join(POINTS)}; fix or unset it")
    return Fault(int(parts[0]), int(parts[1]), parts[2])


def install(model: torch.nn.Module) -> None:
    """Arm the planned fault, if any (hooks on the decoder and on every optimizer's step)."""
    global _planned
    _planned = planned_fault()
    if _planned is None or _planned.point not in STEP_POINTS:
        return
    decoder = getattr(model, "decoder", model)
    if _planned.point == "forward":
        decoder.register_forward_pre_hook(lambda module, args: reached("forward"))
    elif _planned.point == "backward":
        def arm_backward(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(hidden) and hidden.requires_grad:
                hidden.register_hook(lambda grad: reached("backward"))

        decoder.register_forward_hook(arm_backward)
    else:
        register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: reached("optimizer"))


def begin_step(step: int) -> None:
    """The step being trained (and saved after it), 1-based."""
    global _step
    _step = step


def reached(point: str) -> None:
    """Die here if this is the planned fault's rank, step and point."""
    fault = _planned
    if fault is None or fault.point != point or fault.step != _step:
        return
    if int(os.environ.get("RANK", "0")) != fault.rank:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
