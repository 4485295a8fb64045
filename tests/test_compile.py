"""`torch.compile` for training (`parallel/compile.py`): compiled equals eager, and the graph count
is bounded and settles after the first step.

The wide parity matrix (router x KV mode x recompute) runs with the "aot_eager" backend: the same
dynamo tracing, guards, recompiles and AOT autograd as inductor, without its C++ code generation
(a cold inductor compile costs ~25 s per graph on the 2-core CI machine). One representative case
runs the default inductor backend. Graphs are counted with dynamo's `CompileCounterWithBackend`.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from model_helpers import batch, build, tiny_config
from mor_megatron.parallel import compile as compile_module
from mor_megatron.parallel.compile import compile_enabled, compile_layers
from train_helpers import launch, series

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _steps(model, config, seeds):
    """Forward and backward of one micro-batch per seed: (loss, {name: grad}) each."""
    out = []
    for seed in seeds:
        tokens, positions = batch(config, seed=seed)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1)).mean()
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return out


def _assert_same(eager, compiled):
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        assert torch.allclose(loss_c, loss_e, rtol=0, atol=1e-5), (loss_c, loss_e)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            assert torch.allclose(grads_c[name], grads_e[name], rtol=0, atol=1e-5), name


def _graph_bound(config) -> int:
    """Graphs a model may compile: one full-sequence graph for the unshared layers, then per KV
    role one per distinct k_r (expert-choice) or per token bucket (token-choice)."""
    share = config.kv_mode == "share_first"
    if config.router == "expert_choice":
        capacities = config.capacity_tokens(config.seq_length)
        return 1 + len({(k, share and (r == 0 or "read")) for r, k in enumerate(capacities)})
    roles = 2 if share else 1
    if config.router == "token_choice":
        return 1 + roles * compile_module.TOKEN_BUCKETS
    return 1


CASES = [
    ("none", "recursion_wise", False),
    ("none", "recursion_wise", True),
    *[(router, kv, recompute) for router in ("expert_choice", "token_choice")
      for kv in ("recursion_wise", "share_first") for recompute in (False, True)],
]


@pytest.mark.parametrize("router,kv_mode,recompute", CASES)
def test_compiled_matches_eager_and_stops_compiling(parallel, monkeypatch, router, kv_mode, recompute):
    """aot_eager backend; 3 steps; loss and gradients within 1e-5 (fp32), graphs bounded; for
    static shapes (vanilla, expert-choice) no graph after step 1. Token-choice runs with 2
    buckets, so that its 3 batches' packed counts must share them."""
    monkeypatch.setattr(compile_module, "TOKEN_BUCKETS", 2)
    config = tiny_config(
        router=router, kv_mode=kv_mode, effective_layers=6, num_recursions=2, **(RECOMPUTE if recompute else {})
    )
    eager, compiled = build(config), build(config)
    counter = CompileCounterWithBackend("aot_eager")
    assert compile_layers(compiled, config, backend=counter) == len(compiled.decoder.layers)
    reference = _steps(eager, config, [1, 2, 3])
    first = _steps(compiled, config, [1])
    after_first = counter.frame_count
    rest = _steps(compiled, config, [2, 3])
    _assert_same(reference, first + rest)
    assert 1 <= counter.frame_count <= _graph_bound(config), counter.frame_count
    if router != "token_choice":  # static token counts: every graph exists after step 1
        assert counter.frame_count == after_first


def test_inductor_matches_eager(parallel):
    """The default inductor backend on one expert-choice case (two graphs: k_r = S and S / 2)."""
    config = tiny_config(router="expert_choice", sharing="cycle", effective_layers=4, num_recursions=2)
    eager, compiled = build(config), build(config)
    counter = CompileCounterWithBackend("inductor")
    compile_layers(compiled, config, backend=counter)
    reference = _steps(eager, config, [1, 2])
    _assert_same(reference, _steps(compiled, config, [1, 2]))
    assert counter.frame_count == len(set(config.capacity_tokens(config.seq_length)))


def test_compile_setting_resolves_by_device():
    assert compile_enabled(None, torch.device("cuda", 0))
    assert not compile_enabled(None, torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))


COMPILED = ["training.compile=true", "training.compile_backend=aot_eager"]


@pytest.mark.distributed
def test_compiled_zero3_tp2_matches_eager(expert_setup):
    """ZeRO-3 (its parameter gather hooks outside the compiled forwards) with TP=2 (megatron's
    tensor-parallel autograd functions under dynamo) matches the eager single-process run."""
    config, overrides, reference, root = expert_setup
    run_dir = root / "compiled-zero3-tp2"
    result = launch(config, run_dir, overrides + COMPILED + ["training.zero_stage=3", "parallel.tensor_model_parallel_size=2"],
           nproc=2)
    assert "torch.compile (aot_eager): 4 layers" in result.stdout
    for key in ("train/loss", "train/grad_norm"):
        assert series(run_dir, key) == pytest.approx(series(reference, key), rel=1e-5), key


@pytest.mark.distributed
def test_compiled_pp2_token_choice_matches_eager(token_setup):
    """PP=2 (ZeRO-1) with token-choice's bucketed packed steps on both stages."""
    config, overrides, reference, root = token_setup
    run_dir = root / "compiled-pp2"
    launch(config, run_dir, overrides + COMPILED + ["parallel.pipeline_model_parallel_size=2"], nproc=2)
    for key in ("train/loss", "train/grad_norm"):
        assert series(run_dir, key) == pytest.approx(series(reference, key), rel=1e-5), key
