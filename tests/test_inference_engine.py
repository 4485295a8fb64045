"""The engine: continuous depth-wise batching returns exactly the tokens of decoding each request
alone (greedy), mixes recursion depths in one block call, refills rows from the queue; sampling
options and stop rules."""

import pytest
import torch

from model_helpers import build, generate_sequential, tiny_config
from mor_megatron.inference import Engine, SamplingParams

MAX_SEQ = 40
LENGTHS = [5, 9, 3, 11, 4]
NEW_TOKENS = [8, 5, 10, 6, 4]


def prompts(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]


def model_for(router, kv_mode):
    """1 + 3 x 1 + 1 layers (vanilla: 5 layers), small enough for 2 busy cores."""
    if router == "none":
        return build(tiny_config(router="none", sharing="none", num_recursions=1, effective_layers=5, seq_length=MAX_SEQ))
    return build(tiny_config(router=router, kv_mode=kv_mode, effective_layers=5, seq_length=MAX_SEQ))


@pytest.mark.parametrize(
    "router,kv_mode,cap",
    [
        ("expert_choice", "recursion_wise", None),
        ("expert_choice", "share_first", 6),
        ("token_choice", "recursion_wise", 6),
        ("token_choice", "share_first", None),
        ("none", "recursion_wise", None),
    ],
)
def test_depthwise_batching_equals_decoding_alone(parallel, router, kv_mode, cap):
    model = model_for(router, kv_mode)
    requests = prompts(model.config)
    params = [SamplingParams(max_tokens=n) for n in NEW_TOKENS]
    engine = Engine(model, max_batch=3, max_seq=MAX_SEQ, max_block_tokens=cap)
    completions = engine.generate(requests, params)
    for prompt, p, completion in zip(requests, params, completions):
        assert completion.token_ids == generate_sequential(model, prompt, p, max_seq=MAX_SEQ)
        assert completion.finish_reason == "length"
        assert len(completion.depths) == len(prompt) + len(completion.token_ids) - 1
    stats = engine.stats
    assert stats.generated_tokens == sum(NEW_TOKENS)
    # compute counted in layer passes: unique layers once per token, the block once per step run
    stages = engine.stages
    unique, block = len(stages.prefix) + len(stages.suffix), len(stages.plan.block)
    depths = [d for c in completions for d in c.depths]
    assert stats.layer_tokens == sum(unique + block * d for d in depths)
    assert stats.entered_tokens == len(depths)
    assert not engine.rows and engine.pool is None or engine.pool.count == 0
    if router != "none":
        assert stats.mixed_depth_calls > 0  # one block call held tokens of several depths
        assert {d for c in completions for d in c.depths} >= {1, 2}
        if cap is not None:
            assert stats.block_calls and stats.block_tokens / stats.block_calls <= cap + max(LENGTHS)


