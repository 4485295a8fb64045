"""JSON files the tools read (checkpoint `meta.json`, Hugging Face `config.json` and shard
indexes), read once here so that a missing, binary, malformed or partial file is one line naming
the file and the fix, never a `KeyError` or `JSONDecodeError` traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from mor_megatron.errors import UserError


def read_json(
    path: Union[str, Path], fix: str, required: Sequence[str] = (), error: type[UserError] = UserError
) -> dict:
    """The JSON object in `path`, holding every key of `required`; otherwise `error` with one
    line ending in `fix` (what the user should do, e.g. "re-export the model")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found: {fix}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is not a text file: {fix}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): {fix}") from None
    except OSError as err:
        raise error(f"{path} cannot be read ({err.strerror}): {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    missing = [key for key in required if key not in value]
    if missing:
        raise error(f"{path} lacks {', '.join(repr(key) for key in missing)}: {fix}")
    return value
