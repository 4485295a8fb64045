"""Decode throughput: MoR with continuous depth-wise batching vs vanilla with sequence-wise
continuous batching (docs/DESIGN.md 6), and our vanilla engine vs transformers `generate()`.

    python tools/bench_decode.py                                  # CPU-sized defaults
    python tools/bench_decode.py --hidden 960 --heads 15 --kv-heads 5 --ffn 2560 --vocab 49152 \\
        --effective-layers 32 --recursions 2 3 --batch 32 --memory-budget-mib 60000 \\
        --prompt-len 64 --gen-len 256 --dtype bf16                 # the paper's 360M shape, one GPU
    # MoR-4 needs (L-2) % 4 == 0: the same with --effective-layers 34 --recursions 4

Every model has the same effective depth L (vanilla: L unique layers; MoR-Nr: middle-cycle,
1 + (L-2)/Nr x Nr + 1, so (L-2) must divide by every Nr). Each runs the same random prompts,
greedy, a fixed number of new tokens (no early stop), through `mor_megatron.inference.Engine`:
1. at a fixed batch (`--batch` sequences in flight);
2. at the largest batch whose weights + static KV caches fit `--memory-budget-mib` (MoR caches
   are sized by capacity, so they are smaller and the batch grows).
Throughput ratios against vanilla are measured in this one run: every model is timed `--repeats`
times in round-robin order and its median run counts. `layers/tok` is the compute the engine did,
in layer passes per token fed (vanilla: L; MoR: its unique layers plus the block once per step).
At the fixed batch each MoR model's speed-up is checked against 0.95x its layer-pass ratio (the
share a tick loses to per-tick host work beyond the layers; issue #15), with the paired per-round
ratios as the spread. `--host-work` splits each fixed-batch run into its decode layers and the
rest (the same run with every decode layer replaced by the identity, timed in the same rounds):
what the layers alone give against vanilla, and how much of the rest a model may take for its
target. `--static` also decodes the fixed batch with `StaticBatchDecoder` (every
row one token per tick, every shape fixed; compiled too with `--compile`, CUDA graphs with
`--cuda-graphs`): its layers/tok counts the places a static step runs, spare ones included.
Routing of the randomly initialised MoR models: `--routing capacity` (default) forces depth
Nr - (position mod Nr), which realises the default capacities exactly over a sequence, as a
trained router does on average (rows at one position all take one depth: a static step then
needs every row's place); `--routing spread` forces Nr - ((position + row) mod Nr), the same
shares in every tick (rows at one position spread over the depths: the engine's block calls mix
depths, a static step's places suffice); `--routing router` uses the untrained routers' threshold
decisions. Finally the vanilla engine and transformers'
`LlamaForCausalLM.generate(cache_implementation="static")` decode the same batch with the same
weights (their greedy tokens are compared too).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Result:
    name: str
    batch: int
    tokens: int
    seconds: float
    kv_row_bytes: int
    peak_kv_bytes: int
    peak_kv_vanilla_bytes: int
    mean_block_tokens: float
    layers_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")  # nan: too short to time


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, device_name, non_negative_int, positive_float, positive_int, seed

    parser = ToolParser(prog="mor-bench-decode", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--ffn", type=positive_int, default=352)
    parser.add_argument("--vocab", type=positive_int, default=4096)
    parser.add_argument("--effective-layers", type=positive_int, default=14, help="L; (L-2) must divide by every Nr")
    parser.add_argument("--recursions", type=positive_int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--router", default="expert_choice", choices=("expert_choice", "token_choice"))
    parser.add_argument("--kv-mode", default="recursion_wise", choices=("recursion_wise", "share_first"))
    parser.add_argument("--routing", default="capacity", choices=("capacity", "spread", "router"))
    parser.add_argument("--kv-slots", default="capacity", choices=("capacity", "full"),
                        help="MoR recursion caches sized by capacity (static saving) or full length")
    parser.add_argument("--capacity-margin", type=positive_float, default=1.0)
    parser.add_argument("--batch", type=positive_int, default=32, help="fixed batch (sequences in flight; the paper: 32)")
    parser.add_argument("--requests", type=non_negative_int, default=0, help="requests at the fixed batch (default 2 x batch)")
    parser.add_argument("--memory-budget-mib", type=positive_float, default=64.0, help="weights + KV caches")
    parser.add_argument("--max-batch-cap", type=positive_int, default=128, help="upper bound on the budget batch")
    parser.add_argument("--prompt-len", type=positive_int, default=16)
    parser.add_argument("--gen-len", type=positive_int, default=32)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed runs of every model, round-robin; the median is reported")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="also time the fixed batch with the decode layers under torch.compile "
                             "(default backend inductor; its warm-up compiles, untimed)")
    parser.add_argument("--static", action="store_true",
                        help="also time the fixed batch with the static-shape decode tick (StaticBatchDecoder)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --static and --compile: compile the static tick with mode='reduce-overhead'")
    parser.add_argument("--host-work", action="store_true",
                        help="also time the fixed batch with every decode layer replaced by the identity (what is "
                             "left: embedding, routing, head, sampling and the engine's bookkeeping), and print what "
                             "the layers alone give against vanilla")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--seed", type=seed, default=0)
    return parser


def make_config(args, nr: Optional[int]):
    """Vanilla (nr None) or MoR-nr of the benchmark shape."""
    from mor_megatron.config import MoRConfig

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = dict(
        hidden_size=args.hidden, num_attention_heads=args.heads, num_query_groups=args.kv_heads,
        ffn_hidden_size=args.ffn, vocab_size=args.vocab, seq_length=args.prompt_len + args.gen_len,
        effective_layers=args.effective_layers, params_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    if nr is None:
        return MoRConfig(**shape, sharing="none", router="none", num_recursions=1)
    return MoRConfig(**shape, sharing="middle_cycle", router=args.router, kv_mode=args.kv_mode, num_recursions=nr)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(model, prompts: list[list[int]], args, batch: int, name: str, device: torch.device,
               compile: Optional[str] = None, identity_layers: bool = False) -> Result:
    """Greedy decoding of `prompts`, `args.gen_len` tokens each, `batch` rows; timed after a warm-up
    (which also compiles, with `compile`). identity_layers: every decode layer returns its input
    (no matmul, no attention, no KV write): the run times the engine's work around the layers."""
    from mor_megatron.inference import Engine, SamplingParams, kv_bytes_per_row

    config = model.config
    override = depth_override(config, args)
    max_seq = args.prompt_len + args.gen_len
    slots = args.kv_slots if config.router != "none" else "full"

    def engine() -> Engine:
        made = Engine(model, max_batch=batch, max_seq=max_seq, kv_slots=slots, capacity_margin=args.capacity_margin,
                      depth_override=override, device=device, track_memory=True, compile=compile or False)
        if identity_layers:
            made.stages.layers = [_identity_layer] * len(made.stages.layers)
        return made

    params = SamplingParams(max_tokens=args.gen_len)
    # warm-up: a compiled engine meets every token count a run has (prefill, decode, one token)
    warm = SamplingParams(max_tokens=args.gen_len if compile else 2)
    engine().generate(prompts[: min(len(prompts), batch)], warm)
    timed = engine()
    _sync(device)
    start = time.perf_counter()
    timed.generate(prompts, params)
    _sync(device)
    seconds = time.perf_counter() - start
    stats = timed.stats
    return Result(
        name, batch, stats.generated_tokens, seconds,
        kv_bytes_per_row(config, max_seq, slots, args.capacity_margin),
        stats.peak_kv_used_bytes, stats.peak_kv_vanilla_bytes, stats.mean_block_tokens, stats.layers_per_token,
    )


