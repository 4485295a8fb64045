"""The base of every error that a user's input causes (config, data, checkpoint, launch).

The CLIs print such errors as one line with exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the fix."""


def run_cli(main: Callable[[], object], debug: bool = False) -> int:
    """Run a CLI body: its int result (None: 0) is the exit code; a `UserError` becomes one
    `error: ...` line (printed once, by rank 0 under torchrun) and exit code 2.

    Unless `debug`, the warnings megatron-core, apex, DeepSpeed and torch print while importing
    (optional fused kernels missing, deprecations) are hidden, so a CLI's output starts with its
    own lines: a CLI imports those libraries inside `main`. `debug` shows them and the traceback.
    """
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            code = main()
    except UserError as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) and not isinstance(code, bool) else 0
