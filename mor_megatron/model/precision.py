"""FP8 (Transformer Engine) and activation recompute inside the recursive decoder's forward.

Where FP8 regions go:
- delayed scaling: one `fp8_context(config, "decoder")` around the whole decoder forward, all
  recursions and the routers inside it. Calling a TE module several times in one region is
  allowed in TE 2.x: its amax is the max over the calls and every recursion shares one scale;
  amaxes are reduced once, when the outermost region exits (and once in backward).
- current / block / MXFP8 scaling: one `fp8_context(config, "layer", layer_number)` around each
  (layer, recursion) call; these quantizers are stateless, so each recursion gets its own scale.
Both come from megatron's `fp8_utils.get_fp8_context` (megatron-core 0.16.1), which picks the TE
recipe (`get_fp8_recipe`: DelayedScaling, Float8CurrentScaling, ...) and the amax reduction group.
Without TE that function silently returns a null context, so `fp8_context` checks first.

FP8 alignment. FP8 GEMMs need token counts divisible by 16 (32 for MXFP8; megatron
`fp8_utils.get_fp8_align_size`). `pad_active_tokens` pads a recursion step's gathered tokens at
the tail before the block runs; the caller slices the block output back to the real count.
Pads never become keys of real tokens: in dense/padded (sbhd) layouts they sit after every real
token in index order (and get positions past the last real one), so causal masking hides them
from every real query; in packed/thd layouts they form one extra tail sequence in `cu_seqlens`, and with
KV sharing the read path drops them before scattering and gives them zero outputs. As queries,
pads see real keys, but their outputs are sliced off, so they get no gradient. The TE attention
(`te_attention.py`) pads its own full-length sequence dimension the same way (`pad_rows`).

The weight-cache refresh that a DeepSpeed step needs is the trainer's (`training/fp8.py`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor

from mor_megatron.errors import UserError
from mor_megatron.model.attention import ActiveTokens

__all__ = [
    "FP8UnavailableError",
    "PaddedActiveTokens",
    "check_fp8_supported",
    "checkpoint_layer",
    "fp8_align_size",
    "fp8_context",
    "pad_active_tokens",
    "pad_rows",
]

SCOPES = ("decoder", "layer")


class FP8UnavailableError(UserError, RuntimeError):
    """FP8 was asked for where it cannot run."""


@lru_cache(maxsize=None)
def _te_fp8_status(recipe: str = "delayed") -> tuple[bool, str]:
    """(usable, reason): TE importable and `recipe` supported by this GPU (sm89+; MXFP8 sm100+;
    blockwise sm90+ with CUDA 12.9+), the checks TE's autocast asserts on entry
    (transformer_engine/pytorch/quantization.py `FP8GlobalStateManager.autocast_enter`)."""
    try:
        # TE 2.9+: transformer_engine/pytorch/fp8.py is a deprecated shim of quantization.py
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError as err:
        return False, f"Transformer Engine is not installed ({err})"
    check = {
        "mxfp8": FP8GlobalStateManager.is_mxfp8_available,
        "blockwise": FP8GlobalStateManager.is_fp8_block_scaling_available,
    }.get(recipe, FP8GlobalStateManager.is_fp8_available)
    available, reason = check()
    return bool(available), str(reason)


def check_fp8_supported(config, backend: Optional[str] = None) -> None:
    """Nothing when FP8 is off or can run as configured; else one line naming the fix.

    With `gradient_accumulation_fusion` the TE linear flagged as a step's first micro-batch
    (recursion 1, whose backward runs last) would overwrite `main_grad` and drop recursions
    2..Nr's weight gradients; DeepSpeed keeps no `main_grad`, so the fusion must be off and
    autograd sums the recursions."""
    if not config.fp8:
        return
    asked = f"model.fp8={config.fp8!r}"
    if not torch.cuda.is_available():
        raise FP8UnavailableError(
            f"{asked}: FP8 needs a CUDA GPU with Transformer Engine: set model.fp8 to null on CPU"
        )
    usable, reason = _te_fp8_status(str(getattr(config.fp8_recipe, "value", config.fp8_recipe)))
    if not usable:
        raise FP8UnavailableError(
            f"{asked} cannot run here: {reason}; install requirements-gpu.txt on a GPU this recipe "
            "supports (sm89+; mxfp8 sm100+), choose another model.fp8_recipe, or set model.fp8 to null"
        )
    if backend is not None and backend != "te":
        raise FP8UnavailableError(
            f"{asked} needs training.backend te (the {backend} backend has no FP8 GEMMs)"
        )
    align = fp8_align_size(config)
    if config.seq_length % align:
        raise FP8UnavailableError(
            f"model.seq_length={config.seq_length} under FP8 must be a multiple of {align} "
            "(FP8 GEMMs; full-sequence layers are not padded): change seq_length or set model.fp8 to null"
        )
    if config.gradient_accumulation_fusion:
        raise FP8UnavailableError(
            "model.gradient_accumulation_fusion with FP8 drops recursions 2..Nr's weight gradients "
            "and DeepSpeed keeps no main_grad: set it to false"
        )
    if config.fp8_param:
        raise FP8UnavailableError(
            "model.fp8_param (FP8 primary weights) does not work with DeepSpeed's optimizer: "
            "set it to false"
        )


def fp8_context(config, scope: str, layer_number: int = 0) -> ContextManager:
    """The FP8 region for `scope`: "decoder" (the whole decoder forward) or "layer" (one call of
    the 1-based global `layer_number`, at any recursion). Which of the two is a real region
    depends on the recipe (module docstring); the other is a null context."""
    if scope not in SCOPES:
        raise ValueError(f"unknown FP8 scope '{scope}': use one of {', '.join(SCOPES)}")
    if not config.fp8:
        return nullcontext()
    check_fp8_supported(config)
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_context

    delayed = config.fp8_recipe == Fp8Recipe.delayed
    if scope == "decoder":
        return get_fp8_context(config) if delayed else nullcontext()
    # layer_no selects megatron's first/last-layers-in-BF16 option (non-delayed recipes only)
    return nullcontext() if delayed else get_fp8_context(config, layer_number - 1)


def checkpoint_layer(config, function: Callable, *args):
    """Activation recompute of one layer call. Under FP8, TE's non-reentrant checkpoint
    (transformer_engine/pytorch/distributed.py `checkpoint`): it re-enters the forward's FP8
    autocast for the recompute, which torch's checkpoint would run outside any FP8 region, and,
    being non-reentrant, keeps the graph of step 1's shared keys/values for later recursions."""
    if not config.fp8:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from transformer_engine.pytorch.distributed import checkpoint

    return checkpoint(function, *args, use_reentrant=False, get_rng_state_tracker=get_cuda_rng_tracker)


