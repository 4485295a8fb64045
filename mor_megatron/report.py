"""Analytic accounting of a MoR model: parameters, FLOPs and KV-cache bytes per token.

Everything is computed from the config alone (no model is built).

Parameters. One layer: qkv D*(H+2G)*hd, output projection H*hd*D, fc1 D*ffn (x2 with SwiGLU),
fc2 ffn*D, two RMSNorm weights of D (biases added when `add_bias_linear`). The decoder owns its
unique layers plus the final norm D; routers add Nr*D (expert-choice, x2 with the auxiliary
router) or D*Nr (token-choice). Embedding V*D, counted once when tied to the LM head (an untied
LM head adds another V*D to the embedding count). D = hidden size, H heads, G query groups,
hd head dim, V vocab, S = `seq_length`.

Forward FLOPs per token, the paper's forward-only accounting (2 x weights + causal attention):
- matmuls: 2 x the matmul weights of each unrolled layer, weighted by the fraction of tokens that
  run it. Unique (prefix/suffix) layers see all tokens; the shared block at recursion step r sees
  f_r = k_r / S with k_r = `capacity_tokens(S)[r]`. Without a router every unrolled layer sees all
  tokens. Token-choice, analytic: balanced routing assumed, every sequence sending k_r tokens
  through step r, so the same capacities and no padding (the padded layout's m = k_r,
  docs/DESIGN.md 4.1; compile's bucket rounding is not counted). As run: `fractions` gives f_r
  measured, the rows the block ran on over B x S, pads included (`router/r{r}/run_tokens`, which
  the trainer's FLOPs and MFU use); a step's attention then counts f_r x S tokens per sequence
  (exact for the padded layout, the per-sequence mean for the packed one).
- LM head: 2*D*V.
- attention: a layer where n query tokens attend causally among themselves costs
  QK^T + AV = 2 * 2*H*hd * n(n+1)/2 FLOPs per sequence, divided by S per token. Unique layers use
  n = S; recursion-wise caching uses n = k_r at step r. With `share_first` KV sharing step 1 is
  causal over its k_1 tokens and a later step r has k_r queries attending (S+1)/2 keys on average.
- routers: 2*D*outputs per routed token. Expert-choice step r scores its candidates (the k_{r-1}
  tokens selected at step r-1, all S at step 1), twice with the auxiliary router; token-choice
  scores every token once with Nr outputs.
Training FLOPs = 3 x forward (backward = 2 x forward).

KV-cache bytes per token (bf16, 2 bytes per value): a layer stores K and V, 2*G*hd*2 bytes, for
each token it caches. Unique layers cache every token; with recursion-wise caching the shared
block caches the fraction k_r/S at each step; with `share_first` it caches step 1 only. Without a
router every unrolled layer caches every token. The vanilla model caches L full layers.

`model_report` adds the same figures for the vanilla model of the same shape (same width, heads
and FFN; no sharing, L unique layers) and the MoR / vanilla ratios.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from mor_megatron.config import MoRConfig

KV_BYTES_PER_VALUE = 2  # bf16
# what the FLOPs assume of the routing (module docstring); the trainer counts the rows as run
FLOPS_ROUTING = {
    "none": "every layer runs every token",
    "expert_choice": "top-k: k_r tokens of every sequence at step r",
    "token_choice": "balanced: k_r tokens of every sequence at step r, hence no padding",
}
FIGURES = (
    "effective_layers",
    "unique_layers",
    "non_embedding_params",
    "embedding_params",
    "forward_flops_per_token",
    "training_flops_per_token",
    "kv_cache_bytes_per_token",
)


# -- parameters ------------------------------------------------------------------------------------


def layer_matmul_params(config: MoRConfig) -> int:
    """Weights of one layer's four linears (qkv, output projection, fc1, fc2)."""
    d, hd, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    fc1_out = ffn * (2 if config.gated_linear_unit else 1)
    return d * (heads + 2 * groups) * hd + heads * hd * d + d * fc1_out + ffn * d


def _norm_params(config: MoRConfig) -> int:
    return config.hidden_size * (1 if config.normalization == "RMSNorm" else 2)


