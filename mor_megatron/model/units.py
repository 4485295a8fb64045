"""The decoder as a list of units, and the routing state that flows between them.

A unit is one unique layer run on every token, or one recursion step (router + shared block on the
step's active tokens). Pipeline stages take contiguous runs of units; the state a unit leaves for
the next one (hidden states plus the routing state) is what crosses a stage boundary, packed into
one tensor `[S, B, H + extra]` because megatron's p2p sends a single tensor per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mor_megatron.config import MoRConfig


@dataclass(frozen=True)
class Unit:
    kind: str  # "layer" or "recursion"
    index: int  # unique layer index, or 0-based recursion step


def decoder_units(config: MoRConfig) -> list[Unit]:
    """All units of the model in execution order."""
    plan = config.recursion_plan
    if config.router == "none":
        return [Unit("layer", index) for index in plan.unrolled]
    return (
        [Unit("layer", index) for index in plan.prefix]
        + [Unit("recursion", step) for step in range(plan.num_recursions)]
        + [Unit("layer", index) for index in plan.suffix]
    )


def unit_layers(config: MoRConfig, units: list[Unit]) -> list[int]:
    """Unique layer indices the units need, sorted."""
    plan = config.recursion_plan
    needed: set[int] = set()
    for unit in units:
        needed.update(plan.block if unit.kind == "recursion" else (unit.index,))
    return sorted(needed)


@dataclass
class RoutingState:
    """What a unit hands to the next: the residual stream and the routing decisions so far.

    expert-choice: `candidates` [S, B] bool, tokens selected at the previous step.
    token-choice:  `h1` (stream entering recursion 1), `depth` [S, B] (0-based), `gate` [S, B];
                   `hidden` is then F_r(h1), the running state of the tokens still recursing.
    """

    hidden: Tensor
    candidates: Optional[Tensor] = None
    h1: Optional[Tensor] = None
    depth: Optional[Tensor] = None
    gate: Optional[Tensor] = None


def extra_channels(config: MoRConfig) -> int:
    """Channels beyond `hidden_size` that a stage boundary carries."""
    if config.router == "expert_choice":
        return 1
    if config.router == "token_choice":
        return config.hidden_size + 2
    return 0


def pack_state(state: RoutingState, config: MoRConfig) -> Tensor:
    if config.router == "none":
        return state.hidden
    hidden = state.hidden
    if config.router == "expert_choice":
        candidates = state.candidates
        if candidates is None:
            candidates = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return torch.cat([hidden, candidates.to(hidden.dtype).unsqueeze(-1)], dim=-1)
    if state.h1 is None:  # boundary before recursion 1: nothing decided yet
        zeros = hidden.new_zeros(hidden.shape[:2] + (config.hidden_size + 2,))
        zeros[..., -1] = -1.0
        return torch.cat([hidden, zeros], dim=-1)
    extras = [state.h1, state.gate.unsqueeze(-1), state.depth.to(hidden.dtype).unsqueeze(-1)]
    return torch.cat([hidden] + extras, dim=-1)


def unpack_state(packed: Tensor, config: MoRConfig) -> RoutingState:
    size = config.hidden_size
    hidden = packed[..., :size]
    if config.router == "expert_choice":
        return RoutingState(hidden, candidates=packed[..., size] > 0.5)
    if config.router == "token_choice":
        depth = packed[..., -1].detach().round().long()
        if (depth < 0).all():
            return RoutingState(hidden)
        return RoutingState(
            hidden, h1=packed[..., size : 2 * size], depth=depth, gate=packed[..., 2 * size]
        )
    return RoutingState(packed)
