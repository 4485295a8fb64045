"""Core attention over a recursion step's active tokens on Transformer Engine (te backend, GPU).

Same constructor and forward contract as `attention.ActiveTokenAttention` (megatron's
`core_attention` slot, `ActiveTokens` in the `attention_mask` argument), with TE's fused
`DotProductAttention` underneath, used through megatron's `TEDotProductAttention` wrapper
(megatron/core/extensions/transformer_engine.py: GQA, TP group, RNG tracker, and the
`packed_seq_params` -> `qkv_format` / `cu_seqlens_*` / `max_seqlen_*` keyword mapping of
TE's `DotProductAttention.forward`, transformer_engine/pytorch/attention/dot_product_attention/
dot_product_attention.py). TE is imported in `__init__` only, so this module imports without it.

Layouts (TE's FP8 attention runs through cuDNN only, sbhd/bshd only, with no arbitrary mask):
- no `ActiveTokens` (unique layers) and dense `[k, B]` (expert-choice top-k) without KV sharing:
  sbhd with plain "causal". Tokens keep their original order, so causal-by-index is causal-by-
  position. FP8-capable (cuDNN, delayed-scaling attention recipe, head dim 128 for training).
- packed `[t, 1]` (token-choice, threshold routing): thd with `cu_seqlens` from `seq_ids`
  (sequences contiguous, tokens in order, see token_set.TokenSet.packed) and "padding_causal".
  TE has no FP8 thd attention, so under an FP8 attention recipe this call runs in BF16. A te
  decoder builds its variable steps packed (`MoRDecoder.varlen_layout`): thd is already varlen
  per sequence and runs no pads through the layers. The local backend's per-sequence padded
  layout (docs/DESIGN.md 4.1), should it reach this module, runs the local SDPA forward.
- recursive KV sharing, "read" role (queries: this step's active tokens; keys/values: step 1's).
  Chosen: scatter the active queries into a zero query tensor of full length, run plain causal
  attention against step 1's full-length keys and gather the active rows back. Why: it is exact
  (rows of inactive queries get dO = 0, so they add nothing to dK/dV), it stays on the fused
  cuDNN/flash kernels and is FP8-capable; the price is S/k_r more attention FLOPs, i.e. what
  step 1 pays anyway. The alternative, BF16 with an explicit position mask, means TE's
  "arbitrary" mask (unfused, a [b, h, k, S] score tensor) or a post-scale bias of b*k*S
  elements, never FP8. The scatter needs step 1's keys to cover the full [S, B] grid: true for
  dense expert-choice (config requires capacities[0] == 1 with share_first) and for token-choice
  (every token runs step 1). Where it is not (expert-choice threshold routing, packed and
  partial), the local SDPA code with its position mask is used (`ActiveTokenAttention.forward`).

FP8 alignment: a recursion step's tokens arrive padded to the FP8 multiple
(`precision.pad_active_tokens`, `PaddedActiveTokens.pad` rows at the tail); attention pads its own
full-length sequence dimension the same way (tail zeros under causal) when FP8 is on.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from mor_megatron.model.attention import ActiveTokenAttention, ActiveTokens
from mor_megatron.model.precision import fp8_align_size, pad_rows
from mor_megatron.model.token_set import TokenSet


def _build_te_attention(config, layer_number: int, attention_type: str, cp_comm_type,
                        softmax_scale, pg_collection):
    """megatron's TEDotProductAttention (imported here: the module must import without TE).
    The mask type given here is a default; every call passes its own."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention(
        config=config,
        layer_number=layer_number,
        attn_mask_type=AttnMaskType.causal,
        attention_type=attention_type,
        softmax_scale=softmax_scale,
        cp_comm_type=cp_comm_type,
        pg_collection=pg_collection,
    )


