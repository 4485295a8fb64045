"""The tokens a recursion step runs on: gather from and scatter into the `[S, B, D]` residual stream.

Two layouts, both keeping tokens in original order so causal masking stays correct:
- dense  `[k, B, D]`: the same k tokens per sequence (expert-choice top-k); indices `[k, B]`.
- packed `[t, 1, D]`: any subset (token-choice, threshold routing), sequence after sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from mor_megatron.kernels import gated_scatter_add
from mor_megatron.model.attention import ActiveTokens


@dataclass
class TokenSet:
    layout: str
    index: Tensor  # dense: [k, B] positions; packed: [t] flat indices into [S * B]
    positions: Tensor  # dense: [k, B]; packed: [t]
    seq_ids: Optional[Tensor] = None  # packed: [t]

    @classmethod
    def dense(cls, index: Tensor) -> "TokenSet":
        return cls("dense", index, index)

    @classmethod
    def packed(cls, mask: Tensor) -> "TokenSet":
        """From a `[S, B]` boolean mask; tokens ordered by (sequence, position)."""
        seq, pos = mask.t().nonzero(as_tuple=True)
        return cls("packed", pos * mask.shape[1] + seq, pos, seq)

    @property
    def count(self) -> int:
        return self.index.numel()

    def gather(self, hidden: Tensor) -> Tensor:
        """`[S, B, D]` -> the active tokens in this set's layout."""
        if self.layout == "dense":
            return hidden.gather(0, self.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return hidden.reshape(-1, hidden.shape[-1])[self.index].unsqueeze(1)

    def gather_values(self, values: Tensor) -> Tensor:
        """A per-token `[S, B]` tensor (gates, logits) -> this set's layout without the D axis."""
        if self.layout == "dense":
            return values.gather(0, self.index)
        return values.reshape(-1)[self.index].unsqueeze(1)

    def gated_scatter_add(self, hidden: Tensor, gate: Tensor, update: Tensor, backend: str = "auto") -> Tensor:
        """Out of place: `hidden` plus `gate * update` at this set's tokens (the MoR residual update).

        Dense sets use the fused kernel (`mor_megatron.kernels.gated_scatter_add`: Triton on CUDA, its PyTorch
        reference elsewhere, or as `backend` forces)."""
        if self.layout == "dense":
            return gated_scatter_add(hidden, self.index, gate, update, backend=backend)
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat = flat.index_add(0, self.index, (gate.unsqueeze(-1) * update).squeeze(1))
        return flat.view_as(hidden)

    def scatter(self, hidden: Tensor, update: Tensor) -> Tensor:
        """Out of place: `hidden` with this set's tokens replaced by `update`."""
        if self.layout == "dense":
            index = self.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            return hidden.scatter(0, index, update)
        flat = hidden.reshape(-1, hidden.shape[-1]).index_copy(0, self.index, update.squeeze(1))
        return flat.view_as(hidden)

    def rotary(self, freqs: Optional[Tensor]) -> Optional[Tensor]:
        """RoPE frequencies `[S, 1, 1, d]` at the tokens' original positions."""
        if freqs is None:
            return None
        per_position = freqs[:, 0]  # [S, 1, d]
        if self.layout == "dense":
            return per_position[self.positions]  # [k, B, 1, d]
        return per_position[self.positions].unsqueeze(1)  # [t, 1, 1, d]

    def attention_context(self, kv_store: dict, kv_role: str) -> ActiveTokens:
        return ActiveTokens(self.layout, self.positions, self.seq_ids, kv_store, kv_role)
