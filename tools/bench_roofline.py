"""The kernel ceiling of a training step: its GEMMs and attention timed alone, against the mm probe.

Usage::

    python tools/bench_roofline.py [--config configs/tiny.yaml] [--recursions N] [--batch-size B]
        [--repeats R] [--threads T] [--probe-size P] [model.key=value ...]

`bench_train` reports achieved FLOP/s as a share of a dense `torch.mm` probe (issue #15 item 4:
target 70%). This benchmark says how much of that share the step's own kernels allow at the
shape. For one training model (`bench_train`'s default shape unless another --config is given;
vanilla, or MoR with `--recursions N` at its capacities) and batch, it lists every matmul and
attention call of one forward and backward, as the model runs them (a layer call's four linears
at its tokens, forward, input gradient and weight gradient; the LM head; causal SDPA forward and
backward per layer call, with the model's heads and query groups), and times each distinct one
alone, all of them and the probe in turns (one call of each per round, `--repeats` rounds after
3 untimed; medians).

With `--recursions` the vanilla model of the MoR model's depth is listed and timed in the same
rounds (a call both make is timed once), and the MoR model's kernel time over FLOPs is printed
against the vanilla model's: what MoR's smaller per-step GEMMs and attention cost per FLOP.

Prints per model and kind (GEMMs, attention) the FLOPs (the paper's accounting, `report`: attention counts
its causal half), the summed median time and the rate as a share of the probe, and the ceiling:
the step's FLOPs over the summed kernel time alone, as a share of the probe. A step that ran
nothing but these kernels, each as fast as alone, would reach that share; the norms, activations,
RoPE, loss, optimizer, routing and Python of a real step only lower it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_roofline.py` from anywhere
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Gemm:
    m: int
    k: int
    n: int
    transposed: str  # which operand is a transposed view, as megatron's linears pass them: "a", "b" or ""

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


@dataclass(frozen=True)
class Attention:
    batch: int
    tokens: int  # per sequence

    def flops(self, config) -> float:
        """Forward and backward (3x the forward), the causal half, as `report` counts it."""
        from mor_megatron.report import causal_attention_flops

        return 3 * self.batch * causal_attention_flops(config, self.tokens, (self.tokens + 1) / 2)


def layer_tokens(config, batch: int) -> list[int]:
    """Tokens per sequence of each layer call of one forward: prefix and suffix at S, the shared
    block's layers at each recursion step's capacity (vanilla: every layer at S)."""
    seq, plan = config.seq_length, config.recursion_plan
    if config.router == "none":
        return [seq] * len(plan.unrolled)
    return ([seq] * len(plan.prefix) + [k for k in config.capacity_tokens(seq) for _ in plan.block]
            + [seq] * len(plan.suffix))


def step_kernels(config, batch: int) -> tuple[dict[Gemm, int], dict[Attention, int]]:
    """Every GEMM and attention call of one training step, with its count."""
    d, hd, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    fc1_out = ffn * (2 if config.gated_linear_unit else 1)
    linears = [(d, (heads + 2 * groups) * hd), (heads * hd, d), (d, fc1_out), (ffn, d)]  # (in, out)
    gemms: dict[Gemm, int] = {}
    attention: dict[Attention, int] = {}

    def linear(tokens: int, fan_in: int, fan_out: int) -> None:
        for gemm in (Gemm(tokens, fan_in, fan_out, "b"),   # y = x W^T
                     Gemm(tokens, fan_out, fan_in, ""),    # dx = dy W
                     Gemm(fan_out, tokens, fan_in, "a")):  # dW = dy^T x
            gemms[gemm] = gemms.get(gemm, 0) + 1

    for per_sequence in layer_tokens(config, batch):
        for fan_in, fan_out in linears:
            linear(batch * per_sequence, fan_in, fan_out)
        call = Attention(batch, per_sequence)
        attention[call] = attention.get(call, 0) + 1
    linear(batch * config.seq_length, d, config.vocab_size)  # the LM head
    return gemms, attention


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_int

    parser = ToolParser(prog="bench_roofline.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--recursions", type=positive_int, default=None, help="MoR with N recursions (default: vanilla)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step (default 4, as bench_train)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--probe-size", type=positive_int, default=2048, help="the square mm probe (default 2048, as bench_train on CPU)")
    parser.add_argument("overrides", nargs="*", help="model.key=value")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _benchmark(args), debug=args.debug)


def _gemm_call(gemm: Gemm, device) -> Callable[[], object]:
    import torch

    a = torch.randn(gemm.k, gemm.m, device=device).t() if gemm.transposed == "a" else torch.randn(gemm.m, gemm.k, device=device)
    b = torch.randn(gemm.n, gemm.k, device=device).t() if gemm.transposed == "b" else torch.randn(gemm.k, gemm.n, device=device)
    return lambda: torch.mm(a, b)


def _attention_call(call: Attention, config, device) -> Callable[[], object]:
    """Causal SDPA forward and backward from `[s, b, heads, hd]` views, as the model's layers
    permute them (`model/attention.py`)."""
    import torch
    import torch.nn.functional as F

    heads, hd = config.num_attention_heads, config.head_dim
    groups = config.num_query_groups or heads
    q, k, v = (torch.randn(call.tokens, call.batch, h, hd, device=device, requires_grad=True)
               for h in (heads, groups, groups))
    grad = torch.randn(call.batch, heads, call.tokens, hd, device=device)

    def run() -> None:
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True,
                                             enable_gqa=groups != heads)
        torch.autograd.grad(out, (q, k, v), grad)

    return run


def ceiling(config, batch: int, gemm_seconds: dict[Gemm, float], attention_seconds: dict[Attention, float],
            probe_flops_per_s: float) -> dict[str, dict[str, float]]:
    """Per kind and in all: FLOPs, summed seconds (each call at its median, times its count) and
    the rate over the probe's."""
    gemms, attention = step_kernels(config, batch)
    kinds = {
        "gemms": (sum(g.flops * n for g, n in gemms.items()), sum(gemm_seconds[g] * n for g, n in gemms.items())),
        "attention": (sum(a.flops(config) * n for a, n in attention.items()),
                      sum(attention_seconds[a] * n for a, n in attention.items())),
    }
    kinds["all"] = (sum(f for f, _ in kinds.values()), sum(s for _, s in kinds.values()))
    return {kind: {"flops": flops, "seconds": seconds, "share_of_probe": flops / seconds / probe_flops_per_s}
            for kind, (flops, seconds) in kinds.items()}


