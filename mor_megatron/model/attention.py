"""Core attention over a recursion step's active tokens (megatron `core_attention` slot).

Megatron's `SelfAttention` computes q/k/v (with RoPE already applied at the positions the caller
gathered) and hands them here together with its `attention_mask` argument. MoR layers pass an
`ActiveTokens` object through that argument, which says how the tokens are laid out:

- dense  `[k, B]`: every sequence keeps the same number of tokens (expert-choice top-k). Tokens
  are in original order, so causal-by-index is causal-by-position: plain causal attention.
- padded `[m, B]`: a variable number of tokens per sequence (token-choice, threshold routing),
  each sequence's active tokens in order, then pads with positions past every real one: the
  same plain causal attention per sequence, and no real query sees a pad (docs/DESIGN.md 4.1).
  Costs B x m^2, not (B x m)^2, and needs no mask (SDPA's fused kernels).
- packed `[t, 1]`: a variable number of tokens per sequence, sequences one after another (the te
  backend's thd layout); here attention is causal within each sequence by a `[t, t]` mask, the
  te backend's fallback only.

With recursive KV sharing (`kv_role`), step 1 stores its keys/values and later steps attend from
their active queries to those stored keys, masked by original position.

This is the local (SDPA) backend; it runs on CPU and GPU alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.module import MegatronModule


@dataclass
class ActiveTokens:
    """Layout of the tokens a shared layer sees at one recursion step.

    positions: original positions, `[k, B]` (dense), `[m, B]` (padded: pads past S) or `[t]`
               (packed).
    seq_ids:   packed only, `[t]`, which sequence of the micro-batch each token belongs to.
    kv_store:  one dict per forward, shared by its recursion steps, for recursive KV sharing;
               a layer sees its own sub-dict (`for_layer`).
    kv_role:   "none" (recursion-wise caching), "write" (step 1 of KV sharing) or "read".
    """

    layout: str
    positions: Tensor
    seq_ids: Optional[Tensor] = None
    kv_store: dict = field(default_factory=dict)
    kv_role: str = "none"

    def for_layer(self, key) -> "ActiveTokens":
        """This context with the store of layer `key` only: every layer then sees the same store
        structure (empty when writing, its own entry when reading), so a compiled layer's
        guards hold at every layer and one graph serves them all (`parallel/compile.py`). A write
        starts a fresh store, so an activation recompute's write also meets an empty one (the
        reads of later steps have recomputed before it, from the store they were given)."""
        if self.kv_role == "write":
            self.kv_store[key] = {}
        return dataclasses.replace(self, kv_store=self.kv_store.setdefault(key, {}))


def _mask_by_position(
    q_pos: Tensor, k_pos: Tensor, q_seq: Optional[Tensor], k_seq: Optional[Tensor]
) -> Tensor:
    """Boolean attend-mask: a key is visible when at or before the query (and in its sequence)."""
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if q_seq is not None:
        mask &= q_seq.unsqueeze(-1) == k_seq.unsqueeze(-2)
    return mask


class ActiveTokenAttention(MegatronModule):
    """Causal SDPA over the active tokens described by an `ActiveTokens` mask argument."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> Tensor:
        """query `[sq, b, np, hn]`, key/value `[sk, b, ng, hn]` -> `[sq, b, np * hn]`."""
        active = attention_mask if isinstance(attention_mask, ActiveTokens) else None
        mask = None
        if active is not None:
            # dense / padded positions are [s, B]: batch first so the mask comes out [B, sq, sk]
            q_pos = active.positions if active.layout == "packed" else active.positions.t()
            k_pos, k_seq = q_pos, active.seq_ids
            if active.kv_role == "write":
                active.kv_store[self] = (key, value, k_pos, k_seq)
            elif active.kv_role == "read":
                key, value, k_pos, k_seq = active.kv_store[self]
            if active.kv_role == "read" or active.layout == "packed":
                mask = _mask_by_position(q_pos, k_pos, active.seq_ids, k_seq)
                # every real query sees at least itself; a tail alignment pad
                # (`precision.pad_active_tokens`) reading stored keys may see none, which would
                # make NaNs in its (sliced-off) row and their backward: it sees all keys instead.
                # Tested on the mask, not on the pad count, which a compiled layer would guard on
                mask = mask | ~mask.any(-1, keepdim=True)
                if active.layout != "packed":  # [B, 1, sq, sk]: at most B x S^2 elements
                    mask = mask.unsqueeze(1)
        sq, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
