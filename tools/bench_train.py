"""Training-step benchmark: MoR vs vanilla vs transformers' Llama, model-only and in mor-pretrain.

Each model runs in the model-only loop and through the real trainer, eager and compiled, all
measured in one run.

Usage::

    python tools/bench_train.py [--config configs/tiny.yaml] [--seq-length S] [--batch-size B]
        [--steps N] [--warmup W] [--threads T] [--dtype float32|bfloat16] [--recursions 2,3,4]
        [--token-choice 3] [--loops model,trainer] [--compile off|on|both] [--sequential] [--no-transformers]
        [--json PATH] [model.key=value ...]

Models:

- `vanilla L=..`: the config's shape (width, heads, query groups, FFN, vocabulary, tied
  embeddings) with L unique layers, no sharing, no router.
- `mor nr=N`: expert-choice routing, middle-cycle sharing, default capacities (N-r+1)/N, at the
  paper's depth rule: L' = L if (L-2) % N == 0, else L' = 2 + N * ceil((L-2)/N). Each MoR model is
  compared with the vanilla model of its own L' (which is run too when L' != L).
- `mor tc nr=N` (`--token-choice`, Nr = 3 by default): the same with token-choice routing (its
  default softmax router, alpha 1), whose steps run a variable token count per sequence in the
  padded layout (docs/DESIGN.md 4.1).
- `transformers L=..`: `transformers.LlamaForCausalLM` of the base vanilla shape, random init,
  built locally from a `LlamaConfig` (sdpa attention, tied embeddings, `use_cache=False`);
  model-only, eager.
- `dense mm probe`: a square `torch.mm` (`--probe-size`) in the same dtype and thread count.

Each megatron model runs as one job per loop and compile setting, each job in its own fresh
Python process (`job_name`: `mor nr=2`, `mor nr=2 [trainer]`, `mor nr=2 [compiled]`,
`mor nr=2 [trainer, compiled]`):

- loop `model`: one step = zero_grad + forward + loss (mean token cross-entropy, labels = inputs
  shifted by one) + backward + `torch.nn.utils.clip_grad_norm_` to the trainer's clip norm
  (`trainer_grad_clip`: `training.grad_clip`, 1.0 unless a `training.grad_clip=` override says
  otherwise; 0 clips nothing) + `torch.optim.AdamW.step()` (fused where torch has the kernel, as
  in the trainer), on one fixed batch of random tokens: the same update as the trainer's, so the
  clip's gradient norm does not count as the trainer's overhead.
  Parameters are cast to `--dtype` (buffers are not), as DeepSpeed's bf16 mode casts the model.
- loop `trainer`: `mor-pretrain` itself (`mor_megatron.pretrain.main`, tools/bench_train_trainer.py)
  on a shard of random tokens, the same model, batch (one micro-batch of B x S) and dtype
  (`training.bf16`): its DeepSpeed engine (the unset ZeRO stage: 0 at one fp32 rank; the same
  gradient clip), data loader, router statistics, metrics.jsonl + TensorBoard and a log line every
  step; checkpoints off. One step
  = one iteration of its loop, boundary to boundary.
- compiled: `mor_megatron.parallel.compile.compile_layers` on the model (model loop) or
  `training.compile: true` (trainer). Warm-up steps absorb the cold compile (at least
  `COMPILED_WARMUP` = 2 for compiled jobs) and are not timed; eager jobs set `training.compile:
  false` explicitly (its default compiles on CUDA).

Defaults: configs/tiny.yaml widened to hidden 256, FFN 704, sequence 256 (`DEFAULT_SHAPE`, unless
another --config is given; model.* overrides win), batch 4, all cores as torch threads, 8 timed
steps after 2 warm-up, expert-choice Nr = 2, 3, 4 and token-choice Nr = 3, both loops, eager and
compiled: 25 jobs (about 6 minutes on 2 idle cores, most of it imports and cold compiles).

Timing: warm-up steps are not timed; on CUDA every step is bracketed by
`torch.cuda.synchronize()`. By default all jobs are built and warmed up first (`--setup-parallel`
at a time), and then timed step by step in turns (one step of each job per cycle, the starting
job rotating), so that load changes on a shared machine hit every job alike; only one process
computes at any time. `--sequential` runs one job after another instead (only one model in
memory at a time).

Figures, all from this run's measurements (nothing stored):
- step time: median over the timed steps (the fastest step and the spread (max - min) / median
  beside it); tokens/s = batch x seq / median step time.
- MoR/vanilla, per loop and compile setting: FLOPs ratio as routed, from
  `mor_megatron.report.training_flops_per_token` (the paper's accounting) at the tokens the
  routers sent through each recursion step in this job's timed steps (`router/r{r}/selected_tokens`;
  expert-choice: exactly its capacities), over that of the vanilla model of the same L'; padding:
  the FLOPs of the rows the block ran (`router/r{r}/run_tokens`, pads included, what the
  achieved FLOP/s count) over those as routed, minus 1 (token-choice's per-sequence padding; 0 for
  expert-choice top-k); step-time ratio: measured MoR median / vanilla median;
  time/FLOPs = step-time ratio / FLOPs ratio (padding counts as overhead), also from the fastest
  steps and from the median of the per-cycle MoR/vanilla ratios (paired: both steps of a pair ran
  within seconds, so slow phases of a shared machine cancel out). Target: paired time/FLOPs <=
  1.03 for expert-choice (routing, gather and scatter under 3%), <= 1.05 for token-choice
  (padding included).
- trainer / model-only step time per model and compile setting (paired, as above; target <= 1.03:
  the trainer's engine, data, statistics and logging cost under 3% of the model's own step).
- compiled / eager tokens/s per model and loop.
- ours / transformers tokens/s (vanilla megatron model vs LlamaForCausalLM; target >= 0.9).
- CPU time: each worker's process CPU time per step (`time.process_time`), medians and their
  ratios beside the wall-clock ones: with `--threads 1` on a shared machine, what a step cost
  whatever the neighbours did (informational; verdicts use wall-clock time).
- achieved model FLOP/s = training FLOPs per token x tokens/s, as a fraction of the probe's median
  TFLOP/s (target >= 0.7). The probe is timed in the same cycles as the models.

Memory. CUDA: `torch.cuda.max_memory_allocated()` of the worker (weights, gradients, AdamW state,
activations, the batch). CPU: the worker's peak resident set growth from just before the model is
built to the end of its run (Linux `VmHWM` after resetting it through /proc/self/clear_refs, or
`ru_maxrss` where that reset is refused). It is approximate: it also counts allocator caching and
one-time buffers (thread pools, kernels, the compiler).

On CPU the megatron workers run under the project's CPU shims (a process-wide
`TorchFunctionMode` maps `device="cuda"` to CPU), which every torch call pays; the transformers
worker runs without them unless `--transformers-with-shims` is given (to isolate that cost).

Targets are reported PASS/MISS; the run never fails on a missed target. A compiled job whose
compiler is missing from this tree is left out with a note. `--json PATH` writes every number
(settings, per-step times and losses, medians, ratios).
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
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_train.py` from anywhere
    sys.path.insert(0, str(REPO))

TAG = "@bench"
DTYPE_NAMES = ("float32", "bfloat16")
OVERHEAD_TARGET = 1.03  # MoR/vanilla step time over FLOPs, median of the paired per-cycle ratios
TOKEN_CHOICE_TARGET = 1.05  # the same for token-choice, over its as-routed FLOPs (padding included)
TRAINER_TARGET = 1.03  # trainer step / model-only step, median of the paired per-cycle ratios
TRANSFORMERS_TARGET = 0.9
MFU_TARGET = 0.7
LOOPS = ("model", "trainer")
COMPILED_WARMUP = 2  # untimed steps a compiled job runs at least
DEFAULT_CONFIG = "configs/tiny.yaml"
DEFAULT_SHAPE = ["model.hidden_size=256", "model.ffn_hidden_size=704", "model.seq_length=256"]
# (loop, compiled) in the order the tables show them
VARIANTS = (("model", False), ("trainer", False), ("model", True), ("trainer", True))


def job_name(model: str, loop: str = "model", compiled: bool = False) -> str:
    """'vanilla L=8', 'vanilla L=8 [trainer]', 'mor nr=2 [trainer, compiled]', ..."""
    tags = (["trainer"] if loop == "trainer" else []) + (["compiled"] if compiled else [])
    return f"{model} [{', '.join(tags)}]" if tags else model


def variant_name(loop: str, compiled: bool) -> str:
    return f"{'trainer' if loop == 'trainer' else 'model-only'} {'compiled' if compiled else 'eager'}"


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


def _cast_params(model, dtype):
    """Every parameter in `dtype`, buffers (rotary frequencies) untouched: what DeepSpeed's bf16
    mode does to the training model (megatron's local RMSNorm weights are built in fp32)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def _build_megatron(spec: dict, device):
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mor_megatron.model import MoRGPTModel
    from mor_megatron.yaml_config import model_config_from_dict

    config = model_config_from_dict(spec["model"], "benchmark model")
    torch.manual_seed(spec["seed"])
    model = _cast_params(MoRGPTModel(config).to(device), config.params_dtype)
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
    model = _cast_params(LlamaForCausalLM(config).to(device), dtype)
    vocab = shape["vocab_size"]

    def loss_fn(tokens, positions, labels):
        logits = model(input_ids=tokens, position_ids=positions).logits  # [B, S, V]
        return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))

    return model, loss_fn


