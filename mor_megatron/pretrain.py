"""`mor-pretrain` / `python -m mor_megatron.pretrain --config configs/NAME.yaml [section.key=value ...]`

Problems with the config, data, checkpoints or launch environment end the run with one line
naming the problem and the fix, and exit code 2 (1 for a failed run); `--debug` shows tracebacks
and the libraries' import warnings. A finished run ends with the commands to try next.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config module imports megatron: not before run_cli hides its warnings
    from mor_megatron.training.config import RunConfig


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser

    parser = ToolParser(prog="mor-pretrain", description="Pretrain a Mixture-of-Recursions model.")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_steps=50")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mor_megatron.errors import UserError, run_cli

    def train() -> None:
        # before DeepSpeed is first imported; inside run_cli so a bad MOR_DEVICE is one line
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if _computes_on_cuda() else "cpu")
        if not os.path.isfile(args.config):
            raise UserError(f"config file {args.config} not found: pass an existing YAML file (see configs/)")
        from mor_megatron.training.config import load_run_config
        from mor_megatron.training.loop import pretrain

        run = load_run_config(args.config, args.overrides)
        pretrain(run)
        if os.environ.get("RANK", "0") == "0":
            print("\n".join(next_steps(run, args.config, args.overrides)), flush=True)

    return run_cli(train, args.debug)


def next_steps(run: RunConfig, config: str, overrides: list[str]) -> list[str]:
    """What to try after a run, as commands that work as printed from this working directory:
    decode the checkpoint, colour the router's depths, open TensorBoard, train further."""
    checkpoints, run_dir, steps = run.checkpoint_dir, run.logging.dir, run.training.train_steps
    further = [a for a in overrides if not a.startswith("training.train_steps=")]
    further.append(f"training.train_steps={2 * steps}")
    lines = ["", f"Next (checkpoints in {checkpoints}):"]
    if run.data.tokenizer:
        lines.append("  generate text:   " + shlex.join(_command("mor-generate", "mor_megatron.tools.generate") + [
            "--checkpoint", checkpoints, "--prompt", "def main():", "--max-tokens", "32"]))
        lines.append("  recursion depth: " + shlex.join(_command("mor-show-depth", "mor_megatron.tools.show_depth") + [
            "--checkpoint", checkpoints, "--text", "def main():", "--output", str(Path(run_dir) / "depth")]))
    else:  # no tokenizer recorded: prompts are token ids
        lines.append("  generate ids:    " + shlex.join(_command("mor-generate", "mor_megatron.tools.generate") + [
            "--checkpoint", checkpoints, "--token-ids", "--prompt", "1 2 3", "--max-tokens", "16"]))
    if run.logging.tensorboard:
        tensorboard = _command("tensorboard", "tensorboard.main")
        lines.append("  TensorBoard:     " + shlex.join(tensorboard + ["--logdir", run_dir, "--host", "127.0.0.1"])
                     + "   (localhost only: forward the port)")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        lines.append("  train further:   " + shlex.join(_command("mor-pretrain", "mor_megatron.pretrain") + [
            "--config", config, *further]) + "   (resumes from the newest checkpoint)")
    else:  # the launcher's command line is not known here
        lines.append(f"  train further:   relaunch the same command with training.train_steps={2 * steps} "
                     "(resumes from the newest checkpoint)")
    return lines


def _command(script: str, module: str) -> list[str]:
    """How to start one of the installed commands from here: by name where PATH finds it, else
    beside this interpreter (a venv that is not activated), else as `python -m module`."""
    if shutil.which(script):
        return [script]
    beside = Path(sys.executable).parent / script
    if beside.is_file():
        return [_short(beside)]
    return [_short(Path(sys.executable)), "-m", module]


def _short(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _computes_on_cuda() -> bool:
    from mor_megatron.device import compute_device

    return compute_device().type == "cuda"


if __name__ == "__main__":
    sys.exit(main())
