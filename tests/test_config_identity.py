"""One model config, built once and frozen; its dump and checkpoint identity cover every setting.

The field lists are generated from the dataclass (`settable_fields`), never written by hand: a
megatron upgrade that adds a field is covered (or refused) without touching this file.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
import yaml

from mor_megatron.config import MEGATRON_FIELDS, ROUTER_DEFAULTS, ConfigError, MoRConfig
from mor_megatron.training.checkpoint import (
    _NOT_IDENTITY,
    CheckpointError,
    _check_identity,
    identity_hash,
    model_identity,
)
from mor_megatron.yaml_config import (
    RUN_ONLY_FIELDS, _default, _field_types, _members, dump_model_config, dumped_fields, load_model_config,
    model_config_from_dict, settable_fields,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
OWN = set(MoRConfig.__annotations__)

# A valid non-default value (with the settings it needs) where the type alone does not give one.
VALUES = {
    "effective_layers": (11, {}),  # middle-cycle 1 + 3 x 3 + 1
    "num_recursions": (2, {}),  # 1 + 2 x 3 + 1 = 8
    "sharing": ("none", {"router": "none", "num_recursions": 1}),
    "router": ("token_choice", {}),
    "router_activation": ("tanh", {}),
    "capacities": ([1.0, 0.5, 0.25], {}),
    "kv_mode": ("share_first", {}),
    "scatter_kernel": ("torch", {}),
    "token_choice_capacity_factor": (1.25, {"router": "token_choice"}),
    "params_dtype": ("bfloat16", {}),
    "hidden_size": (256, {}),
    "num_attention_heads": (8, {}),
    "num_query_groups": (4, {}),
    "kv_channels": (64, {}),
    "vocab_size": (8192, {}),
    "cp_comm_type": ("a2a", {}),
    "cross_entropy_fusion_impl": ("te", {}),
    "fp16": (True, {"params_dtype": "float16"}),
}


def _have_te() -> bool:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


_HAVE_TE = _have_te()


def _base() -> dict:
    return yaml.safe_load(TINY.read_text())["model"]


def _plain_default(name: str):
    default = _default(name)
    return default.value if hasattr(default, "value") else default


def _candidate(name: str):
    """A type-correct value different from the field's default (valid where `VALUES` says)."""
    if name in VALUES:
        return VALUES[name]
    default = _plain_default(name)
    for member in _members(_field_types()[name]):
        origin = typing.get_origin(member)
        if member is bool:
            return (not default, {})
        if member is int:
            return ((default or 0) + 2, {})
        if member is float:
            return (round((default or 0.0) * 2 + 0.05, 6), {})
        if origin is typing.Literal:
            return (next(a for a in typing.get_args(member) if a != default), {})
        if origin in (list, tuple):
            inner = next(a for a in typing.get_args(member) if a is not Ellipsis)
            item = {str: "x", int: 1, float: 1.0, bool: True}[inner]
            return ([item, item] if origin is tuple else [item], {})
        if member is str:
            return (f"not-{default}", {})
    raise AssertionError(f"no candidate value for {name}")


def _accepted(name: str) -> bool:
    """Whether a non-default value of `name` must build (else it must be refused)."""
    return name in OWN or name in MEGATRON_FIELDS


def _build(name: str, changed: bool = True) -> MoRConfig:
    """tiny.yaml (with the settings the candidate needs) and `name` at its candidate value, or,
    not `changed`, as tiny.yaml has it."""
    value, companions = _candidate(name)
    settings = {**_base(), **companions}
    if changed:
        settings[name] = value
    try:
        return model_config_from_dict(settings)
    except ConfigError as err:
        if "install TE" in str(err) and not _HAVE_TE:
            pytest.skip(f"{name} needs Transformer Engine")
        raise


def _settings(config: MoRConfig) -> dict:
    return {name: getattr(config, name) for name in dumped_fields()}


DUMPED = dumped_fields()
ACCEPTED = [n for n in DUMPED if _accepted(n) and n != "normalization"]
REFUSED = [n for n in DUMPED if not _accepted(n)]


def test_field_lists_are_generated_and_consistent():
    names = set(settable_fields())
    assert {"rotary_interleaved", "qk_layernorm", "hidden_size", "router", "num_moe_experts"} <= names
    assert "num_layers" not in names and "activation_func" not in names
    assert set(RUN_ONLY_FIELDS) <= set(_field_types()), "a run-only name is no MoRConfig field"
    assert not set(DUMPED) & set(RUN_ONLY_FIELDS)
    assert _NOT_IDENTITY - {"bf16"} <= set(DUMPED), "a _NOT_IDENTITY name is not dumped (typo?)"
    assert MEGATRON_FIELDS <= set(_field_types()) | {"_cpu_offloading_context"}


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_setting_dumps_and_reloads(name):
    config = _build(name)
    dumped = dump_model_config(config)
    assert name in dumped
    again = model_config_from_dict(yaml.safe_load(yaml.safe_dump(dumped)))
    assert _settings(again) == _settings(config)
    assert dump_model_config(again) == dumped
    # a built config re-validates as it is: megatron's derived values are accepted
    assert _settings(dataclasses.replace(config)) == _settings(config)


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_resume_with_another_value_is_refused_unless_not_identity(name, tmp_path):
    base, changed = _build(name, changed=False), _build(name)
    identity = model_identity(changed)
    meta = {"model_hash": identity_hash(identity), "model_identity": identity}
    _check_identity(meta, changed, tmp_path)  # the same model resumes
    if name in _NOT_IDENTITY:
        _check_identity(meta, base, tmp_path)
    else:
        with pytest.raises(CheckpointError, match=name):
            _check_identity(meta, base, tmp_path)