class _Session:
    """One model (or the matmul probe) set up in a worker: `step()` runs one timed step."""

    def __init__(self, spec: dict) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            torch.set_num_threads(spec["threads"])
        dtype = getattr(torch, spec["dtype"])
        if spec["kind"] == "megatron":
            from mor_megatron.parallel.state import initialize_parallel

            initialize_parallel(seed=spec["seed"])  # world of one; on CPU this installs the shims
        elif spec.get("with_shims"):
            from mor_megatron.parallel.cpu_shims import apply_cpu_shims

            apply_cpu_shims()
        device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.memory = None
        if spec["kind"] == "probe":
            size = spec["probe_size"]
            self.a = torch.randn(size, size, device=device).to(dtype)
            self.b = torch.randn(size, size, device=device).to(dtype)
            self.info: dict[str, Any] = {"probe_size": size}
        else:
            self._build(spec, device, dtype)
        for _ in range(spec["warmup"]):
            self.step()
        self.routing: dict[str, list] = {"run_tokens": [], "selected_tokens": []}  # timed steps

    def _build(self, spec: dict, device, dtype) -> None:
        torch = self.torch
        generator = torch.Generator().manual_seed(spec["seed"] + 1)
        batch, seq, vocab = spec["batch_size"], spec["seq_length"], spec["vocab_size"]
        sample = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        self.tokens = sample[:, :-1].contiguous().to(device)
        self.labels = sample[:, 1:].contiguous().to(device)
        self.positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.memory = _CpuPeakMemory()
            self.memory.start()
        if spec["kind"] == "megatron":
            self.model, self.loss_fn = _build_megatron(spec, device)
        else:
            self.model, self.loss_fn = _build_transformers(spec, device, dtype)
        self.model.train()
        compiled = 0
        if spec.get("compile"):  # each layer's forward, in place, as training.compile does
            from mor_megatron.parallel.compile import compile_layers

            compiled = compile_layers(self.model, self.model.config)
        from mor_megatron.device import fused_optimizer_kernels

        # the trainer's AdamW kernel (fused where torch has one), so the loops differ only in the trainer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec["lr"],
                                           fused=fused_optimizer_kernels(device) or None)
        self.info = {
            "params": sum(p.numel() for p in self.model.parameters()),
            "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()}),
            "compiled_layers": compiled,
        }

    def _run_once(self):
        if self.spec["kind"] == "probe":
            self.torch.mm(self.a, self.b)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.tokens, self.positions, self.labels)
        loss.backward()
        if self.spec["grad_clip"]:  # the trainer's clip, as a plain PyTorch loop writes it
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec["grad_clip"], foreach=True)
        self.optimizer.step()
        return loss.detach()

    def step(self) -> tuple[float, Optional[float], float]:
        """(seconds, loss, CPU seconds) of one step; the probe's step is one `torch.mm`."""
        if self.cuda:
            self.torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        loss = self._run_once()
        if self.cuda:
            self.torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        self._record_routing()
        return elapsed, (float(loss) if loss is not None else None), cpu

    def _record_routing(self) -> None:
        """This step's tokens per recursion step, as routed and as run (pads included), read
        after the timing (each `float` of a CUDA tensor synchronises)."""
        decoder = getattr(self.model, "decoder", None) if self.spec["kind"] == "megatron" else None
        out = getattr(decoder, "router_output", None)
        if out is None or not hasattr(self, "routing"):
            return
        for key in self.routing:
            self.routing[key].append([float(value) for value in getattr(out, key)])

    def finish(self) -> dict[str, Any]:
        out = dict(self.info, torch_threads=self.torch.get_num_threads())
        if self.spec["kind"] == "probe":
            return out
        if getattr(self, "routing", None) and self.routing["run_tokens"]:
            out["routing"] = self.routing
        if self.cuda:
            out.update(peak_memory_bytes=int(self.torch.cuda.max_memory_allocated()),
                       memory_method="torch.cuda.max_memory_allocated")
        else:
            out.update(self.memory.stop())
        return out


