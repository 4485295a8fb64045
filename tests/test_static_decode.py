"""The static-shape decode tick (`StaticBatchDecoder`): the greedy tokens of decoding each prompt
alone through the eager `IncrementalDecoder`, and tick by tick its logits (1e-5) and depths, for
every router and KV mode, with and without steps that overflow their token places (redone
eagerly); compiled, one graph for every tick."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from model_helpers import build, generate_sequential, tiny_config
from mor_megatron.inference import IncrementalDecoder, SamplingParams, StaticBatchDecoder

MAX_SEQ = 32
LENGTHS = [5, 9, 3, 7]
NEW_TOKENS = 12


def _model(router: str, kv_mode: str = "recursion_wise"):
    if router == "none":
        return build(tiny_config(router="none", sharing="none", num_recursions=1, effective_layers=5, seq_length=MAX_SEQ))
    return build(tiny_config(router=router, kv_mode=kv_mode, effective_layers=5, seq_length=MAX_SEQ))


def _prompts(config, count: int = len(LENGTHS)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in LENGTHS[:count]]


def _alone(model, prompts: list[list[int]]) -> list[list[int]]:
    return [generate_sequential(model, p, SamplingParams(max_tokens=NEW_TOKENS), max_seq=MAX_SEQ) for p in prompts]


def _lockstep(model, decoder: StaticBatchDecoder, prompts: list[list[int]], ticks: int) -> None:
    """Tick by tick against the eager `IncrementalDecoder` fed the same tokens in the same rows:
    logits within 1e-5 (fp32) and the same recursion depths."""
    rows = decoder.batch_size
    padded = prompts + [[0]] * (rows - len(prompts))
    eager = IncrementalDecoder(model, max_batch=rows, max_seq=MAX_SEQ)
    flat_rows = torch.tensor([row for row, p in enumerate(padded) for _ in p])
    out = eager.forward_flat(torch.tensor([t for p in padded for t in p]), flat_rows)
    last = torch.tensor([len(p) for p in padded]).cumsum(0) - 1
    logits, positions = decoder.prefill(prompts, ticks + 1)
    torch.testing.assert_close(logits, out.logits[last], atol=1e-5, rtol=1e-5)
    tokens = logits.max(-1).indices
    for _ in range(ticks):
        expected = eager.forward_flat(tokens, torch.arange(rows))
        tick = decoder.tick(tokens, positions)
        torch.testing.assert_close(tick.logits, expected.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(tick.depths, expected.depths)
        tokens, positions = tick.tokens, positions + 1


CASES = [("none", "recursion_wise"), ("expert_choice", "recursion_wise"), ("expert_choice", "share_first"),
         ("token_choice", "recursion_wise"), ("token_choice", "share_first")]


@pytest.mark.parametrize("router,kv_mode", CASES)
def test_static_tick_gives_the_eager_tokens(parallel, router, kv_mode):
    """Enough places (no step can overflow), then one place per step (most ticks overflow and
    run again eagerly): the same tokens as decoding each prompt alone. A fifth row stays idle."""
    model = _model(router, kv_mode)
    prompts = _prompts(model.config)
    reference = _alone(model, prompts)
    nr = model.config.num_recursions if router != "none" else 0
    roomy = StaticBatchDecoder(model, batch_size=5, max_seq=MAX_SEQ, step_tokens=[5] * nr)
    assert roomy.generate(prompts, NEW_TOKENS) == reference
    assert roomy.stats.redone_ticks == 0 and roomy.stats.ticks == NEW_TOKENS - 1
    _lockstep(model, roomy, prompts, NEW_TOKENS)
    assert roomy.stats.redone_ticks == 0
    if router != "none":
        tight = StaticBatchDecoder(model, batch_size=5, max_seq=MAX_SEQ, step_tokens=[1] * nr)
        assert tight.generate(prompts, NEW_TOKENS) == reference
        assert tight.stats.redone_ticks > 0
        # the caches hold what the eager decoder's would: one entry per token of each row per unit layer
        unit = tight.caches.unit(0)
        assert unit.lengths[: len(prompts)].tolist() == [len(p) + NEW_TOKENS - 1 for p in prompts]
        assert unit.entries == sum(len(p) + NEW_TOKENS - 1 for p in prompts) + NEW_TOKENS  # and the idle row's
        _lockstep(model, tight, prompts, NEW_TOKENS)


def test_static_tick_in_capacity_slots_and_eos(parallel):
    """Capacity-sized recursion caches (kv_slots="capacity") and a stop token: each row ends at
    its first eos, as the eager decoder's stop rule does."""
    model = _model("expert_choice")
    prompts = _prompts(model.config, 3)
    reference = _alone(model, prompts)
    eos = reference[1][4]
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in reference]
    decoder = StaticBatchDecoder(model, batch_size=3, max_seq=MAX_SEQ, kv_slots="capacity", capacity_margin=2.0)
    assert decoder.generate(prompts, NEW_TOKENS, eos_id=eos) == expected


def test_compiled_tick_compiles_once(parallel):
    """aot_eager (the graph dynamo captures, run without inductor's code generation): one graph
    for the whole tick, reused by every tick, with the eager tokens."""
    model = _model("expert_choice")
    prompts = _prompts(model.config)
    counter = CompileCounterWithBackend("aot_eager")
    decoder = StaticBatchDecoder(model, batch_size=4, max_seq=MAX_SEQ, step_tokens=[4, 4, 4], compile=counter)
    assert decoder.generate(prompts, NEW_TOKENS) == _alone(model, prompts)
    assert counter.frame_count == 1 and decoder.stats.redone_ticks == 0
    decoder.generate(prompts[::-1], NEW_TOKENS)  # new prompts, new lengths: the same graph
    assert counter.frame_count == 1


def test_bad_arguments_are_refused(parallel):
    model = _model("expert_choice")
    with pytest.raises(ValueError, match="step_tokens"):
        StaticBatchDecoder(model, batch_size=2, step_tokens=[1])
    decoder = StaticBatchDecoder(model, batch_size=2, max_seq=MAX_SEQ)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        decoder.generate([[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="do not fit max_seq=32"):
        decoder.generate([[1] * 30], 4)
