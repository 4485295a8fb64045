"""Command-line arguments checked by their meaning, for every tool, with one error line.

Every CLI builds its parser with `ToolParser`: a bad argument is one `error: ...` line (argparse's
usage block left out; `--help` shows it) and exit code 2, as every other user error
(`errors.run_cli`), and every parser has `--debug`. The `type=` functions below state each
argument's valid range once, so a value such as `--max-batch 0` is refused before any work
instead of reaching the engine (where it decoded nothing, for ever).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn, Union

from mor_megatron.ranges import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Range

USAGE_ERROR = 2


class ToolParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors and a `--debug` flag."""

    def __init__(self, *args, debug: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if debug:
            self.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)


def ranged(valid: Range) -> Callable[[str], Union[int, float]]:
    """An argparse type: an integer or finite number inside `valid` (the rule of `ranges.Range`,
    which the config sections use too). The type keeps its range as `.range` for tests."""
    kind = int if valid.integer else float

    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {valid.describe()}") from None
        if not valid.holds(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {valid.describe()}")
        return value

    parse.__name__ = valid.describe()  # argparse names the type in its messages
    parse.range = valid
    return parse


positive_int = ranged(POSITIVE_INT)
non_negative_int = ranged(COUNT)
positive_float = ranged(POSITIVE)
non_negative_float = ranged(NON_NEGATIVE)
seed = ranged(SEED)


def device_name(text: str) -> str:
    """An argparse type: a torch device string such as cpu, cuda or cuda:1 (or "auto")."""
    if text == "auto":
        return text
    import torch  # only when the argument is given

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a device: use cpu, cuda or cuda:N") from None
    return text


device_name.bad_example = "gpu9"  # tests/test_cli_args.py tries each typed argument's example

def dims(count: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: `count` positive integers joined by x, such as 2048x8x960."""

    def parse(text: str) -> tuple[int, ...]:
        parts = text.lower().split("x")
        if len(parts) != count or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"'{text}' is not {count} positive integers joined by x")
        return tuple(int(part) for part in parts)

    parse.__name__ = f"{count} sizes joined by x"
    parse.bad_example = "12x"
    return parse


def existing_file(text: str) -> str:
    """An argparse type: a path to an existing regular file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} not found: check the path")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text