def _import_model_code(kind: str) -> None:
    """The imports a worker of `kind` needs (torch, megatron or transformers): done before the
    worker says it is ready, so that they neither count in its memory nor overlap a timed step."""
    import torch  # noqa: F401

    if kind in ("megatron", "trainer"):
        import mor_megatron.model  # noqa: F401
        import mor_megatron.parallel.state  # noqa: F401
        import mor_megatron.yaml_config  # noqa: F401
    if kind == "trainer":
        from mor_megatron import pretrain

        # DeepSpeed's accelerator as mor-pretrain picks it, before DeepSpeed is first imported
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if pretrain._computes_on_cuda() else "cpu")
        import mor_megatron.training.loop  # noqa: F401  (DeepSpeed)
    elif kind == "transformers":
        import transformers.models.llama.modeling_llama  # noqa: F401


def _say(*words: object) -> None:
    print(TAG, *words, flush=True)


def _worker_main(kind: str) -> int:
    """Worker protocol (one line each way): READY; <- spec JSON; WARM; then per "step": STEP
    seconds loss; on "done": RESULT json. An empty line or end of input cancels."""
    _import_model_code(kind)
    _say("READY")
    if kind == "trainer":
        from mor_megatron.tools.bench_train_trainer import trainer_worker

        code = trainer_worker(_say, _CpuPeakMemory)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # without waiting for the threads pretrain leaves (TensorBoard, process group)
    line = sys.stdin.readline()
    if not line.strip():
        return 1
    session = _Session(json.loads(line))
    _say("WARM")
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            seconds, loss, cpu = session.step()
            _say("STEP", repr(seconds), repr(loss), repr(cpu))
        elif command == "done":
            _say("RESULT", json.dumps(session.finish()))
            return 0
        else:
            return 1
    return 1


class WorkerError(RuntimeError):
    pass


