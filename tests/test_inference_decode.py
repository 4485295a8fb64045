"""Incremental decoding (prefill + one token at a time, static KV caches) equals the model's full
forward in threshold routing mode, token by token, for both routers and both KV modes."""

import pytest
import torch

from model_helpers import batch, build, tiny_config
from mor_megatron.inference import IncrementalDecoder
from mor_megatron.inference.layers import LeanLayer, lean_unsupported

COMBOS = [
    ("expert_choice", "recursion_wise"),
    ("expert_choice", "share_first"),
    ("token_choice", "recursion_wise"),
    ("token_choice", "share_first"),
]


def full_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None, extra_block_kwargs={"routing_mode": "threshold", "record_selections": True})


def incremental_logits(decoder, tokens, prefill):
    outs = [decoder.forward(tokens[:, :prefill])]
    for i in range(prefill, tokens.shape[1]):
        outs.append(decoder.forward(tokens[:, i : i + 1]))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "modules"])
@pytest.mark.parametrize("router,kv_mode", COMBOS)
def test_incremental_equals_full_forward(parallel, router, kv_mode, lean):
    """Both ways of running a layer (plain ops on the weights, megatron's modules) equal the
    model's own forward."""
    config = tiny_config(router=router, kv_mode=kv_mode)
    model = build(config)
    tokens, _ = batch(config, batch_size=2)
    full = full_logits(model, tokens)
    selections = model.router_output.selections
    decoder = IncrementalDecoder(model, max_batch=2, lean=lean)
    assert all(isinstance(layer, LeanLayer) for layer in decoder.stages.layers) == lean
    inc = incremental_logits(decoder, tokens, prefill=7)
    assert (inc - full).abs().max() < 1e-4
    # routing is not trivial: some tokens stop before the last recursion
    assert 0 < int(selections[-1].sum()) < tokens.numel()
    # the cache of step r holds exactly the tokens active at step r (recursion-wise)
    if kv_mode == "recursion_wise":
        layer = config.recursion_plan.block[0]
        for step, selected in enumerate(selections):
            assert decoder.caches.block(layer, step).lengths.tolist() == selected.sum(0).tolist()


def test_depths_match_the_model_selections(parallel):
    config = tiny_config()
    model = build(config)
    tokens, _ = batch(config, batch_size=2)
    full_logits(model, tokens)
    expected = torch.stack(model.router_output.selections).sum(0).t()  # [B, S]
    decoder = IncrementalDecoder(model, max_batch=2)
    rows = torch.arange(2).repeat_interleave(config.seq_length)
    out = decoder.forward_flat(tokens.reshape(-1), rows)
    assert out.depths.view(2, -1).tolist() == expected.tolist()


def test_rows_of_different_lengths_and_positions(parallel):
    """Rows advance independently through the flat API: row 1 starts later and is fed in
    uneven chunks; each row equals its own full forward."""
    config = tiny_config(router="expert_choice", aux_router=True, router_activation="tanh")
    model = build(config)
    tokens, _ = batch(config, batch_size=2)
    full = full_logits(model, tokens)
    decoder = IncrementalDecoder(model, max_batch=3)
    got = {0: [], 2: []}
    plan = [(0, 5), (2, 2), (0, 1), (2, 9), (0, 10)]  # (row, tokens to feed)
    fed = {0: 0, 2: 0}
    for row, count in plan:
        source = tokens[0 if row == 0 else 1]
        chunk = source[fed[row] : fed[row] + count]
        got[row].append(decoder.forward_flat(chunk, torch.full((count,), row)).logits)
        fed[row] += count
    torch.testing.assert_close(torch.cat(got[0]), full[0, : fed[0]], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(got[2]), full[1, : fed[2]], atol=1e-4, rtol=0)
    # two tokens of different rows in one call, then reset one row and start it over
    decoder.reset(torch.tensor([2]))
    out = decoder.forward_flat(torch.stack([tokens[0, 16], tokens[1, 0]]), torch.tensor([0, 2])).logits
    torch.testing.assert_close(out[0], full[0, 16], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], full[1, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("sharing", ["none", "middle_cycle"])
def test_models_without_router(parallel, sharing):
    """Vanilla (every layer unique) and a shared block without a router (every unit its own cache)."""
    config = tiny_config(router="none", sharing=sharing, num_recursions=1 if sharing == "none" else 3, seq_length=12)
    model = build(config)
    tokens, _ = batch(config, batch_size=2)
    full = full_logits(model, tokens)
    decoder = IncrementalDecoder(model, max_batch=2)
    assert (incremental_logits(decoder, tokens, prefill=3) - full).abs().max() < 1e-4
    report = decoder.caches.kv_usage()
    assert report.used_bytes == report.vanilla_used_bytes


def test_cycle_sharing_without_unique_layers(parallel):
    config = tiny_config(sharing="cycle", effective_layers=6, num_recursions=3)
    model = build(config)
    tokens, _ = batch(config, batch_size=1)
    full = full_logits(model, tokens)
    decoder = IncrementalDecoder(model, max_batch=1)
    assert (incremental_logits(decoder, tokens, prefill=1) - full).abs().max() < 1e-4


def test_layers_the_lean_path_cannot_run_use_their_modules(parallel):
    """A layer with linear biases is outside `LeanLayer`'s arithmetic: it runs its own modules,
    and decoding still equals the full forward."""
    config = tiny_config(add_bias_linear=True)
    model = build(config)
    assert lean_unsupported(model.decoder.layers[0]) == "linear biases"
    with pytest.raises(ValueError, match="linear biases"):
        LeanLayer(model.decoder.layers[0])
    tokens, _ = batch(config, batch_size=1)
    full = full_logits(model, tokens)
    decoder = IncrementalDecoder(model, max_batch=1)
    assert not any(isinstance(layer, LeanLayer) for layer in decoder.stages.layers)
    assert (incremental_logits(decoder, tokens, prefill=4) - full).abs().max() < 1e-4
