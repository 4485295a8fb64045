"""Static, preallocated KV caches for MoR decoding (gpt-fast style), and their memory report.

One `StaticKVCache` is a pair of `[max_batch, slots, kv_heads, head_dim]` buffers allocated once,
plus per-row lengths and the original position of every stored entry. A row's entries need not
be contiguous in position: a recursion-wise cache of step r stores only the tokens that were
active at step r, so its attention masks by stored position, not by slot.

`KVCacheSet` holds every cache the model needs (docs/DESIGN.md 5):
- a unique layer (every token): one cache per unit of the decoder (`("unit", u)`);
- a shared layer, recursion-wise: one cache per (recursion step, layer) (`("block", layer, r)`),
  step r stores only the tokens active at step r;
- a shared layer, share_first: one cache per layer written at step 1 (all tokens); later steps
  read it (`block(layer, r)` returns the step-1 cache for every r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mor_megatron.config import CAPACITY_ROUNDING_SLACK, MoRConfig
from mor_megatron.errors import UserError
from mor_megatron.model.rules import decoder_units

SLOT_MODES = ("full", "capacity")


class CacheOverflowError(UserError, RuntimeError):
    """A row needs more KV slots than its static cache holds."""


def one_per_row(rows: Tensor) -> bool:
    """Whether `rows` is strictly increasing: one token per row in row order (a plain decode
    tick), where every rank is 0 and the rows are their own unique values."""
    return rows.numel() <= 1 or bool((rows[1:] > rows[:-1]).all())


def ranks_within_rows(rows: Tensor) -> Tensor:
    """For each token, how many tokens of the same row come before it in `rows` (stable)."""
    if one_per_row(rows):
        return torch.zeros_like(rows)
    return _ranks_in_order(rows)


def _ranks_in_order(rows: Tensor) -> Tensor:
    """`ranks_within_rows` by sorting (no device sync)."""
    count = rows.numel()
    order = torch.argsort(rows, stable=True)
    ordered = rows[order]
    index = torch.arange(count, device=rows.device)
    first = torch.ones(count, dtype=torch.bool, device=rows.device)
    first[1:] = ordered[1:] != ordered[:-1]
    start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), dim=0).values
    ranks = torch.empty_like(rows)
    ranks[order] = index - start
    return ranks


@dataclass
class RowGroups:
    """A flat batch's tokens grouped by cache row: `unique` rows, each token's group
    (`inverse`) and rank within it (`ranks`), and the largest group (`width`). `one_per_row`:
    token i is the only token of row `unique[i]` (inverse is the identity, ranks are 0).
    `first_row`: set when `unique` is the consecutive rows first_row, first_row + 1, ... (the
    caches then read their rows as a view instead of gathering a copy)."""

    unique: Tensor
    inverse: Tensor
    ranks: Tensor
    width: int
    one_per_row: bool = False
    first_row: Optional[int] = None


def one_per_row_groups(rows: Tensor, first_row: Optional[int]) -> RowGroups:
    """The grouping of `rows` known to be one token per row in increasing order (`first_row`:
    rows[0] when the rows are consecutive, else None), built without reading the device."""
    return RowGroups(rows, torch.arange(rows.numel(), device=rows.device), torch.zeros_like(rows), 1, True, first_row)


def row_groups(rows: Tensor) -> RowGroups:
    """Group `rows` (a plain decode tick, one token per row in order, skips the sorts).

    The host reads what it needs in one transfer: whether the rows are one per row in order, and
    the first and last row (one device sync where there were three)."""
    count = rows.numel()
    if count == 0:
        increasing, first, last = True, 0, -1
    elif count == 1:
        increasing, first = True, int(rows[0])
        last = first
    else:
        increasing, first, last = torch.stack(((rows[1:] > rows[:-1]).all().to(rows.dtype), rows[0], rows[-1])).tolist()
    if increasing:
        return one_per_row_groups(rows, first if last - first == count - 1 else None)
    unique, inverse = torch.unique(rows, return_inverse=True)
    ranks = _ranks_in_order(rows)
    first, last, top = torch.stack((unique[0], unique[-1], ranks.max())).tolist()
    first_row = first if last - first == unique.numel() - 1 else None
    return RowGroups(unique, inverse, ranks, top + 1, False, first_row)


class StaticKVCache:
    """K/V buffers `[max_batch, slots, kv_heads, head_dim]` with per-row lengths and positions."""

    def __init__(
        self,
        max_batch: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        name: str = "cache",
    ) -> None:
        self.name = name
        self.slots = slots
        self.k = torch.zeros(max_batch, slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.zeros(max_batch, slots, dtype=torch.long, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.entries = 0  # sum of `lengths`, kept on the host: memory reports read no device tensor
        # an upper bound on every row's length, kept on the host (None: read it when next needed):
        # the span attention reads and the overflow check need no device read until a row may
        # reach the last slot
        self.bound: Optional[int] = 0
        # bytes of K plus V for one token (the reports count K/V; the position index, 8 bytes
        # per slot, is bookkeeping)
        self.entry_bytes = 2 * kv_heads * head_dim * self.k.element_size()

    @property
    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def used_bytes(self) -> int:
        return self.entries * self.entry_bytes

    def reset(self, rows: Union[Tensor, slice, None] = None, stored: Optional[int] = None) -> None:
        """Forget the entries of `rows` (all rows when None); `stored`: how many entries those
        rows hold, when the caller has read it (`KVCacheSet.reset` reads every cache's at once).
        The length bound is read again when next needed (or set by `KVCacheSet.reset`)."""
        if rows is None:
            self.lengths.zero_()
            self.entries = 0
            self.bound = 0
        else:
            self.entries -= int(self.lengths[rows].sum()) if stored is None else stored
            self.lengths[rows] = 0
            self.bound = None

    def _bound(self) -> int:
        if self.bound is None:
            self.bound = int(self.lengths.max())
        return self.bound

    def append(
        self, rows: Tensor, positions: Tensor, key: Tensor, value: Tensor, groups: Optional[RowGroups] = None
    ) -> None:
        """Store `key`/`value` `[T, kv_heads, head_dim]` of tokens at (`rows`, `positions`);
        `groups`: `row_groups(rows)` when the caller has it. Returns the span `attend` reads for
        these rows (at least their longest length now), None when no token came."""
        if rows.numel() == 0:
            return None
        groups = groups if groups is not None else row_groups(rows)
        slot = self.lengths[rows] if groups.one_per_row else self.lengths[rows] + groups.ranks
        bound = self._bound() + groups.width  # no row grows by more than its tokens here
        if bound > self.slots:  # a row may overflow: read the exact lengths (rare: near full)
            # the last slot written (a row's new length minus one) and the longest row before
            top, longest = torch.stack((slot.max(), self.lengths.max())).tolist()
            if top >= self.slots:
                raise CacheOverflowError(
                    f"KV cache {self.name} is full ({self.slots} slots per row): allocate with "
                    "kv_slots='full', a larger capacity margin, or a larger max_seq"
                )
            bound = max(top + 1, longest)
        self.bound = bound
        self.k[rows, slot] = key.to(self.k.dtype)
        self.v[rows, slot] = value.to(self.v.dtype)
        self.positions[rows, slot] = positions
        self.lengths.index_add_(0, rows, torch.ones_like(rows))
        self.entries += rows.numel()
        return self.bound

    def attend(
        self, query: Tensor, rows: Tensor, positions: Tensor, scale: Optional[float],
        groups: Optional[RowGroups] = None, span: Optional[int] = None,
    ) -> Tensor:
        """Causal attention of `query` `[T, heads, head_dim]` over its row's stored entries at
        positions <= its own; returns `[T, heads, head_dim]`. `span`: how many slots to read (at
        least the longest length among `rows`; what `append` of these rows returned), else the
        host bound on every row's length."""
        heads, head_dim = query.shape[1:]
        groups = groups if groups is not None else row_groups(rows)
        unique, inverse, ranks, width = groups.unique, groups.inverse, groups.ranks, groups.width
        n = unique.numel()
        if groups.one_per_row:  # a plain decode tick: the queries are already one per row
            q, q_pos = query.unsqueeze(1), positions.unsqueeze(1)
        else:
            q = query.new_zeros(n, width, heads, head_dim)
            q[inverse, ranks] = query
            # padding queries see every stored entry (their output is dropped)
            q_pos = torch.full((n, width), torch.iinfo(torch.long).max, device=rows.device)
            q_pos[inverse, ranks] = positions
        pick = unique if groups.first_row is None else slice(groups.first_row, groups.first_row + n)
        lengths = self.lengths[pick]
        span = self._bound() if span is None else span
        k, v = self.k[pick, :span], self.v[pick, :span]  # [n, L, g, hd]
        stored = self.positions[pick, :span]
        valid = torch.arange(span, device=rows.device).unsqueeze(0) < lengths.unsqueeze(1)
        mask = valid.unsqueeze(1) & (stored.unsqueeze(1) <= q_pos.unsqueeze(2))  # [n, W, L]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=mask.unsqueeze(1),
            scale=scale,
            enable_gqa=k.shape[2] != heads,
        ).transpose(1, 2)  # [n, W, heads, hd]
        return out[:, 0] if groups.one_per_row else out[inverse, ranks]


