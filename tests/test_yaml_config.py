"""YAML config loading: the shipped configs, overrides, round-trip dumping and every bad input."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from mor_megatron.config import ConfigError, MoRConfig
from mor_megatron.yaml_config import (
    KNOWN_SECTIONS,
    dump_model_config,
    load_model_config,
    load_sections,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny.yaml"
BASE_DEPTHS = {"135m": 30, "360m": 32, "730m": 26, "1_7b": 24}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def model_yaml(tmp_path: Path, extra: str) -> Path:
    """The tiny config's model section plus `extra` lines (indented under model:)."""
    base = TINY.read_text()
    return write(tmp_path, base + "".join(f"  {line}\n" for line in extra.splitlines()))


def comparable(config: MoRConfig) -> dict:
    """All plain-valued fields of a config (callables and process-bound fields left out)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (bool, int, float, str, tuple, list, type(None), torch.dtype)):
            out[f.name] = value
    return out


# -- shipped configs ------------------------------------------------------------------------------


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    for base in BASE_DEPTHS:
        assert f"vanilla_{base}" in names
        assert {f"mor_{base}_nr{nr}" for nr in (2, 3, 4)} <= names
    assert {"mor_360m_nr3_token_choice", "mor_360m_nr3_kv_share", "tiny"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_starts_with_comment(path: Path) -> None:
    assert path.read_text().startswith("#")
    config = load_model_config(path)
    assert isinstance(config, MoRConfig)
    if path.stem not in ("tiny", "isoflop_tiny"):  # the CPU shapes; the others are the paper's
        assert (config.vocab_size, config.seq_length, config.tie_embeddings) == (49152, 2048, True)
        assert config.normalization == "RMSNorm" and config.gated_linear_unit
        assert config.head_dim == 64


@pytest.mark.parametrize("base", BASE_DEPTHS)
@pytest.mark.parametrize("nr", [2, 3, 4])
def test_mor_depth_rule_adds_layers(base: str, nr: int) -> None:
    config = load_model_config(ROOT / "configs" / f"mor_{base}_nr{nr}.yaml")
    L = BASE_DEPTHS[base]
    assert config.effective_layers == 2 + nr * math.ceil((L - 2) / nr)
    assert (config.sharing, config.router, config.kv_mode) == (
        "middle_cycle", "expert_choice", "recursion_wise"
    )
    assert config.num_recursions == nr


@pytest.mark.parametrize(
    "name, layers",
    [("mor_360m_nr4", 34), ("mor_135m_nr3", 32), ("mor_1_7b_nr3", 26), ("mor_1_7b_nr4", 26)],
)
def test_worked_depths(name: str, layers: int) -> None:
    assert load_model_config(ROOT / "configs" / f"{name}.yaml").effective_layers == layers


@pytest.mark.parametrize("base", BASE_DEPTHS)
def test_vanilla_configs(base: str) -> None:
    config = load_model_config(ROOT / "configs" / f"vanilla_{base}.yaml")
    assert (config.sharing, config.router, config.num_recursions) == ("none", "none", 1)
    assert config.num_layers == config.effective_layers == BASE_DEPTHS[base]


def test_variant_configs() -> None:
    tc = load_model_config(ROOT / "configs" / "mor_360m_nr3_token_choice.yaml")
    assert tc.router == "token_choice"
    assert tc.router_z_loss_coeff == 1e-5 and tc.router_balance_loss_coeff == 0.1
    kv = load_model_config(ROOT / "configs" / "mor_360m_nr3_kv_share.yaml")
    assert kv.kv_mode == "share_first" and kv.router == "expert_choice"


def test_tiny_config() -> None:
    config = load_model_config(TINY)
    assert (config.effective_layers, config.num_recursions, config.num_layers) == (8, 3, 4)
    assert (config.hidden_size, config.num_attention_heads, config.num_query_groups) == (128, 4, 2)
    assert (config.ffn_hidden_size, config.vocab_size, config.seq_length) == (352, 4096, 128)
    assert config.params_dtype == torch.float32


# -- values and overrides -------------------------------------------------------------------------


def test_overrides_apply() -> None:
    config = load_model_config(TINY, ["model.hidden_size=256", "model.router_z_loss_coeff=1e-4"])
    assert config.hidden_size == 256
    assert config.router_z_loss_coeff == pytest.approx(1e-4)


def test_exponent_float_without_dot(tmp_path: Path) -> None:
    config = load_model_config(model_yaml(tmp_path, "router_z_loss_coeff: 1e-5"))
    assert config.router_z_loss_coeff == pytest.approx(1e-5)


def test_capacities_become_tuple_of_floats() -> None:
    config = load_model_config(TINY, ["model.capacities=[1, 0.5, 0.25]"])
    assert config.capacities == (1.0, 0.5, 0.25)
    assert all(isinstance(c, float) for c in config.capacities)


def test_int_accepted_for_float_field() -> None:
    config = load_model_config(TINY, ["model.router_alpha=1"])
    assert config.router_alpha == 1.0 and isinstance(config.router_alpha, float)


@pytest.mark.parametrize(
    "name, dtype",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_params_dtype_names(name: str, dtype: torch.dtype) -> None:
    assert load_model_config(TINY, [f"model.params_dtype={name}"]).params_dtype == dtype


def test_bf16_flag() -> None:
    assert load_model_config(TINY, ["model.bf16=true"]).bf16 is True


def test_other_sections_are_kept_not_validated(tmp_path: Path) -> None:
    path = write(tmp_path, TINY.read_text() + "training:\n  lr: 3e-3\nparallel:\n  tp: 1\n")
    sections = load_sections(path, ["data.path=/tmp/x", "training.schedule.warmup=10"])
    assert set(sections) == {"model", "training", "parallel", "data"}
    assert sections["training"] == {"lr": 3e-3, "schedule": {"warmup": 10}}
    assert load_model_config(path).hidden_size == 128
    assert KNOWN_SECTIONS == ("model", "parallel", "training", "data", "logging")


# -- dump round-trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dump_round_trips(path: Path, tmp_path: Path) -> None:
    config = load_model_config(path)
    dumped = dump_model_config(config)
    text = yaml.safe_dump({"model": dumped})
    again = load_model_config(write(tmp_path, text))
    assert dump_model_config(again) == dumped
    assert comparable(again) == comparable(config)


def test_dump_is_plain_and_non_default() -> None:
    dumped = dump_model_config(load_model_config(TINY, ["model.params_dtype=bfloat16"]))
    assert dumped["params_dtype"] == "bfloat16"
    assert dumped["capacities"] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert "num_layers" not in dumped and "activation_func" not in dumped
    assert "normalization" not in dumped  # default RMSNorm
    assert "sharing" not in dumped  # default middle_cycle


# -- bad inputs: one ConfigError each -------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  hidden_size: 128\n  bad: [1, 2\n  other: 3\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_model_config(path)


@pytest.mark.parametrize(
    "text, lines",
    [
        ("model:\n  hidden_size: 128\n  num_layers: 4\n  hidden_size: 256\n", (2, 4)),  # in a section
        ("model:\n  hidden_size: 128\ntraining:\n  lr: 0.1\nmodel:\n  num_layers: 4\n", (1, 5)),  # a section
        ("training:\n  lr: 0.1\n  ds: {a: 1, a: 2}\n", (3, 3)),  # in a nested flow mapping
    ],
)
def test_duplicate_key_names_both_lines(tmp_path: Path, text: str, lines: tuple[int, int]) -> None:
    """YAML's own loaders keep the last of two equal keys and drop the first without a word
    (plain SafeLoader reads each of these texts without an error)."""
    yaml.load(text, Loader=yaml.SafeLoader)
    message = rf"config.yaml: duplicate key '\w+' at lines {lines[0]} and {lines[1]}: keep one"
    with pytest.raises(ConfigError, match=message):
        load_sections(write(tmp_path, text))


def test_duplicate_key_in_override_value() -> None:
    with pytest.raises(ConfigError, match=r"override 'training.x=\{a: 1, a: 2\}': duplicate key 'a'"):
        load_sections(TINY, ["training.x={a: 1, a: 2}"])


def test_unknown_model_key_suggests(tmp_path: Path) -> None:
    message = "config.yaml: unknown model key 'hiden_size'.*did you mean 'hidden_size'"
    with pytest.raises(ConfigError, match=message):
        load_model_config(model_yaml(tmp_path, "hiden_size: 128"))


def test_string_for_int_field(tmp_path: Path) -> None:
    message = "model.hidden_size has the wrong type: expected an integer, got str 'big'"
    with pytest.raises(ConfigError, match=message):
        load_model_config(TINY, ["model.hidden_size=big"])


def test_float_for_int_field() -> None:
    with pytest.raises(ConfigError, match="model.num_recursions has the wrong type"):
        load_model_config(TINY, ["model.num_recursions=2.5"])


def test_bool_for_int_field() -> None:
    with pytest.raises(ConfigError, match="model.hidden_size has the wrong type"):
        load_model_config(TINY, ["model.hidden_size=true"])


def test_string_for_bool_field() -> None:
    message = "model.tie_embeddings has the wrong type: expected true/false"
    with pytest.raises(ConfigError, match=message):
        load_model_config(TINY, ["model.tie_embeddings=maybe"])


def test_number_for_str_field() -> None:
    with pytest.raises(ConfigError, match="model.router has the wrong type: expected a string"):
        load_model_config(TINY, ["model.router=3"])


def test_capacities_not_numbers() -> None:
    message = "model.capacities has the wrong type: expected a list of numbers"
    with pytest.raises(ConfigError, match=message):
        load_model_config(TINY, ["model.capacities=[1.0, half]"])


def test_capacities_scalar() -> None:
    with pytest.raises(ConfigError, match="model.capacities has the wrong type"):
        load_model_config(TINY, ["model.capacities=0.5"])


@pytest.mark.parametrize("key", ["activation_func", "init_method", "pipeline_dtype"])
def test_python_object_fields_not_settable(key: str) -> None:
    with pytest.raises(ConfigError, match=f"model.{key} is not settable from YAML"):
        load_model_config(TINY, [f"model.{key}=silu"])


def test_bad_params_dtype() -> None:
    message = "model.params_dtype='int8': use one of float32, bfloat16, float16"
    with pytest.raises(ConfigError, match=message):
        load_model_config(TINY, ["model.params_dtype=int8"])


def test_num_layers_is_derived() -> None:
    with pytest.raises(ConfigError, match="model.num_layers is not settable: .*effective_layers"):
        load_model_config(TINY, ["model.num_layers=4"])


def test_unknown_section_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, TINY.read_text() + "trainig:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trainig'.*did you mean 'training'"):
        load_model_config(path)


def test_section_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_model_config(write(tmp_path, "model: [1, 2]\n"))


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_model_config(write(tmp_path, "- model\n"))


def test_no_model_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no 'model:' section"):
        load_model_config(write(tmp_path, "training:\n  lr: 1\n"))


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_model_config(TINY, ["model.hidden_size"])


def test_override_without_section() -> None:
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_model_config(TINY, ["hidden_size=128"])


def test_override_unknown_section() -> None:
    with pytest.raises(ConfigError, match="unknown section 'modle'.*did you mean 'model'"):
        load_model_config(TINY, ["modle.hidden_size=128"])


def test_mor_validation_error_is_one_line() -> None:
    with pytest.raises(ConfigError, match="tiny.yaml: .*set effective_layers to 8 or 11") as info:
        load_model_config(TINY, ["model.effective_layers=9"])
    assert "\n" not in str(info.value)


def test_megatron_validation_error_is_wrapped() -> None:
    with pytest.raises(ConfigError, match="invalid model settings: Only one of") as info:
        load_model_config(TINY, ["model.bf16=true", "model.fp16=true"])
    assert "\n" not in str(info.value)
