"""Mixture-of-Recursions causal LM for Hugging Face transformers.

Self-contained (imports only torch and transformers): copied next to exported weights and loaded
with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Written by mor-megatron's
`tools/convert_to_hf.py`; the math is mor-megatron's decoder in threshold (decoding) routing mode:

- Llama layers: RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU, no biases.
- The shared block runs once per recursion step on that step's active tokens only; attention at a
  step sees the keys of the tokens active at that step (`kv_mode="recursion_wise"`), or, with
  `kv_mode="share_first"`, every later step's queries attend to the step-1 keys/values of all
  tokens at positions <= the query's.
- Expert-choice: step r selects, among the previous step's tokens, those with sigmoid(logit) >= 0.5
  (the auxiliary router's logit where there is one; a step of capacity 1 keeps all candidates) and
  updates H <- H + alpha * act(logit) * block(H) at the selected tokens.
- Token-choice: one router on the stream entering recursion 1 picks a depth per token; tokens run
  ungated while their depth lasts, then H = H1 + alpha * p_depth * F_depth(H1).

Computation is dense and masked (every token goes through the block, inactive ones are discarded
and never serve as keys), which is simple and exact. `MoRCache` keeps, per (recursion step, layer),
the keys/values of the tokens seen so far with a flag saying whether they were active there, so
`generate()` decodes incrementally with the same routing as a full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mor import MoRHFConfig


# -- cache ----------------------------------------------------------------------------------------


class KVSlot:
    """Keys/values of one attention layer at one recursion step: `[B, G, T, hd]`, plus per key
    `ok` (the token was active there and is not padding) and its position, both `[B, T]`."""

    def __init__(self) -> None:
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None
        self.ok: Optional[torch.Tensor] = None
        self.pos: Optional[torch.Tensor] = None

    def append(self, key: torch.Tensor, value: torch.Tensor, ok: torch.Tensor, pos: torch.Tensor) -> None:
        if self.key is None:
            self.key, self.value, self.ok, self.pos = key, value, ok, pos
            return
        self.key = torch.cat([self.key, key], dim=2)
        self.value = torch.cat([self.value, value], dim=2)
        self.ok = torch.cat([self.ok, ok], dim=1)
        self.pos = torch.cat([self.pos, pos], dim=1)


class MoRCache:
    """KV cache of a MoR model: one `KVSlot` per (unit, layer), created on first use."""

    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self) -> None:
        self.slots: dict[tuple, KVSlot] = {}
        self.seen_tokens = 0
        self.mask: Optional[torch.Tensor] = None  # [B, seen] padding mask (1 = real token)

    def slot(self, key: tuple) -> KVSlot:
        if key not in self.slots:
            self.slots[key] = KVSlot()
        return self.slots[key]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.slots)


# -- layers -------------------------------------------------------------------------------------


class MoRRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        # torch's default device, as nn.Linear's weights: from_pretrained / .to() place them
        self.weight = nn.Parameter(torch.ones(size))  # host: a parameter, made like nn.Linear's
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[B, 1, n, hd]` for rotate-half RoPE at `positions` `[B, n]`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


# -- MoR rules: copies of mor_megatron/model/rules.py without their docstrings (tests/test_rule_copies.py) --


# Copied from mor_megatron.model.rules.token_choice_combine
def token_choice_combine(h1: torch.Tensor, gate: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
    return h1 + gate.unsqueeze(-1) * running


# Copied from mor_megatron.model.rules.token_choice_runs
def token_choice_runs(depth: torch.Tensor, r: int) -> torch.Tensor:
    return depth >= r


# Copied from mor_megatron.model.rules.token_choice_gate
def token_choice_gate(probs: torch.Tensor, depth: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * probs.gather(-1, depth.unsqueeze(-1)).squeeze(-1)


# Copied from mor_megatron.model.rules.token_choice_depth
def token_choice_depth(probs: torch.Tensor) -> torch.Tensor:
    return probs.detach().argmax(dim=-1)


# Copied from mor_megatron.model.rules.token_choice_probs
def token_choice_probs(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if activation == "softmax" else logits.sigmoid()


# Copied from mor_megatron.model.rules.gated_update
def gated_update(hidden: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return hidden + gate.unsqueeze(-1) * update


# Copied from mor_megatron.model.rules.threshold_continue
def threshold_continue(logits: torch.Tensor, aux_logits: Optional[torch.Tensor], capacity: float) -> torch.Tensor:
    if capacity >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    decide = aux_logits if aux_logits is not None else logits
    return decide.detach() >= 0


# Copied from mor_megatron.model.rules.expert_choice_gate
def expert_choice_gate(logits: torch.Tensor, alpha: float, activation: str) -> torch.Tensor:
    act = torch.sigmoid if activation == "sigmoid" else torch.tanh
    return alpha * act(logits)


@dataclass
class StepContext:
    """What a layer needs besides its input: RoPE, query positions `[B, n]`, which new tokens may
    serve as keys `[B, n]`, the slot to append to, and (KV sharing) the slot to read instead."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    key_ok: torch.Tensor
    slot: Optional[KVSlot]
    read: Optional[KVSlot] = None


