"""Decoding a fixed batch with a decode tick of static shapes, compiled once (gpt-fast style).

`Engine` batches by depth: each tick takes whatever tokens wait for the shared block, so every
shape in it changes from tick to tick. Here every row of a fixed batch advances one token per
tick through all of the model (the sequence-wise order of `ModelStages.forward`), and every
tensor of a tick has a shape fixed when the decoder is built:
- the batch: `batch_size` rows, one token each;
- the caches: preallocated `KVCacheSet` buffers, attended over all their slots with a mask of
  each row's length (no span read from the host);
- recursion step r: a fixed number of token places, `step_tokens[r]` (its capacity share of the
  batch times a margin). The routed tokens go first (in row order); the places left over hold
  other rows' tokens whose results are dropped and whose K/V go to a spare cache row
  (`batch_size`, never read by a real row).

So `torch.compile` makes one graph for the tick (and, with `mode="reduce-overhead"` on CUDA,
replays it as a CUDA graph), and a tick reads the device once, for its new tokens.

Exactness: a step that routes more tokens than its places flags the tick. The decoder then puts
every cache's lengths back as they were before the tick (entries past a length are never read)
and runs that tick through the eager stages, so the tokens are always those of the eager path.
`stats.redone_ticks` counts such ticks: many of them mean `step_tokens` is too small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mor_megatron.inference.cache import DEFAULT_CAPACITY_MARGIN, KVCacheSet, StaticKVCache
from mor_megatron.inference.decode import DepthOverride, ModelStages
from mor_megatron.inference.layers import TokenBatch
from mor_megatron.inference.sampling import greedy_tokens
from mor_megatron.model.rules import gated_update, token_choice_combine, token_choice_runs
from mor_megatron.parallel.setup import shim_m_suspended


def step_token_places(config, batch_size: int, margin: float = DEFAULT_CAPACITY_MARGIN) -> list[int]:
    """Token places of each recursion step in a tick: its capacity share of the batch times
    `margin`, at least 1 and at most the batch."""
    if config.router == "none":
        return []
    return [min(batch_size, max(1, math.ceil(c * batch_size * margin))) for c in config.capacities]


@dataclass
class Tick:
    """What one tick gives: greedy next tokens (on the device, and as ids), logits, depths."""

    tokens: Tensor  # [B]
    token_ids: list[int]
    logits: Tensor  # [B, V]
    depths: Tensor  # [B] recursion steps each row's token ran


@dataclass
class StaticDecodeStats:
    ticks: int = 0
    redone_ticks: int = 0  # ticks a step overflowed its places and ran again eagerly
    generated_tokens: int = 0


class StaticBatchDecoder:
    """Greedy decoding of up to `batch_size` prompts, all rows advancing one token per tick.

    max_seq: cache length per row (default: the model's seq_length); prompts plus new tokens
    must fit. step_tokens: token places per recursion step (default `step_token_places`).
    compile: None (eager), True (inductor) or a `torch.compile` backend; mode: its `mode`
    (`"reduce-overhead"`: CUDA graphs on a GPU). depth_override: see `ModelStages` (a function
    of tensors only, so that it traces). Prefill runs through the eager stages.
    """

    def __init__(
        self,
        model,
        batch_size: int,
        max_seq: Optional[int] = None,
        kv_slots: str = "full",
        capacity_margin: float = DEFAULT_CAPACITY_MARGIN,
        step_tokens: Optional[Sequence[int]] = None,
        compile: Union[bool, str, None] = None,
        mode: Optional[str] = None,
        depth_override: Optional[DepthOverride] = None,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        config = model.config
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.device = torch.device(device or next(model.parameters()).device)
        self.batch_size = batch_size
        self.max_seq = max_seq or config.seq_length
        # one spare row (index batch_size): the K/V of a step's unused token places go there
        self.caches = KVCacheSet(config, batch_size + 1, self.max_seq, kv_slots, capacity_margin, device=self.device)
        self.stages = ModelStages(model, self.caches, depth_override)
        nr = self.stages.num_recursions
        places = list(step_tokens) if step_tokens is not None else step_token_places(config, batch_size, capacity_margin)
        if len(places) != nr or not all(1 <= p <= batch_size for p in places):
            raise ValueError(f"step_tokens={places}: give {nr} counts, each 1..{batch_size}")
        self.step_tokens = places
        self.cache_list: list[StaticKVCache] = list(self.caches.caches.values())
        self._saved = [torch.zeros_like(cache.lengths) for cache in self.cache_list]
        self._rows = torch.arange(batch_size, device=self.device)
        self._slots = {cache.slots: torch.arange(cache.slots, device=self.device) for cache in self.cache_list}
        self.stats = StaticDecodeStats()
        self.cuda_graphs = bool(compile) and mode == "reduce-overhead"
        if compile:
            backend = "inductor" if compile is True else compile
            if self.cuda_graphs:
                # CUDA graphs replay fixed addresses: the buffers a tick writes in place stay put
                for tensor in self._state_tensors():
                    torch._dynamo.mark_static_address(tensor)
            # every shape is fixed: one graph, no dynamic-shape guards to re-check
            self._step = torch.compile(self.tick_tensors, backend=backend, mode=mode, dynamic=False)
        else:
            self._step = self.tick_tensors

    @property
    def layers_per_token(self) -> float:
        """Layer passes a tick spends per row: the unique layers, and the block once per place
        of every step (spare places included: the compute a static tick does)."""
        stages = self.stages
        block = len(stages.plan.block) * sum(self.step_tokens) / self.batch_size
        return len(stages.prefix) + len(stages.suffix) + block

    def _state_tensors(self) -> list[Tensor]:
        """Every buffer a tick updates in place."""
        caches = [t for c in self.cache_list for t in (c.k, c.v, c.positions, c.lengths)]
        return caches + self._saved + [self.caches.row_tokens]

    # -- the tick, as tensors ------------------------------------------------------------------

    def _attend(self, cache: StaticKVCache, positions: Tensor, rows: Optional[Tensor], valid: Optional[Tensor],
                write: bool):
        """Attention of one token per place over its row's cache; rows None: every batch row in
        order (the unique layers), else a step's places (`valid` False: a spare place)."""
        scale = self.stages.scale

        def attend(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
            index = self._rows if rows is None else rows
            if write:
                slot = cache.lengths[index]
                # past the last slot only in a tick that is redone (the overflow check at its end)
                slot = slot.clamp(max=cache.slots - 1)
                cache.k.index_put_((index, slot), key.to(cache.k.dtype))
                cache.v.index_put_((index, slot), value.to(cache.v.dtype))
                cache.positions.index_put_((index, slot), positions)  # read by the eager path's mask
                cache.lengths.index_add_(0, index, torch.ones_like(index) if valid is None else valid.long())
            if rows is None:
                k, v, lengths = cache.k[: self.batch_size], cache.v[: self.batch_size], cache.lengths[: self.batch_size]
            else:
                k, v, lengths = cache.k[rows], cache.v[rows], cache.lengths[rows]
            # one token per row, the row's newest: every stored entry of the row is at or before it
            mask = self._slots[cache.slots].unsqueeze(0) < lengths.unsqueeze(1)  # [n, slots]
            if valid is not None:
                mask = mask | ~valid.unsqueeze(1)  # spare places see the spare row (no empty softmax)
            out = F.scaled_dot_product_attention(
                query.unsqueeze(2),  # [n, heads, 1, hd]
                k.transpose(1, 2).to(query.dtype),
                v.transpose(1, 2).to(query.dtype),
                attn_mask=mask.view(mask.shape[0], 1, 1, -1),
                scale=scale,
                enable_gqa=k.shape[2] != query.shape[1],
            )
            return out[:, :, 0]

        return attend

    def _places(self, active: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Step r's places: the active rows first, in order, then others. Returns (index into
        the batch, whether each place is active, the cache row each place uses, overflow)."""
        index = torch.argsort((~active).to(torch.uint8), stable=True)[: self.step_tokens[r]]
        valid = active[index]
        rows = torch.where(valid, index, torch.full_like(index, self.batch_size))
        return index, valid, rows, active.sum() > self.step_tokens[r]

    def _block(self, hidden: Tensor, batch: TokenBatch, r: int, index: Tensor, valid: Tensor, rows: Tensor) -> Tensor:
        stages, caches = self.stages, self.caches
        sub = TokenBatch(rows, batch.positions[index], batch.rope_table, batch.cos[index], batch.sin[index])
        h = hidden[index]
        for layer in stages.plan.block:
            attend = self._attend(caches.block(layer, r), sub.positions, rows, valid, caches.writes(r))
            h = stages.layers[layer](h, sub, attend)
        return h

    def tick_tensors(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One token per row `[B]` at `positions` `[B]` -> (greedy next tokens `[B]`, logits
        `[B, V]`, recursion depths `[B]`, whether a step overflowed its places). Shapes never
        change: `torch.compile` traces this once."""
        stages, caches = self.stages, self.caches
        for cache, saved in zip(self.cache_list, self._saved):
            saved.copy_(cache.lengths)
        caches.row_tokens[: self.batch_size] += 1
        batch = TokenBatch(self._rows, positions, stages.rope_table, stages.cos_table[positions], stages.sin_table[positions])
        hidden = stages.embedding(tokens, batch)
        for unit, layer in stages.prefix:
            hidden = stages.layers[layer](hidden, batch, self._attend(caches.unit(unit), positions, None, None, True))
        depth = torch.zeros_like(tokens)
        overflow = torch.zeros((), dtype=torch.bool, device=tokens.device)
        if stages.router == "expert_choice":
            active = torch.ones_like(tokens, dtype=torch.bool)
            for r in range(stages.num_recursions):
                routed = stages.expert_route(r, hidden, batch)  # every row: static; others masked below
                active = active & routed.keep
                index, valid, rows, over = self._places(active, r)
                out = self._block(hidden, batch, r, index, valid, rows)
                old = hidden[index]
                new = gated_update(old, routed.gate[index].view(-1, 1), out)
                hidden = hidden.index_copy(0, index, torch.where(valid.view(-1, 1, 1), new, old))
                depth = depth + active.long()
                overflow = overflow | over
        elif stages.router == "token_choice":
            chosen, gate = stages.token_route(hidden, batch)
            running = hidden
            for r in range(stages.num_recursions):
                index, valid, rows, over = self._places(token_choice_runs(chosen, r), r)
                out = self._block(running, batch, r, index, valid, rows)
                running = running.index_copy(0, index, torch.where(valid.view(-1, 1, 1), out, running[index]))
                overflow = overflow | over
            hidden = token_choice_combine(hidden, gate.view(-1, 1), running)
            depth = chosen + 1
        for unit, layer in stages.suffix:
            hidden = stages.layers[layer](hidden, batch, self._attend(caches.unit(unit), positions, None, None, True))
        # a slot past a cache's end was clamped above: the tick is redone eagerly
        for cache in self.cache_list:
            overflow = overflow | (cache.lengths[: self.batch_size] > cache.slots).any()
        logits = stages.head(hidden)
        return greedy_tokens(logits), logits, depth, overflow

    # -- driving it ----------------------------------------------------------------------------

    def _sync_host_counts(self) -> None:
        """The caches' host-side counts (entries, length bounds, tokens) after device-side ticks."""
        lengths = torch.stack([cache.lengths.sum() for cache in self.cache_list]
                              + [cache.lengths.max() for cache in self.cache_list]
                              + [self.caches.row_tokens.sum()]).tolist()
        count = len(self.cache_list)
        for cache, entries, bound in zip(self.cache_list, lengths[:count], lengths[count:2 * count]):
            cache.entries, cache.bound = entries, bound
        self.caches.tokens = lengths[-1]

    def _eager_tick(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The overflowed tick again, through the eager stages, from the lengths before it."""
        for cache, saved in zip(self.cache_list, self._saved):
            cache.lengths.copy_(saved)
        self.caches.row_tokens[: self.batch_size] -= 1
        self._sync_host_counts()
        stages = self.stages
        return stages.forward(tokens, stages.batch(self._rows, positions))

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 1) -> tuple[Tensor, Tensor]:
        """Forget every row, then run `prompts` (at most `batch_size`; idle rows get a one-token
        prompt) through the eager stages. Returns each row's last logits `[B, V]` and the
        positions its next token takes `[B]`; refuses prompts that leave no room for
        `max_new_tokens` (the last one generated is never fed)."""
        count = len(prompts)
        if not 1 <= count <= self.batch_size:
            raise ValueError(f"{count} prompts for a batch of {self.batch_size}: give 1..{self.batch_size}")
        prompts = [list(map(int, p)) for p in prompts] + [[0]] * (self.batch_size - count)
        if min(map(len, prompts)) < 1:
            raise ValueError("empty prompt: give at least one token")
        longest = max(map(len, prompts))
        if max_new_tokens < 1 or longest + max_new_tokens - 1 > self.max_seq:
            raise ValueError(f"a {longest}-token prompt and {max_new_tokens} new tokens do not fit max_seq={self.max_seq}")
        with shim_m_suspended():
            self.caches.reset()
            stages = self.stages
            lengths = [len(p) for p in prompts]
            rows = [row for row, n in enumerate(lengths) for _ in range(n)]
            flat = torch.tensor([[t for p in prompts for t in p], rows, [i for n in lengths for i in range(n)]],
                                dtype=torch.long, device=self.device)
            logits, _ = stages.forward(flat[0], stages.batch(flat[1], flat[2], check=False))  # fit checked above
            last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            return logits[last], torch.tensor(lengths, device=self.device)

    @torch.no_grad()
    def tick(self, tokens: Tensor, positions: Tensor) -> "Tick":
        """Feed one token per row `[B]` at `positions` `[B]` (after `prefill`). A tick whose
        steps overflowed runs again eagerly (one more device read)."""
        with shim_m_suspended():
            self.stats.ticks += 1
            nxt, logits, depth, overflow = self._step(tokens, positions)
            *ids, over = torch.cat((nxt, overflow.view(1).long())).tolist()  # the tick's one device read
            if over:
                self.stats.redone_ticks += 1
                logits, depth = self._eager_tick(tokens, positions)
                nxt = greedy_tokens(logits)
                ids = nxt.tolist()
            if self.cuda_graphs:  # a CUDA graph's outputs are overwritten by its next replay: copy them
                nxt, logits, depth = nxt.clone(), logits.clone(), depth.clone()
            return Tick(nxt, ids, logits, depth)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: Optional[int] = None
                 ) -> list[list[int]]:
        """Greedy continuations of `prompts` (at most `batch_size`): `max_new_tokens` each, or up
        to and including `eos_id`. Rows that finish early keep running (shapes are fixed)."""
        logits, positions = self.prefill(prompts, max_new_tokens)
        tokens = greedy_tokens(logits)
        count = len(prompts)
        out = [[t] for t in tokens.tolist()[:count]]
        for _ in range(max_new_tokens - 1):
            if eos_id is not None and all(eos_id in row for row in out):
                break
            tick = self.tick(tokens, positions)
            for row, token in zip(out, tick.token_ids):
                row.append(token)
            tokens = tick.tokens
            positions = positions + 1
        self._sync_host_counts()
        if eos_id is not None:
            out = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out]
        self.stats.generated_tokens += sum(map(len, out))
        return out
