"""Write a model's initial weights in layout-free form, so runs at different TP/PP/DP layouts can
start from identical weights (`training.init_from=DIR`).

    python tools/init_weights.py --config configs/tiny.yaml --output runs/init [section.key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser

    parser = ToolParser(prog="mor-init-weights", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML giving the model")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output already holds (once the new output is complete)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    def write() -> None:
        from mor_megatron.model import MoRGPTModel
        from mor_megatron.parallel.state import initialize_parallel
        from mor_megatron.paths import replaced_output
        from mor_megatron.training.config import load_run_config
        from mor_megatron.weights import save_weights

        run = load_run_config(args.config, args.overrides)
        with replaced_output(args.output, "--output", args.overwrite) as output:
            initialize_parallel(seed=run.training.seed)
            config = dataclasses.replace(run.model, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
            save_weights(MoRGPTModel(config, backend=run.training.backend), str(output))
        print(f"initial weights written to {args.output}")

    return run_cli(write, args.debug)


if __name__ == "__main__":
    sys.exit(main())
