"""Time the fused MoR kernels against their PyTorch references.

Usage::

    python tools/bench_kernels.py                     # MoR-like shapes, device auto
    python tools/bench_kernels.py --dtype fp32 --min-run-time 1.0
    python tools/bench_kernels.py --shapes 2048x8x960 --k-fracs 0.5

On CUDA it prints the reference and the Triton timings and their ratio
(forward, forward+backward). On CPU only the reference is timed: the Triton
interpreter runs every program in Python, so its timing says nothing about the
kernel; the Triton column needs CUDA.

``--row-ops`` adds a second table, how a recursion step moves its tokens, forward and
backward: `TokenSet.gather` and the reference's scatter-add move whole rows of the
``[S * B, D]`` stream (``index_select``, ``index_add``: `kernels.stream_rows`), against
the forms they replaced, an index expanded over D (``gather``, ``scatter_add``).
``--row-ops --shapes 256x4x256 --k-fracs 0.667 0.333`` is `tools/bench_train.py`'s
default shape at MoR-3's capacities.

Timing uses ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up, CUDA
synchronisation and the median of many runs are handled there). The gradients
are taken with ``torch.autograd.grad`` so no ``.grad`` accumulation is timed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import benchmark

from mor_megatron.kernels import HAS_TRITON, gated_scatter_add, gated_scatter_add_reference
from mor_megatron.model.token_set import TokenSet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = ("2048x8x960", "2048x8x2048")
DEFAULT_K_FRACS = (1 / 2, 1 / 3)


@dataclass
class Case:
    s: int
    b: int
    d: int
    k: int

    def label(self) -> str:
        return f"S={self.s} B={self.b} D={self.d} k={self.k}"


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random MoR-step inputs: per column k sorted, duplicate-free token indices (as the router emits)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(case.s, case.b, case.d, generator=gen).to(device=device, dtype=dtype)
    index = torch.stack(
        [torch.randperm(case.s, generator=gen)[: case.k].sort().values for _ in range(case.b)], dim=1
    ).to(device)
    gate = torch.rand(case.k, case.b, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(case.k, case.b, case.d, generator=gen).to(device=device, dtype=dtype)
    d_out = torch.randn(case.s, case.b, case.d, generator=gen).to(device=device, dtype=dtype)
    return hidden, index, gate, y, d_out


def _time(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call."""
    fn()  # warm-up (Triton JIT compile, allocator)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def bench_case(
    case: Case, dtype: torch.dtype, device: torch.device, backend: str, min_run_time: float
) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) for one backend on one shape."""
    hidden, index, gate, y, d_out = make_inputs(case, dtype, device)
    fn = gated_scatter_add_reference if backend == "torch" else (
        lambda h, i, g, yy: gated_scatter_add(h, i, g, yy, backend="triton")
    )

    def fwd() -> object:
        with torch.no_grad():
            return fn(hidden, index, gate, y)

    hg, gg, yg = (t.detach().requires_grad_(True) for t in (hidden, gate, y))

    def fwd_bwd() -> object:
        out = fn(hg, index, gg, yg)
        return torch.autograd.grad(out, (hg, gg, yg), d_out)

    return _time(fwd, min_run_time), _time(fwd_bwd, min_run_time)


def _expanded(index: torch.Tensor, d: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, d)


def row_ops(case: Case, dtype: torch.dtype, device: torch.device, min_run_time: float) -> dict[str, float]:
    """Forward+backward seconds of the token gather and the gated scatter-add, as the model
    runs them (whole rows) and in the expanded-index forms they replaced (the baselines)."""
    hidden, index, gate, y, d_out = make_inputs(case, dtype, device)
    hg, gg, yg = (t.detach().requires_grad_(True) for t in (hidden, gate, y))
    d_rows = torch.randn_like(y)
    tokens = TokenSet.dense(index)
    variants = {
        "gather, expanded": lambda: torch.autograd.grad(hg.gather(0, _expanded(index, case.d)), hg, d_rows),
        "gather, rows": lambda: torch.autograd.grad(tokens.gather(hg), hg, d_rows),
        "scatter-add, expanded": lambda: torch.autograd.grad(
            hg.scatter_add(0, _expanded(index, case.d), gg.unsqueeze(-1) * yg), (hg, gg, yg), d_out),
        "scatter-add, rows": lambda: torch.autograd.grad(
            gated_scatter_add_reference(hg, index, gg, yg), (hg, gg, yg), d_out),
    }
    return {name: _time(fn, min_run_time) for name, fn in variants.items()}


def _print_row_ops(cases: list[Case], dtype: torch.dtype, device: torch.device, min_run_time: float) -> None:
    print()
    print("token rows, forward+backward: whole rows (index_select / index_add, the model's) against the "
          "expanded index (gather / scatter_add, the baseline)")
    hdr = (f"{'shape':<35} {'gather exp ms':>13} {'rows ms':>8} {'x':>5} "
           f"{'scatter exp ms':>14} {'rows ms':>8} {'x':>5}")
    print(hdr)
    print("-" * len(hdr))
    for case in cases:
        t = row_ops(case, dtype, device, min_run_time)
        gather = (t["gather, expanded"], t["gather, rows"])
        scatter = (t["scatter-add, expanded"], t["scatter-add, rows"])
        # "rows " first: gpu_check's parser reads the lines that start with the shape
        print(f"{'rows ' + case.label():<35} {gather[0] * 1e3:>13.3f} {gather[1] * 1e3:>8.3f} "
              f"{gather[0] / gather[1]:>5.2f} {scatter[0] * 1e3:>14.3f} {scatter[1] * 1e3:>8.3f} "
              f"{scatter[0] / scatter[1]:>5.2f}", flush=True)
    print("x = expanded-index time / whole-row time (>1: the model's form is faster)")


def _fwd_bytes(case: Case, dtype: torch.dtype) -> int:
    """Minimum forward traffic: read hidden, write out, read the k selected y rows (gate/index are tiny)."""
    es = torch.empty((), dtype=dtype).element_size()
    return (2 * case.s * case.b * case.d + case.k * case.b * case.d) * es


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, device_name, dims, positive_float, ranged
    from mor_megatron.ranges import Range

    p = ToolParser(prog="mor-bench-kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", nargs="+", type=dims(3), default=[dims(3)(s) for s in DEFAULT_SHAPES], help="SxBxD, e.g. 2048x8x960")
    p.add_argument("--k-fracs", nargs="+", type=ranged(Range(0, 1, low_open=True)), default=list(DEFAULT_K_FRACS), help="k = int(S * frac)")
    p.add_argument("--min-run-time", type=positive_float, default=0.5, help="seconds per timing (blocked_autorange)")
    p.add_argument("--row-ops", action="store_true",
                   help="also time the token gather and scatter-add against their expanded-index forms")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print a table of reference vs Triton timings for MoR-like shapes."""
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    use_triton = device.type == "cuda" and HAS_TRITON
    torch.manual_seed(0)

    cases = []
    for s, b, d in args.shapes:
        for frac in args.k_fracs:
            cases.append(Case(s, b, d, max(1, min(s, int(s * frac)))))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gated_scatter_add  device={name}  dtype={str(dtype).removeprefix('torch.')}  "
          f"median of blocked_autorange(min_run_time={args.min_run_time}s)")
    if not use_triton:
        why = "triton is not installed" if device.type == "cuda" else "the Triton timing needs CUDA"
        print(f"(reference only: {why}; the CPU interpreter is a correctness tool, not a benchmark)")

    hdr = f"{'shape':<30} {'ref fwd ms':>10} {'ref f+b ms':>10}"
    if use_triton:
        hdr += f" {'tri fwd ms':>10} {'tri f+b ms':>10} {'fwd x':>6} {'f+b x':>6} {'tri GB/s':>8}"
    else:
        hdr += f" {'ref GB/s':>8}"
    print(hdr)
    print("-" * len(hdr))
    for case in cases:
        ref_f, ref_fb = bench_case(case, dtype, device, "torch", args.min_run_time)
        row = f"{case.label():<30} {ref_f * 1e3:>10.3f} {ref_fb * 1e3:>10.3f}"
        if use_triton:
            tri_f, tri_fb = bench_case(case, dtype, device, "triton", args.min_run_time)
            gbs = _fwd_bytes(case, dtype) / tri_f / 1e9
            row += (f" {tri_f * 1e3:>10.3f} {tri_fb * 1e3:>10.3f} {ref_f / tri_f:>6.2f} {ref_fb / tri_fb:>6.2f}"
                    f" {gbs:>8.0f}")
        else:
            row += f" {_fwd_bytes(case, dtype) / ref_f / 1e9:>8.1f}"
        print(row, flush=True)
    if use_triton:
        print("x = reference time / Triton time (>1: the kernel is faster); GB/s = minimum forward traffic / Triton fwd time")
    else:
        print("GB/s = minimum forward traffic / reference fwd time")
    if args.row_ops:
        _print_row_ops(cases, dtype, device, args.min_run_time)


if __name__ == "__main__":
    sys.exit(main())
