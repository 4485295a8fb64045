"""Export a mor-megatron checkpoint (any TP/PP/DP layout) as a Hugging Face model folder.

The layout-free weights (`step_N/universal/`, or any megatron dist-checkpoint of the model, such
as `tools/init_weights.py` writes) are read one tensor at a time through the sharding metadata of a
single-process TP=1, PP=1 `MoRGPTModel` built on the meta device (which reshards them), converted
by `layouts.stream_megatron_to_hf` and streamed into the safetensors files: the export's memory is
about twice its largest tensor group plus the process itself, not the model. A vanilla model
(sharing none) becomes a plain `LlamaForCausalLM`; anything else a `MoRForCausalLM` whose
self-contained code (`configuration_mor.py`, `modeling_mor.py`) is copied into the folder.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from mor_megatron.config import MoRConfig
from mor_megatron.hf.layouts import ConversionError, Dims, entries, stream_megatron_to_hf
from mor_megatron.hf.safetensors_io import SafetensorsWriter, TensorSpec, parse_size
from mor_megatron.paths import replaced_output

if TYPE_CHECKING:
    from transformers import PretrainedConfig

HERE = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_mor.py", "modeling_mor.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mor.MoRHFConfig",
    "AutoModel": "modeling_mor.MoRModel",
    "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
}


@dataclass
class Source:
    """Where the weights are and which model settings describe them."""

    weights: Path  # a megatron dist-checkpoint directory
    model_section: dict
    tokenizer: Optional[str]
    description: str


def resolve_source(checkpoint: str, config: Optional[str] = None, log: Callable[[str], None] = print) -> Source:
    """A checkpoint directory, the folder of checkpoints (newest complete one), or a bare
    dist-checkpoint of weights (then `config`, a run YAML, must give the model section)."""
    from mor_megatron.checkpoint_files import checkpoint_problem, find_latest, read_meta
    from mor_megatron.yaml_config import load_sections

    path = Path(checkpoint)
    if not path.is_dir():
        raise ConversionError(f"--checkpoint {path} is not a directory: give a checkpoint, checkpoints folder or weights folder")
    if not (path / "meta.json").is_file() and not (path / "metadata.json").is_file():
        found = find_latest(str(path), log=log)
        if found is None:
            raise ConversionError(f"no complete checkpoint in {path}: give a step_N directory or a weights folder")
        path = found
    section, tokenizer = None, None
    if (path / "meta.json").is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise ConversionError(f"cannot export: {problem}")
        run = read_meta(path)["config"]
        section, tokenizer = run["model"], (run.get("data") or {}).get("tokenizer")
        weights = path / "universal"
    else:
        weights = path
    if config is not None:
        sections = load_sections(config)
        if "model" not in sections:
            raise ConversionError(f"{config} has no model: section")
        section = sections["model"]
        tokenizer = (sections.get("data") or {}).get("tokenizer", tokenizer)
    if section is None:
        raise ConversionError(f"{path} is a bare weights folder: give --config with the model it was made with")
    return Source(weights, dict(section), tokenizer, str(path))


def build_config(section: dict) -> MoRConfig:
    """The single-process (TP=1, PP=1) model config of a `model:` section."""
    from mor_megatron.yaml_config import model_config_from_dict

    config = model_config_from_dict(section)
    config = dataclasses.replace(
        config,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    check_llama(config)
    return config


def check_llama(config: MoRConfig) -> None:
    """Only the Llama layer shape converts (RMSNorm, SwiGLU, no biases, full RoPE)."""
    problems = []
    if config.normalization != "RMSNorm":
        problems.append(f"normalization {config.normalization}")
    if not config.gated_linear_unit or config.activation_func is not torch.nn.functional.silu:
        problems.append("an MLP other than SwiGLU")
    if config.add_bias_linear or config.add_qkv_bias:
        problems.append("linear biases")
    if config.qk_layernorm:
        problems.append("qk_layernorm")
    if problems:
        raise ConversionError(f"the model has {', '.join(problems)}: only Llama-shaped models convert")


def _expected_shapes(model) -> dict[str, tuple[int, ...]]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes = {}
    for item in model.sharded_state_dict().values():
        if isinstance(item, ShardedTensor):
            shapes[item.key] = tuple(item.global_shape)
        elif isinstance(item, ShardedTensorFactory):
            shapes[item.key] = tuple(item.data.shape)
    return shapes


def check_weights(model, directory: Path, tied: bool) -> None:
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is."""
    from megatron.core import dist_checkpointing

    try:
        stored = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as err:  # megatron raises several types for a folder that is no checkpoint
        raise ConversionError(f"{directory} is not a megatron dist-checkpoint ({type(err).__name__})") from None
    expected = _expected_shapes(model)
    for key, shape in expected.items():
        if key not in stored:
            raise ConversionError(f"{directory} has no tensor {key}: the weights do not fit the config")
        found = tuple(stored[key].global_shape)
        if found != shape:
            raise ConversionError(
                f"tensor {key} in {directory} has shape {found} but the config gives {shape}: "
                "use the config the weights were made with"
            )
    ignorable = ("optimizer.",) + (("output_layer.",) if tied else ())
    extra = sorted(key for key in stored if key not in expected and not key.startswith(ignorable))
    if extra:
        raise ConversionError(
            f"{directory} holds tensor {extra[0]} that the config has no place for: "
            "use the config the weights were made with"
        )


