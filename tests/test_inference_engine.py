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