def _identity_layer(hidden, batch, attend):
    return hidden


def depth_override(config, args):
    """The forced depths of `--routing capacity` / `spread` (see the module's docstring), else
    None (the routers)."""
    nr = config.num_recursions
    if config.router == "none" or args.routing == "router":
        return None
    if args.routing == "spread":
        return lambda rows, positions: nr - (positions + rows) % nr
    return lambda rows, positions: nr - positions % nr


def run_static(model, prompts: list[list[int]], args, batch: int, name: str, device: torch.device,
               compile: Optional[str] = None) -> Result:
    """`prompts` in batches of `batch` through one `StaticBatchDecoder`, `args.gen_len` greedy
    tokens each; timed after a warm-up batch (which compiles, with `compile`)."""
    from mor_megatron.inference import StaticBatchDecoder, kv_bytes_per_row

    config = model.config
    max_seq = args.prompt_len + args.gen_len
    slots = args.kv_slots if config.router != "none" else "full"
    mode = "reduce-overhead" if compile and args.cuda_graphs else None
    decoder = StaticBatchDecoder(model, batch, max_seq, slots, args.capacity_margin, compile=compile, mode=mode,
                                 depth_override=depth_override(config, args), device=device)
    decoder.generate(prompts[:batch], args.gen_len if compile else 2)
    before, redone = decoder.stats.generated_tokens, decoder.stats.redone_ticks
    peak = vanilla = 0
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        decoder.generate(prompts[first:first + batch], args.gen_len)
        usage = decoder.caches.kv_usage()  # host counts: the peak, as the caches only grow within a batch
        peak, vanilla = max(peak, usage.used_bytes), max(vanilla, usage.vanilla_used_bytes)
    _sync(device)
    seconds = time.perf_counter() - start
    stats = decoder.stats
    if stats.redone_ticks > redone:
        print(f"  note: {name} static: {stats.redone_ticks - redone} of the timed ticks overflowed a step's places "
              "and ran again eagerly")
    places = decoder.step_tokens
    return Result(
        name, batch, stats.generated_tokens - before, seconds, kv_bytes_per_row(config, max_seq, slots, args.capacity_margin),
        peak, vanilla, sum(places) / max(1, len(places)), decoder.layers_per_token,
    )