def weightless_model(config: MoRConfig):
    """The single-process model on the meta device: its tensors' names, shapes and dtypes, and
    the sharding metadata to read each one, without their memory."""
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.parallel.state import initialize_parallel

    initialize_parallel()
    with torch.device("meta"):
        return MoRGPTModel(config)


def tensor_reader(model, weights: Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The names of the model's tensors, and a function reading one of them at TP=1 from the
    layout-free weights in `weights` (resharded from any saved layout; one tensor in memory)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sharded = {name: item for name, item in model.sharded_state_dict().items()
               if isinstance(item, (ShardedTensor, ShardedTensorFactory))}

    def read(name: str) -> torch.Tensor:
        item = sharded[name]
        buffer = torch.empty(item.data.shape, dtype=item.data.dtype, device="cpu")  # host: read, then written to a file
        real = dataclasses.replace(item, data=buffer)
        return dist_checkpointing.load({name: real}, str(weights), strict="assume_ok_unexpected")[name]

    return list(sharded), read


def plan(model, dims: Dims) -> list[TensorSpec]:
    """Every HF tensor the export writes, with its shape and the model's dtype of its source."""
    dtypes = {name: param.dtype for name, param in model.state_dict(keep_vars=True).items() if torch.is_tensor(param)}
    return [TensorSpec(name, tuple(shape), dtypes[entry.megatron])
            for entry in entries(dims) if entry.megatron in dtypes
            for name, shape in zip(entry.hf, entry.shapes)]


def write_weights(config: MoRConfig, weights: Path, output: Path, max_shard_bytes: int) -> tuple[int, list[str]]:
    """Convert and write the HF weights tensor by tensor (peak memory: about two of the largest
    tensor group, not the model); returns the tensor count and the file names."""
    model = weightless_model(config)
    check_weights(model, weights, config.tie_embeddings)
    dims = Dims.from_mor(config)
    specs = plan(model, dims)
    names, read = tensor_reader(model, weights)
    writer = SafetensorsWriter(specs, output, max_shard_bytes, {"format": "pt"})
    for name, tensor in stream_megatron_to_hf(names, read, dims, str(weights)):
        writer.write(name, tensor)
        del tensor  # the group's last reference: freed before the next is read
    return len(specs), writer.close()


# -- HF configs ---------------------------------------------------------------------------------


def _dtype_name(config: MoRConfig) -> str:
    return str(config.params_dtype).removeprefix("torch.")


def hf_config(config: MoRConfig, special: dict) -> "PretrainedConfig":
    """`LlamaConfig` for a vanilla model, else the remote-code `MoRHFConfig` (every MoR setting)."""
    from mor_megatron.yaml_config import dump_model_config

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layernorm_epsilon,
        initializer_range=config.init_method_std,
        tie_word_embeddings=config.tie_embeddings,
        dtype=_dtype_name(config),
        **special,
    )
    if config.sharing == "none":
        from transformers import LlamaConfig

        hf = LlamaConfig(
            num_hidden_layers=config.num_layers,
            rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_base)},
            attention_bias=False,
            mlp_bias=False,
            **common,
        )
        hf.architectures = ["LlamaForCausalLM"]
        return hf
    from mor_megatron.hf.configuration_mor import MoRHFConfig

    hf = MoRHFConfig(
        rotary_base=config.rotary_base,
        effective_layers=config.effective_layers,
        num_recursions=config.num_recursions,
        sharing=config.sharing,
        router=config.router,
        router_activation=config.router_activation,
        router_alpha=config.router_alpha,
        capacities=list(config.capacities) if config.capacities is not None else None,
        aux_router=config.aux_router,
        kv_mode=config.kv_mode,
        mor_megatron=dump_model_config(config),  # the training settings, for reference and import
        **common,
    )
    if hf.num_hidden_layers != config.num_layers:
        raise ConversionError(f"recursion plan mismatch: {hf.num_hidden_layers} vs {config.num_layers} unique layers")
    hf.architectures = ["MoRForCausalLM"]
    hf.auto_map = dict(AUTO_MAP)
    return hf


