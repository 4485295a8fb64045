"""The FP8 weight cache under the DeepSpeed loop (FP8 regions and recompute: `model/precision.py`).

Megatron's TE linears cache their FP8 weight while their `is_first_microbatch` flag is False and
requantize when it is True; only megatron's pipeline schedules set it
(`MegatronModule.set_is_first_microbatch`). Under DeepSpeed nobody does, so the step-0 FP8
weights would be used for ever: `refresh_fp8_weight_cache` sets the flag on every TE module
before the first micro-batch of each optimizer step (and before evaluation). Why that needs
`gradient_accumulation_fusion` off: `model.precision.check_fp8_supported`.
"""

from __future__ import annotations

from torch import nn

__all__ = ["refresh_fp8_weight_cache"]


def refresh_fp8_weight_cache(model: nn.Module) -> int:
    """Flag every TE module's next forward as a step's first micro-batch, so it requantizes its
    FP8 weight from the current (just updated) weights; returns how many modules were flagged.
    `model` may be a DeepSpeed engine. Call before micro-batch 0 of every step."""
    module = getattr(model, "module", model)
    flagged = 0
    for child in module.modules():
        if hasattr(child, "is_first_microbatch"):  # megatron's TE linears (TELinear & co.)
            child.is_first_microbatch = True
            flagged += 1
    return flagged
