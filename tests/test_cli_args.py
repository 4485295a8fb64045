"""Every command's arguments are checked by their meaning (`mor_megatron/cli.py`): generated from
the commands themselves (every `tools/*.py` run as a script, the console scripts in
pyproject.toml), so a new command is covered without a new test.

For each command: its parser is a `ToolParser` with `--debug`; no numeric argument is left with a
bare `int`/`float` type (each states its range); and for each ranged argument, values outside the
range (from `range_cases.outside`) and a non-number each end in one `error:` line and exit 2,
before the command does anything. (`mor_megatron/torchrun.py` passes its arguments to torchrun's
own parser and is left out.)
"""

from __future__ import annotations

import argparse
import importlib
import tomllib
from pathlib import Path

import pytest

from mor_megatron.cli import ToolParser
from range_cases import inside, outside

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MODULES = {name: target.split(":")[0] for name, target in SCRIPTS.items()}
MODULES |= {  # tools run as scripts that have no console script
    f"tools/{path.name}": f"mor_megatron.tools.{path.stem}"
    for path in sorted((ROOT / "tools").glob("*.py"))
    if '__name__ == "__main__"' in path.read_text() and f"mor_megatron.tools.{path.stem}" not in MODULES.values()
}


def _parser(script: str) -> argparse.ArgumentParser:
    module = importlib.import_module(MODULES[script])
    assert hasattr(module, "build_parser"), f"{script}: give {module.__name__} a build_parser()"
    return module.build_parser()


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the required arguments, so a case fails on its own argument only."""
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:  # a ranged one gets a valid number
            valid = getattr(action.type, "range", None)
            argv += [action.option_strings[0], str(inside(valid)[0]) if valid else "x"]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            first = group._group_actions[0]
            argv += [first.option_strings[0]] + ([] if first.nargs == 0 else ["x"])
    return argv


COMMANDS = sorted(MODULES)


@pytest.mark.parametrize("script", COMMANDS)
def test_parser_is_checked_and_has_debug(script: str) -> None:
    parser = _parser(script)
    assert isinstance(parser, ToolParser), f"{script}: build its parser with mor_megatron.cli.ToolParser"
    assert "--debug" in parser._option_string_actions
    bare = [a.dest for a in parser._actions if a.type in (int, float) and not a.choices]
    assert not bare, f"{script}: give {bare} a ranged type from mor_megatron.cli"


def _options_typed_with(attribute: str) -> list[tuple[str, str]]:
    """(command, option) for every option whose type carries `attribute` (a command without
    build_parser fails the test above, not the collection)."""
    return [
        (script, action.option_strings[0])
        for script in COMMANDS
        if hasattr(importlib.import_module(MODULES[script]), "build_parser")
        for action in _parser(script)._actions
        if hasattr(action.type, attribute) and action.option_strings
    ]


RANGED = _options_typed_with("range")


@pytest.mark.parametrize("script, option", RANGED, ids=[f"{s} {o}" for s, o in RANGED])
def test_out_of_range_argument_is_one_line_exit_2(script: str, option: str, capsys) -> None:
    parser = _parser(script)
    valid = parser._option_string_actions[option].type.range
    for value in [*outside(valid), "many"]:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(_required(parser) + [option, str(value)])
        err = capsys.readouterr().err
        assert exited.value.code == 2
        assert err.count("\n") == 1 and err.startswith(f"error: {parser.prog}: argument {option}"), err


TYPED = _options_typed_with("bad_example")  # other checked types (devices, shapes)


@pytest.mark.parametrize("script, option", TYPED, ids=[f"{s} {o}" for s, o in TYPED])
def test_malformed_argument_is_one_line_exit_2(script: str, option: str, capsys) -> None:
    """Before: `--device gpu9` or `--shapes 12x` ended in torch's or int()'s traceback."""
    parser = _parser(script)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(_required(parser) + [option, parser._option_string_actions[option].type.bad_example])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and f"argument {option}" in err, err


def test_generate_max_batch_zero_is_refused_before_loading(capsys) -> None:
    """`mor-generate --max-batch 0` looped for ever; now it stops at the argument."""
    from mor_megatron.tools import generate

    with pytest.raises(SystemExit) as exited:
        generate.main(["--checkpoint", "nowhere", "--prompt", "hi", "--max-batch", "0"])
    assert exited.value.code == 2
    assert "argument --max-batch: 0 is out of range: use an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("mor-init-weights", ["--config", str(ROOT / "configs" / "tiny.yaml"), "data.train=unused"]),
    ("mor-convert-from-hf", ["--hf", "nowhere", "--config", str(ROOT / "configs" / "tiny.yaml")]),
    ("mor-convert-to-hf", ["--checkpoint", "nowhere"]),
])
def test_output_holding_files_is_refused_without_overwrite(script, argv, tmp_path, capsys, parallel) -> None:
    """Every tool writing a folder refuses one that already holds something (before, init weights
    and imports wrote into it beside what was there), before any work, naming --overwrite."""
    from train_helpers import tree_digest

    out = tmp_path / "out"
    out.mkdir()
    (out / "other.txt").write_text("someone else's")
    before = tree_digest(out)
    module = importlib.import_module(MODULES[script])
    assert module.main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds files" in err and "--overwrite" in err, err
    assert tree_digest(out) == before
