"""Routing behaviour: capacities, nesting, causality, gradients, FLOPs, KV modes."""

from collections import defaultdict

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mor_megatron.model.decoder import MoRDecoder
from mor_megatron.model.token_set import TokenSet
from model_helpers import batch, build, logits, tiny_config

pytestmark = pytest.mark.usefixtures("parallel")


@pytest.mark.parametrize("num_recursions,depth", [(2, 6), (3, 8), (4, 10)])
@pytest.mark.parametrize("seq_length", [24, 17])
def test_expert_choice_selects_exactly_k_per_sequence_and_nests(num_recursions, depth, seq_length):
    config = tiny_config(effective_layers=depth, num_recursions=num_recursions, seq_length=seq_length)
    model = build(config)
    tokens, positions = batch(config, batch_size=3)
    logits(model, tokens, positions)
    selections = model.router_output.selections
    expected = config.capacity_tokens(seq_length)
    assert expected == [max(1, (num_recursions - r) * seq_length // num_recursions) for r in range(num_recursions)]
    previous = torch.ones_like(selections[0])
    for step, selected in enumerate(selections):
        assert selected.sum(dim=0).tolist() == [expected[step]] * 3
        assert not (selected & ~previous).any(), "a token selected without being a candidate"
        previous = selected


def test_token_choice_depths_nest_and_match_histogram():
    config = tiny_config(router="token_choice")
    model = build(config)
    tokens, positions = batch(config, batch_size=3)
    logits(model, tokens, positions)
    out = model.router_output
    counts = out.depth_histogram.tolist()
    for step, selected in enumerate(out.selections):
        assert selected.sum().item() == sum(counts[step:])
        if step:
            assert not (selected & ~out.selections[step - 1]).any()
    assert float(out.max_vio) == pytest.approx((max(counts) - sum(counts) / 3) / (sum(counts) / 3))


def _perturb_after(tokens, t, vocab, seed):
    changed = tokens.clone()
    generator = torch.Generator().manual_seed(seed)
    changed[:, t + 1 :] = torch.randint(0, vocab, changed[:, t + 1 :].shape, generator=generator)
    return changed


@pytest.mark.parametrize(
    "router,mode,kv_mode",
    [
        ("token_choice", "topk", "recursion_wise"),
        ("token_choice", "topk", "share_first"),
        ("expert_choice", "threshold", "recursion_wise"),
        ("expert_choice", "threshold", "share_first"),
    ],
)
def test_causal_routing_never_looks_ahead(router, mode, kv_mode):
    config = tiny_config(router=router, kv_mode=kv_mode)
    model = build(config)
    tokens, positions = batch(config)
    base = logits(model, tokens, positions, routing_mode=mode)
    for t in (0, 5, 11, config.seq_length - 2):
        changed = _perturb_after(tokens, t, config.vocab_size, seed=t)
        out = logits(model, changed, positions, routing_mode=mode)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


def test_threshold_routing_selects_per_token():
    """Threshold decisions are sigmoid(logit) >= 0.5 among candidates, so counts vary per row."""
    config = tiny_config()
    model = build(config)
    tokens, positions = batch(config, batch_size=4)
    logits(model, tokens, positions, routing_mode="threshold")
    selections = model.router_output.selections
    assert selections[0].all(), "a capacity-1 step keeps every token, as top-k does"
    for earlier, later in zip(selections, selections[1:]):
        assert not (later & ~earlier).any()


def test_training_topk_leaks_future_information():
    """Known limitation of expert-choice training (docs/DESIGN.md 3.4): the per-sequence top-k looks at
    later tokens, so changing the future can change earlier logits. Decoding uses threshold
    routing instead (tested above)."""
    config = tiny_config()
    model = build(config)
    tokens, positions = batch(config)
    base = logits(model, tokens, positions)
    leaked = False
    for seed in range(8):
        t = config.seq_length // 2
        out = logits(model, _perturb_after(tokens, t, config.vocab_size, seed), positions)
        leaked |= not torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
    assert leaked


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("kv_mode", ["recursion_wise", "share_first"])
def test_gradients_reach_routers_and_sum_over_recursions(router, kv_mode, monkeypatch):
    config = tiny_config(router=router, kv_mode=kv_mode, aux_router=router == "expert_choice")
    model = build(config)
    tokens, positions = batch(config)
    labels = torch.roll(tokens, -1, dims=1)
    model(tokens, positions, None, labels=labels).mean().backward()

    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"
        grads[name] = param.grad.clone()
    block = config.recursion_plan.block
    shared = {id(p) for i in block for p in model.decoder.layers[i].parameters()}
    assert len(shared) == sum(1 for i in block for _ in model.decoder.layers[i].parameters())

    # Re-run with every layer call using its own copy of the weights: each shared parameter's
    # gradient must equal the sum of its copies' gradients.
    copies = defaultdict(list)

    def call_with_copies(layer, hidden, rotary, mask):
        params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
        copies[id(layer)].append(params)
        kwargs = dict(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
        return torch.func.functional_call(layer, params, (), kwargs)[0]

    monkeypatch.setattr(MoRDecoder, "_call_layer", staticmethod(call_with_copies))
    model.zero_grad()
    model(tokens, positions, None, labels=labels).mean().backward()
    for index in block:
        layer = model.decoder.layers[index]
        uses = copies[id(layer)]
        assert len(uses) == config.num_recursions
        for name, param in layer.named_parameters():
            summed = sum(use[name].grad for use in uses)
            torch.testing.assert_close(grads[f"decoder.layers.{index}.{name}"], summed)


def _linear_params(config):
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.head_dim
    d, ffn = config.hidden_size, config.ffn_hidden_size
    return d * (heads + 2 * groups) * head_dim + heads * head_dim * d + d * 2 * ffn + ffn * d


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_shared_block_matmul_flops_follow_the_rows_run(router):
    config = tiny_config(router=router, seq_length=48)
    model = build(config)
    tokens, positions = batch(config, batch_size=2)
    with FlopCounterMode(display=False) as counter:
        logits(model, tokens, positions)
    active = sum(int(s.sum()) for s in model.router_output.selections)
    run = sum(int(n) for n in model.router_output.run_tokens)  # pads included
    if router == "expert_choice":
        assert active == run == 2 * sum(config.capacity_tokens(48))
    assert active <= run < config.num_recursions * 2 * 48
    for index in config.recursion_plan.block:
        flops = counter.get_flop_counts()[f"MoRGPTModel.decoder.layers.{index}"]
        assert sum(flops.values()) == 2 * _linear_params(config) * run


def test_attention_queries_are_the_active_tokens_only():
    config = tiny_config(seq_length=30)
    model = build(config)
    seen = []
    shared = model.decoder.layers[config.recursion_plan.block[0]].self_attention.core_attention
    shared.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    logits(model, *batch(config))
    assert seen == [(k, 2) for k in config.capacity_tokens(30)]


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_share_first_equals_full_sequence_simulation(router, monkeypatch):
    """Recursive KV sharing computed on the active tokens only == the public code's simulation:
    every token through every step with step-1 keys/values, then the active rows taken."""
    config = tiny_config(router=router, kv_mode="share_first")
    model = build(config)
    tokens, positions = batch(config)
    compact = logits(model, tokens, positions)
    original = MoRDecoder._run_block_on
    seq_len, batch_size = config.seq_length, tokens.shape[0]

    def full_then_gather(self, active, hidden, rotary, kv_store, step):
        everyone = TokenSet.dense(torch.arange(seq_len).unsqueeze(1).expand(seq_len, batch_size))
        full = original(self, everyone, hidden, rotary, kv_store, step)
        return active.gather(full)

    monkeypatch.setattr(MoRDecoder, "_run_block_on", full_then_gather)
    simulated = logits(model, tokens, positions)
    torch.testing.assert_close(compact, simulated, rtol=0, atol=1e-5)


def test_kv_modes_differ_and_share_first_reuses_step_one_keys():
    recursion_wise = build(tiny_config())
    share_first = build(tiny_config(kv_mode="share_first"))
    share_first.load_state_dict(recursion_wise.state_dict())
    tokens, positions = batch(recursion_wise.config)
    assert not torch.allclose(
        logits(recursion_wise, tokens, positions), logits(share_first, tokens, positions)
    )
    layer = share_first.decoder.layers[share_first.config.recursion_plan.block[0]]
    key_lengths = []
    layer.self_attention.core_attention.register_forward_hook(
        lambda module, args, out: key_lengths.append(args[1].shape[0])
    )
    logits(share_first, tokens, positions)
    # megatron computes k/v for the active tokens; the core attention swaps in step 1's full set
    assert key_lengths == share_first.config.capacity_tokens(share_first.config.seq_length)


def test_router_statistics_structure():
    config = tiny_config()
    model = build(config)
    logits(model, *batch(config))
    metrics = model.router_output.metrics()
    for step in (1, 2, 3):
        for name in ("selected_tokens", "sampling_accuracy", "dead_token_ratio"):
            assert f"router/r{step}/{name}" in metrics
    assert metrics["router/r1/dead_token_ratio"] == 0.0
    assert 0.0 <= metrics["router/r3/sampling_accuracy"] <= 1.0
    assert metrics["router/aux_loss"] == pytest.approx(0.001 * metrics["router/loss_bce"], rel=1e-5)


def test_token_choice_capacity_factor_caps_work_and_logs_drops():
    config = tiny_config(router="token_choice", token_choice_capacity_factor=0.5, seq_length=30)
    model = build(config)
    tokens, positions = batch(config, batch_size=2)
    logits(model, tokens, positions)
    out = model.router_output
    for step in range(1, config.num_recursions):
        limit = -(-0.5 * config.capacities[step] * 60 // 1)
        assert out.selections[step].sum() <= limit
    assert len(out.drop_rate) == config.num_recursions - 1
    assert "router/r2/drop_rate" in out.metrics()
    uncapped = build(tiny_config(router="token_choice", seq_length=30))
    logits(uncapped, tokens, positions)
    assert sum(int(s.sum()) for s in out.selections) <= sum(
        int(s.sum()) for s in uncapped.router_output.selections
    )


def test_capacity_factor_needs_token_choice():
    from mor_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="needs router token_choice"):
        tiny_config(token_choice_capacity_factor=1.5)


def test_triton_scatter_kernel_in_the_model_matches_torch(monkeypatch):
    """The model with the Triton gated scatter (CPU interpreter) == with the PyTorch reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = tiny_config(seq_length=12)
    runs = []
    for kernel in ("torch", "triton"):
        model = build(tiny_config(seq_length=12, scatter_kernel=kernel))
        tokens, positions = batch(config)
        out = model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))
        out.mean().backward()
        runs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-6)
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(grad, runs[1][1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_choice_losses_and_stats_have_no_data_dependent_shapes(dtype):
    """They run at every recursion step of every training step. A boolean index
    (`logits[candidates]`) has a data-dependent size and `.item()` a data-dependent value: on CUDA
    either makes the host wait for the device. Fake tensors (shapes, no data) refuse both, so
    running them on fake tensors shows there is none. Their values and gradients equal the sums
    over the boolean-indexed candidates (the rule read directly: means over the candidates)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mor_megatron.model.routing import expert_choice_losses, expert_choice_step_stats

    config = tiny_config(router_z_loss_coeff=1e-3, aux_router=True)
    generator = torch.Generator().manual_seed(0)
    logits_ = torch.randn(16, 3, generator=generator).to(dtype).requires_grad_()
    aux = torch.randn(16, 3, generator=generator).to(dtype).requires_grad_()
    candidates = torch.rand(16, 3, generator=generator) < 0.7
    selected = candidates & (torch.rand(16, 3, generator=generator) < 0.5)

    def both(logits_, aux, candidates, selected):
        return (expert_choice_losses(config, logits_, aux, candidates, selected),
                expert_choice_step_stats(logits_, candidates, selected))

    with FakeTensorMode() as fake:
        both(*(fake.from_tensor(t) for t in (logits_, aux, candidates, selected)))
    losses, stats = both(logits_, aux, candidates, selected)

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    count = candidates.sum().item()
    target = selected[candidates].float()
    expected = {
        "bce": bce(logits_[candidates].float(), target, reduction="sum") / count,
        "z": logits_[candidates].float().square().sum() / count,
        "aux_router_bce": bce(aux[candidates].float(), target, reduction="sum") / count,
    }
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name].float(), value.detach(), **tolerance)
        got = torch.autograd.grad(losses[name], (logits_, aux), retain_graph=True, allow_unused=True,
                                  materialize_grads=True)
        want = torch.autograd.grad(value, (logits_, aux), retain_graph=True, allow_unused=True,
                                   materialize_grads=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), **tolerance)
    agree = ((logits_.detach()[candidates] >= 0) == selected[candidates]).float().mean()
    torch.testing.assert_close(stats["sampling_accuracy"], agree)
    assert stats["selected_tokens"].item() == selected.sum().item()


@pytest.mark.parametrize("settings", [
    {},
    {"kv_mode": "share_first"},
    {"aux_router": True, "router_z_loss_coeff": 1e-3, "recompute_granularity": "full", "recompute_method": "uniform",
     "recompute_num_layers": 1},
])
def test_an_expert_choice_training_step_has_no_data_dependent_shapes(settings):
    """The whole forward and backward of an expert-choice model (static k per step) on fake
    tensors: no boolean index, `nonzero` or `.item()` anywhere, so nothing in it waits for the
    device on CUDA (the one read of the step's statistics, `RouterOutput.metrics`, comes after)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = tiny_config(**settings)
    model = build(config)
    tokens, positions = batch(config)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        tokens, positions = fake.from_tensor(tokens), fake.from_tensor(positions)
        model(tokens, positions, None, labels=tokens).float().mean().backward()
    assert model.decoder.router_output is not None
