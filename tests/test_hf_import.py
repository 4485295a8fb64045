"""Import from Hugging Face: a random GQA `LlamaForCausalLM` built here becomes our vanilla model
with the same logits, or a MoR model whose layers are the base layers the uptraining
initialisation names; mismatched configs or tensors fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from model_helpers import TINY, logits

BASE_LAYERS = 8


def make_llama(directory: Path, layers: int = BASE_LAYERS, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama of the tiny shape, every parameter (norms too) drawn at random."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY["vocab_size"],
        hidden_size=TINY["hidden_size"],
        intermediate_size=TINY["ffn_hidden_size"],
        num_hidden_layers=layers,
        num_attention_heads=TINY["num_attention_heads"],
        num_key_value_heads=TINY["num_query_groups"],
        max_position_embeddings=TINY["seq_length"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    return model


def write_config(path: Path, **model) -> Path:
    section = dict(TINY, effective_layers=BASE_LAYERS, num_recursions=3)
    section.update(model)
    path.write_text(yaml.safe_dump({"model": section}))
    return path


def load_ours(config_path: Path, weights: Path):
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.weights import load_weights
    from mor_megatron.yaml_config import load_model_config

    model = MoRGPTModel(load_model_config(config_path)).eval()
    load_weights(model, str(weights))
    return model


def hf_view(model) -> dict[str, torch.Tensor]:
    """Our model's tensors under HF names."""
    from mor_megatron.hf.layouts import Dims, megatron_to_hf

    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return megatron_to_hf(state, Dims.from_mor(model.config))


