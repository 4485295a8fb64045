"""Print one JSON object with a config's parameters, FLOPs and KV-cache figures vs vanilla.

    python tools/model_report.py --config configs/mor_360m_nr3.yaml [model.key=value ...]

The accounting is documented in `mor_megatron.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence



def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_int

    parser = ToolParser(prog="mor-model-report", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. model.seq_length=4096"
    )
    layout = parser.add_argument_group("layout for the per-GPU memory estimate")
    layout.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    layout.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    layout.add_argument("--dp", type=positive_int, default=1, help="data-parallel size")
    layout.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                        help="ZeRO stage (default: the trainer's, 0 at DP=1 in fp32 without PP, else 1)")
    layout.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per micro-batch")
    layout.add_argument("--recompute", action="store_true", help="full activation recomputation")
    layout.add_argument("--fp32", action="store_true", help="fp32 training instead of bf16")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: report(args), args.debug)


def report(args: argparse.Namespace) -> None:
    """Print the report of `args.config` (megatron is imported here, under run_cli's quiet)."""
    from mor_megatron.errors import UserError
    from mor_megatron.report import model_report
    from mor_megatron.sizing import Layout, training_memory
    from mor_megatron.training.config import zero_stage_for
    from mor_megatron.yaml_config import load_model_config

    config = load_model_config(args.config, args.overrides)
    zero = zero_stage_for(args.zero, args.dp, args.pp, bf16=not args.fp32)
    layout = Layout(args.tp, args.pp, args.dp, zero, args.micro_batch, args.recompute, not args.fp32)
    try:
        memory = training_memory(config, layout)
    except ValueError as err:  # a layout the config cannot take
        raise UserError(str(err)) from err
    print(json.dumps({
        "config": args.config,
        "overrides": list(args.overrides),
        **model_report(config),
        "memory_per_gpu": memory,
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
