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

from mor_megatron.config import ConfigError
from mor_megatron.inference.cache import RowGroups, row_groups

# attend(query [T, heads, hd], key [T, groups, hd], value [T, groups, hd]) -> [T, heads, hd]
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# layer(hidden [T, 1, D], batch, attend) -> [T, 1, D]
LayerFn = Callable[[Tensor, "TokenBatch", AttendFn], Tensor]


@dataclass
class TokenBatch:
    """Where the tokens of a flat batch sit: cache row, absolute position, and RoPE's cos/sin
    (`cos`, `sin` `[T, 1, rot_dim]`, mscale applied); `rope`, megatron's form of the frequencies,
    is gathered from `rope_table` only when asked (the lean layers never do)."""

    rows: Tensor  # [T] long
    positions: Tensor  # [T] long
    rope_table: Tensor  # [max_seq, 1, 1, rot_dim]
    cos: Tensor
    sin: Tensor
    _groups: Optional[RowGroups] = field(default=None, repr=False)

    def select(self, index: Tensor) -> "TokenBatch":
        return TokenBatch(self.rows[index], self.positions[index], self.rope_table, self.cos[index], self.sin[index])

    @property
    def rope(self) -> Tensor:
        """`[T, 1, 1, rot_dim]`"""
        return self.rope_table[self.positions]

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


def lean_qkv(
    hidden: Tensor, norm: Tensor, eps: Optional[float], qkv: Tensor, cos: Tensor, sin: Tensor,
    groups: int, heads: int, split: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """Input RMSNorm, fused QKV linear, RoPE: `[T, 1, D]` -> query `[T, heads, hd]`, key and value
    `[T, groups, hd]`. Weights are arguments, so one compiled graph serves every layer."""
    count = hidden.shape[0]
    normed = F.rms_norm(hidden, (norm.shape[0],), norm, eps)
    query, key, value = F.linear(normed, qkv).view(count, groups, -1).split(split, dim=-1)
    return rotate(query.reshape(count, heads, -1), cos, sin), rotate(key, cos, sin), value


def lean_out(
    hidden: Tensor, context: Tensor, proj: Tensor, norm: Tensor, eps: Optional[float], fc1: Tensor, fc2: Tensor
) -> Tensor:
    """Output projection and residual, pre-MLP RMSNorm, SwiGLU MLP and residual."""
    hidden = hidden + F.linear(context.reshape(context.shape[0], 1, -1), proj)
    gate, up = F.linear(F.rms_norm(hidden, (norm.shape[0],), norm, eps), fc1).chunk(2, dim=-1)
    return hidden + F.linear(F.silu(gate) * up, fc2)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, backend: str) -> Callable:
    """`fn` under `torch.compile` (one wrapper per backend, shared by every layer and model).
    Token counts vary between prefill and decode ticks: dynamo's automatic dynamic shapes make
    the count symbolic at its second value, so a run compiles at most two graphs per function."""
    return torch.compile(fn, backend=backend)


class LeanLayer:
    """`layer_forward` of a local-spec Llama layer as plain torch ops on the layer's own weights
    (the tensors themselves, so loading new weights into the model is seen here). compile: a
    `torch.compile` backend for the math around the cached attention (None: eager)."""

    def __init__(self, layer, compile: Optional[str] = None) -> None:
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
        self._qkv = compiled(lean_qkv, compile) if compile else lean_qkv
        self._out = compiled(lean_out, compile) if compile else lean_out

    def __call__(self, hidden: Tensor, batch: TokenBatch, attend: AttendFn) -> Tensor:
        n1, n2 = self.norm1, self.norm2
        query, key, value = self._qkv(hidden, n1.weight, n1.eps, self.qkv, batch.cos, batch.sin, self.groups,
                                      self.heads, self.split)
        context = attend(query, key, value)  # [T, heads, hd]
        return self._out(hidden, context, self.proj, n2.weight, n2.eps, self.fc1, self.fc2)


def decode_layer(layer, lean: bool = True, compile: Optional[str] = None) -> LayerFn:
    """The fastest exact way to run `layer` over a token batch: `LeanLayer` where it applies
    (and `lean`), the layer's own modules otherwise. compile: see `LeanLayer` (needs lean)."""
    reason = lean_unsupported(layer) if lean else "lean=False"
    if reason is None:
        return LeanLayer(layer, compile)
    if compile:
        raise ConfigError(f"compiled decoding runs the lean decode layers, which cannot run this model ({reason}): "
                          "decode it without compile")
    return functools.partial(layer_forward, layer)
