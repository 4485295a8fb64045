"""The te backend's attention (`TEActiveTokenAttention`) and the FP8 helpers (`model/precision.py`,
`training/fp8.py`).

On CPU: both modules import without Transformer Engine; FP8 asked for on CPU is one clear line;
and the TE attention's layout code (sbhd / thd cu_seqlens / KV-sharing scatter / fallback / FP8
tail padding) is checked against the local backend with a torch stand-in for TE's
`DotProductAttention`. On a CUDA machine with TE: the real TE backend against the local one, the
FP8 gradient of a shared weight, and the FP8 weight cache under DeepSpeed.
"""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from model_helpers import batch, build, logits, tiny_config
from train_helpers import repo_root, write_config
from mor_megatron.model import te_attention
from mor_megatron.model.attention import ActiveTokenAttention
from mor_megatron.model.decoder import MoRDecoder
from mor_megatron.model.specs import get_mor_layer_spec
from mor_megatron.model.te_attention import TEActiveTokenAttention
from mor_megatron.model.token_set import TokenSet
from mor_megatron.model import precision as fp8
from mor_megatron.model.precision import (
    FP8UnavailableError,
    check_fp8_supported,
    fp8_align_size,
    fp8_context,
    pad_active_tokens,
)
from mor_megatron.training.fp8 import refresh_fp8_weight_cache

pytestmark = pytest.mark.usefixtures("parallel")

# (router, kv_mode, routing mode): dense sbhd, dense KV scatter, thd, thd + bshd KV grid, and
# packed expert-choice KV sharing (step 1 partial: the local-mask fallback)
CASES = [
    ("expert_choice", "recursion_wise", "topk"),
    ("expert_choice", "share_first", "topk"),
    ("token_choice", "recursion_wise", "topk"),
    ("token_choice", "share_first", "topk"),
    ("expert_choice", "share_first", "threshold"),
]


# -- CPU: imports and the one-line FP8 error -----------------------------------------------------


