"""YAML run configs: the `model:` section becomes a validated `MoRConfig`.

A config file is a mapping of sections (`KNOWN_SECTIONS`); the `model:` keys are `MoRConfig` field
names. Command-line overrides are `section.key=value` strings whose value is parsed as YAML.
Every problem is reported up front as one `ConfigError` line that names the fix.

`dump_model_config` is the inverse: the YAML-able dict of a config's model settings that differ
from the defaults, so that `load(dump(config))` rebuilds the same model.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence, Union

import torch
import yaml

from mor_megatron.config import ConfigError, MoRConfig, field_default

KNOWN_SECTIONS = ("model", "parallel", "training", "data", "logging")

# Fields a model section must not set: derived ones, with the reason shown to the user.
DERIVED_FIELDS = {
    "num_layers": "it is derived from effective_layers and sharing: set effective_layers instead",
}

# torch dtypes settable by name.
DTYPE_FIELDS = ("params_dtype",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Settings of one run rather than of the model: `dump_model_config` leaves them out, so a dump
# rebuilds the same model at any layout, precision and machine. Each names where it comes from;
# those set by another section of a run config are refused in its `model:` section.
_LAYOUT = "the run's layout (parallel section)"
_FP8 = "the run's FP8 precision (needs a GPU; decode and export run without it)"
RUN_ONLY_FIELDS = {
    # layout
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "expert_tensor_parallel_size": _LAYOUT,
    "microbatch_group_size_per_vp_stage": _LAYOUT,
    # precision
    "bf16": "training.bf16",
    **{name: _FP8 for name in (
        "fp8", "fp8_recipe", "fp8_param", "fp8_margin", "fp8_interval", "fp8_amax_history_len",
        "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention",
        "fp8_multi_head_attention", "tp_only_amax_red", "first_last_layers_bf16",
        "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
    )},
    # recompute
    "recompute_granularity": "training.recompute",
    "recompute_method": "training.recompute",
    "recompute_num_layers": "training.recompute",
    "recompute_modules": "training.recompute",
    "cuda_graph_scope": "megatron (derived; CUDA graphs are not used)",
    # where the weights are built
    "use_cpu_initialization": "the machine that builds the weights",
    "perform_initialization": "the code that builds the weights",
}

# Fields whose unset value is another field's: dumped only when they differ from it.
DEFAULTS_FROM = {"embedding_init_method_std": "init_method_std"}


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (YAML's "last one wins" would drop the first silently)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-5`) as floats (YAML 1.2),
    and refuses a key written twice in one mapping (a section or the top level)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # SafeLoader's own error names an unhashable key
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(
                    f"duplicate key '{key}' at lines {first_line[key]} and {line}: keep one of them"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# -- reading ------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: check the path (e.g. configs/tiny.yaml)")
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        message = f"{path}: YAML syntax error{where}: {problem}; fix the syntax there"
        raise ConfigError(message) from None


def _check_sections(raw: Any, source: str) -> dict[str, dict]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: top level must be a mapping of sections ({', '.join(KNOWN_SECTIONS)})"
        )
    sections: dict[str, dict] = {}
    for name, body in raw.items():
        if name not in KNOWN_SECTIONS:
            raise ConfigError(
                f"{source}: unknown section '{name}'{_suggest(str(name), KNOWN_SECTIONS)}; "
                f"sections are {', '.join(KNOWN_SECTIONS)}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of key: value")
        sections[name] = dict(body)
    return sections


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def apply_overrides(sections: dict[str, dict], overrides: Sequence[str]) -> dict[str, dict]:
    """Apply `section.key=value` overrides (value parsed as YAML) to a sections dict, in place."""
    for item in overrides:
        dotted, sep, text = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(
                f"override '{item}' is not of the form section.key=value "
                "(e.g. model.hidden_size=128)"
            )
        if parts[0] not in KNOWN_SECTIONS:
            raise ConfigError(
                f"override '{item}': unknown section '{parts[0]}'"
                f"{_suggest(parts[0], KNOWN_SECTIONS)}; sections are {', '.join(KNOWN_SECTIONS)}"
            )
        try:
            value = yaml.load(text, Loader=_Loader)
        except DuplicateKeyError as err:
            raise ConfigError(f"override '{item}': {err}") from None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML; quote it") from None
        node = sections.setdefault(parts[0], {})
        for key in parts[1:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{key}' holds a value, not a mapping")
            node = child
        node[parts[-1]] = value
    return sections


def load_sections(path: Union[str, Path], overrides: Sequence[str] = ()) -> dict[str, dict]:
    """All sections of a config file (known names only, each a dict) with overrides applied."""
    path = Path(path)
    sections = _check_sections(_read_yaml(path), str(path))
    return apply_overrides(sections, overrides)


# -- types --------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(MoRConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(MoRConfig) if f.init}


def _members(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def _yaml_member(tp: Any) -> bool:
    """Whether values of type `tp` can be written in YAML (scalars, literals, lists of those)."""
    if tp in (bool, int, float, str, type(None)):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return True
    if origin in (list, tuple):
        return all(arg is Ellipsis or _yaml_member(arg) for arg in typing.get_args(tp))
    return False


def _settable(tp: Any) -> bool:
    return any(_yaml_member(m) for m in _members(tp) if m is not type(None))


class _Mismatch(Exception):
    pass


def _coerce_member(value: Any, tp: Any) -> Any:
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
    elif typing.get_origin(tp) in (list, tuple) and isinstance(value, (list, tuple)):
        return _coerce_sequence(value, tp)
    raise _Mismatch


def _coerce_sequence(value: Sequence, tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        items = [_coerce(v, args[0]) for v in value] if args else list(value)
    elif len(args) == len(value):
        items = [_coerce(v, a) for v, a in zip(value, args)]
    else:
        raise _Mismatch
    return list(items) if typing.get_origin(tp) is list else tuple(items)


def _coerce(value: Any, tp: Any) -> Any:
    for member in _members(tp):
        if member is type(None) or _yaml_member(member):
            try:
                return _coerce_member(value, member)
            except _Mismatch:
                continue
    raise _Mismatch


def _describe(tp: Any, plural: bool = False) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if plural:
        names = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
    parts = []
    for member in _members(tp):
        origin = typing.get_origin(member)
        if member is type(None):
            parts.append("null")
        elif member in names:
            parts.append(names[member])
        elif origin is typing.Literal:
            parts.append("one of " + "/".join(map(str, typing.get_args(member))))
        elif origin in (list, tuple):
            inner = [a for a in typing.get_args(member) if a is not Ellipsis]
            parts.append(f"a list of {_describe(inner[0], plural=True) if inner else 'values'}")
    return " or ".join(parts)


# -- the model section ----------------------------------------------------------------------------


def _model_value(key: str, value: Any, types_by_name: dict[str, Any]) -> Any:
    where = f"model.{key}"
    if key not in types_by_name:
        raise ConfigError(
            f"unknown model key '{key}'{_suggest(key, list(types_by_name))}; "
            "model keys are MoRConfig field names"
        )
    if key in DERIVED_FIELDS:
        raise ConfigError(f"{where} is not settable: {DERIVED_FIELDS[key]}")
    if key in DTYPE_FIELDS:
        if not isinstance(value, str) or value not in DTYPES:
            raise ConfigError(f"{where}={value!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[value]
    tp = types_by_name[key]
    if not _settable(tp):
        raise ConfigError(
            f"{where} is not settable from YAML (it holds a Python object): remove it; "
            "the code sets it"
        )
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise ConfigError(
            f"{where} has the wrong type: expected {_describe(tp)}, got "
            f"{type(value).__name__} {value!r}"
        ) from None


def model_config_from_dict(section: dict, source: str = "model section") -> MoRConfig:
    """Validate a `model:` mapping and build the `MoRConfig`; every problem is a `ConfigError`."""
    types_by_name = _field_types()
    try:
        kwargs = {str(k): _model_value(str(k), v, types_by_name) for k, v in section.items()}
        return MoRConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except (ValueError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{source}: invalid model settings: {first}") from None


def load_model_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> MoRConfig:
    """The `MoRConfig` of a YAML config file, with `section.key=value` overrides applied."""
    sections = load_sections(path, overrides)
    if "model" not in sections:
        raise ConfigError(f"{path}: no 'model:' section; add one with at least effective_layers")
    return model_config_from_dict(sections["model"], str(path))


# -- other sections ------------------------------------------------------------------------------


def section_from_dict(cls: type, section: Any, name: str, source: str = "config") -> Any:
    """Build the dataclass `cls` of a non-model section, with the same one-line errors."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in section.items():
        key = str(key)
        if key not in known:
            raise ConfigError(
                f"{source}: unknown {name} key '{key}'{_suggest(key, known)}; "
                f"{name} keys are {', '.join(known)}"
            )
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Mismatch:
            raise ConfigError(
                f"{source}: {name}.{key} has the wrong type: expected {_describe(hints[key])}, "
                f"got {type(value).__name__} {value!r}"
            ) from None
    try:
        return cls(**kwargs)
    except ConfigError as err:  # the section's own checks
        raise ConfigError(f"{source}: {err}") from None