def rounds(jobs: list[Callable[[], Result]], repeats: int) -> list[list[Result]]:
    """Run every job `repeats` times in round-robin order (a slow phase of a shared machine then
    hits every model alike); each job's runs, in round order."""
    runs: list[list[Result]] = [[] for _ in jobs]
    for _ in range(max(1, repeats)):
        for job, results in zip(jobs, runs):
            results.append(job())
    return runs


def median_run(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.seconds)[len(results) // 2]


def median_of_rounds(jobs: list[Callable[[], Result]], repeats: int) -> list[Result]:
    """`rounds`, keeping each job's median run."""
    return [median_run(results) for results in rounds(jobs, repeats)]


# issue #15: at the fixed batch, a MoR model's speed-up over vanilla reaches this share of its
# layer-pass ratio (what is left to per-tick host work beyond the layers)
LAYER_RATIO_SHARE = 0.95


def target_speedup(base: Result, run: Result) -> float:
    """The speed-up over vanilla's run `base` that `run` must reach: LAYER_RATIO_SHARE x its
    layer-pass ratio."""
    return LAYER_RATIO_SHARE * base.layers_per_token / run.layers_per_token


def overhead_targets(names: list[str], runs: list[list[Result]]) -> list[str]:
    """Per MoR model at the fixed batch: its speed-up (median runs, and the paired per-round
    ratios as the spread) against LAYER_RATIO_SHARE x its layer-pass ratio, and whether it holds."""
    base = runs[names.index("vanilla")] if "vanilla" in names else None
    if base is None:
        return []
    lines = [f"fixed batch target: MoR tok/s vs vanilla >= {LAYER_RATIO_SHARE:g}x the layer-pass ratio"]
    base_median = median_run(base)
    for name, results in zip(names, runs):
        if name == "vanilla":
            continue
        median = median_run(results)
        speed = median.tokens_per_s / base_median.tokens_per_s
        paired = [r.tokens_per_s / b.tokens_per_s for r, b in zip(results, base)]
        layer_ratio = base_median.layers_per_token / median.layers_per_token
        need = target_speedup(base_median, median)
        lines.append(
            f"  {name}: {speed:.2f}x (per round {' '.join(f'{x:.2f}' for x in paired)}), layer-pass ratio "
            f"{layer_ratio:.2f}x, needs >= {need:.2f}x: {'holds' if speed >= need else 'MISSED'}"
        )
    return lines


def host_work_lines(names: list[str], full: list[Result], host: list[Result]) -> list[str]:
    """The fixed batch split into the layers (median full run minus median run with identity
    layers) and the rest, per model; against vanilla: the layers alone, and the most host work
    the model may take for its target (LAYER_RATIO_SHARE x its layer-pass ratio) at vanilla's."""
    if "vanilla" not in names:
        return []
    base_full, base_host = full[names.index("vanilla")], host[names.index("vanilla")]
    base_layers = base_full.seconds - base_host.seconds
    lines = ["the fixed batch without its decode layers (each replaced by the identity; the rest is the embedding, "
             "routing, final norm and LM head, sampling and the engine's bookkeeping; medians, ms a run):"]
    for name, run, rest in zip(names, full, host):
        layers = run.seconds - rest.seconds
        line = (f"  {name:<8} run {1000 * run.seconds:7.1f}, layers {1000 * layers:7.1f}, rest {1000 * rest.seconds:6.1f} "
                f"({rest.seconds / run.seconds:.1%}), {rest.seconds / max(1, run.tokens) * 1e6:5.1f} us/token")
        if name != "vanilla":
            need = target_speedup(base_full, run)
            allowed = base_full.seconds / need - layers
            line += (f"; layers alone {base_layers / layers:.2f}x vanilla (needs >= {need:.2f}x), rest allowed for "
                     f"it {1000 * allowed:.1f}")
        lines.append(line)
    return lines


def budget_batch(model, args) -> int:
    from mor_megatron.inference import kv_bytes_per_row

    config = model.config
    slots = args.kv_slots if config.router != "none" else "full"
    per_row = kv_bytes_per_row(config, args.prompt_len + args.gen_len, slots, args.capacity_margin)
    free = args.memory_budget_mib * 2**20 - weight_bytes(model)
    return max(0, min(args.max_batch_cap, int(free // per_row)))


def hf_compare(model, prompts: list[list[int]], args, device: torch.device) -> Optional[tuple[float, float, float]]:
    """(our tok/s, transformers tok/s, share of equal greedy tokens) on one batch of `prompts`."""
    try:
        from transformers import LlamaForCausalLM

        from mor_megatron.hf.export import hf_config
        from mor_megatron.hf.layouts import Dims, megatron_to_hf
    except ImportError as err:
        print(f"transformers comparison skipped: {err}")
        return None
    from mor_megatron.inference import Engine, SamplingParams

    config = model.config
    hf = LlamaForCausalLM(hf_config(config, {}))
    hf.load_state_dict(megatron_to_hf(model.state_dict(), Dims.from_mor(config)), strict=False)
    hf.tie_weights()
    hf = hf.to(device=device, dtype=config.params_dtype).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_len, min_new_tokens=args.gen_len,
        do_sample=False, cache_implementation="static", pad_token_id=0,
    )
    total = len(prompts) * args.gen_len
    generated = {}

    @torch.no_grad()
    def hf_run() -> Result:
        hf.generate(ids, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))  # warm-up
        _sync(device)
        start = time.perf_counter()
        generated["out"] = hf.generate(ids, **kwargs)
        _sync(device)
        return Result("transformers", len(prompts), total, time.perf_counter() - start, 0, 0, 0, 0.0, 0.0)

    ours, theirs_run = median_of_rounds(
        [functools.partial(run_engine, model, prompts, args, len(prompts), "vanilla", device), hf_run], args.repeats
    )
    out = generated["out"]
    engine = Engine(model, max_batch=len(prompts), max_seq=args.prompt_len + args.gen_len, device=device)
    mine = engine.generate(prompts, SamplingParams(max_tokens=args.gen_len))
    theirs = out[:, ids.shape[1]:].tolist()
    same = sum(a == b for m, t in zip(mine, theirs) for a, b in zip(m.token_ids, t))
    return ours.tokens_per_s, theirs_run.tokens_per_s, same / total


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> None:
    from mor_megatron.errors import UserError
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.parallel.state import initialize_parallel

    if args.cuda_graphs and not (args.static and args.compile):
        raise UserError("--cuda-graphs applies to the compiled static tick: add --static --compile")

    automatic = args.device in (None, "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if automatic else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [("vanilla", make_config(args, None))] + [(f"MoR-{nr}", make_config(args, nr)) for nr in args.recursions]
    initialize_parallel(seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    requests = args.requests or 2 * args.batch
    pool = torch.randint(0, args.vocab, (max(requests, 2 * args.max_batch_cap), args.prompt_len), generator=generator)
    print(
        f"shape: d={args.hidden} heads={args.heads}/{args.kv_heads} ffn={args.ffn} vocab={args.vocab} "
        f"L={args.effective_layers}; prompt {args.prompt_len} + {args.gen_len} new tokens; {args.dtype} on {device}; "
        f"router {args.router}, {args.kv_mode}, routing '{args.routing}', KV slots '{args.kv_slots}'; "
        f"{torch.get_num_threads()} torch threads"
    )
    fixed_jobs, budget_jobs, models = [], [], {}
    for name, config in configs:
        torch.manual_seed(args.seed)
        model = MoRGPTModel(config).to(device).eval()
        models[name] = model
        fixed_jobs.append(functools.partial(run_engine, model, pool[:requests].tolist(), args, args.batch, name, device))
        rows = budget_batch(model, args)
        if rows:
            budget_jobs.append(functools.partial(run_engine, model, pool[: 2 * rows].tolist(), args, rows, name, device))
        print(f"  {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{len(config.recursion_plan.unrolled)} effective / {config.num_layers} unique layers, budget batch {rows}")
    print(f"timing: median of {args.repeats} round-robin runs per model")
    # --host-work: the identity-layer runs share the fixed batch's rounds (the same phases of a shared machine)
    host_jobs = [functools.partial(job, identity_layers=True) for job in fixed_jobs] if args.host_work else []
    fixed_runs = rounds(fixed_jobs + host_jobs, args.repeats)
    fixed_runs, host_runs = fixed_runs[: len(fixed_jobs)], [median_run(r) for r in fixed_runs[len(fixed_jobs):]]
    fixed, budget = [median_run(r) for r in fixed_runs], median_of_rounds(budget_jobs, args.repeats)
    compiled_runs = []
    if args.compile:
        compiled_jobs = [functools.partial(job, compile=args.compile) for job in fixed_jobs]
        compiled_runs = rounds(compiled_jobs, args.repeats)
    static_runs = {}
    if args.static:
        static_jobs = [functools.partial(run_static, models[name], pool[:requests].tolist(), args, args.batch, name,
                                         device) for name, _ in configs]
        static_runs["eager"] = rounds(static_jobs, args.repeats)
        if args.compile:
            static_runs[f"compiled ({args.compile}{', CUDA graphs' if args.cuda_graphs else ''})"] = rounds(
                [functools.partial(job, compile=args.compile) for job in static_jobs], args.repeats)
    mib = 2.0**20
    for title, results in (("fixed batch", fixed), (f"max batch in {args.memory_budget_mib:g} MiB", budget)):
        if not results:
            continue
        base = next((r for r in results if r.name == "vanilla"), None)
        print(f"\n{title}")
        print(f"{'model':<9}{'batch':>6}{'tok/s':>10}{'vs vanilla':>11}{'KV/row KiB':>12}"
              f"{'peak KV MiB':>13}{'vs vanilla':>11}{'block toks':>11}{'layers/tok':>11}{'vanilla/this':>13}")
        for r in results:
            speed = r.tokens_per_s / base.tokens_per_s if base else float("nan")
            kv = r.peak_kv_bytes / max(1, r.peak_kv_vanilla_bytes)
            compute = base.layers_per_token / r.layers_per_token if base else float("nan")
            print(f"{r.name:<9}{r.batch:>6}{r.tokens_per_s:>10.1f}{speed:>10.2f}x{r.kv_row_bytes / 1024:>12.1f}"
                  f"{r.peak_kv_bytes / mib:>13.3f}{kv:>10.3f}x{r.mean_block_tokens:>11.1f}"
                  f"{r.layers_per_token:>11.2f}{compute:>12.2f}x")
        print("(layers/tok: layer passes per token fed, the compute; where a tick is compute-bound, "
              "the speed-up over vanilla tends to vanilla/this)")
        if results is fixed:
            print("\n".join(overhead_targets([name for name, _ in configs], fixed_runs)))
            if host_runs:
                print("\n".join(host_work_lines([name for name, _ in configs], fixed, host_runs)))
    if compiled_runs:
        print(f"\ncompiled (torch.compile backend {args.compile}) vs eager, fixed batch {args.batch}")
        base = median_run(compiled_runs[0])
        for (name, _), eager, runs in zip(configs, fixed, compiled_runs):
            run = median_run(runs)
            print(f"  {name:<8} eager {eager.tokens_per_s:8.1f} tok/s, compiled {run.tokens_per_s:8.1f} tok/s: "
                  f"{run.tokens_per_s / eager.tokens_per_s:.2f}x; compiled vs compiled vanilla "
                  f"{run.tokens_per_s / base.tokens_per_s:.2f}x")
        print("\n".join(overhead_targets([name for name, _ in configs], compiled_runs)))
    for kind, runs in static_runs.items():
        print(f"\nstatic decode tick, {kind}, fixed batch {args.batch}")
        base = median_run(runs[0])
        for (name, _), eager, results in zip(configs, fixed, runs):
            run = median_run(results)
            print(f"  {name:<8} {run.tokens_per_s:8.1f} tok/s ({run.tokens_per_s / eager.tokens_per_s:.2f}x the engine), "
                  f"vs vanilla {run.tokens_per_s / base.tokens_per_s:.2f}x, layers/tok {run.layers_per_token:.2f}")
        print("\n".join(overhead_targets([name for name, _ in configs], runs)))
    if not args.no_hf:
        hf_batch = pool[: args.batch].tolist()
        compared = hf_compare(models["vanilla"], hf_batch, args, device)
        if compared:
            ours, theirs, same = compared
            print(f"\nvanilla, batch {args.batch}: our engine {ours:.1f} tok/s, transformers generate() with a "
                  f"static cache {theirs:.1f} tok/s: {ours / theirs:.2f}x; equal greedy tokens {same:.1%}")


if __name__ == "__main__":
    sys.exit(main())
