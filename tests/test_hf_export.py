"""Export to Hugging Face: the exported model reproduces ours in threshold (decoding) routing mode.

Tiny models are built in-process with a large init std (0.1), so routing decides a lot: at that
scale top-k and threshold routing differ by ~0.5 in the logits, and the export must match ours to
1e-4. One test trains a step at TP=2 through the real CLI (lr 0, so the weights stay the initial
ones) and checks that its checkpoint exports to exactly the tensors of the TP=1 initial weights.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from model_helpers import batch, build, logits, tiny_config

STD = 0.1
CASES = {
    "expert_recursion_wise": {},
    "expert_share_first_aux": dict(kv_mode="share_first", aux_router=True),
    "token_choice": dict(router="token_choice"),
    "token_choice_share_first": dict(router="token_choice", kv_mode="share_first", router_activation="sigmoid"),
    "cycle_tanh_untied": dict(sharing="cycle", effective_layers=6, router_activation="tanh", tie_embeddings=False),
    "no_router_middle_sequence": dict(router="none", sharing="middle_sequence"),
}


def _quiet(message: str) -> None:
    pass


def save_model(model, config, directory: Path) -> tuple[Path, Path]:
    """Layout-free weights of `model` plus a run YAML holding its model section."""
    from mor_megatron.weights import save_weights
    from mor_megatron.yaml_config import dump_model_config

    weights, run_yaml = directory / "weights", directory / "run.yaml"
    save_weights(model, str(weights))
    run_yaml.write_text(yaml.safe_dump({"model": dump_model_config(config)}))
    return weights, run_yaml


def export_tiny(directory: Path, max_shard_size="5GB", **overrides):
    from mor_megatron.hf.export import export

    config = tiny_config(init_method_std=STD, **overrides)
    model = build(config).eval()
    weights, run_yaml = save_model(model, config, directory)
    out = export(str(weights), str(directory / "hf"), config=str(run_yaml), max_shard_size=max_shard_size, log=_quiet)
    return config, model, out


def load_hf(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_mor_export_matches_threshold_routing(parallel, tmp_path, case):
    shard = 40_000 if case == "expert_share_first_aux" else "5GB"
    config, model, out = export_tiny(tmp_path, max_shard_size=shard, **CASES[case])
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "mor" and saved["architectures"] == ["MoRForCausalLM"]
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.MoRForCausalLM"
    for key in ("effective_layers", "num_recursions", "sharing", "router", "kv_mode", "aux_router"):
        assert saved[key] == getattr(config, key), key
    if config.router != "none":
        assert saved["capacities"] == pytest.approx(list(config.capacities))
        assert saved["router_alpha"] == config.router_alpha
    if case == "expert_share_first_aux":
        assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1

    hf = load_hf(out)
    assert type(hf).__name__ == "MoRForCausalLM"
    tokens, positions = batch(config)
    with torch.no_grad():
        ours = logits(model, tokens, positions, routing_mode="threshold")
        result = hf(tokens)
    assert (ours - result.logits).abs().max() < 1e-4
    if config.router != "none":
        decided = model.router_output.selections
        assert len(result.selections) == len(decided) == config.num_recursions
        for mine, theirs in zip(decided, result.selections):
            assert torch.equal(mine.t(), theirs)
        shares = [float(s.float().mean()) for s in result.selections]
        assert any(0.0 < share < 1.0 for share in shares), shares  # routing is not trivial


def test_remote_code_is_self_contained(parallel, tmp_path):
    _, _, out = export_tiny(tmp_path)
    allowed = {"torch", "transformers", "__future__", "dataclasses", "typing", "math"}
    for name in ("configuration_mor.py", "modeling_mor.py"):
        tree = ast.parse((out / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_vanilla_exports_as_llama(parallel, tmp_path, tied):
    config, model, out = export_tiny(
        tmp_path, sharing="none", router="none", num_recursions=1, effective_layers=3, tie_embeddings=tied
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" not in saved and saved["tie_word_embeddings"] == tied
    assert not list(out.glob("*.py"))
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert isinstance(hf, LlamaForCausalLM)
    tokens, positions = batch(config)
    with torch.no_grad():
        assert (logits(model, tokens, positions) - hf(tokens).logits).abs().max() < 1e-4


def test_shape_mismatch_is_one_line(parallel, tmp_path, capsys):
    from mor_megatron.tools.convert_to_hf import main

    config = tiny_config(init_method_std=STD)
    weights, _ = save_model(build(config), config, tmp_path)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"model": dict(yaml.safe_load((tmp_path / "run.yaml").read_text())["model"], ffn_hidden_size=96)}))
    code = main(["--checkpoint", str(weights), "--config", str(wrong), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "decoder.layers.0.mlp.linear_fc1.weight" in err and "(256, 64)" in err and "(192, 64)" in err
    assert main(["--checkpoint", str(weights), "--output", str(tmp_path / "hf")]) == 2
    assert "give --config" in capsys.readouterr().err


def test_layouts_name_every_bad_or_unused_tensor(parallel):
    from mor_megatron.hf.layouts import ConversionError, Dims, hf_to_megatron, megatron_to_hf

    config = tiny_config()
    state = {k: v for k, v in build(config).state_dict().items() if torch.is_tensor(v)}
    dims = Dims.from_mor(config)
    hf = megatron_to_hf(state, dims)
    back = hf_to_megatron(hf, dims)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match=r"decoder\.routers\.1\.linear\.weight .*shape \(2, 64\)"):
        megatron_to_hf(dict(state, **{"decoder.routers.1.linear.weight": torch.zeros(2, 64)}), dims)
    with pytest.raises(ConversionError, match=r"holds tensor decoder\.extra\.weight"):
        megatron_to_hf(dict(state, **{"decoder.extra.weight": torch.zeros(1)}), dims)
    with pytest.raises(ConversionError, match=r"no tensor model\.layers\.2\.self_attn\.k_proj\.weight"):
        hf_to_megatron({k: v for k, v in hf.items() if k != "model.layers.2.self_attn.k_proj.weight"}, dims)


# -- generation ----------------------------------------------------------------------------------


def _greedy(step, prompt: torch.Tensor, new: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(new):
        nxt = step(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, nxt], dim=1)
    return sequence


@pytest.mark.parametrize(
    "case",
    [{}, dict(kv_mode="share_first"), dict(router="token_choice", kv_mode="share_first")],
    ids=["expert", "expert_share_first", "token_share_first"],
)
def test_generate_with_cache_equals_full_forwards(parallel, tmp_path, case):
    config, model, out = export_tiny(tmp_path, tie_embeddings=False, **case)
    hf = load_hf(out)
    lengths = []
    hf.model.register_forward_pre_hook(lambda mod, args, kwargs: lengths.append(kwargs.get("input_ids", args[0] if args else None).shape[1]), with_kwargs=True)
    prompt, _ = batch(config)
    prompt, new = prompt[:, :7], 6
    with torch.no_grad():
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert lengths == [7] + [1] * (new - 1)  # prefill, then one token at a time from the cache
        by_hf = _greedy(lambda seq: hf(seq, use_cache=False).logits, prompt, new)

        def ours(seq):
            positions = torch.arange(seq.shape[1]).expand_as(seq)
            return logits(model, seq, positions, routing_mode="threshold")

        by_ours = _greedy(ours, prompt, new)
    assert torch.equal(generated, by_hf) and torch.equal(generated, by_ours)


def test_left_padded_batch_generates_like_single_sequences(parallel, tmp_path):
    config, _, out = export_tiny(tmp_path, tie_embeddings=False)
    hf = load_hf(out)
    tokens, _ = batch(config)
    short, long = tokens[0, :4], tokens[1, :7]
    padded = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    with torch.no_grad():
        both = hf.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for row, alone in ((0, short), (1, long)):
            single = hf.generate(alone[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(both[row, -5:], single[0, -5:])


# -- a real checkpoint, saved at TP=2 by the CLI -----------------------------------------------------


@pytest.mark.distributed
def test_tp2_checkpoint_exports_like_tp1_initial_weights(parallel, corpus, tmp_path):
    import dataclasses

    from megatron.core import tensor_parallel
    from safetensors.torch import load_file

    from mor_megatron.hf.export import export
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.weights import load_weights, save_weights
    from mor_megatron.training.config import load_run_config
    from mor_megatron.tools.convert_to_hf import main
    from train_helpers import launch, write_config

    run_yaml = write_config(
        tmp_path / "run.yaml", corpus, model={"init_method_std": STD},
        training={"train_steps": 1, "lr": 0.0, "warmup_steps": 0, "global_batch_size": 2},
        logging={"tensorboard": False},
    )
    run = load_run_config(run_yaml)
    config = dataclasses.replace(run.model, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    torch.manual_seed(3)
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    save_weights(MoRGPTModel(config), str(tmp_path / "init"))
    launch(run_yaml, tmp_path / "tp2", [f"training.init_from={tmp_path / 'init'}", "parallel.tensor_model_parallel_size=2", "data.valid=null"], nproc=2)

    assert main(["--checkpoint", str(tmp_path / "tp2" / "checkpoints"), "--output", str(tmp_path / "hf_tp2")]) == 0
    export(str(tmp_path / "init"), str(tmp_path / "hf_init"), config=str(run_yaml), log=_quiet)
    from_tp2, from_init = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("hf_tp2", "hf_init"))
    assert from_tp2.keys() == from_init.keys()
    for name in from_init:
        assert torch.equal(from_tp2[name], from_init[name]), name

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf_tp2"))  # the run's tokenizer came along
    generation = json.loads((tmp_path / "hf_tp2" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id is not None
    model = MoRGPTModel(config).eval()
    load_weights(model, str(tmp_path / "init"))
    hf = load_hf(tmp_path / "hf_tp2")
    tokens = torch.tensor([tokenizer.encode("def main():\n    return sorted(items)\n")[:32]] * 2)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        assert (logits(model, tokens, positions, routing_mode="threshold") - hf(tokens).logits).abs().max() < 1e-4


def test_cli_help_runs_without_megatron():
    result = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and "--checkpoint" in result.stdout


def test_export_never_mixes_with_what_the_folder_held(parallel, tmp_path):
    """Before, an export into another model's folder left a mix (the other model's tokenizer and
    extra files stayed beside the new weights). Now a folder holding files is refused unless
    `overwrite`, and then only the new export's files are there; an export that fails leaves the
    folder as it was."""
    from mor_megatron.errors import UserError
    from mor_megatron.hf.export import export
    from train_helpers import tree_digest

    config = tiny_config(init_method_std=STD)
    weights, run_yaml = save_model(build(config).eval(), config, tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # another model's file
    before = tree_digest(out)
    with pytest.raises(UserError, match=r"--output .*hf already holds files: .*pass --overwrite"):
        export(str(weights), str(out), config=str(run_yaml), log=_quiet)
    with pytest.raises(Exception):  # fails half-way: the weights folder is not a checkpoint
        export(str(tmp_path), str(out), config=str(run_yaml), log=_quiet, overwrite=True)
    assert tree_digest(out) == before and not list(tmp_path.glob(".hf.*"))
    export(str(weights), str(out), config=str(run_yaml), log=_quiet, overwrite=True)
    assert not (out / "tokenizer.json").exists() and (out / "config.json").is_file()
    assert list((out).glob("*.safetensors")) and not list(tmp_path.glob(".hf.*"))
