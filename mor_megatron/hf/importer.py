"""Import a Hugging Face Llama-family folder as layout-free mor-megatron weights.

The result is a megatron dist-checkpoint (`mor_megatron.weights.save_weights`) that any TP/PP layout
starts from with `training.init_from=DIR`. A vanilla config takes the base layers one to one; a MoR
config fills its shared layers by an uptraining initialisation (MoR paper, App. F), with M middle
base layers (all base layers for cycle/sequence sharing; all but the first and last for the middle
variants, whose unique first/last layers take the base's first/last) and d shared layers:

- stepwise: shared layer i <- middle base layer floor(i * M / d) (evenly spaced, from the first);
- average:  shared layer i <- mean of the middle base layers that map to it, base middle layer j
            standing at unrolled middle position floor(j * U / M) (U = unrolled middle depth);
- lower / upper: the first / last d middle base layers;
- random:   the target model's fresh initialisation.

Embedding, final norm and LM head come from the base; routers are freshly initialised. An exported
MoR folder (model_type "mor") imports back one to one (`init` is then ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from mor_megatron.config import MoRConfig
from mor_megatron.hf.layouts import ConversionError, Dims, hf_to_megatron
from mor_megatron.hf.safetensors_io import read_safetensors
from mor_megatron.json_files import read_json
from mor_megatron.paths import replaced_output

INITS = ("stepwise", "average", "lower", "upper", "random")
LLAMA_TYPES = ("llama", "mistral")


# The HF config keys the import reads (every Llama-family and exported MoR config has them).
HF_CONFIG_KEYS = ("model_type", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
                  "num_hidden_layers")


def read_hf_config(folder: Path) -> dict:
    return read_json(Path(folder) / "config.json", "give a Hugging Face model folder (config.json + safetensors)",
                     HF_CONFIG_KEYS, ConversionError)


def _rope(hf: dict) -> tuple[float, str]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def check_compatible(hf: dict, config: MoRConfig, source: str, target: str) -> None:
    """One line naming the first setting where the HF model and the target config differ."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_TYPES + ("mor",):
        raise ConversionError(f"{source} is a '{model_type}' model: only Llama-family (llama, mistral) or exported MoR folders import")
    heads = hf["num_attention_heads"]
    theta, rope_kind = _rope(hf) if model_type != "mor" else (hf["rotary_base"], "default")
    pairs = [
        ("hidden_size", hf["hidden_size"], "hidden_size", config.hidden_size),
        ("intermediate_size", hf["intermediate_size"], "ffn_hidden_size", config.ffn_hidden_size),
        ("num_attention_heads", heads, "num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", hf.get("num_key_value_heads") or heads, "num_query_groups", config.num_query_groups or config.num_attention_heads),
        ("head_dim", hf.get("head_dim") or hf["hidden_size"] // heads, "kv_channels", config.head_dim),
        ("vocab_size", hf["vocab_size"], "vocab_size", config.vocab_size),
        ("rope theta", theta, "rotary_base", float(config.rotary_base)),
        ("rms_norm_eps", hf.get("rms_norm_eps", 1e-6), "layernorm_epsilon", config.layernorm_epsilon),
    ]
    for hf_name, hf_value, our_name, our_value in pairs:
        if hf_value != our_value:
            raise ConversionError(
                f"{source} has {hf_name}={hf_value} but {target} gives model.{our_name}={our_value}: "
                "use a config with the base model's shape"
            )
    if rope_kind != "default":
        raise ConversionError(f"{source} uses RoPE scaling '{rope_kind}': only plain RoPE imports")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError(f"{source} has biases or a non-SiLU MLP: only Llama-shaped models import")
    if config.tie_embeddings and not hf.get("tie_word_embeddings", model_type == "mor"):
        raise ConversionError(f"{source} has a separate lm_head: set model.tie_embeddings: false in {target}")
    if model_type == "mor":
        for key in ("effective_layers", "num_recursions", "sharing", "router", "aux_router"):
            if hf.get(key) != getattr(config, key):
                raise ConversionError(f"{source} has {key}={hf.get(key)} but {target} gives model.{key}={getattr(config, key)}")


# -- layer assignment ---------------------------------------------------------------------------


def middle_layers(config: MoRConfig) -> tuple[list[int], list[int], list[int], list[int]]:
    """(prefix, shared, suffix, unrolled middle): unique-layer indices of the target plan."""
    plan = config.recursion_plan
    prefix, suffix = list(plan.prefix), list(plan.suffix)
    middle = list(plan.unrolled[len(prefix) : len(plan.unrolled) - len(suffix)])
    shared = sorted(set(middle))
    return prefix, shared, suffix, middle


def assign_layers(config: MoRConfig, base_layers: int, init: str) -> dict[int, list[int]]:
    """Unique target layer -> the base layers it takes (averaged when several); empty: fresh."""
    if init not in INITS:
        raise ConversionError(f"unknown --init '{init}': choose one of {', '.join(INITS)}")
    prefix, shared, suffix, middle = middle_layers(config)
    offset = len(prefix)
    m, d = base_layers - len(prefix) - len(suffix), len(shared)
    if m < d:
        raise ConversionError(
            f"the base has {base_layers} layers, too few for {len(prefix) + d + len(suffix)} unique layers: "
            "use a shallower config or a deeper base"
        )
    out: dict[int, list[int]] = {}
    out.update({layer: [i] for i, layer in enumerate(prefix)})
    out.update({layer: [base_layers - len(suffix) + i] for i, layer in enumerate(suffix)})
    for i, layer in enumerate(shared):
        if init == "stepwise":
            out[layer] = [offset + i * m // d]
        elif init == "lower":
            out[layer] = [offset + i]
        elif init == "upper":
            out[layer] = [offset + m - d + i]
        elif init == "random":
            out[layer] = []
        else:
            out[layer] = [offset + j for j in range(m) if middle[j * len(middle) // m] == layer]
            out[layer] = out[layer] or [offset + i * m // d]
    return out


def _layer_tensors(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"decoder.layers.{index}."
    return {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}


def _base_dims(hf: dict, config: MoRConfig) -> Dims:
    heads = hf["num_attention_heads"]
    return Dims(
        hidden=hf["hidden_size"],
        heads=heads,
        groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn=hf["intermediate_size"],
        vocab=hf["vocab_size"],
        layers=hf["num_hidden_layers"],
        tied=bool(hf.get("tie_word_embeddings", False)),
    )


def imported_state(
    hf_state: dict[str, torch.Tensor], hf: dict, config: MoRConfig, fresh: dict[str, torch.Tensor], init: str,
    source: str = "HF model",
) -> dict[str, torch.Tensor]:
    """The target's TP=1 `state_dict`: `fresh` (its own initialisation) overwritten from the base."""
    state = dict(fresh)
    if hf.get("model_type") == "mor":
        converted = hf_to_megatron(hf_state, Dims.from_mor(config), source)
        state.update({name: value.to(fresh[name].dtype) for name, value in converted.items()})
        return state
    base = hf_to_megatron(hf_state, _base_dims(hf, config), source)
    for name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
        state[name] = base[name]
    if not config.tie_embeddings:
        state["output_layer.weight"] = base.get("output_layer.weight", base["embedding.word_embeddings.weight"])
    for layer, sources in assign_layers(config, hf["num_hidden_layers"], init).items():
        if not sources:
            continue
        parts = [_layer_tensors(base, index) for index in sources]
        for name in parts[0]:
            state[f"decoder.layers.{layer}.{name}"] = torch.stack([p[name].float() for p in parts]).mean(dim=0)
    return {name: value.to(fresh[name].dtype) if torch.is_tensor(value) else value for name, value in state.items()}


def import_hf(
    hf_dir: str,
    config_path: str,
    output: str,
    init: str = "stepwise",
    overrides: Sequence[str] = (),
    seed: int = 1234,
    log: Callable[[str], None] = print,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write layout-free weights for the model of `config_path` from the HF folder `hf_dir`
    (safetensors; pickled `pytorch_model.bin` only with `allow_pickle`). An `output` that already
    holds files is refused unless `overwrite` (`paths.replaced_output`)."""
    if init not in INITS:
        raise ConversionError(f"unknown --init '{init}': choose one of {', '.join(INITS)}")
    with replaced_output(output, "--output", overwrite) as partial:
        hf, config = _import_into(partial, hf_dir, config_path, init, overrides, seed, allow_pickle)
    one_to_one = hf.get("model_type") == "mor"
    how = "one to one" if one_to_one else f"{init} initialisation"
    log(f"imported {hf_dir} ({hf['num_hidden_layers']} layers) into {config_path} by {how}: {output}")
    if not one_to_one:
        log(describe_assignment(config, hf["num_hidden_layers"], init))
    return Path(output)


def _import_into(
    output: Path, hf_dir: str, config_path: str, init: str, overrides: Sequence[str], seed: int, allow_pickle: bool
) -> tuple[dict, MoRConfig]:
    """The import itself, written into `output`; returns the HF config it read and the model's."""
    import dataclasses

    from megatron.core import tensor_parallel

    from mor_megatron.model import MoRGPTModel
    from mor_megatron.parallel.state import initialize_parallel
    from mor_megatron.weights import save_weights
    from mor_megatron.yaml_config import load_model_config

    hf = read_hf_config(Path(hf_dir))
    config = load_model_config(config_path, overrides)
    config = dataclasses.replace(config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, use_cpu_initialization=True)
    check_compatible(hf, config, hf_dir, config_path)
    hf_state = read_safetensors(Path(hf_dir), allow_pickle=allow_pickle)
    initialize_parallel(seed=seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = MoRGPTModel(config)
    fresh = model.state_dict()
    state = imported_state(hf_state, hf, config, fresh, init, hf_dir)
    model.load_state_dict(state, strict=True)
    save_weights(model, str(output))
    return hf, config


def describe_assignment(config: MoRConfig, base_layers: int, init: str) -> str:
    """`unique layer <- base layers`, one line per layer, for the CLI's log."""
    lines = []
    for layer, sources in sorted(assign_layers(config, base_layers, init).items()):
        what = "fresh" if not sources else ("mean of " if len(sources) > 1 else "") + ", ".join(map(str, sources))
        lines.append(f"  layer {layer} <- base {what}")
    return "\n".join(lines)


__all__ = ["INITS", "import_hf", "assign_layers", "imported_state", "check_compatible", "describe_assignment"]
