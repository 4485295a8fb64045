"""The base of every error that a user's input causes (config, data, checkpoint, launch).

The CLIs print such errors as one line with exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Callable

# Under torchrun every rank usually meets the same input error. Rank 0 says it; the others wait
# this long first, because torchrun stops the remaining workers as soon as one exits, which could
# kill rank 0 before it printed. A rank still alive after the wait met an error of its own (its
# data, its device) that rank 0 did not, and prints it.
OTHER_RANKS_GRACE_S = 5.0


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the fix."""


# The shell's code for a process stopped by SIGINT (128 + 2).
INTERRUPTED = 130


def run_cli(main: Callable[[], object], debug: bool = False) -> int:
    """Run a CLI body: its int result (None: 0) is the exit code; a `UserError` becomes one
    `error: ...` line and exit code 2 (under torchrun: printed by rank 0, or after
    `OTHER_RANKS_GRACE_S` by a rank whose error rank 0 did not meet).

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
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            time.sleep(OTHER_RANKS_GRACE_S)
        print(f"error: {err}" if rank == "0" else f"error: (rank {rank}) {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no handler asked for a clean stop, or a second Ctrl-C
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print("interrupted (Ctrl-C): stopped; files written before stay as they were", file=sys.stderr, flush=True)
        return INTERRUPTED
    return code if isinstance(code, int) and not isinstance(code, bool) else 0