def test_rows_are_refilled_from_the_queue(parallel):
    model = model_for("expert_choice", "recursion_wise")
    engine = Engine(model, max_batch=2, max_seq=MAX_SEQ)
    for prompt, n in zip(prompts(model.config), NEW_TOKENS):
        engine.add_request(prompt, SamplingParams(max_tokens=n))
    held, finished = [], []
    while engine.busy:
        now = engine.tick()
        finished += now
        # requests in flight during this step: still held, or finished by it
        held.append({state.request.request_id for state in engine.rows.values()} | {c.request_id for c in now})
    assert max(len(h) for h in held) == 2 and len(finished) == len(LENGTHS)
    # the first finished request's row goes to request 2 while the other first request decodes
    other = 1 - finished[0].request_id
    assert {other, 2} in held


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a device value on the host (a sync on CUDA)."""

    READS = {"__int__", "__bool__", "__float__", "item", "tolist", "nonzero", "unique"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_decode_tick_host_reads_do_not_grow_with_depth(parallel):
    """Routing bookkeeping and KV-cache bounds live on the host: a decode tick reads the device
    a few times (routing's count, the sampled tokens), not once per layer or recursion step."""
    reads = {}
    for layers in (5, 8):  # shared block of 1 and of 2 layers
        model = build(tiny_config(router="expert_choice", effective_layers=layers, seq_length=MAX_SEQ))
        engine = Engine(model, max_batch=4, max_seq=MAX_SEQ, depth_override=lambda rows, positions: 3 - positions % 3)
        for _ in range(4):
            engine.add_request([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=12))
        for _ in range(6):  # prefill and its exits
            engine.tick()
        per_tick = []
        for _ in range(9):  # decode ticks: every depth 1-3
            with _HostReads() as counter:
                engine.tick()
            per_tick.append(counter.count)
        reads[layers] = per_tick
    assert reads[5] == reads[8] and max(reads[5]) <= 4, reads


def test_admission_host_reads_do_not_grow_with_the_rows_admitted(parallel):
    """A tick that admits requests forgets their rows' caches in one reset: its device reads are
    the same for one admitted row as for eight (not one reset, and its reads, per row); and the
    refilled rows decode as if alone."""
    model = model_for("expert_choice", "recursion_wise")
    requests = prompts(model.config)
    reads = {}
    for count in (1, 8):
        engine = Engine(model, max_batch=8, max_seq=MAX_SEQ, track_memory=True)
        for _ in range(count):
            engine.add_request(requests[0], SamplingParams(max_tokens=2))
        with _HostReads() as counter:
            engine._admit()
        reads[count] = counter.count
        assert sorted(engine.rows) == list(range(count))
    assert reads[1] == reads[8], reads
    # rows 0 and 2 finish in one tick (equal prompt lengths and lengths to generate; vanilla: one
    # tick per token): one reset of the row tensor [0, 2] refills both. Right after each
    # admission the admitted rows hold no entry in any cache and the other rows keep theirs
    model = model_for("none", "recursion_wise")
    requests = prompts(model.config)
    requests[2] = requests[2] + requests[0][: len(requests[0]) - len(requests[2])]
    requests.append(requests[1])  # then one row alone: a reset of a slice
    params = [SamplingParams(max_tokens=n) for n in (3, 9, 3, 7, 5, 4)]
    engine = Engine(model, max_batch=3, max_seq=MAX_SEQ)
    caches, admissions = engine.caches.caches.values(), []
    admit = engine._admit

    def recorded():
        held, before = set(engine.rows), [cache.lengths.tolist() for cache in caches]
        admit()
        if set(engine.rows) - held:
            admissions.append((sorted(set(engine.rows) - held), before, [cache.lengths.tolist() for cache in caches]))

    engine._admit = recorded
    completions = engine.generate(requests, params)
    for prompt, p, completion in zip(requests, params, completions):
        assert completion.token_ids == generate_sequential(model, prompt, p, max_seq=MAX_SEQ)
    assert [0, 2] in [rows for rows, _, _ in admissions] and len(admissions[-1][0]) == 1, admissions
    for rows, before, after in admissions:
        for old, new in zip(before, after):
            assert new == [0 if row in rows else length for row, length in enumerate(old)], (rows, old, new)
    # both refills emptied rows that held entries
    assert any(old[0] and old[2] for rows, before, _ in admissions if rows == [0, 2] for old in before)
    assert any(old[admissions[-1][0][0]] for old in admissions[-1][1])
    for cache in caches:  # host counters: entries and the length bound
        assert cache.entries == int(cache.lengths.sum()) and cache._bound() >= int(cache.lengths.max())


def test_compiled_decoding_equals_eager_without_recompiling(parallel):
    """`Engine(compile=...)`: the same greedy tokens as eager decoding; once a run has met the
    token counts a tick can have (its first, a symbolic count, one token), another run with other
    requests compiles nothing new (dynamo's counters)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model_for("expert_choice", "recursion_wise")
    requests = prompts(model.config)
    params = [SamplingParams(max_tokens=n) for n in NEW_TOKENS]
    eager = [c.token_ids for c in Engine(model, max_batch=3, max_seq=MAX_SEQ).generate(requests, params)]
    compiled = Engine(model, max_batch=3, max_seq=MAX_SEQ, compile="aot_eager").generate(requests, params)
    assert [c.token_ids for c in compiled] == eager
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 6  # two compiled functions (layers.lean_qkv, lean_out), at most three graphs each
    again = Engine(model, max_batch=2, max_seq=MAX_SEQ, compile="aot_eager").generate(requests[::-1], params[::-1])
    assert [c.token_ids for c in again] == eager[::-1]
    assert counters["stats"]["unique_graphs"] == graphs
