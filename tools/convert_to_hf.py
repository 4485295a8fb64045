"""Export a mor-megatron checkpoint (saved at any TP/PP/DP layout) as a Hugging Face model folder.

    python tools/convert_to_hf.py --checkpoint runs/NAME/checkpoints --output hf/NAME [--tokenizer DIR]
    python tools/convert_to_hf.py --checkpoint runs/init --config configs/tiny.yaml --output hf/init

`--checkpoint` is a `step_N` directory, the folder holding them (the newest complete one is used),
or a bare weights folder (`tools/init_weights.py` output) with `--config`. A vanilla model becomes
`LlamaForCausalLM`; a MoR model `MoRForCausalLM`, loaded with `trust_remote_code=True`. Problems
are one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser

    parser = ToolParser(prog="mor-convert-to-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints folder or weights folder")
    parser.add_argument("--output", required=True, help="HF folder to write")
    parser.add_argument("--config", help="run YAML giving the model (needed for a bare weights folder)")
    parser.add_argument("--tokenizer", help="tokenizer folder to include (default: the run's data.tokenizer)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output already holds (once the new output is complete)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mor_megatron.errors import run_cli

    def convert() -> None:
        from mor_megatron.hf.export import export  # inside run_cli: its import warnings hidden

        export(args.checkpoint, args.output, args.config, args.tokenizer, args.max_shard_size,
               overwrite=args.overwrite)

    return run_cli(convert, args.debug)


def cli() -> int:
    """The command (`python tools/X.py`, console script): a process of its own, on the CPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion runs on CPU (gloo, CPU tensors) everywhere
    os.environ["MOR_DEVICE"] = "cpu"  # a launcher's MOR_DEVICE=cuda:N would name a GPU hidden above
    os.environ.pop("MOR_DIST_BACKEND", None)  # the CPU's backend (gloo), not a launcher's nccl
    return main()


if __name__ == "__main__":
    sys.exit(cli())