def test_modules_import_without_transformer_engine():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'transformer_engine': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mor_megatron.model.te_attention, mor_megatron.model.precision, mor_megatron.model.specs\n"
        "import mor_megatron.training.fp8\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=repo_root()
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may run FP8")
def test_fp8_on_cpu_is_one_clear_line():
    check_fp8_supported(tiny_config())  # FP8 off: nothing to check
    assert isinstance(fp8_context(tiny_config(), "decoder"), contextlib.nullcontext)
    config = tiny_config(fp8="hybrid")
    for call in (lambda: check_fp8_supported(config), lambda: fp8_context(config, "decoder")):
        with pytest.raises(FP8UnavailableError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "FP8 needs a CUDA GPU" in message and "model.fp8 to null" in message
    with pytest.raises(ValueError, match="unknown FP8 scope"):
        fp8_context(tiny_config(), "step")
    assert fp8_align_size(config) == 16 and fp8_align_size(tiny_config()) == 1


def _fp8_check_wired() -> bool:
    import mor_megatron.training.config as run_config
    import mor_megatron.training.loop as loop

    return any("check_fp8_supported" in inspect.getsource(m) for m in (run_config, loop))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may run FP8")
def test_pretrain_with_fp8_on_cpu_exits_2_with_one_line(request, tmp_path, capfd):
    if not _fp8_check_wired():  # else the run would train, FP8 silently off (megatron's no-TE path)
        pytest.xfail("check_fp8_supported is not called by the run yet: apply the loop.py patch (#7)")
    from mor_megatron.pretrain import main

    config = write_config(tmp_path / "run.yaml", request.getfixturevalue("corpus"))
    capfd.readouterr()
    rc = main(["--config", str(config), f"logging.dir={tmp_path / 'run'}", "model.fp8=hybrid"])
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "FP8 needs a CUDA GPU" in lines[0] and "Traceback" not in out + err


# -- CPU: the TE attention's layouts against the local backend ----------------------------------


class ReferenceDotProductAttention(torch.nn.Module):
    """What megatron's TEDotProductAttention computes, in torch: top-left causal for sbhd/bshd,
    causal within each `cu_seqlens` segment for thd (TE's DotProductAttention semantics)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type, packed_seq_params=None):
        layout = packed_seq_params.qkv_format if packed_seq_params is not None else "sbhd"
        if layout == "thd":
            assert attn_mask_type == AttnMaskType.padding_causal
            cu = packed_seq_params.cu_seqlens_q.tolist()
            assert packed_seq_params.cu_seqlens_q.dtype == torch.int32 and cu[-1] == query.shape[0]
            assert packed_seq_params.max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
            parts = [
                self._causal(query[a:b, None], key[a:b, None], value[a:b, None])[:, 0]
                for a, b in zip(cu, cu[1:])
            ]
            return torch.cat(parts)
        assert attn_mask_type == AttnMaskType.causal and layout in ("sbhd", "bshd")
        if layout == "bshd":
            swap = (t.transpose(0, 1) for t in (query, key, value))
            return self._causal(*swap).transpose(0, 1)
        return self._causal(query, key, value)

    @staticmethod
    def _causal(query, key, value):
        """[s, b, h, d] -> [s, b, h * d]."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def _swap_in_te_attention(model, monkeypatch) -> None:
    """Replace every layer's core attention by TEActiveTokenAttention over the torch stand-in,
    with the te decoder's packed (thd) layout for variable steps."""
    monkeypatch.setattr(te_attention, "_build_te_attention", lambda *a, **k: ReferenceDotProductAttention())
    model.decoder.varlen_layout = "packed"
    for layer in model.decoder.layers:
        layer.self_attention.core_attention = TEActiveTokenAttention(
            model.config, layer.layer_number, AttnMaskType.causal
        )


def _pad_like_the_decoder_patch(monkeypatch) -> None:
    """The proposed decoder patch: under FP8, a step's active tokens padded at the tail to the
    FP8 multiple before the block, the output sliced back."""
    if "pad_active_tokens" in inspect.getsource(MoRDecoder):  # the patch has landed
        return
    original = MoRDecoder._run_layers

    def padded(self, layers, hidden, rotary, mask=None):
        if not (self.config.fp8 and mask is not None):
            return original(self, layers, hidden, rotary, mask)
        count = hidden.shape[0]
        hidden, rotary, mask = pad_active_tokens(hidden, rotary, mask, fp8_align_size(self.config))
        return original(self, layers, hidden, rotary, mask)[:count]

    monkeypatch.setattr(MoRDecoder, "_run_layers", padded)


@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "fp8-padded"])
@pytest.mark.parametrize("router,kv_mode,mode", CASES)
def test_te_attention_layouts_equal_local_attention(router, kv_mode, mode, padded, monkeypatch):
    """Logits with TEActiveTokenAttention (torch stand-in for TE) == the local backend's, 1e-5;
    with FP8 tail padding of every recursion step's tokens as well."""
    config = tiny_config(router=router, kv_mode=kv_mode, fp8="hybrid" if padded else None)
    # FP8 regions (once the decoder opens them) let through on CPU: without TE, megatron's
    # get_fp8_context is a null context, so only the padding differs
    monkeypatch.setattr(fp8, "check_fp8_supported", lambda *args, **kwargs: None)
    tokens, positions = batch(config)
    local = build(config)
    expected = logits(local, tokens, positions, routing_mode=mode)
    selections = [s.clone() for s in local.router_output.selections]
    if padded:
        _pad_like_the_decoder_patch(monkeypatch)
    _swap_in_te_attention(local, monkeypatch)
    seen = []
    for layer in local.decoder.layers:
        layer.self_attention.core_attention.register_forward_hook(
            lambda module, args, out: seen.append((args[0].shape[0], getattr(args[3], "pad", 0)))
        )
    out = logits(local, tokens, positions, routing_mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(selections, local.router_output.selections))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if padded:  # every recursion step ran on a multiple of 16 tokens, some of them pads
        assert any(pad for _, pad in seen) and all(count % 16 == 0 for count, pad in seen if pad)


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_pads_never_reach_real_tokens(layout, monkeypatch):
    """Attention outputs of real tokens do not depend on what the tail pad rows hold."""
    monkeypatch.setattr(te_attention, "_build_te_attention", lambda *a, **k: ReferenceDotProductAttention())
    config = tiny_config(fp8="hybrid")
    attention = TEActiveTokenAttention(config, 1, AttnMaskType.causal)
    generator = torch.Generator().manual_seed(3)
    if layout == "dense":  # 9 of 20 positions per sequence, in order
        index = torch.stack([torch.randperm(20, generator=generator)[:9].sort().values for _ in range(3)], 1)
        tokens = TokenSet.dense(index)
    else:
        tokens = TokenSet.packed(torch.rand(20, 3, generator=generator) < 0.6)
    rows, width = tokens.index.shape[0], tokens.index.shape[1] if layout == "dense" else 1
    qkv = [torch.randn(rows, width, heads, 16, generator=generator) for heads in (4, 2, 2)]
    outs = []
    for fill in (0.0, 1e3):
        context = tokens.attention_context({}, "none")
        _, _, active = pad_active_tokens(torch.zeros(rows, width, 1), None, context, 16)
        assert active.pad > 0 and (rows + active.pad) % 16 == 0
        padded = [torch.cat([t, torch.full((active.pad,) + t.shape[1:], fill)]) for t in qkv]
        outs.append(attention(*padded, active)[:rows])
    reference = ActiveTokenAttention(config, 1)(*qkv, tokens.attention_context({}, "none"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0], reference, rtol=0, atol=1e-5)