class TEActiveTokenAttention(ActiveTokenAttention):
    """TE fused attention over the active tokens described by an `ActiveTokens` mask argument
    (the local SDPA forward it inherits is the fallback for masks TE cannot express)."""

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
        super().__init__(config, layer_number, attn_mask_type, attention_type, cp_comm_type, softmax_scale,
                         pg_collection)
        self.align = fp8_align_size(config)
        self.te_attention = _build_te_attention(
            config, layer_number, attention_type, cp_comm_type, softmax_scale, pg_collection
        )
        # megatron's TEDotProductAttention.sharded_state_dict saves no `_extra_state`, so a dist
        # checkpoint has none to load: do not report it missing
        self.register_load_state_dict_post_hook(_ignore_missing_extra_state)

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
        if active is None:
            return self._causal_sbhd(query, key, value)
        if active.layout == "padded":  # the local backend's layout: a te decoder builds packed sets
            return super().forward(query, key, value, active)
        pad = getattr(active, "pad", 0)
        if active.kv_role == "read":
            return self._read(query, active, pad)
        if active.kv_role == "write":
            self._store(key, value, active, pad)
        if active.layout == "dense":
            return self._causal_sbhd(query, key, value)
        return self._packed_thd(query, key, value, active.seq_ids)

    # -- kernels ----------------------------------------------------------------------------

    def _align(self, x: Tensor, dim: int = 0) -> Tensor:
        """Tail zeros up to the FP8 multiple; under causal masking no real query sees them."""
        return pad_rows(x, (-x.shape[dim]) % self.align, dim)

    def _causal_sbhd(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Plain causal attention, `[s, b, h, d]` -> `[s, b, h * d]`."""
        count = query.shape[0]
        q, k, v = (self._align(t) for t in (query, key, value))
        return self.te_attention(q, k, v, None, attn_mask_type=AttnMaskType.causal)[:count]

    def _packed_thd(self, query: Tensor, key: Tensor, value: Tensor, seq_ids: Tensor) -> Tensor:
        """Causal within each sequence of a packed `[t, 1, h, d]` set -> `[t, 1, h * d]`."""
        counts = torch.unique_consecutive(seq_ids, return_counts=True)[1]
        cu_seqlens = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(counts.max())  # explicit, else TE syncs with the host itself
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=longest, max_seqlen_kv=longest,
        )
        with self._bf16_attention():
            out = self.te_attention(
                query.squeeze(1), key.squeeze(1), value.squeeze(1), None,
                attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=params,
            )
        return out.reshape(query.shape[0], 1, -1)

    def _bf16_attention(self) -> ContextManager:
        """TE has no FP8 attention for thd or arbitrary masks: run such calls in BF16 when the
        recipe asks for FP8 attention (a nested autocast(enabled=False), TE 2.9+ API)."""
        # fp8_mha alone turns FP8 attention on too: TE's DotProductAttention.forward forces
        # recipe.fp8_dpa=True when recipe.fp8_mha (attention/dot_product_attention/
        # dot_product_attention.py, TE 2.9-2.11); megatron's TEDelayedScaling sets fp8_mha from
        # config.fp8_multi_head_attention (megatron/core/extensions/transformer_engine.py)
        if not (self.config.fp8 and (self.config.fp8_dot_product_attention
                                     or self.config.fp8_multi_head_attention)):
            return nullcontext()
        # TE 2.9+: `fp8_autocast` is deprecated (a DeprecationWarning per call) in favour of
        # `autocast` (transformer_engine/pytorch/quantization.py)
        from transformer_engine.pytorch import autocast

        return autocast(enabled=False)

    # -- recursive KV sharing ---------------------------------------------------------------

    def _store(self, key: Tensor, value: Tensor, active: ActiveTokens, pad: int) -> None:
        """Step 1: keep keys/values in the local backend's format (the fallback reads it) and
        the [B, S] grid they cover, if the read steps can scatter into it."""
        positions = active.positions.t() if active.layout == "dense" else active.positions
        active.kv_store[self] = (key, value, positions, active.seq_ids)
        grid = None
        if active.layout == "packed" and self.config.router == "token_choice":
            # every token runs step 1: [B * S] tokens, sequence after sequence
            real = key.shape[0] - pad
            last_seq, last_pos = torch.stack(
                [active.seq_ids[real - 1], active.positions[real - 1]]
            ).tolist()
            if (last_seq + 1) * (last_pos + 1) == real:
                grid = (last_seq + 1, last_pos + 1)
        active.kv_store[(self, "grid")] = grid

    def _read(self, query: Tensor, active: ActiveTokens, pad: int) -> Tensor:
        """Later steps: active queries against step 1's keys, masked by original position."""
        key, value = active.kv_store[self][:2]
        grid = active.kv_store[(self, "grid")]
        real = query.shape[0] - pad  # pads take no part and get zero outputs
        positions = active.positions[:real]
        if active.layout == "dense":
            out = self._read_dense(query[:real], positions, key, value)
        elif grid is not None:
            out = self._read_grid(query[:real], positions, active.seq_ids[:real], key, value, grid)
        else:  # step 1 did not cover the grid: the local backend's explicit position mask
            trimmed = ActiveTokens(active.layout, positions, active.seq_ids[:real], active.kv_store, "read")
            out = super().forward(query[:real], key, value, trimmed)
        return pad_rows(out, pad)

    def _read_dense(self, query: Tensor, positions: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """`[k, B, h, d]` queries at `positions [k, B]`; keys `[L, B, g, d]` with row = position."""
        tokens = TokenSet.dense(positions)
        k, batch, heads, dim = query.shape
        full = tokens.scatter(query.new_zeros(key.shape[0], batch, heads * dim), query.reshape(k, batch, -1))
        return tokens.gather(self._causal_sbhd(full.view(-1, batch, heads, dim), key, value))

    def _read_grid(
        self, query: Tensor, positions: Tensor, seq_ids: Tensor, key: Tensor, value: Tensor,
        grid: tuple[int, int],
    ) -> Tensor:
        """Packed `[t, 1, h, d]` queries; step-1 keys `[B * S, 1, g, d]` seen as bshd `[B, S]`."""
        batch, length = grid
        heads, dim = query.shape[2:]
        flat = seq_ids * length + positions
        q = query.new_zeros((batch * length, heads, dim)).index_copy(0, flat, query[:, 0])
        q = q.view(batch, length, heads, dim)
        k, v = (t[: batch * length].reshape(batch, length, *t.shape[2:]) for t in (key, value))
        q, k, v = (self._align(t, dim=1) for t in (q, k, v))
        out = self.te_attention(
            q, k, v, None, attn_mask_type=AttnMaskType.causal,
            packed_seq_params=PackedSeqParams(qkv_format="bshd"),
        )
        return out[:, :length].reshape(batch * length, -1)[flat].unsqueeze(1)


def _ignore_missing_extra_state(module: torch.nn.Module, incompatible_keys) -> None:
    """A load_state_dict post-hook: drop `te_attention._extra_state` from the missing keys."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.endswith("te_attention._extra_state")]