# -- FP8 alignment ---------------------------------------------------------------------------------


@dataclass
class PaddedActiveTokens(ActiveTokens):
    """`ActiveTokens` whose last `pad` rows (dim 0 of the block input) are FP8 alignment pads."""

    pad: int = 0


def fp8_align_size(config) -> int:
    """Token-count multiple FP8 GEMMs need under `config` (1 without FP8)."""
    if not config.fp8:
        return 1
    from megatron.core.fp8_utils import get_fp8_align_size  # defined with or without TE

    return get_fp8_align_size(config.fp8_recipe)


def pad_rows(x: Tensor, extra: int, dim: int = 0) -> Tensor:
    """`x` with `extra` zero rows appended along `dim`."""
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def pad_active_tokens(
    hidden: Tensor, rotary: Optional[Tensor], active: ActiveTokens, multiple: int
) -> tuple[Tensor, Optional[Tensor], PaddedActiveTokens]:
    """Pad a step's gathered tokens (`[k, B, D]` dense or padded, `[t, 1, D]` packed) at the tail
    to a multiple of `multiple`. Pads are zero rows (zero RoPE angle, zero amax contribution), with
    positions after the last real one (dense, padded) or one extra tail sequence (packed)."""
    extra = (-hidden.shape[0]) % multiple
    positions, seq_ids = active.positions, active.seq_ids
    if extra:
        hidden, rotary = pad_rows(hidden, extra), None if rotary is None else pad_rows(rotary, extra)
        steps = torch.arange(1, extra + 1, device=positions.device, dtype=positions.dtype)
        if active.layout != "packed":  # [k, B]: per sequence, past its last real position
            positions = torch.cat([positions, positions[-1:] + steps.unsqueeze(1)])
        else:  # [t]: a sequence of its own after the last real one
            positions = torch.cat([positions, steps - 1])
            seq_ids = torch.cat([seq_ids, (seq_ids[-1:] + 1).expand(extra)])
    pad = getattr(active, "pad", 0) + extra  # padding twice keeps the first pads counted
    padded = PaddedActiveTokens(active.layout, positions, seq_ids, active.kv_store, active.kv_role, pad)
    return hidden, rotary, padded
