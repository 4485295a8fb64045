"""The base of every error that a user's input causes (config, data, checkpoint, launch).

The CLIs print such errors as one line with exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the fix."""


def run_cli(main: Callable[[], object], debug: bool = False) -> int:
    """Run a CLI body: 0 on success; a `UserError` becomes one `error: ...` line (printed once,
    by rank 0 under torchrun) and exit code 2, unless `debug` asks for the traceback."""
    try:
        main()
        return 0
    except UserError as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