def layer_params(config: MoRConfig) -> int:
    """All parameters of one transformer layer: linears, their biases and the two norms."""
    params = layer_matmul_params(config) + 2 * _norm_params(config)
    if config.add_bias_linear:
        d, hd, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
        groups = config.num_query_groups or config.num_attention_heads
        fc1_out = ffn * (2 if config.gated_linear_unit else 1)
        params += (config.num_attention_heads + 2 * groups) * hd + d + fc1_out + d
    return params


def router_params(config: MoRConfig) -> int:
    """Expert-choice: Nr Linear(D->1) (+ as many auxiliary ones); token-choice: Linear(D->Nr)."""
    d, nr = config.hidden_size, config.num_recursions
    if config.router == "expert_choice":
        return nr * d * (2 if config.aux_router else 1)
    if config.router == "token_choice":
        return d * nr
    return 0


def non_embedding_params(config: MoRConfig) -> int:
    """Unique layers, final norm and routers."""
    return config.num_layers * layer_params(config) + _norm_params(config) + router_params(config)


def embedding_params(config: MoRConfig) -> int:
    """Input embedding V*D, plus the LM head when it is not tied to it."""
    table = config.vocab_size * config.hidden_size
    return table if config.tie_embeddings else 2 * table


# -- FLOPs -----------------------------------------------------------------------------------------


def step_fractions(config: MoRConfig) -> list[float]:
    """Fraction of a sequence's tokens the shared block runs on at each recursion step."""
    if config.router == "none":
        return [1.0] * config.num_recursions
    seq = config.seq_length
    return [k / seq for k in config.capacity_tokens(seq)]


def causal_attention_flops(config: MoRConfig, queries: int, keys_per_query: float) -> float:
    """QK^T + AV FLOPs of one layer for one sequence: 2 matmuls x 2 FLOPs x H*hd per query-key."""
    return 2 * 2 * config.num_attention_heads * config.head_dim * queries * keys_per_query


def _self_causal(config: MoRConfig, n: int) -> float:
    """n tokens attending causally among themselves: n(n+1)/2 query-key pairs."""
    return causal_attention_flops(config, n, (n + 1) / 2)


def _block_fractions(config: MoRConfig, fractions: Optional[Sequence[float]]) -> list[float]:
    """Per recursion step, the fraction of token slots the shared block runs: as run, when
    given (routed models only), else the analytic `step_fractions`."""
    if fractions is None or config.router == "none":
        return step_fractions(config)
    if len(fractions) != config.num_recursions:
        raise ValueError(f"{len(fractions)} step fractions for {config.num_recursions} recursion steps")
    return [float(f) for f in fractions]


def _block_attention_per_sequence(config: MoRConfig, fractions: Optional[Sequence[float]] = None) -> float:
    seq = config.seq_length
    ks = config.capacity_tokens(seq) if config.router != "none" else [seq] * config.num_recursions
    if fractions is not None and config.router != "none":
        ks = [f * seq for f in _block_fractions(config, fractions)]
    if config.kv_mode == "share_first" and config.router != "none":
        later = sum(causal_attention_flops(config, k, (seq + 1) / 2) for k in ks[1:])
        return _self_causal(config, ks[0]) + later
    return sum(_self_causal(config, k) for k in ks)


def _router_flops(config: MoRConfig, fractions: Optional[Sequence[float]] = None) -> float:
    d = config.hidden_size
    if config.router == "token_choice":
        return 2 * d * config.num_recursions
    if config.router != "expert_choice":
        return 0.0
    candidates = [1.0] + _block_fractions(config, fractions)[:-1]
    return 2 * d * sum(candidates) * (2 if config.aux_router else 1)