class Worker:
    """One model's fresh Python process, driven line by line over stdin/stdout.

    All workers start together so that their slow, single-threaded imports overlap; a worker then
    blocks on stdin (idle) except while the parent has it build its model or run one step, so
    at most one of them computes at any time.
    """

    def __init__(self, name: str, kind: str, threads: int) -> None:
        self.name = name
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            cwd=str(REPO), env=env,
        )
        self.stdout: list[str] = []

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failure() from None

    def _expect(self, word: str) -> str:
        """The rest of the next tagged line, which must start with `word`."""
        for line in self.proc.stdout:
            if line.startswith(TAG + " "):
                got, _, rest = line[len(TAG) + 1:].rstrip("\n").partition(" ")
                if got == word:
                    return rest
            self.stdout.append(line)
        raise self._failure()

    def _failure(self) -> WorkerError:
        self.proc.wait()
        self.stderr.seek(0)
        text = "".join(self.stdout) + self.stderr.read()
        tail = "\n".join(text.strip().splitlines()[-25:])
        return WorkerError(f"benchmark worker for {self.name} failed (rc {self.proc.returncode}):\n{tail}")

    def ready(self) -> None:
        self._expect("READY")

    def setup(self, spec: dict) -> None:
        self.start_setup(spec)
        self.wait_warm()

    def start_setup(self, spec: dict) -> None:
        """Send the spec: the worker builds its model and runs its warm-up steps."""
        self._send(json.dumps(spec))

    def wait_warm(self) -> None:
        self._expect("WARM")

    def step(self) -> tuple[float, Optional[float], float]:
        """(seconds, loss or None, CPU seconds of the worker process) of one step."""
        self._send("step")
        seconds, loss, cpu = self._expect("STEP").split()
        return float(seconds), (None if loss == "None" else float(loss)), float(cpu)

    def finish(self, verbose: bool = False) -> dict[str, Any]:
        self._send("done")
        result = json.loads(self._expect("RESULT"))
        self.proc.stdin.close()
        self.proc.wait()
        if verbose:
            self.stderr.seek(0)
            sys.stderr.write(self.stderr.read())
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of input: the worker exits
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def run_workers(jobs: list[tuple[str, dict]], steps: int, threads: int, sequential: bool,
                verbose: bool = False, concurrent_setup: int = 1) -> dict[str, dict]:
    """Run every (name, spec) job for `steps` timed steps; returns per job step times, losses and
    the worker's final figures. Interleaved (default): all models are built and warmed up first
    (`concurrent_setup` workers at a time: warm-up is untimed, and a compiled model's cold compile
    is mostly single-threaded), then each cycle times one step of every model, one worker
    computing at a time, the starting model rotating from cycle to cycle, so that load changes on
    a shared machine hit all models alike. Sequential: one model after another (only one model
    in memory at a time)."""
    workers = [Worker(name, spec["kind"], threads) for name, spec in jobs]
    out = {name: {"step_times_s": [], "cpu_times_s": [], "losses": []} for name, _ in jobs}

    def record(worker: Worker) -> None:
        seconds, loss, cpu = worker.step()
        out[worker.name]["step_times_s"].append(seconds)
        out[worker.name]["cpu_times_s"].append(cpu)
        if loss is not None:
            out[worker.name]["losses"].append(loss)

    try:
        for worker in workers:
            worker.ready()
        if sequential:
            for worker, (name, spec) in zip(workers, jobs):
                worker.setup(spec)
                for _ in range(steps):
                    record(worker)
                out[name].update(worker.finish(verbose))
                _progress(f"{name}: median step {statistics.median(out[name]['step_times_s']) * 1e3:.1f} ms")
        else:
            pending = list(zip(workers, jobs))
            warming: list[tuple[Worker, str]] = []
            while pending or warming:
                while pending and len(warming) < max(1, concurrent_setup):
                    worker, (name, spec) = pending.pop(0)
                    worker.start_setup(spec)
                    warming.append((worker, name))
                worker, name = warming.pop(0)
                worker.wait_warm()
                _progress(f"{name}: built and warmed up")
            for cycle in range(steps):
                shift = cycle % len(workers)
                for worker in workers[shift:] + workers[:shift]:
                    record(worker)
                _progress(f"cycle {cycle + 1}/{steps} done")
            for worker, (name, _) in zip(workers, jobs):
                out[name].update(worker.finish(verbose))
    finally:
        for worker in workers:
            worker.close()
    return out


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- planning -------------------------------------------------------------------------------------


def _with(config, **changes):
    """`dataclasses.replace` for a MoRConfig (num_layers re-derived)."""
    return dataclasses.replace(config, num_layers=0, **changes)


