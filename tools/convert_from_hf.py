"""Import a Hugging Face Llama-family folder as layout-free weights for a mor-megatron config.

    python tools/convert_from_hf.py --hf HF_DIR --config configs/NAME.yaml --init stepwise --output DIR

then train with `training.init_from=DIR` at any TP/PP layout. A MoR config's shared layers are
filled by `--init` (stepwise, average, lower, upper or random; see mor_megatron/hf/importer.py);
its first/last unique layers take the base's first/last layers, routers start fresh. Problems are
one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

INITS = ("stepwise", "average", "lower", "upper", "random")


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, seed

    parser = ToolParser(prog="mor-convert-from-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--config", required=True, help="run YAML whose model: section is the target")
    parser.add_argument("--init", default="stepwise", choices=INITS, help="shared-layer initialisation")
    parser.add_argument("--output", required=True, help="weights folder to write")
    parser.add_argument("--seed", type=seed, default=1234, help="seed of the fresh parts (routers, random)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output already holds (once the new output is complete)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pytorch_model.bin when the folder has no safetensors (pickles can run code: "
                             "only for sources you trust; loaded with torch's weights_only unpickler)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mor_megatron.errors import run_cli

    def convert() -> None:
        from mor_megatron.hf.importer import import_hf  # inside run_cli: its import warnings hidden

        import_hf(args.hf, args.config, args.output, args.init, args.overrides, args.seed,
                  allow_pickle=args.allow_pickle, overwrite=args.overwrite)

    return run_cli(convert, args.debug)


def cli() -> int:
    """The command (`python tools/X.py`, console script): a process of its own, on the CPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion runs on CPU (gloo, CPU tensors) everywhere
    os.environ["MOR_DEVICE"] = "cpu"  # a launcher's MOR_DEVICE=cuda:N would name a GPU hidden above
    os.environ.pop("MOR_DIST_BACKEND", None)  # the CPU's backend (gloo), not a launcher's nccl
    return main()


if __name__ == "__main__":
    sys.exit(cli())
