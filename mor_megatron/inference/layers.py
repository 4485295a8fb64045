"""One megatron `TransformerLayer` on a flat batch of tokens, attending through a KV cache.

The layer's own submodules run (input RMSNorm, fused QKV linear, RoPE at each token's absolute
position, output projection, bias-dropout-add, pre-MLP RMSNorm, SwiGLU MLP), so the weights and
the arithmetic are the training model's; only the core attention is replaced by attention over
the cache (TP=1, one process). Hidden states are megatron-shaped `[T, 1, D]`: T tokens of any
rows, each with its row and position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config
from torch import Tensor

# attend(query [T, heads, hd], key [T, groups, hd], value [T, groups, hd]) -> [T, heads, hd]
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class TokenBatch:
    """Where the tokens of a flat batch sit: cache row, absolute position, RoPE frequencies."""

    rows: Tensor  # [T] long
    positions: Tensor  # [T] long
    rope: Tensor  # [T, 1, 1, rot_dim]

    def select(self, index: Tensor) -> "TokenBatch":
        return TokenBatch(self.rows[index], self.positions[index], self.rope[index])

    @property
    def count(self) -> int:
        return self.rows.numel()


def softmax_scale(layer) -> float | None:
    """The scale the layer's core attention uses (None: 1/sqrt(head_dim))."""
    return getattr(layer.self_attention.core_attention, "softmax_scale", None)


def layer_forward(layer, hidden: Tensor, batch: TokenBatch, attend: AttendFn) -> Tensor:
    """`hidden` `[T, 1, D]` through one layer; `attend` does the cached attention."""
    attention = layer.self_attention
    config = layer.config
    residual = hidden
    normed = layer.input_layernorm(hidden)
    query, key, value = attention.get_query_key_value_tensors(normed, None)
    mscale = _yarn_get_concentration_factor_from_config(config)
    cp_group = attention.pg_collection.cp
    query = apply_rotary_pos_emb(query, batch.rope, config=config, mscale=mscale, cp_group=cp_group)
    key = apply_rotary_pos_emb(key, batch.rope, config=config, mscale=mscale, cp_group=cp_group)
    context = attend(query[:, 0], key[:, 0], value[:, 0])  # [T, heads, hd]
    projected = attention.linear_proj(context.reshape(context.shape[0], 1, -1))
    fused = config.bias_dropout_fusion
    hidden = layer.self_attn_bda(False, fused)(projected, residual, layer.hidden_dropout)
    residual = hidden
    mlp_out = layer.mlp(layer.pre_mlp_layernorm(hidden))
    return layer.mlp_bda(False, fused)(mlp_out, residual, layer.hidden_dropout)
