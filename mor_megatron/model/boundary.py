"""The routing state that flows from one unit (`rules.Unit`) to the next, and its stage-boundary form.

Pipeline stages take contiguous runs of units; the state a unit leaves for the next one (hidden
states plus the routing state) is what crosses a stage boundary, packed into one tensor
`[S, B, H + extra]` because megatron's p2p sends a single tensor per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mor_megatron.config import MoRConfig

# Token-choice depth channel before recursion 1 has decided anything (real depths are >= 0).
UNDECIDED_DEPTH = -1.0
# Expert-choice candidate channel: 1.0 for a candidate, 0.0 otherwise; read back as > 0.5 so any
# dtype the boundary travels in (bf16 included) rounds to the right side.
CANDIDATE_CUT = 0.5


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
        zeros[..., -1] = UNDECIDED_DEPTH
        return torch.cat([hidden, zeros], dim=-1)
    extras = [state.h1, state.gate.unsqueeze(-1), state.depth.to(hidden.dtype).unsqueeze(-1)]
    return torch.cat([hidden] + extras, dim=-1)


def unpack_state(packed: Tensor, config: MoRConfig) -> RoutingState:
    size = config.hidden_size
    hidden = packed[..., :size]
    if config.router == "expert_choice":
        return RoutingState(hidden, candidates=packed[..., size] > CANDIDATE_CUT)
    if config.router == "token_choice":
        depth = packed[..., -1].detach().round().long()
        if (depth == UNDECIDED_DEPTH).all():
            return RoutingState(hidden)
        return RoutingState(
            hidden, h1=packed[..., size : 2 * size], depth=depth, gate=packed[..., 2 * size]
        )
    return RoutingState(packed)
