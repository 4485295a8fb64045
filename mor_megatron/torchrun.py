"""`python -m mor_megatron.torchrun [torchrun options] -m mor_megatron.pretrain ...`: torchrun, with
failures kept short.

torchrun (`torch.distributed.run`) answers any failed worker with its own traceback and a failure
table, so a worker's one-line `error: ...` (a bad config, data or checkpoint: exit code 2) drowns
in 30 lines. Here the launch is the same `torch.distributed.run` (same options, same elastic agent),
but a failure ends with one line: nothing more when the worker already said what was wrong (exit
code 2), else which rank failed and how; a SIGTERM to torchrun itself (preemption) ends in one
line too. Exit codes: the failed worker's (2 for user errors), 1 when it died by a signal, 128 +
the signal when torchrun was stopped by one.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Optional, Sequence


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its per-worker "closing signal" / "failed (exitcode ...)" lines: the summary below says it once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode == 2:
            return 2  # the worker printed its one-line error
        print(f"error: worker rank {rank} (pid {failure.pid}) {_describe(failure.exitcode)}; its output "
              "is above; relaunch the same command to resume from the last checkpoint", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as stopped:
        # SIGTERM from Slurm preemption or the user: torchrun passed it on to the workers, which
        # save a checkpoint before they exit (see their output above)
        name = signal.Signals(stopped.sigval).name
        print(f"error: stopped by {name}; the trainers' last lines above say whether they saved; relaunch "
              "the same command (or requeue the job) to resume from the newest complete checkpoint", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
