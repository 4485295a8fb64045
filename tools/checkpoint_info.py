"""Print a checkpoint's layout, step, tokens and config, after checking it is complete.

    python tools/checkpoint_info.py runs/NAME/checkpoints[/step_00000100]

Given the checkpoints folder, describes the newest complete checkpoint. A damaged checkpoint
gives one line naming the file and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser

    parser = ToolParser(prog="mor-checkpoint-info", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a checkpoint directory or the folder holding them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: describe(Path(args.path)), args.debug)


def describe(path: Path) -> None:
    """Print the checkpoint at `path` (or the newest complete one in it)."""
    from mor_megatron.checkpoint_files import checkpoint_problem, find_latest, read_meta
    from mor_megatron.errors import UserError

    if not path.is_dir():
        raise UserError(f"{path} is not a directory: give a checkpoint or checkpoints folder")
    if not (path / "meta.json").exists() and not path.name.startswith("step_"):
        found = find_latest(str(path), log=lambda message: print(message, file=sys.stderr))
        if found is None:
            raise UserError(f"no complete checkpoint in {path}")
        path = found
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(problem)
    meta = read_meta(path)
    state, layout = meta["train_state"], meta["layout"]
    print(f"checkpoint   {path}")
    print(f"step         {state['step']}")
    print(f"samples      {state['consumed_samples']}")
    print(f"tokens       {state['consumed_tokens']}")
    print(
        "layout       TP {tensor_model_parallel_size} x PP {pipeline_model_parallel_size} x "
        "DP {data_parallel_size}, ZeRO {zero_stage}".format(**layout)
    )
    print(f"files        {len(meta['files'])} ({sum(meta['files'].values()) / 1e6:.1f} MB)")
    print("config")
    print(json.dumps(meta["config"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
