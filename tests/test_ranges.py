"""The range table (`mor_megatron/ranges.py`): every numeric setting of every section has an entry,
and each entry's bounds are enforced when its section is built, with a one-line `ConfigError`.

Cases are generated from the table: for each setting, values just outside each bound, a non-finite
value and (for integers) a fraction are refused; the bound itself (or a value just inside an open
bound) passes the range check.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from mor_megatron.config import MEGATRON_FIELDS, ConfigError, MoRConfig
from mor_megatron.ranges import RANGES
from mor_megatron.training.config import LoggingConfig, ParallelConfig, TrainingConfig, load_run_config
from range_cases import inside, outside

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SECTIONS = {"parallel": ParallelConfig, "training": TrainingConfig, "logging": LoggingConfig, "model": MoRConfig}
# A valid tiny model: a range case changes one field of it.
TINY_MODEL = dict(effective_layers=8, num_recursions=3, hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=128, vocab_size=256, seq_length=32)


def _numeric(tp: typing.Any) -> bool:
    members = [m for m in typing.get_args(tp) if m is not type(None)] if typing.get_args(tp) else [tp]
    return len(members) == 1 and members[0] in (int, float)


def _numeric_fields(section: str) -> set[str]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init and _numeric(hints[f.name])}
    if section == "model":  # the settings the MoR model honours; others are refused when changed
        names &= set(MoRConfig.__annotations__) | MEGATRON_FIELDS
    return names


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_numeric_setting_has_a_range(section: str) -> None:
    assert _numeric_fields(section) <= set(RANGES[section]), "add these settings to ranges.RANGES"
    assert set(RANGES[section]) <= {f.name for f in dataclasses.fields(SECTIONS[section])}


def _build(section: str, name: str, value) -> None:
    if section == "model":
        MoRConfig(**dict(TINY_MODEL, **{name: value}))
    else:
        SECTIONS[section](**{name: value})


CASES = [(s, n) for s in RANGES for n in RANGES[s]]


@pytest.mark.parametrize("section, name", CASES, ids=[f"{s}.{n}" for s, n in CASES])
def test_out_of_range_is_refused(section: str, name: str) -> None:
    valid = RANGES[section][name]
    for value in outside(valid):
        with pytest.raises(ConfigError, match=rf"^{section}\.{name}=.* is out of range: use "):
            _build(section, name, value)


@pytest.mark.parametrize("section, name", CASES, ids=[f"{s}.{n}" for s, n in CASES])
def test_bounds_pass_the_range_check(section: str, name: str) -> None:
    """A value at (or just inside) each bound is not refused by the range check (another rule of
    the section may still refuse it, e.g. a head count that does not divide the width)."""
    for value in inside(RANGES[section][name]):
        try:
            _build(section, name, value)
        except ConfigError as err:
            assert "is out of range" not in str(err), err


@pytest.mark.parametrize("override, message", [
    ("training.lr=1e400", "training.lr=inf is out of range: use a finite number in [0, 1]"),
    ("training.lr=1e39", "training.lr=1e+39 is out of range"),  # beyond fp32: torch's traceback before
    ("training.lr=.nan", "training.lr=nan is out of range"),
    ("training.min_lr_ratio=-5", "training.min_lr_ratio=-5.0 is out of range: use a finite number in [0, 1]"),
    ("training.adam_beta1=1.5", "training.adam_beta1=1.5 is out of range: use a finite number in [0, 1)"),
    ("training.seed=-1", "training.seed=-1 is out of range: use an integer in [0, 4.29497e+09]"),
    ("logging.log_interval=0", "logging.log_interval=0 is out of range: use an integer >= 1"),
    ("model.hidden_dropout=1", "model.hidden_dropout=1.0 is out of range"),
])
def test_run_config_names_the_file_and_setting(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(TINY, ["data.train=somewhere", override])
    assert str(err.value).startswith(f"{TINY}: {message}")
    assert "\n" not in str(err.value)