def test_local_spec_keeps_local_attention_and_te_spec_is_one_line_on_cpu():
    attention = get_mor_layer_spec("local").submodules.self_attention.submodules.core_attention
    assert attention is ActiveTokenAttention
    if not torch.cuda.is_available():
        from mor_megatron.model.specs import BackendUnavailableError

        with pytest.raises(BackendUnavailableError, match="use backend 'local'"):
            get_mor_layer_spec("te")


# -- GPU with Transformer Engine -----------------------------------------------------------------


@pytest.fixture
def te():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return pytest.importorskip("transformer_engine.pytorch")


def _gpu_config(**overrides):
    settings = dict(params_dtype=torch.bfloat16, bf16=True, seq_length=32)
    settings.update(overrides)
    return tiny_config(**settings)


def _te_model(config, seed: int = 0):
    from megatron.core import tensor_parallel

    from mor_megatron.model import MoRGPTModel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return MoRGPTModel(config, backend="te").cuda()


def _local_weights_into_te(local, te_model) -> None:
    """Local parameter names -> TE's (the layer spec's sharded_state_dict_keys_map: each pre-norm
    lives in the following TE linear); TE's FP8 `_extra_state` stays as built."""
    renames = get_mor_layer_spec("local").submodules.sharded_state_dict_keys_map
    state = {}
    for key, value in local.state_dict().items():
        for old, new in renames.items():
            key = key.replace(f".{old}", f".{new}")
        state[key] = value
    result = te_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(key.endswith("_extra_state") for key in result.missing_keys), result.missing_keys


@pytest.mark.parametrize("router,kv_mode,mode", CASES)
def test_te_backend_equals_local_backend_in_bf16(te, router, kv_mode, mode):
    config = _gpu_config(router=router, kv_mode=kv_mode)
    local = build(config).cuda()
    te_model = _te_model(config, seed=1)
    _local_weights_into_te(local, te_model)
    tokens, positions = (t.cuda() for t in batch(config))
    expected = logits(local, tokens, positions, routing_mode=mode)
    out = logits(te_model, tokens, positions, routing_mode=mode)
    for a, b in zip(local.router_output.selections, te_model.router_output.selections):
        assert torch.equal(a, b), "routing diverged between backends (a near-tie at bf16)"
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def _fp8_layer_chain(config, layers, hidden) -> torch.Tensor:
    """Run `layers` one after another under FP8 regions placed as the decoder places them."""
    for layer in set(layers):
        refresh_fp8_weight_cache(layer)
    with fp8_context(config, "decoder"):
        for layer in layers:
            with fp8_context(config, "layer", layer.layer_number):
                hidden = layer(hidden_states=hidden, attention_mask=None)[0]
    return hidden


