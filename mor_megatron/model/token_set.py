"""The tokens a recursion step runs on: gather from and scatter into the `[S, B, D]` residual stream.

Three layouts, all keeping tokens in original order so causal masking stays correct
(docs/DESIGN.md 4.1):
- dense  `[k, B, D]`: the same k tokens per sequence (expert-choice top-k); indices `[k, B]`.
- padded `[m, B, D]`: any subset (token-choice, threshold routing), per sequence its active tokens
  then pads up to m, the largest count of the step; the local (SDPA) backend's variable layout.
- packed `[t, 1, D]`: any subset, sequence after sequence; the Transformer Engine backend's
  variable layout (thd with `cu_seqlens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor

from mor_megatron.kernels import gated_scatter_add, stream_rows
from mor_megatron.model.attention import ActiveTokens

LAYOUTS = ("dense", "padded", "packed")


@dataclass
class TokenSet:
    layout: str
    index: Tensor  # dense, padded: [k, B] rows of each column; packed: [t] flat indices into [S * B]
    positions: Tensor  # original positions, dense: [k, B]; padded: [m, B], pads past S; packed: [t]
    seq_ids: Optional[Tensor] = None  # packed: [t]
    valid: Optional[Tensor] = None  # padded: [m, B], False at pads

    @classmethod
    def dense(cls, index: Tensor) -> "TokenSet":
        return cls("dense", index, index)

    @classmethod
    def packed(cls, mask: Tensor) -> "TokenSet":
        """From a `[S, B]` boolean mask; tokens ordered by (sequence, position)."""
        seq, pos = mask.t().nonzero(as_tuple=True)
        return cls("packed", pos * mask.shape[1] + seq, pos, seq)

    @classmethod
    def padded(cls, mask: Tensor, multiple: int = 1) -> "TokenSet":
        """From a `[S, B]` boolean mask: per sequence its active tokens in order, then pads, up to
        m rows, the largest active count rounded up to `multiple` (at most S).

        A pad row gathers one of its sequence's inactive tokens (a real, finite row: no NaN can
        start there) and has position S + row, after every real one: causal-by-index is then
        causal-by-position and no real query ever sees a pad key (docs/DESIGN.md 4.1)."""
        length = mask.shape[0]
        counts = mask.sum(0)  # [B]
        # the one host sync of this layout, its size (the packed layout's nonzero syncs too)
        rows = int(counts.max())
        if rows:
            rows = min(length, -(-rows // multiple) * multiple)
        # each token's row: active ones first (rank among active), then inactive ones
        active_rank = mask.cumsum(0) - 1
        inactive_rank = counts + (~mask).cumsum(0) - 1
        row = torch.where(mask, active_rank, inactive_rank)
        position = torch.arange(length, device=mask.device).unsqueeze(1).expand_as(row)
        index = torch.empty_like(row).scatter_(0, row, position)[:rows]
        step = torch.arange(rows, device=mask.device).unsqueeze(1)
        valid = step < counts
        return cls("padded", index, torch.where(valid, index, length + step), valid=valid)

    @property
    def count(self) -> int:
        """Rows the block runs on (pads included)."""
        return self.index.numel()

    @cached_property
    def rows(self) -> Tensor:
        """Each token's row in the `[S * B, D]` view of the stream, in this set's order: tokens
        move as whole rows (`index_select`, `index_add`, `index_copy`), not through an index
        expanded over D (`kernels.stream_rows`)."""
        return self.index if self.layout == "packed" else stream_rows(self.index)

    def _shape(self) -> tuple[int, int]:
        """This set's `[rows, columns]`: `[k, B]` / `[m, B]`, packed `[t, 1]`."""
        return tuple(self.index.shape) if self.layout != "packed" else (self.index.shape[0], 1)

    def gather(self, hidden: Tensor) -> Tensor:
        """`[S, B, D]` -> the active tokens in this set's layout."""
        width = hidden.shape[-1]
        return hidden.reshape(-1, width).index_select(0, self.rows).view(*self._shape(), width)

    def gather_values(self, values: Tensor) -> Tensor:
        """A per-token `[S, B]` tensor (gates, logits) -> this set's layout without the D axis."""
        return values.reshape(-1).index_select(0, self.rows).view(self._shape())

    def gated_scatter_add(self, hidden: Tensor, gate: Tensor, update: Tensor, backend: str = "auto") -> Tensor:
        """Out of place: `hidden` plus `gate * update` at this set's tokens (the MoR residual update).

        Dense and padded sets use the fused kernel (`mor_megatron.kernels.gated_scatter_add`:
        Triton on CUDA, its PyTorch reference elsewhere, or as `backend` forces); a pad adds
        exactly 0 to its (inactive) row, its gate being 0."""
        if self.layout != "packed":
            if self.index.shape[0] == 0:
                return hidden
            if self.valid is not None:
                gate = gate.masked_fill(~self.valid, 0.0)
            return gated_scatter_add(hidden, self.index, gate, update, backend=backend)
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat = flat.index_add(0, self.index, (gate.unsqueeze(-1) * update).squeeze(1))
        return flat.view_as(hidden)

    def scatter(self, hidden: Tensor, update: Tensor) -> Tensor:
        """Out of place: `hidden` with this set's tokens replaced by `update` (a pad writes its
        row's own value back)."""
        if self.valid is not None:
            update = torch.where(self.valid.unsqueeze(-1), update, self.gather(hidden))
        width = hidden.shape[-1]
        flat = hidden.reshape(-1, width).index_copy(0, self.rows, update.reshape(-1, width))
        return flat.view_as(hidden)

    def rotary(self, freqs: Optional[Tensor]) -> Optional[Tensor]:
        """RoPE frequencies `[S, 1, 1, d]` at the rows' stream positions (a pad: its gathered row's)."""
        if freqs is None:
            return None
        per_position = freqs[:, 0]  # [S, 1, d]
        positions = self.positions if self.layout == "packed" else self.index  # a pad: its gathered row's
        return per_position.index_select(0, positions.reshape(-1)).view(*self._shape(), *per_position.shape[1:])

    def attention_context(self, kv_store: dict, kv_role: str) -> ActiveTokens:
        return ActiveTokens(self.layout, self.positions, self.seq_ids, kv_store, kv_role)
