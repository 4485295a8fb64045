"""Incremental MoR decoding with causal routing: the model's stages over flat token batches.

`ModelStages` splits a `MoRGPTModel` into what a decoder calls: embedding, unique layers before
the recursions (`prefix`), one recursion step of the shared block over tokens that may sit at
different steps (`block`), the routers, the unique layers after the recursions (`suffix`), final
norm and LM head. Routing is the model's `routing_mode="threshold"` rule, causal per token, from
`model/rules.py`: expert-choice `threshold_continue` and `gated_update`; token-choice
`token_choice_probs`, `token_choice_depth`, `token_choice_gate`, `token_choice_runs`, `token_choice_combine`.

`IncrementalDecoder` runs all stages in order on any set of new tokens (prefill or one token per
row), appending to static KV caches: the reference path, sequence-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import Tensor

from mor_megatron.inference.cache import (
    DEFAULT_CAPACITY_MARGIN,
    KVCacheSet,
    RowGroups,
    StaticKVCache,
    ranks_within_rows,
)
from mor_megatron.inference.layers import TokenBatch, decode_layer, rope_mscale, softmax_scale
from mor_megatron.model.rules import gated_update, threshold_continue, token_choice_combine, token_choice_runs

# depth_override(rows [T], positions [T]) -> recursion depth per token, 1..Nr (tests, demos)
DepthOverride = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Routed:
    """Tokens that continue to the next recursion step, and their gate (expert-choice)."""

    keep: Tensor  # [T] bool
    gate: Tensor  # [T]


class ModelStages:
    """The stages of one `MoRGPTModel` (TP=1, PP=1) over flat `[T, 1, D]` token batches.

    lean: run layers, embedding and head as plain torch ops on the model's weights where they
    are the local spec's (`layers.LeanLayer`); False runs megatron's modules (same arithmetic).
    compile: a `torch.compile` backend for the lean layers' math (`layers.compiled`), or None.
    """

    def __init__(
        self, model, caches: KVCacheSet, depth_override: Optional[DepthOverride] = None, lean: bool = True,
        compile: Optional[str] = None,
    ) -> None:
        config = model.config
        if config.tensor_model_parallel_size != 1 or config.pipeline_model_parallel_size != 1:
            raise ValueError("MoR decoding runs a single-process model: build it with TP=1 and PP=1")
        if not (model.pre_process and model.post_process):
            raise ValueError("MoR decoding needs the whole model (embedding to LM head) in one process")
        model.eval()
        self.model, self.config, self.decoder = model, model.config, model.decoder
        self.caches = caches
        self.plan = self.config.recursion_plan
        self.router = self.config.router
        self.num_recursions = self.plan.num_recursions if self.router != "none" else 0
        self.depth_override = depth_override
        units = caches.units
        steps = [i for i, unit in enumerate(units) if unit.kind == "recursion"]
        first, last = (steps[0], steps[-1]) if steps else (len(units), len(units))
        self.prefix = [(i, units[i].index) for i in range(first)]
        self.suffix = [(i, units[i].index) for i in range(last + 1, len(units))]
        # [max_seq, 1, 1, rot_dim]; megatron makes it on `torch.cuda.current_device()` (its
        # `inv_freq` is no buffer, so `model.to()` does not move it): bring it to the caches' device
        self.rope_table = model.rotary_pos_emb(caches.max_seq).to(caches.device)
        mscale = rope_mscale(config)
        dtype = config.params_dtype
        self.cos_table = (torch.cos(self.rope_table[:, 0]) * mscale).to(dtype)  # [max_seq, 1, rot_dim]
        self.sin_table = (torch.sin(self.rope_table[:, 0]) * mscale).to(dtype)
        self.scale = softmax_scale(next(iter(self.decoder.layers)))
        self.layers = [decode_layer(layer, lean, compile) for layer in self.decoder.layers]
        embedding = model.embedding
        self.lean_embed = lean and not (
            embedding.add_position_embedding or embedding.tokentype_embeddings is not None
            or config.fp32_residual_connection or config.sequence_parallel
        )
        output = model.output_layer
        self.lean_head = lean and type(output) is ColumnParallelLinear and output.bias is None

    # -- pieces ---------------------------------------------------------------------------------

    def batch(self, rows: Tensor, positions: Tensor, check: bool = True, groups: Optional[RowGroups] = None) -> TokenBatch:
        """The tokens' `TokenBatch`. check: refuse positions beyond the caches (a device read);
        False where the caller has checked them (the engine, on the host). groups: the rows'
        `RowGroups` where the caller knows them on the host (else read when first needed)."""
        if check and positions.numel():
            top = int(positions.max())
            if top >= self.caches.max_seq:
                raise ValueError(f"position {top} is beyond max_seq={self.caches.max_seq}")
        return TokenBatch(rows, positions, self.rope_table, self.cos_table[positions], self.sin_table[positions], groups)

    def embed(self, tokens: Tensor, batch: TokenBatch) -> Tensor:
        """Token ids `[T]` -> `[T, 1, D]` (the model's word embedding), counted as entering."""
        self.caches.count_tokens(batch.rows)
        return self.embedding(tokens, batch)

    def embedding(self, tokens: Tensor, batch: TokenBatch) -> Tensor:
        """`embed` without the count (tensor ops only: the static decode tick traces it)."""
        if self.lean_embed:
            return F.embedding(tokens, self.model.embedding.word_embeddings.weight).unsqueeze(1)
        return self.model.embedding(input_ids=tokens.unsqueeze(0), position_ids=batch.positions.unsqueeze(0))

    def _cached(self, cache: StaticKVCache, batch: TokenBatch, write: bool):
        def attend(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
            span = cache.append(batch.rows, batch.positions, key, value, batch.groups) if write else None
            return cache.attend(query, batch.rows, batch.positions, self.scale, batch.groups, span)

        return attend

    def run_units(self, units: list[tuple[int, int]], hidden: Tensor, batch: TokenBatch) -> Tensor:
        """Unique layers (every token, full caches)."""
        for position, layer in units:
            cache = self.caches.unit(position)
            hidden = self.layers[layer](hidden, batch, self._cached(cache, batch, True))
        return hidden

    def block(self, hidden: Tensor, batch: TokenBatch, steps: Tensor, present: Optional[list[int]] = None) -> Tensor:
        """f(hidden): the shared block once, each token at its own recursion step `steps` [T]
        (attention through that step's cache); tokens of different steps share the matmuls.
        present: the distinct values of `steps` in increasing order, when the caller has them."""
        present = torch.unique(steps).tolist() if present is None else present
        # tokens of several steps: per step, its tokens and their batch, made once (every layer
        # reuses the batch's row grouping instead of reading it from the device again)
        groups = []
        if len(present) > 1:
            for step in present:
                index = (steps == step).nonzero().squeeze(1)
                groups.append((step, index, batch.select(index)))
        for layer in self.plan.block:

            def attend(query: Tensor, key: Tensor, value: Tensor, layer: int = layer) -> Tensor:
                if len(present) == 1:
                    step = present[0]
                    cache = self.caches.block(layer, step)
                    return self._cached(cache, batch, self.caches.writes(step))(query, key, value)
                out = torch.empty_like(query)
                for step, index, sub in groups:
                    cache = self.caches.block(layer, step)
                    out[index] = self._cached(cache, sub, self.caches.writes(step))(
                        query[index], key[index], value[index]
                    )
                return out

            hidden = self.layers[layer](hidden, batch, attend)
        return hidden

    def expert_route(self, r: int, hidden: Tensor, batch: TokenBatch) -> Routed:
        """Expert-choice decision of recursion step r for tokens that ran the previous step."""
        router = self.decoder.routers[str(r)]
        # the router's forward as plain ops on its bias-free linears (`ExpertChoiceRouter.forward`):
        # a tick routes a few dozen tokens, where two module calls cost more than the matmuls
        logits = F.linear(hidden, router.linear.weight).view(-1)
        aux = F.linear(hidden, router.aux.weight) if router.aux is not None else None
        gate = router.gate(logits)
        if self.depth_override is not None:
            keep = self.depth_override(batch.rows, batch.positions) > r
        else:
            keep = threshold_continue(logits, aux.reshape(-1) if aux is not None else None, self.config.capacities[r])
        return Routed(keep, gate)

    def token_route(self, hidden: Tensor, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """Token-choice: 0-based depth `[T]` and gate `[T]` from the stream entering recursion 1."""
        override = None
        if self.depth_override is not None:
            override = (self.depth_override(batch.rows, batch.positions) - 1).long().view(-1, 1)
        depth, gate, _ = self.decoder.router(hidden, override)
        return depth.reshape(-1), gate.reshape(-1)

    def head(self, hidden: Tensor) -> Tensor:
        """Final RMSNorm and LM head: `[T, 1, D]` -> logits `[T, V]`."""
        if self.decoder.final_layernorm is not None:
            hidden = self.decoder.final_layernorm(hidden)
        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights else None
        if self.lean_head:
            return F.linear(hidden[:, 0], weight if weight is not None else self.model.output_layer.weight)
        logits, _ = self.model.output_layer(hidden, weight=weight)
        return logits[:, 0]

    # -- all stages, sequence-wise -----------------------------------------------------------------

    def forward(self, tokens: Tensor, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """Every stage in order: logits `[T, V]` and recursion depth `[T]` of each token."""
        hidden = self.run_units(self.prefix, self.embed(tokens, batch), batch)
        depth = torch.zeros_like(tokens)
        if self.router == "expert_choice":
            active = torch.arange(tokens.numel(), device=tokens.device)
            for r in range(self.num_recursions):
                routed = self.expert_route(r, hidden[active], batch.select(active))
                active = active[routed.keep]
                if active.numel() == 0:
                    break
                out = self.block(hidden[active], batch.select(active), torch.full_like(active, r))
                hidden = hidden.index_copy(
                    0, active, gated_update(hidden[active], routed.gate[routed.keep].view(-1, 1), out)
                )
                depth[active] += 1
        elif self.router == "token_choice":
            chosen, gate = self.token_route(hidden, batch)
            running = hidden
            for r in range(self.num_recursions):
                active = token_choice_runs(chosen, r).nonzero().squeeze(1)
                if active.numel() == 0:
                    break
                out = self.block(running[active], batch.select(active), torch.full_like(active, r))
                running = running.index_copy(0, active, out)
            hidden = token_choice_combine(hidden, gate.view(-1, 1), running)
            depth = chosen + 1
        hidden = self.run_units(self.suffix, hidden, batch)
        return self.head(hidden), depth


@dataclass
class DecodeOutput:
    logits: Tensor  # [T, V]
    depths: Tensor  # [T] recursion steps each token ran (0 without a router)


class IncrementalDecoder:
    """Prefill and token-by-token decoding of up to `max_batch` rows through static KV caches.

    kv_slots: "full" (every cache holds `max_seq` entries per row) or "capacity" (recursion
    step r holds c_r x max_seq x capacity_margin, the static saving of docs/DESIGN.md 5; a row that
    routes more tokens deeper than that raises `CacheOverflowError`).
    lean: see `ModelStages`.
    """

    def __init__(
        self,
        model,
        max_batch: int = 1,
        max_seq: Optional[int] = None,
        kv_slots: str = "full",
        capacity_margin: float = DEFAULT_CAPACITY_MARGIN,
        depth_override: Optional[DepthOverride] = None,
        lean: bool = True,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        config = model.config
        device = device or next(model.parameters()).device
        self.device = torch.device(device)
        self.caches = KVCacheSet(
            config, max_batch, max_seq or config.seq_length, kv_slots, capacity_margin, device=device
        )
        self.stages = ModelStages(model, self.caches, depth_override, lean)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Forget `rows` (all rows when None)."""
        self.caches.reset(rows)
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    @torch.no_grad()
    def forward_flat(self, tokens: Tensor, rows: Tensor, positions: Optional[Tensor] = None) -> DecodeOutput:
        """Append tokens `[T]` to their `rows` `[T]` (in order within a row); positions default
        to each row's next positions."""
        tokens, rows = tokens.to(self.device), rows.to(self.device)
        if positions is None:
            positions = self.lengths[rows] + ranks_within_rows(rows)
        positions = positions.to(self.device)
        logits, depths = self.stages.forward(tokens, self.stages.batch(rows, positions))
        self.lengths.index_add_(0, rows, torch.ones_like(rows))
        return DecodeOutput(logits, depths)

    def forward(self, tokens: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """`[B, T]` new tokens for rows `rows` (default 0..B-1) -> logits `[B, T, V]`."""
        batch, count = tokens.shape
        rows = torch.arange(batch, device=self.device) if rows is None else rows
        flat_rows = rows.to(self.device).repeat_interleave(count)
        out = self.forward_flat(tokens.reshape(-1), flat_rows)
        return out.logits.view(batch, count, -1)
