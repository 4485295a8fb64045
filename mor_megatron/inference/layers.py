"""One megatron `TransformerLayer` on a flat batch of tokens, attending through a KV cache.

Two ways to run a layer, with the same weights and the same arithmetic:
- `layer_forward`: the layer's own submodules (input RMSNorm, fused QKV linear, RoPE at each
  token's absolute position, output projection, bias-dropout-add, pre-MLP RMSNorm, SwiGLU MLP),
  only the core attention replaced by attention over the cache. Works for every spec.
- `LeanLayer`: the same computation as plain torch ops on the layer's own weight tensors. A
  decode tick runs a handful of tokens through every layer, so it is bound by per-operator
  overhead, and megatron's module dispatch (autograd functions, process-group lookups per
  linear) costs several times the arithmetic there. Used where the layer is the Llama layer of
  the local spec at TP=1 (`lean_unsupported` says why not otherwise).
`decode_layer` picks one. Hidden states are megatron-shaped `[T, 1, D]`: T tokens of any rows,
each with its row and position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config
from torch import Tensor

from mor_megatron.inference.cache import RowGroups, row_groups

# attend(query [T, heads, hd], key [T, groups, hd], value [T, groups, hd]) -> [T, heads, hd]
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# layer(hidden [T, 1, D], batch, attend) -> [T, 1, D]
LayerFn = Callable[[Tensor, "TokenBatch", AttendFn], Tensor]


@dataclass
class TokenBatch:
    """Where the tokens of a flat batch sit: cache row, absolute position, RoPE frequencies
    (`rope`, megatron's form) and their cos/sin (`cos`, `sin` `[T, 1, rot_dim]`, mscale applied)."""

    rows: Tensor  # [T] long
    positions: Tensor  # [T] long
    rope: Tensor  # [T, 1, 1, rot_dim]
    cos: Tensor
    sin: Tensor
    _groups: Optional[RowGroups] = field(default=None, repr=False)

    def select(self, index: Tensor) -> "TokenBatch":
        return TokenBatch(self.rows[index], self.positions[index], self.rope[index], self.cos[index], self.sin[index])

    @property
    def groups(self) -> RowGroups:
        """The rows' grouping for the caches, computed once per batch."""
        if self._groups is None:
            self._groups = row_groups(self.rows)
        return self._groups

    @property
    def count(self) -> int:
        return self.rows.numel()


def softmax_scale(layer) -> float | None:
    """The scale the layer's core attention uses (None: 1/sqrt(head_dim))."""
    return getattr(layer.self_attention.core_attention, "softmax_scale", None)


def rope_mscale(config) -> float:
    """The factor megatron multiplies RoPE's cos/sin by (1 except for YaRN)."""
    return _yarn_get_concentration_factor_from_config(config)


def layer_forward(layer, hidden: Tensor, batch: TokenBatch, attend: AttendFn) -> Tensor:
    """`hidden` `[T, 1, D]` through one layer's own modules; `attend` does the cached attention."""
    attention = layer.self_attention
    config = layer.config
    residual = hidden
    normed = layer.input_layernorm(hidden)
    query, key, value = attention.get_query_key_value_tensors(normed, None)
    mscale = rope_mscale(config)
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


def lean_unsupported(layer) -> Optional[str]:
    """Why `LeanLayer` cannot run `layer` exactly (None: it can)."""
    config = layer.config
    attention, mlp = layer.self_attention, layer.mlp
    checks = (
        (config.tensor_model_parallel_size == 1, "tensor parallelism"),
        (isinstance(layer.input_layernorm, torch.nn.RMSNorm), "input norm is not torch RMSNorm"),
        (isinstance(layer.pre_mlp_layernorm, torch.nn.RMSNorm), "pre-MLP norm is not torch RMSNorm"),
        (type(attention.linear_qkv) is ColumnParallelLinear, "QKV linear is not megatron's local linear"),
        (type(mlp.linear_fc1) is ColumnParallelLinear, "FC1 is not megatron's local linear"),
        (type(attention.linear_proj) is RowParallelLinear, "output projection is not megatron's local linear"),
        (type(mlp.linear_fc2) is RowParallelLinear, "FC2 is not megatron's local linear"),
        (not config.add_bias_linear and not config.add_qkv_bias, "linear biases"),
        (not config.qk_layernorm, "QK layernorm"),
        (not getattr(config, "attention_output_gate", False), "attention output gate"),
        (not getattr(config, "multi_latent_attention", False), "multi-latent attention"),
        (config.gated_linear_unit and config.activation_func is F.silu, "MLP is not SwiGLU"),
        (not config.rotary_interleaved, "interleaved RoPE"),
        (not config.fp32_residual_connection, "fp32 residual connection"),
    )
    return next((reason for ok, reason in checks if not ok), None)


def rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (megatron's non-interleaved form) on `t` `[T, heads, hd]` with `cos`/`sin` `[T, 1, rot]`."""
    rot = cos.shape[-1]
    part, rest = (t, None) if rot == t.shape[-1] else (t[..., :rot], t[..., rot:])
    first, second = part.chunk(2, dim=-1)
    rotated = part * cos + torch.cat((-second, first), dim=-1) * sin
    return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


class LeanLayer:
    """`layer_forward` of a local-spec Llama layer as plain torch ops on the layer's own weights
    (the tensors themselves, so loading new weights into the model is seen here)."""

    def __init__(self, layer) -> None:
        reason = lean_unsupported(layer)
        if reason is not None:
            raise ValueError(f"LeanLayer cannot run this layer: {reason}")
        attention, mlp = layer.self_attention, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.pre_mlp_layernorm
        self.qkv = attention.linear_qkv.weight
        self.proj = attention.linear_proj.weight
        self.fc1, self.fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
        self.groups = attention.num_query_groups_per_partition
        self.heads = attention.num_attention_heads_per_partition
        self.head_dim = attention.hidden_size_per_attention_head
        per_group = self.heads // self.groups
        self.split = [per_group * self.head_dim, self.head_dim, self.head_dim]

    @staticmethod
    def _norm(norm: torch.nn.RMSNorm, x: Tensor) -> Tensor:
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)

    def __call__(self, hidden: Tensor, batch: TokenBatch, attend: AttendFn) -> Tensor:
        count = hidden.shape[0]
        mixed = F.linear(self._norm(self.norm1, hidden), self.qkv).view(count, self.groups, -1)
        query, key, value = mixed.split(self.split, dim=-1)
        query = rotate(query.reshape(count, self.heads, self.head_dim), batch.cos, batch.sin)
        key = rotate(key, batch.cos, batch.sin)
        context = attend(query, key, value)  # [T, heads, hd]
        hidden = hidden + F.linear(context.reshape(count, 1, -1), self.proj)
        gate, up = F.linear(self._norm(self.norm2, hidden), self.fc1).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate) * up, self.fc2)


def decode_layer(layer, lean: bool = True) -> LayerFn:
    """The fastest exact way to run `layer` over a token batch: `LeanLayer` where it applies
    (and `lean`), the layer's own modules otherwise."""
    if lean and lean_unsupported(layer) is None:
        return LeanLayer(layer)
    return functools.partial(layer_forward, layer)