@dataclass
class KVUsage:
    """KV bytes of the realised routing against a vanilla model of the same effective depth.

    `used`: entries actually stored; `allocated`: the static buffers. The vanilla model caches
    every token at each of `effective_layers` layers. `recursion_*` counts the shared (recursion)
    layers only, where docs/DESIGN.md 5 states the ratios.
    """

    entry_bytes: int
    tokens: int
    used_bytes: int
    allocated_bytes: int
    vanilla_used_bytes: int
    vanilla_allocated_bytes: int
    recursion_used_bytes: int
    recursion_vanilla_bytes: int

    @property
    def used_ratio(self) -> float:
        return self.used_bytes / max(1, self.vanilla_used_bytes)

    @property
    def allocated_ratio(self) -> float:
        return self.allocated_bytes / max(1, self.vanilla_allocated_bytes)

    @property
    def recursion_ratio(self) -> float:
        return self.recursion_used_bytes / max(1, self.recursion_vanilla_bytes)

    def summary(self) -> str:
        mib = 2.0**20
        return (
            f"KV cache: {self.tokens} tokens, used {self.used_bytes / mib:.3f} MiB vs vanilla "
            f"{self.vanilla_used_bytes / mib:.3f} MiB ({self.used_ratio:.3f}x; recursion layers "
            f"{self.recursion_ratio:.3f}x), allocated {self.allocated_bytes / mib:.3f} MiB vs "
            f"{self.vanilla_allocated_bytes / mib:.3f} MiB ({self.allocated_ratio:.3f}x)"
        )