def _models(args) -> list[tuple[str, object]]:
    """The model, and with `--recursions` the vanilla model of its depth (its baseline) after it."""
    from bench_optimizer import _model

    name, config = _model(args)
    if not args.recursions:
        return [(name, config)]
    from bench_train import plan_models

    entries = plan_models(config, [], "float32")  # a MoR config's vanilla model at its own depth L'
    return [(name, config), (entries[0]["name"], entries[0]["config"])]


def _benchmark(args) -> int:
    import torch
    from bench_optimizer import WARMUP, time_rounds

    from mor_megatron.device import compute_device
    from mor_megatron.report import training_flops_per_token

    torch.set_num_threads(args.threads)
    device = compute_device()
    models = _models(args)
    a = torch.randn(args.probe_size, args.probe_size, device=device)
    calls: dict[object, Callable[[], object]] = {"probe": lambda: torch.mm(a, a)}
    for _, config in models:  # a call both models make is timed once
        gemms, attention = step_kernels(config, args.batch_size)
        calls.update({gemm: _gemm_call(gemm, device) for gemm in gemms if gemm not in calls})
        calls.update({call: _attention_call(call, config, device) for call in attention if call not in calls})
    print(f"{' and '.join(name for name, _ in models)}, batch {args.batch_size} x {models[0][1].seq_length}, "
          f"device {device}, {args.threads} threads; {len(calls) - 1} distinct kernel calls and the probe, "
          f"{args.repeats} rounds after {WARMUP}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = {key: (lambda call=call: (call(), sync())) for key, call in calls.items()}
    medians = {key: statistics.median(values) for key, values in time_rounds(timed, args.repeats).items()}
    probe = 2.0 * args.probe_size ** 3 / medians.pop("probe")
    print(f"dense mm probe ({args.probe_size}^2): {probe / 1e9:.0f} GFLOP/s")
    per_flop = []
    for name, config in models:
        result = ceiling(config, args.batch_size, medians, medians, probe)
        step_flops = training_flops_per_token(config) * args.batch_size * config.seq_length
        print(f"model: {name}")
        print(f"  {'kernels':10s} {'GFLOP':>8s} {'ms alone':>9s} {'GFLOP/s':>8s} {'of probe':>9s}")
        for kind, row in result.items():
            print(f"  {kind:10s} {row['flops'] / 1e9:8.2f} {1e3 * row['seconds']:9.1f} "
                  f"{row['flops'] / row['seconds'] / 1e9:8.0f} {100 * row['share_of_probe']:8.0f}%")
        print(f"  the step's FLOPs (report.training_flops_per_token): {step_flops / 1e9:.2f} GFLOP, of which these "
              f"kernels {100 * result['all']['flops'] / step_flops:.1f}% (the rest: routers)")
        print(f"  ceiling: a step of these kernels alone reaches {100 * result['all']['share_of_probe']:.0f}% of the probe")
        per_flop.append(result["all"]["seconds"] / result["all"]["flops"])
    if len(models) == 2:
        print(f"{models[0][0]} over {models[1][0]}, kernel time over FLOPs: {per_flop[0] / per_flop[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
