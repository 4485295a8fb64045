"""The trainer's update outside the model: torch AdamW's kernels and the ZeRO-0 gradient norm and clip.

Usage::

    python tools/bench_optimizer.py [--config configs/tiny.yaml] [--recursions N] [--repeats R]
        [--threads T] [model.key=value ...]

On the parameters of one training model (`bench_train`'s default shape: configs/tiny.yaml widened
to hidden 256, FFN 704, sequence 256, unless another --config is given; vanilla, or MoR with
`--recursions N`), each with a random gradient, in one process, all variants timed in turns
(one call of each per round, `--repeats` rounds after 3 untimed):

- AdamW step (the trainer's param groups and hyper-parameters): torch's default kernel (on the
  CPU, one op at a time per parameter: the baseline), `foreach=True`, and `fused=True` (what the
  trainer runs where torch has the kernel: `device.fused_optimizer_kernels`);
- gradient norm, measured only (max norm inf) and clipped (max norm 1e-3, so every call scales;
  the gradients are put back untimed after each call):
  DeepSpeed's `deepspeed.runtime.utils.clip_grad_norm_` (the baseline) against
  `training.grad_clip.clip_grad_norm_` (its rule in foreach kernels, no scaling pass where the
  factor is 1; the trainer measures with the same `global_grad_norm`);

- the clip inside the update, with the fused AdamW and a clip factor of 0.5: a scaling pass over
  the gradients and then the step (the baseline) against the trainer's `optimizer.clipped`, where
  the fused kernel scales them itself (its `grad_scale`).

Prints per variant the median call time, the fastest, the spread (max - min) / median and the
baseline's median over its own.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_optimizer.py` from anywhere
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_CONFIG = "configs/tiny.yaml"
WARMUP = 3


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_int

    parser = ToolParser(prog="bench_optimizer.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--recursions", type=positive_int, default=None, help="MoR with N recursions (default: vanilla)")
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("overrides", nargs="*", help="model.key=value")
    return parser


def _model(args):
    from bench_train import DEFAULT_SHAPE, plan_models

    from mor_megatron.yaml_config import load_sections, model_config_from_dict

    shape = list(DEFAULT_SHAPE) if args.config == DEFAULT_CONFIG else []
    config_path = args.config if Path(args.config).exists() else str(REPO / args.config)
    sections = load_sections(config_path, shape + list(args.overrides))
    base = model_config_from_dict(sections["model"], config_path)
    entries = plan_models(base, [args.recursions] if args.recursions else [], "float32")
    # the MoR entry, not the last: plan_models appends the vanilla model of a new depth (Nr=4: L=10) after it
    entry = next(e for e in entries if e["role"] == "mor") if args.recursions else entries[0]
    return entry["name"], entry["config"]


def time_rounds(variants: dict[str, Callable[[], object]], repeats: int,
                after: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call of each per round, in turns; `after` runs
    untimed after every call."""
    for _ in range(WARMUP):
        for call in variants.values():
            call()
            after()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            after()
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> list[str]:
    base = statistics.median(times[baseline])
    lines = [title, f"  {'variant':44s} {'median ms':>9s} {'min ms':>7s} {'spread':>7s} {'baseline / this':>15s}"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"  {name:44s} {1e3 * median:9.2f} {1e3 * min(values):7.2f} "
                     f"{100 * (max(values) - min(values)) / median:6.0f}% {base / median:15.2f}x")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _benchmark(args), debug=args.debug)


def _benchmark(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip_grad_norm_

    from mor_megatron.device import compute_device, fused_optimizer_kernels, process_group_backend
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.parallel.mpu import MegatronMpu
    from mor_megatron.parallel.state import initialize_parallel
    from mor_megatron.training.config import TrainingConfig
    from mor_megatron.training.grad_clip import clip_grad_norm_, scale_gradients_
    from mor_megatron.training.optimizer import clipped, param_groups

    torch.set_num_threads(args.threads)
    initialize_parallel()
    deepspeed.comm.init_distributed(dist_backend=process_group_backend(), dist_init_required=False)
    device = compute_device()
    name, config = _model(args)
    model = MoRGPTModel(config).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    cfg = TrainingConfig()
    print(f"model: {name}, {count / 1e6:.2f}M parameters in {len(params)} tensors, device {device}, "
          f"{args.threads} threads; {args.repeats} rounds after {WARMUP}")

    kernels = {"default (baseline)": {}, "foreach": {"foreach": True}}
    if fused_optimizer_kernels(device):
        kernels["fused (the trainer's)"] = {"fused": True}
    optimizers = {
        label: torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-6,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **options)
        for label, options in kernels.items()
    }
    adam = time_rounds({label: optimizer.step for label, optimizer in optimizers.items()}, args.repeats)

    mpu = MegatronMpu()
    grads = [p.grad.clone() for p in params]

    def restore() -> None:  # a clip scaled the gradients: every call gets the same ones
        for param, grad in zip(params, grads):
            param.grad.copy_(grad)

    norms = time_rounds({  # float(): the host read of the norm, which the trainer makes too
        "measure: DeepSpeed's (baseline)": lambda: float(deepspeed_clip_grad_norm_(params, math.inf, mpu=mpu)),
        "measure: grad_clip's": lambda: clip_grad_norm_(params, math.inf, mpu),
        "clip: DeepSpeed's": lambda: float(deepspeed_clip_grad_norm_(params, 1e-3, mpu=mpu)),
        "clip: grad_clip.clip_grad_norm_": lambda: clip_grad_norm_(params, 1e-3, mpu),
    }, args.repeats, after=restore)
    lines = report("AdamW step", adam, "default (baseline)")
    lines += report("gradient norm (clip: max norm 1e-3, every call scales)", norms, "measure: DeepSpeed's (baseline)")
    if "fused (the trainer's)" in optimizers:
        fused = optimizers["fused (the trainer's)"]
        engine = types.SimpleNamespace(optimizer=fused)  # what `clipped` reads of DeepSpeed's engine

        def scaled_then_stepped() -> None:
            scale_gradients_(params, 0.5)
            fused.step()

        def stepped_in_kernel() -> None:
            with clipped(engine, params, 0.5):
                fused.step()

        update = time_rounds({"scale pass, then the fused step (baseline)": scaled_then_stepped,
                              "the fused step scaling (the trainer's)": stepped_in_kernel}, args.repeats, after=restore)
        lines += report("clip (factor 0.5) and fused AdamW step", update, "scale pass, then the fused step (baseline)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