def expected_recursion_ratio(config: MoRConfig) -> float:
    """docs/DESIGN.md 5 on the recursion layers when step r keeps a share c_r of the tokens:
    recursion-wise sum(c_r)/Nr ((Nr+1)/(2Nr) at the default capacities); share_first 1/Nr."""
    nr = config.num_recursions
    if config.router == "none" or nr == 1:
        return 1.0
    if config.kv_mode == "share_first":
        return 1.0 / nr
    return sum(config.capacities) / nr


# "capacity" slots: each recursion step holds its capacity share of max_seq times this margin, so a
# row may route somewhat more than the average share deeper before `CacheOverflowError`.
DEFAULT_CAPACITY_MARGIN = 1.25


def step_slots(config: MoRConfig, max_seq: int, mode: str, margin: float) -> list[int]:
    """Slots per row of each recursion step's caches: all `max_seq` ("full"), or the step's
    capacity share times `margin` ("capacity": static memory shrinks as docs/DESIGN.md 5 says)."""
    if mode not in SLOT_MODES:
        raise ValueError(f"unknown kv_slots '{mode}': choose one of {', '.join(SLOT_MODES)}")
    nr = config.num_recursions
    if mode == "full" or config.router == "none":
        return [max_seq] * nr
    return [min(max_seq, max(1, math.ceil(c * max_seq * margin - CAPACITY_ROUNDING_SLACK))) for c in config.capacities]