def test_delayed_scaling_amax_is_the_max_over_recursions(te):
    """The decoder opens one delayed-scaling region around all recursions, so a shared module
    quantizes Nr times in it. TE's cast kernels take an atomic max into the amax slot, so the next
    scale follows the largest input of the Nr calls (TE's autocast docstring still says repeated
    calls override the amax; this checks the kernels, not the docstring)."""
    from transformer_engine.common.recipe import DelayedScaling, Format

    check_fp8_supported(_gpu_config(fp8="hybrid"), backend="te")
    linear = te.Linear(64, 64, bias=False, params_dtype=torch.bfloat16).cuda()
    recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=1, amax_compute_algo="max", margin=0)
    # the largest input first: "the last call wins" would give a 16x larger scale
    inputs = [bound * (2 * torch.rand(32, 64, device="cuda") - 1).bfloat16() for bound in (8.0, 2.0, 0.5)]
    with te.autocast(enabled=True, recipe=recipe):  # one region, three calls, as over recursions
        for x in inputs:
            linear(x)
    amax = max(float(x.abs().max()) for x in inputs)
    scale = float(linear.fp8_meta["scaling_fwd"].scale[0])  # forward input quantizer
    assert scale == pytest.approx(448.0 / amax, rel=1e-2)  # E4M3's largest value over the amax


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_shared_weight_fp8_gradient_is_the_sum_over_recursions(te, recipe):
    """A shared TE layer called Nr times under FP8 == Nr copies of it, one per recursion: the
    gradient of a shared weight is the sum of the per-recursion gradients, none dropped."""
    config = _gpu_config(fp8="hybrid", fp8_recipe=recipe)
    check_fp8_supported(config, backend="te")
    shared_model = _te_model(config)
    shared = shared_model.decoder.layers[config.recursion_plan.block[0]]
    nr = config.num_recursions
    unrolled = _te_model(_gpu_config(fp8="hybrid", fp8_recipe=recipe, effective_layers=nr,
                                     num_recursions=1, sharing="none", router="none"))
    copies = list(unrolled.decoder.layers)
    for copy in copies:
        copy.load_state_dict(shared.state_dict())
    hidden = torch.randn(config.seq_length, 2, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    # a sum, not a mean: gradients of order 1 stay inside E5M2's range at the first step's scale 1
    _fp8_layer_chain(config, [shared] * nr, hidden).float().square().sum().backward()
    _fp8_layer_chain(config, copies, hidden).float().square().sum().backward()
    name = "self_attention.linear_qkv.weight"
    total = dict(shared.named_parameters())[name].grad.float()
    parts = [dict(copy.named_parameters())[name].grad.float() for copy in copies]
    torch.testing.assert_close(total, sum(parts), rtol=5e-2, atol=5e-2 * float(total.abs().max()))
    assert float((total - parts[0]).norm()) > 0.1 * float(total.norm())  # later recursions count


def _fp8_deepspeed(seed: int = 0):
    """A TE model with FP8 in a DeepSpeed engine, and one batch for it."""
    from mor_megatron.training.config import TrainingConfig
    from mor_megatron.training.optimizer import build_engine

    # expert-choice capacities whose k_r * B are multiples of 16 (FP8 GEMMs) without padding
    config = _gpu_config(fp8="hybrid", capacities=(1.0, 0.5, 0.25))
    check_fp8_supported(config, backend="te")
    model = _te_model(config, seed)
    engine = build_engine(model, TrainingConfig(micro_batch_size=2, global_batch_size=2, lr=1e-2,
                                                warmup_steps=0, bf16=True), 2, 1)
    tokens = batch(config)[0].cuda()
    labels, mask = torch.roll(tokens, -1, 1), torch.ones_like(tokens)
    return model, engine, [{"tokens": tokens, "labels": labels, "loss_mask": mask}]


def test_deepspeed_fp8_steps_refresh_the_weight_cache(te, monkeypatch):
    """Three FP8 steps through DeepSpeed: the cached FP8 weight follows every update; without
    the refresh it would stay at the first step's weights."""
    from mor_megatron.training import schedule
    from mor_megatron.training.schedule import train_step

    model, engine, step_batch = _fp8_deepspeed()
    linear = model.decoder.layers[model.config.recursion_plan.block[0]].self_attention.linear_qkv

    def cached() -> torch.Tensor:
        return linear._fp8_workspaces["weight"].dequantize().float().clone()

    snapshots = []
    for _ in range(3):
        assert refresh_fp8_weight_cache(engine) > 0
        assert train_step(engine, step_batch).finite
        snapshots.append(cached())
    assert all(not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:]))
    # no refresh (also not the one train_step makes): the cache keeps the previous step's
    # weights, the trap a DeepSpeed loop falls into
    monkeypatch.setattr(schedule, "refresh_fp8_weight_cache", lambda engine: 0, raising=False)
    train_step(engine, step_batch)
    torch.testing.assert_close(cached(), snapshots[-1], rtol=0, atol=0)


def test_fp8_state_survives_a_checkpoint(te, tmp_path):
    """The FP8 scaling state of every TE module (scales and amax history, in its `_extra_state`)
    is written with a checkpoint and restored by a resume at the same layout."""
    from mor_megatron.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from mor_megatron.training.schedule import train_step

    model, engine, step_batch = _fp8_deepspeed()
    for _ in range(2):
        refresh_fp8_weight_cache(engine)
        assert train_step(engine, step_batch).finite
    directory = save_checkpoint(engine, model, TrainState(step=2), str(tmp_path), {})
    fresh, fresh_engine, _ = _fp8_deepspeed(seed=1)

    def fp8_state(module) -> dict[str, torch.Tensor]:
        out = {}
        for name, sub in module.named_modules():
            meta = getattr(sub, "fp8_meta", None) or {}
            for key in ("scaling_fwd", "scaling_bwd"):
                if key in meta:
                    out[f"{name}.{key}.scale"] = meta[key].scale.clone()
                    out[f"{name}.{key}.amax_history"] = meta[key].amax_history.clone()
        return out

    trained = fp8_state(model)
    assert trained and any(not torch.equal(t, torch.ones_like(t)) for k, t in trained.items() if k.endswith("scale"))
    load_checkpoint(fresh_engine, fresh, directory)
    restored = fp8_state(fresh)
    assert restored.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0, msg=key)