@pytest.mark.parametrize("name", REFUSED)
def test_settings_the_model_would_ignore_are_refused(name):
    with pytest.raises(ConfigError, match=f"model.{name}=.*do not implement.*remove it"):
        _build(name)


def test_normalization_other_than_rmsnorm_is_refused():
    with pytest.raises(ConfigError, match="normalization 'LayerNorm' is not supported.*RMSNorm"):
        load_model_config(TINY, ["model.normalization=LayerNorm"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_keep_their_checkpoint_hash(path):
    """The identity of every shipped config is what the old dump (MoRConfig's own fields plus the
    Llama shape) gave: checkpoints written before inherited fields were dumped still resume."""
    config = load_model_config(path)
    legacy_fields = ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                     "ffn_hidden_size", "init_method_std", "params_dtype", "bf16", "fp16", *OWN)
    legacy = {k: v for k, v in dump_model_config(config).items()
              if k in legacy_fields and k not in _NOT_IDENTITY}
    assert identity_hash(model_identity(config)) == identity_hash(legacy)


def test_inherited_settings_reach_meta_identity():
    """rotary_interleaved and qk_layernorm, set in YAML, were lost from meta.json."""
    config = load_model_config(TINY, ["model.rotary_interleaved=true", "model.qk_layernorm=true"])
    assert {"rotary_interleaved": True, "qk_layernorm": True}.items() <= model_identity(config).items()


# -- built once, frozen ---------------------------------------------------------------------------


def test_config_is_frozen_after_build():
    config = load_model_config(TINY)
    with pytest.raises(ConfigError, match="cannot change after the config is built"):
        config.hidden_size = 256
    with pytest.raises(ConfigError, match="cannot change"):
        config.router_alpha = 0.5
    config.grad_sync_func = None  # megatron's schedule installs its hooks on the built config
    changed = dataclasses.replace(config, hidden_size=256)  # a new config, validated again
    assert (changed.hidden_size, config.hidden_size) == (256, 128)


def _run_yaml(tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text() + "data:\n  train: /nowhere/shard\n" + "".join(extra))
    return path


def test_run_config_builds_the_final_model_config_once(tmp_path):
    from mor_megatron.training.config import load_run_config

    path = _run_yaml(tmp_path, "parallel:\n  tensor_model_parallel_size: 2\n",
                     "training:\n  bf16: true\n  recompute: true\n")
    model = load_run_config(path).model
    assert model.tensor_model_parallel_size == 2 and model.bf16 and model.pipeline_dtype == torch.bfloat16
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == ("full", "uniform", 1)
    plain = load_run_config(_run_yaml(tmp_path, "training:\n  bf16: false\n")).model
    assert not plain.bf16 and plain.recompute_granularity is None and plain.pipeline_dtype == torch.float32


@pytest.mark.parametrize("key, where", [("bf16", "training.bf16"),
                                        ("tensor_model_parallel_size", "parallel.tensor_model_parallel_size"),
                                        ("recompute_granularity", "training.recompute")])
def test_run_settings_in_the_model_section_are_refused(tmp_path, key, where):
    from mor_megatron.training.config import load_run_config

    value = {"bf16": "true", "tensor_model_parallel_size": "2", "recompute_granularity": "full"}[key]
    with pytest.raises(ConfigError, match=f"model.{key} is a run setting: set {where} instead"):
        load_run_config(_run_yaml(tmp_path), [f"model.{key}={value}"])


def test_build_model_takes_the_run_config_as_built():
    import inspect

    from mor_megatron.training import loop

    source = inspect.getsource(loop.build_model)
    assert "replace(" not in source and "config = run.model" in source


# -- router-dependent defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("router", sorted(ROUTER_DEFAULTS))
def test_switching_router_switches_its_defaults(router):
    config = load_model_config(TINY, [f"model.router={router}"])
    assert {k: getattr(config, k) for k in ROUTER_DEFAULTS[router]} == ROUTER_DEFAULTS[router]


def test_a_router_setting_the_user_gives_is_kept():
    config = load_model_config(TINY, ["model.router=token_choice", "model.router_activation=sigmoid"])
    assert (config.router_activation, config.router_alpha) == ("sigmoid", 1.0)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_files_do_not_pin_router_defaults(path):
    model = yaml.safe_load(path.read_text())["model"]
    defaults = ROUTER_DEFAULTS.get(model.get("router", "expert_choice"), {})
    pinned = [k for k, v in defaults.items() if model.get(k) == v]
    assert not pinned, f"{path.name} pins {pinned}: leave them to the router"