# -- dumping ---------------------------------------------------------------------------------------


def settable_fields() -> list[str]:
    """The `model:` keys a YAML file can set (every `MoRConfig` field of a YAML-able type, inherited
    megatron ones included, but not the derived `num_layers`), in field order."""
    return [
        name for name, tp in _field_types().items()
        if (name in DTYPE_FIELDS or _settable(tp)) and name not in DERIVED_FIELDS
    ]


def dumped_fields() -> list[str]:
    """The fields `dump_model_config` writes (when not at their default): every settable field
    but the run-only ones."""
    return [name for name in settable_fields() if name not in RUN_ONLY_FIELDS]


def _default(name: str) -> Any:
    return field_default(MoRConfig.__dataclass_fields__[name])


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, torch.dtype):
        names = [name for name, dtype in DTYPES.items() if dtype == value]
        return names[0] if names else str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_model_config(config: MoRConfig) -> dict[str, Any]:
    """The model settings of `config` that differ from the defaults, as plain YAML-able values.

    Every settable field (`dumped_fields`: MoR and inherited megatron ones) but the run-only ones
    (`RUN_ONLY_FIELDS`); `load_model_config` of `{"model": dump_model_config(config)}` rebuilds
    the same model settings.
    """
    out: dict[str, Any] = {}
    for name in dumped_fields():
        value = getattr(config, name)
        source = DEFAULTS_FROM.get(name)
        default = getattr(config, source) if source else _default(name)
        if value != default:
            out[name] = _plain(value)
    return out