def _tokenizer_tokens(tokenizer: Optional[str], output: Path, explicit: bool, log) -> dict:
    """Save the tokenizer into `output`; its special token ids for the configs (None without)."""
    none = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if not tokenizer:
        return none
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as err:  # OSError / ValueError / hub errors
        if explicit:
            raise ConversionError(f"cannot load tokenizer {tokenizer} ({type(err).__name__}): give a tokenizer folder") from None
        log(f"warning: the run's tokenizer {tokenizer} could not be loaded ({type(err).__name__}); exported without one")
        return none
    tok.save_pretrained(str(output))
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def export(
    checkpoint: str,
    output: str,
    config: Optional[str] = None,
    tokenizer: Optional[str] = None,
    max_shard_size: str | int = "5GB",
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> Path:
    """Write the HF folder `output` for `checkpoint`; returns its path. A folder that already holds
    files is refused unless `overwrite`; it is replaced whole once the export is complete
    (`paths.replaced_output`)."""
    from transformers import GenerationConfig

    shard_bytes = parse_size(max_shard_size)  # a bad size is refused before any work
    with replaced_output(output, "--output", overwrite) as out:
        source = resolve_source(checkpoint, config, log)
        model_config = build_config(source.model_section)
        if model_config.router == "token_choice" and model_config.token_choice_capacity_factor is not None:
            log("note: token_choice_capacity_factor is a training-time cap; the HF model routes without it")
        count, files = write_weights(model_config, source.weights, out, shard_bytes)
        special = _tokenizer_tokens(tokenizer or source.tokenizer, out, tokenizer is not None, log)
        hf = hf_config(model_config, special)
        hf.save_pretrained(str(out))
        GenerationConfig(**{k: v for k, v in special.items() if v is not None}).save_pretrained(str(out))
        if hf.model_type == "mor":
            for name in REMOTE_CODE:
                shutil.copyfile(HERE / name, out / name)
    kind = "LlamaForCausalLM" if hf.model_type == "llama" else "MoRForCausalLM (trust_remote_code=True)"
    log(f"exported {source.description} as {kind} to {output} ({count} tensors, {len(files)} file(s))")
    return Path(output)
