"""Engine sampling options: stop tokens, stop strings, max_seq, seeded temperature / top-p
sampling (the same tokens at any batch size and as decoding alone), and the logit filters."""

import pytest
import torch

from mor_megatron.inference import Engine, SamplingParams
from mor_megatron.inference.sampling import cut_at_stop, filter_logits, sample
from model_helpers import build, generate_sequential, tiny_config

MAX_SEQ = 40


def prompts(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (5, 9, 3)]


def model_for(router, kv_mode="recursion_wise"):
    return build(tiny_config(router=router, kv_mode=kv_mode, effective_layers=5, seq_length=MAX_SEQ))


def test_stop_tokens_and_max_seq(parallel):
    model = model_for("token_choice", "recursion_wise")
    prompt = prompts(model.config)[0]
    free = generate_sequential(model, prompt, SamplingParams(max_tokens=8), max_seq=MAX_SEQ)
    stop = free[3]
    first = free.index(stop)
    engine = Engine(model, max_batch=2, max_seq=MAX_SEQ)
    done = engine.generate([prompt, prompt], [SamplingParams(max_tokens=8, stop_token_ids=(stop,)), SamplingParams(max_tokens=100)])
    assert done[0].token_ids == free[: first + 1] and done[0].finish_reason == "stop"
    # the second request runs into the cache length
    assert done[1].finish_reason == "length" and len(prompt) + len(done[1].token_ids) == MAX_SEQ + 1


def test_stop_strings_with_a_tokenizer(parallel):
    class Letters:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    model = model_for("expert_choice", "recursion_wise")
    prompt = prompts(model.config)[1]
    free = generate_sequential(model, prompt, SamplingParams(max_tokens=6), max_seq=MAX_SEQ)
    text = Letters().decode(free)
    stop = text[2:4]
    engine = Engine(model, max_batch=1, max_seq=MAX_SEQ, tokenizer=Letters())
    (done,) = engine.generate([prompt], SamplingParams(max_tokens=6, stop_strings=(stop,)))
    assert done.finish_reason == "stop" and done.text == text[: text.find(stop)]


def test_seeded_sampling_is_reproducible_across_batch_sizes(parallel):
    model = model_for("expert_choice", "recursion_wise")
    requests = prompts(model.config)[:3]
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=i) for i in range(3)]
    one = Engine(model, max_batch=1, max_seq=MAX_SEQ).generate(requests, params)
    three = Engine(model, max_batch=3, max_seq=MAX_SEQ).generate(requests, params)
    assert [c.token_ids for c in one] == [c.token_ids for c in three]
    assert [c.token_ids for c in one] == [generate_sequential(model, r, p, MAX_SEQ) for r, p in zip(requests, params)]


def test_sampling_filters():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    probs = logits.softmax(-1)
    kept = filter_logits(logits, top_p=float(probs[0]) + 1e-3).isfinite()
    assert kept.tolist() == [True, True, False, False]
    assert filter_logits(logits, top_p=0.01).isfinite().tolist() == [True, False, False, False]
    assert filter_logits(logits, top_k=3).isfinite().tolist() == [True, True, True, False]
    assert sample(logits, SamplingParams()) == 0
    generator = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), generator) for _ in range(50)}
    assert draws == {0, 1}
    assert cut_at_stop("hello world", SamplingParams(stop_strings=("o w", "ld"))) == "hell"
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
