"""Training-step benchmark: MoR vs vanilla vs transformers' Llama, measured in one run.

Usage::

    python tools/bench_train.py [--config configs/tiny.yaml] [--seq-length S] [--batch-size B]
        [--steps N] [--warmup W] [--threads T] [--dtype float32|bfloat16] [--recursions 2,3,4]
        [--rounds R] [--no-transformers] [--json PATH] [model.key=value ...]

What runs (each model in a fresh subprocess, one after another, `--rounds` times interleaved):

- `vanilla L=..`: the config's shape (width, heads, query groups, FFN, vocabulary, tied
  embeddings) with L unique layers, no sharing, no router.
- `mor nr=N`: expert-choice routing, middle-cycle sharing, default capacities (N-r+1)/N, at the
  paper's depth rule: L' = L if (L-2) % N == 0, else L' = 2 + N * ceil((L-2)/N). Each MoR model is
  compared with the vanilla model of its own L' (which is run too when L' != L).
- `transformers L=..`: `transformers.LlamaForCausalLM` of the vanilla shape, random init, built
  locally from a `LlamaConfig` (sdpa attention, tied embeddings, `use_cache=False`).

One training step = zero_grad + forward + loss (mean token cross-entropy, labels = inputs shifted
by one) + backward + `torch.optim.AdamW.step()`, on one fixed batch of random tokens. The step
time is the median over the timed steps of all rounds (warm-up steps are not timed; on CUDA each
step is bracketed by `torch.cuda.synchronize()`). tokens/s = batch x seq / median step time.

Ratios are computed from the measured medians of this run, never from stored numbers:
- MoR/vanilla FLOPs ratio: `mor_megatron.report.training_flops_per_token` (the paper's
  accounting) of the MoR config over that of its vanilla counterpart of the same L';
  step-time ratio: measured MoR median / measured vanilla median; overhead = step-time ratio /
  FLOPs ratio (target <= 1.05: routing, gather and scatter cost under 5%).
- ours / transformers tokens/s (vanilla megatron model vs LlamaForCausalLM; target >= 0.9).
- achieved model FLOP/s = training FLOPs per token x tokens/s, as a fraction of a dense `torch.mm`
  probe of the same dtype and thread count measured in this run (target >= 0.5). The probe is a
  square matmul (`--probe-size`); its TFLOP/s is the best of its per-round medians, so a noisy
  neighbour lowers the fraction rather than inflating it.

Memory. CUDA: `torch.cuda.max_memory_allocated()` of the worker (weights, gradients, AdamW state,
activations). CPU: the worker's peak resident set growth, from just before the model is built to
the end of the run (Linux `VmHWM` after resetting it through /proc/self/clear_refs, or
`ru_maxrss` where that reset is refused). It is approximate: it also counts allocator caching and
one-time buffers (thread pools, kernels), and not memory that was freed and reused.

On CPU the megatron workers run under the project's CPU shims (a process-wide
`TorchFunctionMode` maps `device="cuda"` to CPU), which every torch call pays; the transformers
worker runs without them unless `--transformers-with-shims` is given (to isolate that cost).

Targets are reported PASS/MISS; the run never fails on a missed target. `--json PATH` writes every
number (settings, per-step times, medians, ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_train.py` from anywhere
    sys.path.insert(0, str(REPO))

RESULT_TAG = "BENCH_RESULT "
READY_TAG = "BENCH_READY"
DTYPE_NAMES = ("float32", "bfloat16")
OVERHEAD_TARGET = 1.05
TRANSFORMERS_TARGET = 0.9
MFU_TARGET = 0.5


# -- depth rule ------------------------------------------------------------------------------------


def paper_depth(effective_layers: int, num_recursions: int) -> int:
    """Middle-cycle depth for Nr recursions: L if (L-2) % Nr == 0, else 2 + Nr*ceil((L-2)/Nr)."""
    body = effective_layers - 2
    if body > 0 and body % num_recursions == 0:
        return effective_layers
    return 2 + num_recursions * max(1, math.ceil(body / num_recursions))


# -- worker: one model, one process ------------------------------------------------------------------


def _read_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _CpuPeakMemory:
    """Peak RSS growth of this process from `start()` to `stop()` (approximate, see module doc)."""

    def start(self) -> None:
        self.method = "ru_maxrss"
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            if _read_status_kib("VmHWM") is not None:
                self.method = "VmHWM"
        except OSError:
            pass
        self.rss_start = _read_status_kib("VmRSS")
        if self.rss_start is None:  # no /proc: ru_maxrss so far stands in for the baseline
            self.rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> dict[str, Any]:
        peak = _read_status_kib("VmHWM") if self.method == "VmHWM" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {
            "peak_memory_bytes": max(0, peak - self.rss_start) * 1024,
            "peak_rss_bytes": peak * 1024,
            "memory_method": f"CPU peak RSS growth ({self.method}), approximate",
        }


def _build_megatron(spec: dict, device):
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mor_megatron.model import MoRGPTModel
    from mor_megatron.yaml_config import model_config_from_dict

    config = model_config_from_dict(spec["model"], "benchmark model")
    torch.manual_seed(spec["seed"])
    model = MoRGPTModel(config).to(device)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))

    def loss_fn(tokens, positions, labels):
        per_token = model(tokens, positions, None, labels=labels)  # [B, S]
        return per_token.float().mean()

    return model, loss_fn


def _build_transformers(spec: dict, device, dtype):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = spec["llama"]
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"],
        head_dim=shape["head_dim"],
        max_position_embeddings=shape["seq_length"],
        rms_norm_eps=shape["layernorm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rotary_base"]},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    vocab = shape["vocab_size"]

    def loss_fn(tokens, positions, labels):
        logits = model(input_ids=tokens, position_ids=positions).logits  # [B, S, V]
        return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))

    return model, loss_fn


def run_worker(spec: dict) -> dict[str, Any]:
    """Build one model, train it for warmup + steps on one batch, time each timed step."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    if spec["kind"] == "megatron":
        from mor_megatron.parallel.state import initialize_parallel

        initialize_parallel(seed=spec["seed"])  # world of one; on CPU this installs the shims
    elif spec.get("with_shims"):
        from mor_megatron.parallel.cpu_shims import apply_cpu_shims

        apply_cpu_shims()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    _import_model_code(spec["kind"])  # (already done in a worker) not counted in the memory

    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    batch, seq, vocab = spec["batch_size"], spec["seq_length"], spec["vocab_size"]
    sample = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    tokens, labels = sample[:, :-1].contiguous().to(device), sample[:, 1:].contiguous().to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)

    memory = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        memory = _CpuPeakMemory()
        memory.start()

    if spec["kind"] == "megatron":
        model, loss_fn = _build_megatron(spec, device)
    else:
        model, loss_fn = _build_transformers(spec, device, dtype)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    param_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(tokens, positions, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    times, losses = [], []
    for index in range(spec["warmup"] + spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        if index >= spec["warmup"]:
            times.append(elapsed)

    if cuda:
        mem = {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
            "memory_method": "torch.cuda.max_memory_allocated",
        }
    else:
        mem = memory.stop()
    return {
        "step_times_s": times,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "params": params,
        "param_dtypes": param_dtypes,
        "torch_threads": torch.get_num_threads(),
        **mem,
    }


def _import_model_code(kind: str) -> None:
    """The imports a worker of `kind` needs (torch, megatron or transformers): done before the
    worker says it is ready, so that they neither count in its memory nor overlap a timed run."""
    import torch  # noqa: F401

    if kind == "megatron":
        import mor_megatron.model  # noqa: F401
        import mor_megatron.parallel.state  # noqa: F401
        import mor_megatron.yaml_config  # noqa: F401
    else:
        import transformers.models.llama.modeling_llama  # noqa: F401


def _worker_main(kind: str) -> int:
    """Import, say READY, wait for the spec on stdin, run it, print the tagged result."""
    _import_model_code(kind)
    print(READY_TAG, flush=True)
    line = sys.stdin.readline()
    if not line.strip():  # the parent went away or cancelled
        return 1
    result = run_worker(json.loads(line))
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


class Worker:
    """One model's fresh Python process. All the workers of a round are started together so that
    their (single-threaded, slow) imports overlap; each then blocks on stdin, idle, until `run`
    hands it its spec, so timed runs never overlap anything of ours."""

    def __init__(self, kind: str, threads: int) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            cwd=str(REPO), env=env,
        )
        self.ready = False
        self.early: list[str] = []

    def wait_ready(self) -> None:
        for line in self.proc.stdout:
            if line.strip() == READY_TAG:
                self.ready = True
                return
            self.early.append(line)
        # stdout closed before READY: the import failed; `run` reports it

    def _failure(self, name: str, stdout: str) -> RuntimeError:
        self.stderr.seek(0)
        text = "".join(self.early) + stdout + self.stderr.read()
        tail = "\n".join(text.strip().splitlines()[-25:])
        return RuntimeError(f"benchmark worker for {name} failed (rc {self.proc.returncode}):\n{tail}")

    def run(self, spec: dict, verbose: bool = False) -> dict[str, Any]:
        if not self.ready:
            self.proc.wait()
            raise self._failure(spec["name"], "")
        stdout, _ = self.proc.communicate(json.dumps(spec) + "\n")
        lines = [l for l in stdout.splitlines() if l.startswith(RESULT_TAG)]
        if self.proc.returncode != 0 or not lines:
            raise self._failure(spec["name"], stdout)
        if verbose:
            self.stderr.seek(0)
            sys.stderr.write(self.stderr.read())
        self.stderr.close()
        return json.loads(lines[-1][len(RESULT_TAG):])

    def cancel(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.communicate("\n", timeout=30)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


# -- dense matmul probe ------------------------------------------------------------------------------


def matmul_probe(size: int, dtype_name: str, repeats: int) -> dict[str, Any]:
    """Median TFLOP/s of a dense square `torch.mm` in `dtype` (this process's thread setting)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        samples.append(2 * size**3 / (time.perf_counter() - start) / 1e12)
    return {"median_tflops": statistics.median(samples), "samples_tflops": samples}


# -- planning -------------------------------------------------------------------------------------


def _with(config, **changes):
    """`dataclasses.replace` for a MoRConfig (num_layers re-derived)."""
    return dataclasses.replace(config, num_layers=0, **changes)


def plan_models(base, recursions: Sequence[int], dtype_name: str) -> list[dict[str, Any]]:
    """Model entries: vanilla at L, MoR at each Nr (depth rule), vanilla at each new L'."""
    import torch

    from mor_megatron.report import vanilla_config

    dtype = getattr(torch, dtype_name)
    base = _with(base, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    L = base.effective_layers
    keep_router = base.router == "expert_choice"
    entries: list[dict[str, Any]] = []
    vanillas: dict[int, Any] = {}

    def vanilla_at(depth: int) -> str:
        name = f"vanilla L={depth}"
        if depth not in vanillas:
            mor_like = _with(base, effective_layers=depth, sharing="none", router="none",
                             num_recursions=1, capacities=None, router_activation=None,
                             router_alpha=None, aux_router=False)
            vanillas[depth] = vanilla_config(mor_like)
            entries.append({"name": name, "kind": "megatron", "role": "vanilla",
                            "config": vanillas[depth], "effective_layers": depth})
        return name

    vanilla_at(L)
    mors = []
    for nr in recursions:
        depth = paper_depth(L, nr)
        config = _with(
            base,
            effective_layers=depth,
            num_recursions=nr,
            sharing="middle_cycle",
            router="expert_choice",
            capacities=None,
            router_activation=base.router_activation if keep_router else None,
            router_alpha=base.router_alpha if keep_router else None,
        )
        mors.append({"name": f"mor nr={nr}", "kind": "megatron", "role": "mor", "config": config,
                     "effective_layers": depth, "num_recursions": nr})
    for entry in mors:
        entries.append(entry)
        entry["vanilla"] = vanilla_at(entry["effective_layers"])
    # vanilla models of a new depth were appended after the MoR that needed them; fine for timing
    return entries


def llama_shape(config) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_layers": config.effective_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups or config.num_attention_heads,
        "head_dim": config.head_dim,
        "seq_length": config.seq_length,
        "layernorm_epsilon": config.layernorm_epsilon,
        "rotary_base": config.rotary_base,
    }


# -- arithmetic on measurements ----------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summarize(models: dict[str, dict], entries: list[dict], probe_tflops: float,
              transformers_name: Optional[str], tokens_per_step: int) -> dict[str, Any]:
    """Medians, throughput, FLOP/s and every ratio, from the raw per-step times."""
    for record in models.values():
        times = record["step_times_s"]
        record["step_time_s"] = statistics.median(times)
        record["tokens_per_s"] = tokens_per_step / record["step_time_s"]
        record["achieved_tflops"] = record["training_flops_per_token"] * record["tokens_per_s"] / 1e12
        record["fraction_of_probe"] = record["achieved_tflops"] / probe_tflops
        record["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in record["rounds"])

    mor_vs_vanilla = []
    for entry in entries:
        if entry["role"] != "mor":
            continue
        mor, vanilla = models[entry["name"]], models[entry["vanilla"]]
        flops_ratio = mor["training_flops_per_token"] / vanilla["training_flops_per_token"]
        time_ratio = mor["step_time_s"] / vanilla["step_time_s"]
        overhead = time_ratio / flops_ratio
        mor_vs_vanilla.append({
            "mor": entry["name"],
            "vanilla": entry["vanilla"],
            "num_recursions": entry["num_recursions"],
            "effective_layers": entry["effective_layers"],
            "flops_ratio": flops_ratio,
            "step_time_ratio": time_ratio,
            "overhead": overhead,
            "memory_ratio": (mor["peak_memory_bytes"] / vanilla["peak_memory_bytes"]
                             if vanilla["peak_memory_bytes"] else None),
            "target": OVERHEAD_TARGET,
            "verdict": _verdict(overhead <= OVERHEAD_TARGET),
        })

    out: dict[str, Any] = {"mor_vs_vanilla": mor_vs_vanilla}
    if transformers_name is not None:
        ours = models[entries[0]["name"]]
        theirs = models[transformers_name]
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        out["ours_vs_transformers"] = {
            "ours": entries[0]["name"],
            "transformers": transformers_name,
            "ours_tokens_per_s": ours["tokens_per_s"],
            "transformers_tokens_per_s": theirs["tokens_per_s"],
            "tokens_per_s_ratio": ratio,
            "target": TRANSFORMERS_TARGET,
            "verdict": _verdict(ratio >= TRANSFORMERS_TARGET),
        }
    out["model_flops_utilization"] = [
        {
            "model": name,
            "achieved_tflops": record["achieved_tflops"],
            "probe_tflops": probe_tflops,
            "fraction": record["fraction_of_probe"],
            "target": MFU_TARGET,
            "verdict": _verdict(record["fraction_of_probe"] >= MFU_TARGET),
        }
        for name, record in models.items()
    ]
    return out


# -- printing ---------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"device: {report['device']}  dtype: {s['dtype']}  "
        f"batch {s['batch_size']} x seq {s['seq_length']} = {s['tokens_per_step']} tokens/step  "
        f"steps {s['steps']} (+{s['warmup']} warm-up) x {s['rounds']} round(s)",
        f"shape: hidden {s['hidden_size']}, heads {s['num_attention_heads']}, query groups "
        f"{s['num_query_groups']}, ffn {s['ffn_hidden_size']}, vocab {s['vocab_size']}, "
        f"base L={s['effective_layers']} (config {s['config']})",
        f"dense mm probe ({s['dtype']}, {s['probe_size']}^2): {report['probe']['tflops'] * 1e3:.1f} "
        "GFLOP/s (best of per-round medians)",
        f"memory: {report['memory_method']}",
        "",
    ]
    rows = []
    for name, r in report["models"].items():
        rows.append([
            name, r["effective_layers"], r.get("unique_layers", "-"), f"{r['params'] / 1e6:.2f}M",
            f"{r['step_time_s'] * 1e3:.1f}", f"{min(r['step_times_s']) * 1e3:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['training_flops_per_token'] / 1e6:.1f}",
            f"{r['achieved_tflops'] * 1e3:.1f}", f"{100 * r['fraction_of_probe']:.0f}%",
        ])
    lines.append(_table(
        ["model", "L", "unique", "params", "median ms", "min ms", "tok/s", "peak MiB", "MFLOP/tok",
         "GFLOP/s", "of probe"], rows))
    lines.append("")
    c = report["comparisons"]
    rows = [[m["mor"], f"{m['effective_layers']}", m["vanilla"], f"{m['flops_ratio']:.3f}",
             f"{m['step_time_ratio']:.3f}", f"{m['overhead']:.3f}",
             f"{m['memory_ratio']:.2f}" if m["memory_ratio"] is not None else "-",
             f"<= {m['target']:.2f}", m["verdict"]] for m in c["mor_vs_vanilla"]]
    lines.append(_table(["MoR vs vanilla", "L'", "vs", "FLOPs ratio", "time ratio",
                         "time/FLOPs", "mem ratio", "target", ""], rows))
    if "ours_vs_transformers" in c:
        t = c["ours_vs_transformers"]
        lines += ["", f"{t['ours']} vs {t['transformers']}: tokens/s {t['ours_tokens_per_s']:.0f} / "
                  f"{t['transformers_tokens_per_s']:.0f} = {t['tokens_per_s_ratio']:.3f} "
                  f"(target >= {t['target']:.2f}) {t['verdict']}"]
    lines.append("")
    rows = [[m["model"], f"{m['achieved_tflops'] * 1e3:.1f}", f"{m['probe_tflops'] * 1e3:.1f}",
             f"{m['fraction']:.3f}", f">= {m['target']:.2f}", m["verdict"]]
            for m in c["model_flops_utilization"]]
    lines.append(_table(["model FLOP/s vs probe", "GFLOP/s", "probe", "fraction", "target", ""], rows))
    lines += ["", "targets are informational: PASS/MISS never changes the exit status"]
    return "\n".join(lines)


def _cpu_name(threads: int) -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} logical cores, {threads} torch threads)"


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml",
                        help="YAML config whose model shape is benchmarked (default configs/tiny.yaml)")
    parser.add_argument("--seq-length", type=int, help="sequence length (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every model this many times, interleaved (medians pool all rounds)")
    parser.add_argument("--threads", type=int, default=cores, help=f"CPU threads (default {cores})")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--recursions", default="2,3,4", help="MoR Nr values, comma-separated")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--probe-size", type=int, help="dense mm size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--probe-repeats", type=int, default=10)
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers LlamaForCausalLM comparison")
    parser.add_argument("--transformers-with-shims", action="store_true",
                        help="run transformers under the same CPU shims as megatron (diagnostic)")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("overrides", nargs="*", help="model.key=value overrides of the config")
    parser.add_argument("--worker", choices=("megatron", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "rounds", "threads", "probe_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if not Path(args.config).exists() and (REPO / args.config).exists():
        args.config = str(REPO / args.config)  # repo-relative, from any working directory
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)

    import torch

    with warnings.catch_warnings():  # megatron's "Apex/TE not installed" notes on import
        warnings.simplefilter("ignore")
        from mor_megatron.config import ConfigError
        from mor_megatron.report import training_flops_per_token
        from mor_megatron.yaml_config import load_model_config

    overrides = list(args.overrides)
    if args.seq_length:
        overrides.append(f"model.seq_length={args.seq_length}")
    try:
        recursions = [int(x) for x in args.recursions.split(",") if x.strip()]
        base = load_model_config(args.config, overrides)
        entries = plan_models(base, recursions, args.dtype)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if cuda else _cpu_name(args.threads)
    probe_size = args.probe_size or (8192 if cuda else 2048)
    seq, batch = base.seq_length, args.batch_size
    tokens_per_step = seq * batch
    common = dict(batch_size=batch, seq_length=seq, vocab_size=base.vocab_size, steps=args.steps,
                  warmup=args.warmup, threads=args.threads, dtype=args.dtype, seed=args.seed,
                  lr=args.lr)

    from mor_megatron.yaml_config import dump_model_config

    specs = []
    for entry in entries:
        spec = dict(common, name=entry["name"], kind="megatron",
                    model=dump_model_config(entry["config"]))
        specs.append((entry, spec))
    transformers_name = None
    if not args.no_transformers:
        transformers_name = f"transformers L={entries[0]['effective_layers']}"
        vanilla = entries[0]["config"]
        entry = {"name": transformers_name, "kind": "transformers", "role": "reference",
                 "config": vanilla, "effective_layers": vanilla.effective_layers}
        spec = dict(common, name=transformers_name, kind="transformers", llama=llama_shape(vanilla),
                    with_shims=args.transformers_with_shims)
        specs.append((entry, spec))

    models: dict[str, dict] = {}
    for entry, _ in specs:
        config = entry["config"]
        models[entry["name"]] = {
            "kind": entry["kind"],
            "role": entry["role"],
            "effective_layers": entry["effective_layers"],
            "unique_layers": config.num_layers if entry["kind"] == "megatron" else config.effective_layers,
            "num_recursions": entry.get("num_recursions", 1),
            "training_flops_per_token": training_flops_per_token(config),
            "rounds": [],
            "step_times_s": [],
        }
    probes = []
    total = args.rounds * len(specs)
    done = 0
    for round_index in range(args.rounds):
        probe = matmul_probe(probe_size, args.dtype, args.probe_repeats)
        probes.append(probe)
        print(f"[round {round_index + 1}] dense mm probe: {probe['median_tflops'] * 1e3:.1f} GFLOP/s",
              file=sys.stderr, flush=True)
        order = specs if round_index % 2 == 0 else specs[::-1]
        workers = [Worker(spec["kind"], args.threads) for _, spec in order]
        try:
            for worker in workers:
                worker.wait_ready()
            for worker, (entry, spec) in zip(workers, order):
                try:
                    result = worker.run(spec, args.verbose)
                except RuntimeError as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 1
                record = models[entry["name"]]
                record["rounds"].append(result)
                record["step_times_s"].extend(result["step_times_s"])
                record["params"] = result["params"]
                done += 1
                print(f"[{done}/{total}] {entry['name']}: median step "
                      f"{statistics.median(result['step_times_s']) * 1e3:.1f} ms, loss "
                      f"{result['loss_first']:.3f} -> {result['loss_last']:.3f}",
                      file=sys.stderr, flush=True)
        finally:
            for worker in workers:
                worker.cancel()
    probe_tflops = max(p["median_tflops"] for p in probes)

    comparisons = summarize(models, [e for e, _ in specs if e["kind"] == "megatron"],
                            probe_tflops, transformers_name, tokens_per_step)
    methods = {r["memory_method"] for m in models.values() for r in m["rounds"]}
    report = {
        "device": device,
        "settings": {
            "config": args.config,
            "overrides": overrides,
            "dtype": args.dtype,
            "threads": args.threads,
            "batch_size": batch,
            "seq_length": seq,
            "tokens_per_step": tokens_per_step,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "recursions": recursions,
            "effective_layers": base.effective_layers,
            "hidden_size": base.hidden_size,
            "num_attention_heads": base.num_attention_heads,
            "num_query_groups": base.num_query_groups or base.num_attention_heads,
            "ffn_hidden_size": base.ffn_hidden_size,
            "vocab_size": base.vocab_size,
            "probe_size": probe_size,
            "transformers_with_shims": args.transformers_with_shims,
            "torch": torch.__version__,
        },
        "probe": {"tflops": probe_tflops, "rounds": probes, "size": probe_size, "dtype": args.dtype},
        "memory_method": "; ".join(sorted(methods)),
        "models": models,
        "comparisons": comparisons,
    }
    print(render(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
