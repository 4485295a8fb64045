"""`Engine`: a request queue served with continuous depth-wise batching (docs/DESIGN.md 6).

Every in-flight token is in one of three places:
- entering: sampled (or prompt) tokens waiting for the embedding and the unique layers before the
  recursions; they are routed for recursion 1 right away;
- the block pool: tokens waiting for their next recursion step. Each tick the shared block runs
  once on the pool, mixing tokens of every depth (each attends through its own step's cache);
  a token the router lets go leaves the pool at once, so its slot goes to the next token;
- exited: tokens done recursing, collected for the unique layers after the recursions, the final
  norm and the LM head. A row's exited tokens move on together once none of its tokens is still
  recursing (a prompt's tokens exit at different depths; the suffix layer must see them in order).

A sampled token re-enters at the next tick; a finished sequence frees its cache row and the
queue fills it. Without a router (a vanilla model) the same loop is sequence-wise continuous
batching: every layer runs at entry. Decisions are per token and causal (`ModelStages`), so
greedy tokens equal decoding each request alone.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mor_megatron.inference.cache import DEFAULT_CAPACITY_MARGIN, KVCacheSet, one_per_row_groups
from mor_megatron.inference.decode import DepthOverride, ModelStages
from mor_megatron.inference.layers import TokenBatch
from mor_megatron.model.rules import gated_update, token_choice_combine, token_choice_runs
from mor_megatron.parallel.setup import shim_m_suspended
from mor_megatron.inference.sampling import (
    SamplingParams,
    cut_at_stop,
    greedy_tokens,
    make_generator,
    sample,
    stop_reason,
)


@dataclass
class Completion:
    """A finished request. `depths`: recursion steps run by each token fed to the model
    (prompt, then every generated token but the last)."""

    request_id: int
    prompt: list[int]
    token_ids: list[int]
    finish_reason: str
    depths: list[int] = field(default_factory=list)
    text: Optional[str] = None


@dataclass
class _Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams


@dataclass
class _Row:
    request: _Request
    generator: Optional[torch.Generator]
    next_position: int = 0
    pending: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    depths: dict[int, int] = field(default_factory=dict)


@dataclass
class _Tokens:
    """A flat set of in-flight tokens (all tensors share the first axis).

    Two host-side notes save device reads every tick: `steps`, the recursion steps `step` may
    hold (a superset, exact when it has one value: a token set that entered together and ran
    every block call since, the common case); `batch`, the tokens' `TokenBatch` (RoPE rows and
    cache row grouping), kept while the set is unchanged and rebuilt after a `take`."""

    rows: Tensor
    positions: Tensor
    hidden: Tensor  # [n, 1, D]: expert-choice stream, or token-choice running state
    step: Tensor  # next recursion step (pool) / steps run (exited)
    gate: Tensor  # expert-choice: gate of the next step; token-choice: final gate
    h1: Optional[Tensor] = None  # token-choice: stream entering recursion 1
    depth: Optional[Tensor] = None  # token-choice: chosen 0-based depth
    steps: tuple[int, ...] = ()
    batch: Optional[TokenBatch] = None

    def take(self, index: Tensor) -> "_Tokens":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return _Tokens(*(pick(getattr(self, name)) for name in _FIELDS), steps=self.steps)

    def split(self, mask: Tensor) -> tuple[Optional["_Tokens"], Optional["_Tokens"]]:
        """(the tokens where `mask`, the others); None for an empty side, and no copies when
        one side is empty (the common case in a decode tick). One device read (the count):
        both sides are taken by integer index, where boolean masks would each read their size."""
        chosen = int(mask.sum())
        if chosen == self.count:
            return self, None
        if chosen == 0:
            return None, self
        order = torch.argsort((~mask).to(torch.uint8), stable=True)  # chosen first, each side in order
        return self.take(order[:chosen]), self.take(order[chosen:])

    @property
    def count(self) -> int:
        return self.rows.numel()


_FIELDS = ("rows", "positions", "hidden", "step", "gate", "h1", "depth")


def _cat(parts: list[Optional[_Tokens]]) -> Optional[_Tokens]:
    parts = [p for p in parts if p is not None and p.count]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    values = []
    for name in _FIELDS:
        items = [getattr(p, name) for p in parts]
        values.append(None if items[0] is None else torch.cat(items))
    return _Tokens(*values, steps=tuple(sorted({s for p in parts for s in p.steps})))


@dataclass
class EngineStats:
    ticks: int = 0
    block_calls: int = 0
    block_tokens: int = 0
    mixed_depth_calls: int = 0  # block calls whose tokens sat at more than one recursion step
    entered_tokens: int = 0
    generated_tokens: int = 0
    layer_tokens: int = 0  # (token, layer) evaluations: the compute, in layer passes per token
    peak_kv_used_bytes: int = 0  # with track_memory: most KV bytes held at once
    peak_kv_vanilla_bytes: int = 0  # what a vanilla model of the same depth held then

    @property
    def mean_block_tokens(self) -> float:
        return self.block_tokens / max(1, self.block_calls)

    @property
    def layers_per_token(self) -> float:
        """Layer passes per token fed to the model (a vanilla model: its depth)."""
        return self.layer_tokens / max(1, self.entered_tokens)


class Engine:
    """Serve requests with continuous depth-wise batching over `max_batch` cache rows.

    max_block_tokens: cap on the tokens one shared-block call takes (deepest rows first; a row's
    tokens are never split); None runs the whole pool each tick.
    kv_slots / capacity_margin: see `IncrementalDecoder`.
    tokenizer: anything with `decode(ids) -> str`; needed for stop strings and `Completion.text`.
    track_memory: record the peak KV bytes in `stats` (host counters, no device read). KV entries
    only grow until a row is reset for a new request, so the peak is taken just before each
    admission's resets and when the engine runs out of work, not every tick.
    lean: see `ModelStages`.
    compile: run the decode layers' math under `torch.compile` (True: inductor, or a backend's
    name such as "aot_eager"); the KV caches, routing and sampling stay eager.
    """

    def __init__(
        self,
        model,
        max_batch: int = 8,
        max_seq: Optional[int] = None,
        kv_slots: str = "full",
        capacity_margin: float = DEFAULT_CAPACITY_MARGIN,
        max_block_tokens: Optional[int] = None,
        tokenizer=None,
        depth_override: Optional[DepthOverride] = None,
        lean: bool = True,
        device: Union[str, torch.device, None] = None,
        track_memory: bool = False,
        compile: Union[bool, str] = False,
    ) -> None:
        config = model.config
        if max_batch < 1 or (max_seq is not None and max_seq < 1):
            # a batch of no rows would never admit a request: `run` would loop for ever
            raise ValueError(f"max_batch={max_batch}, max_seq={max_seq}: both must be at least 1")
        device = torch.device(device or next(model.parameters()).device)
        self.track_memory = track_memory
        self.device, self.max_batch = device, max_batch
        self.max_seq = max_seq or config.seq_length
        self.caches = KVCacheSet(config, max_batch, self.max_seq, kv_slots, capacity_margin, device=device)
        backend = ("inductor" if compile is True else compile) or None
        self.stages = ModelStages(model, self.caches, depth_override, lean, backend)
        self.max_block_tokens = max_block_tokens
        self.tokenizer = tokenizer
        self.queue: deque[_Request] = deque()
        self.rows: dict[int, _Row] = {}
        self.pool: Optional[_Tokens] = None
        self.exited: Optional[_Tokens] = None
        self.stats = EngineStats()
        self._waited: dict[int, int] = {}  # row -> block calls it sat out
        self._ids = itertools.count()

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: Optional[SamplingParams] = None) -> int:
        """Queue a prompt (token ids); returns its request id."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt) >= self.max_seq:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq={self.max_seq}")
        request = _Request(next(self._ids), prompt, params or SamplingParams())
        self.queue.append(request)
        return request.request_id

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.rows)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Union[SamplingParams, Sequence[SamplingParams], None] = None
    ) -> list[Completion]:
        """Queue `prompts`, run until all are done; completions in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        done = {c.request_id: c for c in self.run()}
        return [done[i] for i in ids]

    def run(self) -> list[Completion]:
        """Step until the queue and every row are empty."""
        finished: list[Completion] = []
        while self.busy:
            finished.extend(self.tick())
        return finished

    # -- one tick --------------------------------------------------------------------------------

    @torch.no_grad()
    def tick(self) -> list[Completion]:
        """Admit, enter, one shared-block call, exit; returns the requests finished now."""
        self.stats.ticks += 1
        with shim_m_suspended():  # decoding names no CUDA device: skip the CPU shim's dispatch
            self._admit()
            self._enter()
            self._run_block()
            finished = self._leave()
            if self.track_memory and not self.busy:
                self._note_memory()
            return finished

    def _note_memory(self) -> None:
        report = self.caches.kv_usage()
        if report.used_bytes > self.stats.peak_kv_used_bytes:
            self.stats.peak_kv_used_bytes = report.used_bytes
            self.stats.peak_kv_vanilla_bytes = report.vanilla_used_bytes

    def _admit(self) -> None:
        if not self.queue:
            return
        free = [row for row in range(self.max_batch) if row not in self.rows][: len(self.queue)]
        if not free:
            return
        if self.track_memory:
            self._note_memory()  # before the resets below free entries
        # every admitted row's caches forgotten at once: the reset's device reads are per call,
        # not per row (a wave of admissions at a large batch would otherwise sync once per row)
        consecutive = free[-1] - free[0] == len(free) - 1
        self.caches.reset(slice(free[0], free[-1] + 1) if consecutive else torch.tensor(free, device=self.device))
        for row in free:
            request = self.queue.popleft()
            state = _Row(request, make_generator(request.params, self.device))
            state.pending = list(request.prompt)
            self.rows[row] = state

    def _enter(self) -> None:
        # in row order: a decode tick's tokens are then one per row in order, which the caches
        # attend without regrouping (`row_groups`)
        entering = [(row, state) for row, state in sorted(self.rows.items()) if state.pending]
        if not entering:
            return
        tokens, rows, positions = [], [], []
        for row, state in entering:
            count = len(state.pending)
            tokens += state.pending
            rows += [row] * count
            positions += range(state.next_position, state.next_position + count)
            state.next_position += count
            state.pending = []
        top = max(positions)  # the caches' bound, checked here on the host (the stages would read the device)
        if top >= self.max_seq:
            raise ValueError(f"position {top} is beyond max_seq={self.max_seq}")
        # a decode tick (one token per row, rows in increasing order): its row grouping is known here
        single = len(rows) == len(entering)
        first_row = rows[0] if rows[-1] - rows[0] == len(rows) - 1 else None
        # one host-to-device copy for the three (each copy from pageable memory waits for the stream)
        tokens, rows, positions = torch.tensor([tokens, rows, positions], dtype=torch.long, device=self.device).unbind(0)
        self.stats.entered_tokens += tokens.numel()
        stages = self.stages
        self.stats.layer_tokens += tokens.numel() * len(stages.prefix)
        groups = one_per_row_groups(rows, first_row) if single else None
        batch = stages.batch(rows, positions, check=False, groups=groups)  # positions checked above
        hidden = stages.run_units(stages.prefix, stages.embed(tokens, batch), batch)
        zeros = torch.zeros_like(rows)
        fresh = _Tokens(rows, positions, hidden, zeros, hidden.new_zeros(rows.shape), steps=(0,), batch=batch)
        if stages.router == "none":
            self.exited = _cat([self.exited, fresh])
        elif stages.router == "expert_choice":
            routed = stages.expert_route(0, hidden, batch)
            fresh.gate = routed.gate
            recursing, done = fresh.split(routed.keep)
            self.pool = _cat([self.pool, recursing])
            self.exited = _cat([self.exited, done])
        else:
            depth, gate = stages.token_route(hidden, batch)
            fresh.gate, fresh.h1, fresh.depth = gate, hidden, depth
            self.pool = _cat([self.pool, fresh])

    def _batch(self, tokens: _Tokens) -> TokenBatch:
        """The tokens' `TokenBatch`, made once per token set (positions were checked on entry)."""
        if tokens.batch is None:
            tokens.batch = self.stages.batch(tokens.rows, tokens.positions, check=False)
        return tokens.batch

    def _pick(self, pool: _Tokens) -> Tensor:
        """Boolean mask of the pool tokens the next block call takes when the pool holds more than
        `max_block_tokens`: rows by priority (recursion step plus ticks already waited, so deep
        tokens go first and nobody starves), greedily while they fit; the first row is always taken."""
        cap = self.max_block_tokens
        rows, counts = torch.unique(pool.rows, return_counts=True)
        # a row's step: that of its last token in the pool (what `step[pool.rows] = pool.step`
        # left on the host, where the last write wins; on CUDA such a write keeps any of them)
        index = torch.arange(pool.count, device=self.device)
        last = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        last.scatter_reduce_(0, pool.rows, index, reduce="amax")
        rows, counts, steps = torch.stack((rows, counts, pool.step[last[rows]])).tolist()  # one device read
        priority = {row: step + self._waited.get(row, 0) for row, step in zip(rows, steps)}
        taken, used = [], 0
        for row, count in sorted(zip(rows, counts), key=lambda rc: -priority[rc[0]]):
            if not taken or used + count <= cap:
                taken.append(row)
                used += count
        for row in rows:
            self._waited[row] = 0 if row in taken else self._waited.get(row, 0) + 1
        return torch.isin(pool.rows, torch.tensor(taken, device=self.device))

    def _run_block(self) -> None:
        pool = self.pool
        if pool is None or pool.count == 0:
            return
        cap = self.max_block_tokens
        if cap is None or pool.count <= cap:
            self._waited.clear()
            run, waiting = pool, None
        else:
            run, waiting = pool.split(self._pick(pool))
        stages = self.stages
        batch = self._batch(run)
        # the recursion steps this call runs: known on the host unless the pool mixes steps
        present = list(run.steps) if len(run.steps) == 1 else torch.unique(run.step).tolist()
        out = stages.block(run.hidden, batch, run.step, present)
        self.stats.block_calls += 1
        self.stats.block_tokens += run.count
        self.stats.layer_tokens += run.count * len(stages.plan.block)
        self.stats.mixed_depth_calls += int(len(present) > 1)
        nxt = run.step + 1
        last = stages.num_recursions
        if stages.router == "expert_choice":
            run.hidden = gated_update(run.hidden, run.gate.view(-1, 1), out)
            steps = [s + 1 for s in present]  # the steps the tokens are routed for next
            if len(steps) == 1 and steps[0] < last:  # every token at one step: route them at once
                routed = stages.expert_route(steps[0], run.hidden, batch)
                keep, run.gate = routed.keep, routed.gate
            else:
                keep = torch.zeros_like(nxt, dtype=torch.bool)
                for step in [s for s in steps if s < last]:
                    index = (nxt == step).nonzero().squeeze(1)
                    routed = stages.expert_route(step, run.hidden[index], batch.select(index))
                    keep[index] = routed.keep
                    run.gate[index] = routed.gate
            run.step, run.steps = nxt, tuple(s + 1 for s in present)
            staying, leaving = run.split(keep)
        else:
            run.hidden = out
            keep = token_choice_runs(run.depth, nxt) & (nxt < last)
            run.step, run.steps = nxt, tuple(s + 1 for s in present)
            staying, leaving = run.split(keep)
            if leaving is not None:
                leaving.hidden = token_choice_combine(leaving.h1, leaving.gate.view(-1, 1), leaving.hidden)
        self.pool = _cat([waiting, staying])
        self.exited = _cat([self.exited, leaving])

    def _leave(self) -> list[Completion]:
        exited = self.exited
        if exited is None or exited.count == 0:
            return []
        done, rest = exited, None
        if self.pool is not None and self.pool.count:
            done, rest = exited.split(~torch.isin(exited.rows, self.pool.rows))
            if done is None:
                return []
        self.exited = rest
        stages = self.stages
        batch = self._batch(done)
        hidden = stages.run_units(stages.suffix, done.hidden, batch)
        self.stats.layer_tokens += done.count * len(stages.suffix)
        rows, positions, steps = torch.stack((done.rows, done.positions, done.step)).tolist()  # one device read
        if batch.groups.one_per_row:  # one token per row, in row order (a decode tick): each is its row's last
            ready_rows, logits = rows, stages.head(hidden)
        else:
            ready_rows = sorted(set(rows))
            # the last token of each row (larger position wins), in row order
            key = done.rows * (self.max_seq + 1) + done.positions
            order = torch.argsort(key)
            rows_sorted = done.rows[order]
            is_last = torch.ones_like(rows_sorted, dtype=torch.bool)
            is_last[:-1] = rows_sorted[1:] != rows_sorted[:-1]
            # order[is_last] without reading its size from the device: one last token per ready row
            last = order[torch.argsort((~is_last).to(torch.uint8), stable=True)[: len(ready_rows)]]
            logits = stages.head(hidden[last])
        for row, position, depth in zip(rows, positions, steps):
            self.rows[row].depths[position] = depth
        greedy = greedy_tokens(logits).tolist()  # one call for every row (most requests are greedy)
        finished = []
        for index, row in enumerate(ready_rows):
            completion = self._sample(row, logits, index, greedy[index])
            if completion is not None:
                finished.append(completion)
        return finished

    def _sample(self, row: int, logits: Tensor, index: int, greedy: int) -> Optional[Completion]:
        """Row `row`'s next token: `greedy` (the argmax of `logits[index]`) or sampled from that row."""
        state = self.rows[row]
        params = state.request.params
        token = greedy if params.greedy else sample(logits[index], params, state.generator)
        state.generated.append(token)
        self.stats.generated_tokens += 1
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        reason = stop_reason(state.generated, params, decode)
        if reason is None and state.next_position >= self.max_seq:
            reason = "length"
        if reason is None:
            state.pending = [token]
            return None
        del self.rows[row]
        text = None
        if self.tokenizer is not None:
            text = cut_at_stop(self.tokenizer.decode(state.generated), params)
        depths = [state.depths[p] for p in sorted(state.depths)]
        return Completion(
            state.request.request_id, state.request.prompt, state.generated, reason, depths, text
        )
