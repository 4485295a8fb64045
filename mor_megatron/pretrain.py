"""`mor-pretrain` / `python -m mor_megatron.pretrain --config configs/NAME.yaml [section.key=value ...]`

Problems with the config, data, checkpoints or launch environment end the run with one line
naming the problem and the fix, and exit code 2 (1 for a failed run); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mor-pretrain", description="Pretrain a Mixture-of-Recursions model."
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_steps=50")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
    from mor_megatron.errors import UserError, run_cli

    def train() -> None:
        # before DeepSpeed is first imported; inside run_cli so a bad MOR_DEVICE is one line
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if _computes_on_cuda() else "cpu")
        if not os.path.isfile(args.config):
            raise UserError(f"config file {args.config} not found: pass an existing YAML file (see configs/)")
        from mor_megatron.training.config import load_run_config
        from mor_megatron.training.loop import pretrain

        pretrain(load_run_config(args.config, args.overrides))

    return run_cli(train, args.debug)


def _computes_on_cuda() -> bool:
    from mor_megatron.device import compute_device

    return compute_device().type == "cuda"


if __name__ == "__main__":
    sys.exit(main())