class MoRAttention(nn.Module):
    def __init__(self, config: MoRHFConfig) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        size = config.hidden_size
        self.q_proj = nn.Linear(size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(size, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(size, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, size, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        batch, n, _ = x.shape
        q = _rope(self.q_proj(x).view(batch, n, self.heads, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
        if ctx.read is None:
            k = self.k_proj(x).view(batch, n, self.groups, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(batch, n, self.groups, self.head_dim).transpose(1, 2)
            slot = ctx.slot if ctx.slot is not None else KVSlot()
            slot.append(_rope(k, ctx.cos, ctx.sin), v, ctx.key_ok, ctx.positions)
        else:
            slot = ctx.read
        mask = slot.ok[:, None, :] & (slot.pos[:, None, :] <= ctx.positions[:, :, None])  # [B, n, T]
        if ctx.read is None:
            # a query always sees its own key: rows of inactive (discarded) queries stay finite
            own = torch.eye(n, dtype=torch.bool, device=x.device)
            mask = torch.cat([mask[..., : mask.shape[-1] - n], mask[..., -n:] | own], dim=-1)
        repeat = self.heads // self.groups
        key = slot.key.repeat_interleave(repeat, dim=1)
        value = slot.value.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, self.heads * self.head_dim))


class MoRMLP(nn.Module):
    def __init__(self, config: MoRHFConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoRDecoderLayer(nn.Module):
    def __init__(self, config: MoRHFConfig) -> None:
        super().__init__()
        self.input_layernorm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoRAttention(config)
        self.post_attention_layernorm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoRMLP(config)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


# -- model ---------------------------------------------------------------------------------------


class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoRDecoderLayer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, MoRRMSNorm):
            module.weight.fill_(1.0)


@dataclass
class MoRModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    cache: Optional[MoRCache] = None
    selections: Optional[tuple] = None  # per recursion step, the [B, n] mask of tokens it ran on


@dataclass
class MoRCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[MoRCache] = None
    selections: Optional[tuple] = None


class MoRModel(MoRPreTrainedModel):
    """Embedding, unique layers, routers and final norm; `forward` runs the recursion."""

    def __init__(self, config: MoRHFConfig) -> None:
        super().__init__(config)
        size, nr = config.hidden_size, config.num_recursions
        self.embed_tokens = nn.Embedding(config.vocab_size, size)
        self.layers = nn.ModuleList(MoRDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = MoRRMSNorm(size, config.rms_norm_eps)
        if config.router == "expert_choice":
            self.routers = nn.ModuleList(nn.Linear(size, 1, bias=False) for _ in range(nr))
            if config.aux_router:
                self.aux_routers = nn.ModuleList(nn.Linear(size, 1, bias=False) for _ in range(nr))
        elif config.router == "token_choice":
            self.router = nn.Linear(size, nr, bias=False)
        self.plan = config.plan
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _run(
        self, layers: list, hidden: torch.Tensor, tag: tuple, active: torch.Tensor, base: StepContext, cache: MoRCache
    ) -> torch.Tensor:
        """`layers` (unique indices) in order on every token; keys only from `active` tokens."""
        share = self.config.kv_mode == "share_first" and tag[0] == "step"
        for j, index in enumerate(layers):
            read = cache.slot(("step", 0, j)) if share and tag[1] > 0 else None
            ctx = StepContext(
                base.cos, base.sin, base.positions, base.key_ok & active,
                None if read is not None else cache.slot(tag + (j,)), read,
            )
            hidden = self.layers[index](hidden, ctx)
        return hidden

    def _expert_choice(
        self, hidden: torch.Tensor, base: StepContext, cache: MoRCache, selections: list
    ) -> torch.Tensor:
        config = self.config
        candidates = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        for step in range(config.num_recursions):
            logits = self.routers[step](hidden).squeeze(-1)
            aux = self.aux_routers[step](hidden).squeeze(-1) if config.aux_router else None
            selected = candidates & threshold_continue(logits, aux, config.capacities[step])
            out = self._run(self.plan["block"], hidden, ("step", step), selected, base, cache)
            gate = expert_choice_gate(logits, config.router_alpha, config.router_activation)
            hidden = torch.where(selected[..., None], gated_update(hidden, gate, out), hidden)
            candidates = selected
            selections.append(selected)
        return hidden

    def _token_choice(
        self, hidden: torch.Tensor, base: StepContext, cache: MoRCache, selections: list
    ) -> torch.Tensor:
        config = self.config
        probs = token_choice_probs(self.router(hidden), config.router_activation)
        depth = token_choice_depth(probs)
        gate = token_choice_gate(probs, depth, config.router_alpha)
        running = hidden
        for step in range(config.num_recursions):
            active = token_choice_runs(depth, step)
            out = self._run(self.plan["block"], running, ("step", step), active, base, cache)
            running = torch.where(active[..., None], out, running)
            selections.append(active)
        return token_choice_combine(hidden, gate, running)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[MoRCache] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> MoRModelOutput:
        """`input_ids` `[B, n]`: the tokens after those already in `cache`.

        attention_mask: `[B, past + n]` padding mask (1 = token); position_ids default to the
        count of real tokens before each one.
        """
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, MoRCache):
            cache = None  # a generic transformers cache: MoR keeps its own
        use_cache = self.config.use_cache if use_cache is None else use_cache
        work = cache if cache is not None else MoRCache()
        batch, n = input_ids.shape
        device = input_ids.device
        mask = self._padding_mask(attention_mask, work, batch, n, device)
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        hidden = self.embed_tokens(input_ids)
        cos, sin = rotary(position_ids, self.config.head_dim, self.config.rotary_base, hidden.dtype)
        everyone = torch.ones(batch, n, dtype=torch.bool, device=device)
        base = StepContext(cos, sin, position_ids, mask[:, -n:].bool(), None)
        selections: list = []
        config, plan = self.config, self.plan
        if config.router == "none":
            for position, index in enumerate(plan["unrolled"]):
                hidden = self._run((index,), hidden, ("layer", position), everyone, base, work)
        else:
            for index in plan["prefix"]:
                hidden = self._run((index,), hidden, ("layer", index), everyone, base, work)
            if config.router == "expert_choice":
                hidden = self._expert_choice(hidden, base, work, selections)
            else:
                hidden = self._token_choice(hidden, base, work, selections)
            for index in plan["suffix"]:
                hidden = self._run((index,), hidden, ("layer", index), everyone, base, work)
        work.seen_tokens += n
        work.mask = mask
        out_cache = work if use_cache else None
        return MoRModelOutput(self.norm(hidden), out_cache, tuple(selections))

    @staticmethod
    def _padding_mask(
        attention_mask: Optional[torch.Tensor], cache: MoRCache, batch: int, n: int, device: torch.device
    ) -> torch.Tensor:
        total = cache.seen_tokens + n
        if attention_mask is not None:
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if mask.shape != (batch, total):
                if mask.shape == (batch, n) and cache.mask is not None:
                    mask = torch.cat([cache.mask, mask], dim=1)
                else:
                    raise ValueError(
                        f"attention_mask has shape {tuple(mask.shape)}; expected ({batch}, {total}) "
                        "(cached plus new tokens)"
                    )
            return mask
        new = torch.ones(batch, n, dtype=torch.bool, device=device)
        return new if cache.mask is None else torch.cat([cache.mask, new], dim=1)


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoRHFConfig) -> None:
        super().__init__(config)
        self.model = MoRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # MoR keeps its own cache (`MoRCache`), returned by `forward`

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[MoRCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoRCausalLMOutput:
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else kwargs.get("past_key_values"),
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return MoRCausalLMOutput(loss, logits, out.cache, out.selections)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Optional[MoRCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen; positions follow the padding mask."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if isinstance(cache, MoRCache) and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens :]
        elif not isinstance(cache, MoRCache):
            cache = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}


__all__ = ["MoRForCausalLM", "MoRModel", "MoRPreTrainedModel", "MoRCache"]