def plan_models(base, recursions: Sequence[int], dtype_name: str,
                token_choice: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Model entries: vanilla at L, MoR at each Nr (depth rule; expert-choice at `recursions`,
    token-choice at `token_choice`), vanilla at each new L'."""
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
    routed = [("expert_choice", nr) for nr in recursions] + [("token_choice", nr) for nr in token_choice]
    for router, nr in routed:
        depth = paper_depth(L, nr)
        keep = keep_router and router == "expert_choice"
        config = _with(
            base,
            effective_layers=depth,
            num_recursions=nr,
            sharing="middle_cycle",
            router=router,
            capacities=None,
            router_activation=base.router_activation if keep else None,  # None: the router's default
            router_alpha=base.router_alpha if keep else None,
        )
        name = f"mor nr={nr}" if router == "expert_choice" else f"mor tc nr={nr}"
        mors.append({"name": name, "kind": "megatron", "role": "mor", "config": config,
                     "effective_layers": depth, "num_recursions": nr, "router": router})
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


def routing_flops(config, routing: Optional[dict], slots: int) -> dict[str, Any]:
    """Training FLOPs per token of a MoR job as run (the rows its shared block ran, pads
    included: `training_flops_per_token`) and as routed (`routed_flops_per_token`), from the
    per-step token counts its timed steps recorded (`routing`, each over the micro-batch's
    `slots` = B x S), and the padding overhead between them. Without routing statistics (vanilla,
    transformers): the analytic figure for both."""
    from mor_megatron.report import training_flops_per_token

    analytic = training_flops_per_token(config)
    if not routing or not routing.get("run_tokens"):
        return {"training_flops_per_token": analytic, "routed_flops_per_token": analytic,
                "padding_overhead": 0.0}

    def fractions(key: str) -> list[float]:
        steps = routing[key]
        return [sum(step[r] for step in steps) / len(steps) / slots for r in range(len(steps[0]))]

    run, routed = fractions("run_tokens"), fractions("selected_tokens")
    as_run, as_routed = training_flops_per_token(config, run), training_flops_per_token(config, routed)
    return {"training_flops_per_token": as_run, "routed_flops_per_token": as_routed,
            "padding_overhead": as_run / as_routed - 1.0, "run_fractions": run,
            "routed_fractions": routed, "analytic_flops_per_token": analytic}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _paired(a: dict, b: dict) -> float:
    """Median of the per-cycle ratios a/b: both steps of a cycle ran within seconds of each
    other, so a slow phase of a shared machine cancels out of the pair."""
    return statistics.median(x / y for x, y in zip(a["step_times_s"], b["step_times_s"]))


def _cpu_ratio(a: dict, b: dict) -> Optional[float]:
    """Ratio of the median CPU times of two jobs, where both were measured."""
    return a["cpu_time_s"] / b["cpu_time_s"] if a.get("cpu_time_s") and b.get("cpu_time_s") else None


def variants_present(models: dict[str, dict]) -> list[tuple[str, bool]]:
    return [v for v in VARIANTS if any((r.get("loop", "model"), r.get("compiled", False)) == v
                                       for r in models.values())]


def summarize(models: dict[str, dict], entries: list[dict], probe: dict,
              transformers_name: Optional[str], tokens_per_step: int, interleaved: bool = True) -> dict[str, Any]:
    """Medians, throughput, FLOP/s and every ratio, from the raw per-step times (in place).
    `models` holds one record per job (`job_name` of model, loop and compile setting)."""
    probe["tflops"] = statistics.median(probe["samples_tflops"])
    for record in models.values():
        times = record["step_times_s"]
        record["step_time_s"] = statistics.median(times)
        record["min_step_time_s"] = min(times)
        # process CPU time: on a shared machine, with one torch thread, what the step itself cost
        record["cpu_time_s"] = statistics.median(record["cpu_times_s"]) if record.get("cpu_times_s") else None
        record["tokens_per_s"] = tokens_per_step / record["step_time_s"]
        record["achieved_tflops"] = record["training_flops_per_token"] * record["tokens_per_s"] / 1e12
        record["fraction_of_probe"] = record["achieved_tflops"] / probe["tflops"]

    mor_vs_vanilla = []
    for loop, compiled in variants_present(models):
        for entry in entries:
            mor_name = job_name(entry["name"], loop, compiled)
            if entry["role"] != "mor" or mor_name not in models:
                continue
            vanilla_name = job_name(entry["vanilla"], loop, compiled)
            mor, vanilla = models[mor_name], models[vanilla_name]
            # as routed: the padding a layout adds counts as overhead, like routing and scatters
            routed_flops = mor.get("routed_flops_per_token", mor["training_flops_per_token"])
            flops_ratio = routed_flops / vanilla["training_flops_per_token"]
            target = TOKEN_CHOICE_TARGET if entry.get("router") == "token_choice" else OVERHEAD_TARGET
            time_ratio = mor["step_time_s"] / vanilla["step_time_s"]
            overhead = time_ratio / flops_ratio
            paired = _paired(mor, vanilla) / flops_ratio if interleaved else None
            mor_vs_vanilla.append({
                "mor": mor_name,
                "vanilla": vanilla_name,
                "variant": variant_name(loop, compiled),
                "loop": loop,
                "compiled": compiled,
                "num_recursions": entry["num_recursions"],
                "router": entry.get("router", "expert_choice"),
                "effective_layers": entry["effective_layers"],
                "flops_ratio": flops_ratio,
                "run_flops_ratio": mor["training_flops_per_token"] / vanilla["training_flops_per_token"],
                "padding_overhead": mor.get("padding_overhead", 0.0),
                "step_time_ratio": time_ratio,
                "overhead": overhead,
                # the same from the fastest step of each: less sensitive to a noisy neighbour
                "min_step_time_ratio": mor["min_step_time_s"] / vanilla["min_step_time_s"],
                "min_overhead": mor["min_step_time_s"] / vanilla["min_step_time_s"] / flops_ratio,
                "paired_overhead": paired,
                "cpu_overhead": _cpu_ratio(mor, vanilla) / flops_ratio if _cpu_ratio(mor, vanilla) else None,
                "memory_ratio": (mor["peak_memory_bytes"] / vanilla["peak_memory_bytes"]
                                 if vanilla["peak_memory_bytes"] else None),
                "target": target,
                # the paired figure where there is one: medians of a shared machine drift apart
                "verdict": _verdict((paired if paired is not None else overhead) <= target),
            })

    trainer_overhead = []
    for compiled in (False, True):
        for entry in entries:
            model = models.get(job_name(entry["name"], "model", compiled))
            trainer = models.get(job_name(entry["name"], "trainer", compiled))
            if model is None or trainer is None:
                continue
            ratio = trainer["step_time_s"] / model["step_time_s"]
            paired = _paired(trainer, model) if interleaved else None
            trainer_overhead.append({
                "model": entry["name"],
                "trainer": job_name(entry["name"], "trainer", compiled),
                "model_only": job_name(entry["name"], "model", compiled),
                "compiled": compiled,
                "step_time_ratio": ratio,
                "min_step_time_ratio": trainer["min_step_time_s"] / model["min_step_time_s"],
                "paired_ratio": paired,
                "cpu_ratio": _cpu_ratio(trainer, model),
                "target": TRAINER_TARGET,
                "verdict": _verdict((paired if paired is not None else ratio) <= TRAINER_TARGET),
            })

    compile_speedup = []
    for loop in LOOPS:
        for entry in entries:
            eager = models.get(job_name(entry["name"], loop, False))
            compiled = models.get(job_name(entry["name"], loop, True))
            if eager is None or compiled is None:
                continue
            compile_speedup.append({
                "model": entry["name"], "loop": loop,
                "tokens_per_s_ratio": compiled["tokens_per_s"] / eager["tokens_per_s"],
                "paired_ratio": _paired(eager, compiled) if interleaved else None,
            })

    out: dict[str, Any] = {"mor_vs_vanilla": mor_vs_vanilla, "trainer_overhead": trainer_overhead,
                           "compile_speedup": compile_speedup}
    if transformers_name is not None and entries and entries[0]["name"] in models:
        ours = models[entries[0]["name"]]
        theirs = models[transformers_name]
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        out["ours_vs_transformers"] = {
            "ours": entries[0]["name"],
            "transformers": transformers_name,
            "ours_tokens_per_s": ours["tokens_per_s"],
            "transformers_tokens_per_s": theirs["tokens_per_s"],
            "tokens_per_s_ratio": ratio,
            "min_step_time_ratio": theirs["min_step_time_s"] / ours["min_step_time_s"],
            "target": TRANSFORMERS_TARGET,
            "verdict": _verdict(ratio >= TRANSFORMERS_TARGET),
        }
    out["model_flops_utilization"] = [
        {
            "model": name,
            "achieved_tflops": record["achieved_tflops"],
            "probe_tflops": probe["tflops"],
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

    def line(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _maybe(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(report: dict[str, Any]) -> str:
    s, probe = report["settings"], report["probe"]
    lines = [
        f"device: {report['device']}  dtype: {s['dtype']}",
        f"shape: hidden {s['hidden_size']}, heads {s['num_attention_heads']}, query groups "
        f"{s['num_query_groups']}, ffn {s['ffn_hidden_size']}, vocab {s['vocab_size']}, "
        f"base L={s['effective_layers']} (config {s['config']})",
        f"batch {s['batch_size']} x seq {s['seq_length']} = {s['tokens_per_step']} tokens/step; "
        f"{s['steps']} timed steps per model after {s['warmup']} warm-up, "
        + ("one model at a time" if s["sequential"] else "interleaved step by step across models"),
        f"loops: {', '.join(s['loops'])}; compile: {s['compile']}; gradient clip: "
        + (f"{s['grad_clip']:g} in every loop" if s.get("grad_clip") else "none"),
        f"dense mm probe ({s['dtype']}, {probe['size']}x{probe['size']}, "
        + ("timed before the models" if s["sequential"] else "timed in the same cycles")
        + f"): median {probe['tflops'] * 1e3:.1f} GFLOP/s, best "
        f"{max(probe['samples_tflops']) * 1e3:.1f}",
        f"memory: {report['memory_method']}",
        *(f"note: {note}" for note in report.get("notes", [])),
        "",
    ]
    rows = []
    for name, r in report["models"].items():
        spread = (max(r["step_times_s"]) - min(r["step_times_s"])) / r["step_time_s"]
        rows.append([
            name, r["effective_layers"], r["unique_layers"], f"{r['params'] / 1e6:.2f}M",
            f"{r['step_time_s'] * 1e3:.1f}", f"{r['min_step_time_s'] * 1e3:.1f}", f"{100 * spread:.0f}%",
            f"{r['tokens_per_s']:.0f}", f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['training_flops_per_token'] / 1e6:.1f}",
            f"{r['achieved_tflops'] * 1e3:.1f}", f"{100 * r['fraction_of_probe']:.0f}%",
        ])
    lines.append(_table(
        ["job", "L", "unique", "params", "median ms", "min ms", "spread", "tok/s", "peak MiB",
         "MFLOP/tok", "GFLOP/s", "of probe"], rows))
    lines.append("")

    variants = [tuple(v) for v in report["variants"]]
    if variants:
        rows = []
        for model in report["model_names"]:
            cells = []
            for loop, compiled in variants:
                r = report["models"].get(job_name(model, loop, compiled))
                cells.append(f"{r['tokens_per_s']:.0f} ({100 * r['fraction_of_probe']:.0f}%)" if r else "-")
            rows.append([model] + cells)
        lines.append(_table(["tokens/s (of probe)"] + [variant_name(*v) for v in variants], rows))
        lines.append("")
    c = report["comparisons"]
    rows = [[m["mor"], f"{m['effective_layers']}", m["vanilla"], f"{m['flops_ratio']:.3f}",
             f"{100 * m.get('padding_overhead', 0.0):+.1f}%", f"{m['step_time_ratio']:.3f}",
             f"{m['overhead']:.3f}", f"{m['min_overhead']:.3f}",
             f"{m['paired_overhead']:.3f}" if m["paired_overhead"] is not None else "-",
             _maybe(m.get("cpu_overhead")),
             f"{m['memory_ratio']:.2f}" if m["memory_ratio"] is not None else "-",
             f"<= {m['target']:.2f}", m["verdict"]] for m in c["mor_vs_vanilla"]]
    lines.append(_table(["MoR vs vanilla", "L'", "vs", "FLOPs ratio", "padding", "time ratio",
                         "time/FLOPs", "(min-based)", "(paired)", "(CPU time)", "mem ratio", "target", ""],
                        rows))
    if c["trainer_overhead"]:
        rows = [[t["trainer"], t["model_only"], f"{t['step_time_ratio']:.3f}", f"{t['min_step_time_ratio']:.3f}",
                 f"{t['paired_ratio']:.3f}" if t["paired_ratio"] is not None else "-",
                 _maybe(t.get("cpu_ratio")), f"<= {t['target']:.2f}", t["verdict"]] for t in c["trainer_overhead"]]
        lines += ["", _table(["trainer vs model-only", "vs", "time ratio", "(min-based)", "(paired)",
                              "(CPU time)", "target", ""], rows)]
    if c["compile_speedup"]:
        rows = [[f"{t['model']} ({t['loop']})", f"{t['tokens_per_s_ratio']:.3f}",
                 f"{t['paired_ratio']:.3f}" if t["paired_ratio"] is not None else "-"]
                for t in c["compile_speedup"]]
        lines += ["", _table(["compiled vs eager tokens/s", "ratio", "(paired)"], rows)]
    if "ours_vs_transformers" in c:
        t = c["ours_vs_transformers"]
        lines += ["", f"{t['ours']} vs {t['transformers']}: tokens/s {t['ours_tokens_per_s']:.0f} / "
                  f"{t['transformers_tokens_per_s']:.0f} = {t['tokens_per_s_ratio']:.3f} "
                  f"(min-based {t['min_step_time_ratio']:.3f}; target >= {t['target']:.2f}) "
                  f"{t['verdict']}"]
    lines.append("")
    rows = [[m["model"], f"{m['achieved_tflops'] * 1e3:.1f}", f"{m['probe_tflops'] * 1e3:.1f}",
             f"{m['fraction']:.3f}", f">= {m['target']:.2f}", m["verdict"]]
            for m in c["model_flops_utilization"]]
    lines.append(_table(["model FLOP/s vs probe", "GFLOP/s", "probe", "fraction", "target", ""], rows))
    lines += ["", "FLOPs ratio: as routed (tokens the routers sent through each step); padding: the rows run "
              "(pads included, what MFLOP/tok counts) over those, in FLOPs; time/FLOPs counts padding as overhead",
              "verdicts: MoR vs vanilla and trainer vs model-only from the paired per-cycle ratios "
              "(medians when --sequential), the rest from the medians; spread = (max - min) / median step; "
              "CPU time: the process's, a check on a shared machine with --threads 1; targets are informational (PASS/MISS never changes the exit status)"]
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


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, non_negative_int, positive_float, positive_int, seed

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = ToolParser(prog="bench_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML config whose model shape is benchmarked (default {DEFAULT_CONFIG} "
                        f"with {' '.join(DEFAULT_SHAPE)} unless overridden)")
    parser.add_argument("--seq-length", type=positive_int, help="sequence length (default: the config's)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=8, help="timed steps per job")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help=f"untimed steps before them (compiled jobs: at least {COMPILED_WARMUP})")
    parser.add_argument("--threads", type=positive_int, default=cores,
                        help=f"CPU torch threads per model (default: all cores, {cores})")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--recursions", default="2,3,4", help="expert-choice MoR Nr values, comma-separated")
    parser.add_argument("--token-choice", default="3",
                        help="token-choice MoR Nr values, comma-separated ('' for none)")
    parser.add_argument("--loops", default="model,trainer",
                        help="what a step is: 'model' (the model-only loop: forward, loss, backward, "
                        "torch AdamW on a fixed batch), 'trainer' (mor-pretrain's loop: DeepSpeed, "
                        "data loader, router statistics, logging; checkpoints off), or both")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both",
                        help="eager, per-layer torch.compile (training.compile), or both side by side")
    parser.add_argument("--setup-parallel", type=positive_int, default=cores,
                        help=f"workers building and warming up at once (untimed; default {cores})")
    parser.add_argument("--sequential", action="store_true",
                        help="one model at a time instead of all built and interleaved step by "
                        "step (use when the models do not fit in memory together)")
    parser.add_argument("--lr", type=positive_float, default=1e-4)
    parser.add_argument("--seed", type=seed, default=1234)
    parser.add_argument("--probe-size", type=positive_int, help="dense mm size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers LlamaForCausalLM comparison")
    parser.add_argument("--transformers-with-shims", action="store_true",
                        help="run transformers under the same CPU shims as megatron (diagnostic)")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("overrides", nargs="*", help="model.key=value overrides of the config; "
                        "training.key=value / logging.key=value: of the trainer jobs' run config")
    parser.add_argument("--worker", choices=("megatron", "trainer", "transformers", "probe"),
                        help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.loop_list = [loop.strip() for loop in args.loops.split(",") if loop.strip()]
    if not args.loop_list or set(args.loop_list) - set(LOOPS):
        parser.error(f"--loops {args.loops}: give model, trainer or model,trainer")
    # the CPU smoke config, widened to a shape worth timing
    args.shape_defaults = list(DEFAULT_SHAPE) if args.config == DEFAULT_CONFIG else []
    if not Path(args.config).exists() and (REPO / args.config).exists():
        args.config = str(REPO / args.config)  # repo-relative, from any working directory
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _benchmark(args), debug=args.debug)


def plan_jobs(entries: list[dict], variants: Sequence[tuple[str, bool]], common: dict,
              work: Optional[str], data_prefix: Optional[str]) -> list[tuple[str, dict]]:
    """(job name, worker spec) per megatron model and variant, variant by variant."""
    from mor_megatron.yaml_config import dump_model_config

    jobs = []
    for loop, compiled in variants:
        for entry in entries:
            name = job_name(entry["name"], loop, compiled)
            spec = dict(common, kind="megatron" if loop == "model" else "trainer",
                        model=dump_model_config(entry["config"]), compile=compiled)
            if compiled:  # the first step compiles, the second may meet new shapes
                spec["warmup"] = max(COMPILED_WARMUP, spec["warmup"])
            if loop == "trainer":
                spec.update(run_dir=str(Path(work) / f"run_{len(jobs)}"), data_prefix=data_prefix)
            jobs.append((name, spec))
    return jobs


def trainer_grad_clip(trainer_overrides: Sequence[str]) -> float:
    """The gradient-clip norm of the trainer jobs (`training.grad_clip`: the user's override, else
    the trainer's default; 0: no clipping), which the model-only loop clips to as well: both loops
    then run the same update, and the clip is not counted as the trainer's overhead."""
    from mor_megatron.training.config import TrainingConfig
    from mor_megatron.yaml_config import apply_overrides

    training = apply_overrides({}, list(trainer_overrides)).get("training", {})
    return float(training.get("grad_clip", TrainingConfig().grad_clip))


def _benchmark(args: argparse.Namespace) -> int:
    import torch

    from mor_megatron.errors import UserError
    from mor_megatron.yaml_config import load_model_config

    overrides = list(args.overrides)
    # training.* / logging.*: settings of the trainer jobs' run config (mor-pretrain's own overrides)
    trainer_overrides = [o for o in overrides if o.startswith(("training.", "logging."))]
    overrides = args.shape_defaults + [o for o in overrides if o not in trainer_overrides]  # the user's win
    if args.seq_length:
        overrides.append(f"model.seq_length={args.seq_length}")
    try:
        recursions = [int(x) for x in args.recursions.split(",") if x.strip()]
    except ValueError:
        recursions = []
    if not recursions or min(recursions) < 2:
        raise UserError(f"--recursions {args.recursions}: give comma-separated Nr values of at least 2")
    try:
        token_choice = [int(x) for x in args.token_choice.split(",") if x.strip()]
    except ValueError:
        token_choice = [0]
    if token_choice and min(token_choice) < 2:
        raise UserError(f"--token-choice {args.token_choice}: give comma-separated Nr values of at least 2, "
                        "or '' for none")
    base = load_model_config(args.config, overrides)
    try:
        entries = plan_models(base, recursions, args.dtype, token_choice)
    except ValueError as err:
        raise UserError(str(err)) from err

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else _cpu_name(args.threads)
    probe_size = args.probe_size or (8192 if cuda else 2048)
    seq, batch = base.seq_length, args.batch_size
    tokens_per_step = seq * batch
    common = dict(batch_size=batch, seq_length=seq, vocab_size=base.vocab_size,
                  warmup=args.warmup, steps=args.steps, threads=args.threads, dtype=args.dtype,
                  seed=args.seed, lr=args.lr, grad_clip=trainer_grad_clip(trainer_overrides),
                  trainer_overrides=trainer_overrides)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    variants = [(loop, compiled) for loop, compiled in VARIANTS
                if loop in args.loop_list and compiled in compile_modes]

    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        data_prefix = None
        if "trainer" in args.loop_list:
            from mor_megatron.tools.bench_train_trainer import shard_samples, write_random_shard

            data_prefix = str(Path(work) / "random_tokens")
            write_random_shard(data_prefix, base.vocab_size, seq,
                               shard_samples(args.warmup, args.steps, batch), args.seed)
        jobs = [("dense mm probe", dict(common, kind="probe", probe_size=probe_size,
                                        warmup=max(2, args.warmup)))]
        jobs += plan_jobs(entries, variants, common, work, data_prefix)
        model_entries = list(entries)
        transformers_name = None
        if not args.no_transformers and ("model", False) in variants:
            vanilla = entries[0]["config"]
            transformers_name = f"transformers L={vanilla.effective_layers}"
            entries.append({"name": transformers_name, "kind": "transformers", "role": "reference",
                            "config": vanilla, "effective_layers": vanilla.effective_layers})
            jobs.append((transformers_name, dict(common, kind="transformers",
                                                 llama=llama_shape(vanilla),
                                                 with_shims=args.transformers_with_shims)))

        _progress(f"{len(jobs) - 1} jobs + probe, {args.steps} timed steps each, on {device}")
        try:
            measured = run_workers(jobs, args.steps, args.threads, args.sequential, args.verbose,
                                   concurrent_setup=args.setup_parallel)
        except WorkerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    models: dict[str, dict] = {}
    notes: list[str] = []
    for entry in entries:
        config = entry["config"]
        for loop, compiled in variants if entry["kind"] == "megatron" else [("model", False)]:
            name = job_name(entry["name"], loop, compiled)
            models[name] = {
                "model": entry["name"],
                "loop": loop,
                "compiled": compiled,
                "kind": entry["kind"],
                "role": entry["role"],
                "effective_layers": entry["effective_layers"],
                "unique_layers": config.num_layers if entry["kind"] == "megatron" else config.effective_layers,
                "num_recursions": entry.get("num_recursions", 1),
                "router": config.router if entry["kind"] == "megatron" else "none",
                **measured[name],
            }
            models[name].update(routing_flops(config, measured[name].get("routing"), tokens_per_step))
            if compiled and not models[name].get("compiled_layers"):
                notes.append(f"{name}: no layer was compiled (training.compile / compile_layers did "
                             "nothing): its figures are eager ones")
    probe_result = measured["dense mm probe"]
    probe = {
        "size": probe_size,
        "dtype": args.dtype,
        "samples_tflops": [2 * probe_size**3 / t / 1e12 for t in probe_result["step_times_s"]],
        "step_times_s": probe_result["step_times_s"],
    }
    comparisons = summarize(models, model_entries, probe, transformers_name, tokens_per_step,
                            interleaved=not args.sequential)
    report = {
        "device": device,
        "settings": {
            "config": args.config,
            "overrides": overrides,
            "trainer_overrides": trainer_overrides,
            "grad_clip": common["grad_clip"],  # both loops clip to it (0: neither)
            "dtype": args.dtype,
            "threads": args.threads,
            "batch_size": batch,
            "seq_length": seq,
            "tokens_per_step": tokens_per_step,
            "steps": args.steps,
            "warmup": args.warmup,
            "sequential": args.sequential,
            "recursions": recursions,
            "token_choice": token_choice,
            "loops": args.loop_list,
            "compile": args.compile,
            "effective_layers": base.effective_layers,
            "hidden_size": base.hidden_size,
            "num_attention_heads": base.num_attention_heads,
            "num_query_groups": base.num_query_groups or base.num_attention_heads,
            "ffn_hidden_size": base.ffn_hidden_size,
            "vocab_size": base.vocab_size,
            "transformers_with_shims": args.transformers_with_shims,
            "torch": torch.__version__,
        },
        "notes": notes,
        "variants": [list(v) for v in variants],
        "model_names": [e["name"] for e in entries],
        "probe": probe,
        "memory_method": "; ".join(sorted({m["memory_method"] for m in models.values()})),
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