def forward_flops_breakdown(
    config: MoRConfig, fractions: Optional[Sequence[float]] = None
) -> dict[str, float]:
    """Forward FLOPs per token by kind: matmuls, attention, lm_head, routers (module docstring);
    `fractions`: the shared block's as-run fraction of token slots per recursion step."""
    plan, seq = config.recursion_plan, config.seq_length
    if config.router == "none":
        layer_tokens = float(len(plan.unrolled))
        attention = len(plan.unrolled) * _self_causal(config, seq)
    else:
        unique = len(plan.prefix) + len(plan.suffix)
        layer_tokens = unique + len(plan.block) * sum(_block_fractions(config, fractions))
        attention = unique * _self_causal(config, seq)
        attention += len(plan.block) * _block_attention_per_sequence(config, fractions)
    return {
        "matmuls": 2.0 * layer_matmul_params(config) * layer_tokens,
        "attention": attention / seq,
        "lm_head": 2.0 * config.hidden_size * config.vocab_size,
        "routers": _router_flops(config, fractions),
    }


def forward_flops_per_token(config: MoRConfig, fractions: Optional[Sequence[float]] = None) -> float:
    return sum(forward_flops_breakdown(config, fractions).values())


def training_flops_per_token(config: MoRConfig, fractions: Optional[Sequence[float]] = None) -> float:
    """Forward + backward, the backward costing twice the forward (`fractions`: as run)."""
    return 3.0 * forward_flops_per_token(config, fractions)


# -- KV cache --------------------------------------------------------------------------------------


def kv_bytes_per_layer_token(config: MoRConfig) -> int:
    """K and V of one token in one layer: 2 * G * hd values of 2 bytes."""
    groups = config.num_query_groups or config.num_attention_heads
    return 2 * groups * config.head_dim * KV_BYTES_PER_VALUE


def kv_cache_breakdown(config: MoRConfig) -> dict[str, float]:
    """KV-cache bytes per token of the `prefix_suffix` (unique) layers and of the `block` layers.

    Without a router every unrolled layer outside prefix/suffix counts as `block`, cached in full.
    """
    plan, per_layer = config.recursion_plan, kv_bytes_per_layer_token(config)
    unique = len(plan.prefix) + len(plan.suffix)
    if config.router == "none":
        block = float(len(plan.unrolled) - unique)
    else:
        fractions = step_fractions(config)
        cached = fractions[:1] if config.kv_mode == "share_first" else fractions
        block = len(plan.block) * sum(cached)
    return {"prefix_suffix": float(unique * per_layer), "block": block * per_layer}


def kv_cache_bytes_per_token(config: MoRConfig) -> float:
    return sum(kv_cache_breakdown(config).values())


# -- report ----------------------------------------------------------------------------------------


def vanilla_config(config: MoRConfig) -> MoRConfig:
    """The vanilla model of the same shape: L unique layers, no sharing, no router."""
    return dataclasses.replace(
        config,
        num_layers=0,
        sharing="none",
        router="none",
        num_recursions=1,
        capacities=None,
        router_activation=None,
        router_alpha=None,
        aux_router=False,
    )


def model_figures(config: MoRConfig) -> dict[str, Any]:
    """The headline figures (`FIGURES`) of one config."""
    return {
        "effective_layers": config.effective_layers,
        "unique_layers": config.num_layers,
        "non_embedding_params": non_embedding_params(config),
        "embedding_params": embedding_params(config),
        "forward_flops_per_token": forward_flops_per_token(config),
        "training_flops_per_token": training_flops_per_token(config),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config),
    }


def _ratios(mor: dict[str, Any], vanilla: dict[str, Any]) -> dict[str, float]:
    return {name: round(mor[name] / vanilla[name], 6) for name in FIGURES if vanilla[name]}


def model_report(config: MoRConfig) -> dict[str, Any]:
    """Figures of `config`, of its vanilla counterpart (`vanilla`) and their ratios."""
    mor = model_figures(config)
    vanilla = model_figures(vanilla_config(config))
    return {
        "sharing": config.sharing,
        "router": config.router,
        "kv_mode": config.kv_mode,
        "num_recursions": config.num_recursions,
        "seq_length": config.seq_length,
        "capacity_tokens": (
            config.capacity_tokens(config.seq_length) if config.router != "none" else None
        ),
        "flops_routing": FLOPS_ROUTING[config.router],
        **mor,
        "forward_flops_breakdown": forward_flops_breakdown(config),
        "kv_cache_breakdown": kv_cache_breakdown(config),
        "vanilla": vanilla,
        "ratio_to_vanilla": _ratios(mor, vanilla),
    }