def layer(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _quiet(message: str) -> None:
    pass


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_vanilla_import_gives_the_same_logits(parallel, tmp_path, tied):
    from mor_megatron.hf.importer import import_hf

    base = make_llama(tmp_path / "llama", tied=tied)
    config = write_config(tmp_path / "vanilla.yaml", sharing="none", router="none", num_recursions=1, tie_embeddings=tied)
    import_hf(str(tmp_path / "llama"), str(config), str(tmp_path / "weights"), log=_quiet)
    ours = load_ours(config, tmp_path / "weights")
    tokens = torch.randint(0, TINY["vocab_size"], (2, TINY["seq_length"]), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        assert (logits(ours, tokens, positions) - base(tokens).logits).abs().max() < 1e-4


EXPECTED = {  # middle-cycle 1 + 2x3 + 1 over 8 base layers: middle base layers 1..6, d = 2
    "stepwise": {1: [1], 2: [4]},
    "average": {1: [1, 3, 5], 2: [2, 4, 6]},
    "lower": {1: [1], 2: [2]},
    "upper": {1: [5], 2: [6]},
    "random": {1: [], 2: []},
}


@pytest.mark.parametrize("init", list(EXPECTED))
def test_mor_import_ties_the_expected_base_layers(parallel, tmp_path, init):
    from mor_megatron.tools.convert_from_hf import main

    base = make_llama(tmp_path / "llama")
    base_state = {k: v.detach() for k, v in base.state_dict().items()}
    config = write_config(tmp_path / "mor.yaml", router="expert_choice")
    code = main(["--hf", str(tmp_path / "llama"), "--config", str(config), "--init", init, "--output", str(tmp_path / "w")])
    assert code == 0
    ours = hf_view(load_ours(config, tmp_path / "w"))
    expected = {0: [0], 3: [BASE_LAYERS - 1], **EXPECTED[init]}
    for unique, sources in expected.items():
        got = layer(ours, unique)
        if not sources:  # fresh: unlike every base layer
            for index in range(BASE_LAYERS):
                assert not torch.equal(got["self_attn.q_proj.weight"], layer(base_state, index)["self_attn.q_proj.weight"])
            continue
        for name, value in got.items():
            want = torch.stack([layer(base_state, i)[name] for i in sources]).mean(dim=0)
            assert torch.allclose(value, want, atol=1e-7, rtol=0), (unique, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(ours[name], base_state[name])
    assert ours["model.routers.0.weight"].shape == (1, TINY["hidden_size"])


def test_config_mismatch_is_one_line(parallel, tmp_path, capsys):
    from mor_megatron.tools.convert_from_hf import main

    make_llama(tmp_path / "llama")
    capsys.readouterr()
    config = write_config(tmp_path / "wide.yaml", hidden_size=128)
    code = main(["--hf", str(tmp_path / "llama"), "--config", str(config), "--output", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "hidden_size=64" in err and "model.hidden_size=128" in err


def test_tensor_shape_mismatch_names_the_tensor(parallel, tmp_path):
    from safetensors.torch import load_file, save_file

    from mor_megatron.hf.importer import import_hf
    from mor_megatron.hf.layouts import ConversionError

    make_llama(tmp_path / "llama")
    path = tmp_path / "llama" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.3.mlp.up_proj.weight"] = state["model.layers.3.mlp.up_proj.weight"][:96].contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    config = write_config(tmp_path / "mor.yaml")
    with pytest.raises(ConversionError) as err:
        import_hf(str(tmp_path / "llama"), str(config), str(tmp_path / "w"), log=_quiet)
    message = str(err.value)
    assert "\n" not in message and "model.layers.3.mlp.up_proj.weight" in message and "(96, 64)" in message


def test_too_shallow_base_and_unknown_family(parallel, tmp_path):
    from mor_megatron.hf.importer import import_hf
    from mor_megatron.hf.layouts import ConversionError

    make_llama(tmp_path / "llama", layers=3)
    with pytest.raises(ConversionError, match="too few"):
        import_hf(str(tmp_path / "llama"), str(write_config(tmp_path / "mor.yaml")), str(tmp_path / "w"), log=_quiet)
    hf_config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(hf_config, model_type="gpt2")))
    with pytest.raises(ConversionError, match="'gpt2' model"):
        import_hf(str(tmp_path / "llama"), str(write_config(tmp_path / "mor.yaml")), str(tmp_path / "w"), log=_quiet)


def test_exported_mor_imports_back_unchanged(parallel, tmp_path):
    from mor_megatron.hf.export import export
    from mor_megatron.hf.importer import import_hf
    from mor_megatron.weights import save_weights
    from mor_megatron.yaml_config import load_model_config
    from model_helpers import build

    config_path = write_config(tmp_path / "mor.yaml", router="token_choice", kv_mode="share_first")

    model = build(load_model_config(config_path), seed=5)
    save_weights(model, str(tmp_path / "w0"))
    export(str(tmp_path / "w0"), str(tmp_path / "hf"), config=str(config_path), log=_quiet)
    import_hf(str(tmp_path / "hf"), str(config_path), str(tmp_path / "w1"), log=_quiet)
    before = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    after = {k: v for k, v in load_ours(config_path, tmp_path / "w1").state_dict().items() if torch.is_tensor(v)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pickled_weights_need_the_explicit_flag(parallel, tmp_path, capsys):
    """A folder with only `pytorch_model.bin` is refused by default (pickles can run code) and read
    with `--allow-pickle`, through torch's weights_only unpickler, to the same weights."""
    from mor_megatron.tools.convert_from_hf import main

    base = make_llama(tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").unlink()
    torch.save(base.state_dict(), tmp_path / "llama" / "pytorch_model.bin")
    config = write_config(tmp_path / "vanilla.yaml", sharing="none", router="none", num_recursions=1)
    args = ["--hf", str(tmp_path / "llama"), "--config", str(config), "--output", str(tmp_path / "w")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pickled weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not (tmp_path / "w").exists()

    assert main(args + ["--allow-pickle"]) == 0
    ours = hf_view(load_ours(config, tmp_path / "w"))
    for name, value in base.state_dict().items():
        if name in ours:
            assert torch.equal(ours[name], value), name


def test_pickled_weights_with_code_are_refused_even_with_the_flag(parallel, tmp_path, capsys):
    """`weights_only=True`: a pickle that would call a function is rejected, the function never runs."""
    import os

    from mor_megatron.hf.layouts import ConversionError
    from mor_megatron.hf.safetensors_io import read_safetensors

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (tmp_path / "evil").mkdir()
    torch.save({"weight": Payload()}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(ConversionError):
        read_safetensors(tmp_path / "evil")
    with pytest.raises(ConversionError, match="holds more than tensors and was not loaded") as raised:
        read_safetensors(tmp_path / "evil", allow_pickle=True)
    assert "\n" not in str(raised.value)
    assert not marker.exists()