class KVCacheSet:
    """Every KV cache of one model for `max_batch` rows of up to `max_seq` tokens."""

    def __init__(
        self,
        config: MoRConfig,
        max_batch: int,
        max_seq: int,
        kv_slots: str = "full",
        capacity_margin: float = DEFAULT_CAPACITY_MARGIN,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.config = config
        self.max_batch, self.max_seq = max_batch, max_seq
        self.share_first = config.kv_mode == "share_first" and config.router != "none"
        dtype = dtype or config.params_dtype
        groups = config.num_query_groups or config.num_attention_heads
        groups //= config.tensor_model_parallel_size
        head_dim = config.head_dim
        plan = config.recursion_plan
        self.units = decoder_units(config)
        self.slots = step_slots(config, max_seq, kv_slots, capacity_margin)
        self.caches: dict[tuple, StaticKVCache] = {}
        for position, unit in enumerate(self.units):
            if unit.kind == "layer":
                self.caches[("unit", position)] = StaticKVCache(
                    max_batch, max_seq, groups, head_dim, dtype, device, f"unit {position}"
                )
        if config.router != "none":
            steps = 1 if self.share_first else plan.num_recursions
            for layer in plan.block:
                for step in range(steps):
                    self.caches[("block", layer, step)] = StaticKVCache(
                        max_batch, self.slots[step], groups, head_dim, dtype, device,
                        f"layer {layer} step {step + 1}",
                    )
        self.device = torch.device(device)
        self.row_tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.tokens = 0  # sum of `row_tokens`, kept on the host (as `StaticKVCache.entries`)

    def unit(self, position: int) -> StaticKVCache:
        return self.caches[("unit", position)]

    def block(self, layer: int, step: int) -> StaticKVCache:
        """The cache a shared layer reads at recursion `step` (0-based)."""
        return self.caches[("block", layer, 0 if self.share_first else step)]

    def writes(self, step: int) -> bool:
        """Whether recursion `step` stores K/V (share_first: only the first step)."""
        return not self.share_first or step == 0

    def reset(self, rows: Union[Tensor, slice, None] = None) -> None:
        """Forget `rows` (a tensor of rows or a slice; all when None) in every cache."""
        caches = list(self.caches.values())
        if rows is None:
            for cache in caches:
                cache.reset()
            self.row_tokens.zero_()
            self.tokens = 0
            return
        # every cache's count and the rows' tokens in one device read, then every cache's longest row
        *stored, tokens = torch.stack([cache.lengths[rows].sum() for cache in caches] + [self.row_tokens[rows].sum()]).tolist()
        for cache, count in zip(caches, stored):
            cache.reset(rows, count)
        longest = torch.stack([cache.lengths.max() for cache in caches]).tolist()
        for cache, top in zip(caches, longest):
            cache.bound = top
        self.row_tokens[rows] = 0
        self.tokens -= tokens

    def count_tokens(self, rows: Tensor) -> None:
        """Record tokens entering the model (the vanilla comparison caches all of them)."""
        self.row_tokens.index_add_(0, rows, torch.ones_like(rows))
        self.tokens += rows.numel()

    @property
    def allocated_bytes(self) -> int:
        return sum(cache.allocated_bytes for cache in self.caches.values())

    def kv_usage(self) -> KVUsage:
        config = self.config
        any_cache = next(iter(self.caches.values()))
        entry = any_cache.entry_bytes
        tokens = self.tokens  # no device read: the engine's `track_memory` asks at every admission
        depth = config.effective_layers
        plan = config.recursion_plan
        recursion_layers = len(plan.block) * plan.num_recursions if config.router != "none" else 0
        recursion_used = sum(
            cache.used_bytes for key, cache in self.caches.items() if key[0] == "block"
        )
        return KVUsage(
            entry_bytes=entry,
            tokens=tokens,
            used_bytes=sum(cache.used_bytes for cache in self.caches.values()),
            allocated_bytes=self.allocated_bytes,
            vanilla_used_bytes=depth * tokens * entry,
            vanilla_allocated_bytes=depth * self.max_batch * self.max_seq * entry,
            recursion_used_bytes=recursion_used,
            recursion_vanilla_bytes=recursion_layers * tokens * entry,
        )


def kv_bytes_per_row(config: MoRConfig, max_seq: int, kv_slots: str = "full", capacity_margin: float = DEFAULT_CAPACITY_MARGIN,
                     dtype: Optional[torch.dtype] = None) -> int:
    """Static KV bytes one row of a `KVCacheSet` allocates (without allocating it)."""
    dtype = dtype or config.params_dtype
    groups = (config.num_query_groups or config.num_attention_heads) // config.tensor_model_parallel_size
    entry = 2 * groups * config.head_dim * dtype.itemsize
    plan = config.recursion_plan
    units = decoder_units(config)
    total = sum(max_seq for unit in units if unit.kind == "layer")
    if config.router != "none":
        slots = step_slots(config, max_seq, kv_slots, capacity_margin)
        steps = 1 if config.kv_mode == "share_first" else plan.num_recursions
        total += len(plan.block) * sum(slots[:steps])
    return total * entry
