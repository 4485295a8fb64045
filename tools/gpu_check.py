"""The project's one-call check on one GPU: every GPU-only claim measured in one command.

    python tools/gpu_check.py [--wheels .whl] [--out DIR] [--steps a,b,...]   # on a CUDA host
    python tools/gpu_check.py --dry-run                                      # the same at toy sizes on CPU

Steps (each in its own subprocesses under its own time limit; a failure or a timeout is recorded
and the next step runs; the whole check stays within `--budget-s`, 480 s by default):

  a. `pytest -m cuda` over the suite (the CUDA-marked tests; they skip without CUDA).
  b. `mor-pretrain` on configs/tiny.yaml (the embedded stdlib corpus, a tokenizer trained on the
     spot): 20 steps, bf16, NCCL, a checkpoint at step 10; then a second run resumed from a copy
     of that checkpoint in another run directory, whose steps 11-20 must equal the uninterrupted
     run's. Both run with torch's deterministic algorithms (warn-only) and a fixed cuBLAS
     workspace, so equal is expected bit for bit; where a kernel has no deterministic variant
     the losses may differ by the rounding of a bf16 gradient, hence the bound
     |delta loss| <= 2^-8 x |loss| (one bf16 rounding step of the loss, about 0.4%): within it the
     step passes with the difference recorded as a finding; beyond it, it fails. On CPU: exact.
  c. two processes sharing the one GPU over gloo (MOR_DEVICE=cuda:0 MOR_DIST_BACKEND=gloo; NCCL
     refuses two ranks on one GPU), data parallel 2 and tensor parallel 2, 5 steps each in fp32
     from the same initial weights, against a one-process run: loss and gradient norm within
     1e-4 relative (the CPU suite holds 1e-5; GPU kernels sum in shape-dependent orders, so a 10x
     margin; CPU dry run: 1e-5). A collective that gloo cannot run on CUDA tensors marks the
     layout skipped, naming the op, instead of failed.
  d. `tools/convert_to_hf.py` of step b's checkpoint; transformers' greedy `generate()` of the
     exported folder (trust_remote_code) on the GPU against the project's engine
     (`tools/generate.py --greedy`) for a few prompts: the same tokens.
  e. `tools/bench_train.py --dtype bfloat16` at the paper's 360M shape, sequence 2048: vanilla,
     MoR-2, MoR-3 tokens/s, MFU against the chip's dense bf16 peak, peak memory, the ratios
     (targets: MoR-2 >= 1.23x, MoR-3 >= 1.30x vanilla tokens/s; vanilla MFU >= 40%).
  f. `tools/bench_decode.py` at the paper's 360M shape (L=32 for MoR-2/3, L=34 for MoR-4, each
     against the vanilla model of its depth) at batch 32 and at the largest batch of an 8000 MiB
     budget (weights + KV caches, below the 1024 cap for every model); targets at the max batch:
     MoR-4 >= 2.06x, MoR-2 >= 1.60x vanilla tokens/s.
  g. the Triton kernel tests compiled (tests/test_kernels_gated_scatter.py, no TRITON_INTERPRET)
     and `tools/bench_kernels.py`.
A missed performance target is a finding, recorded, not a failure.

Writes into `--out` (default `$OUT` if set, else runs/gpu_check): `gpu_check.json`,
`gpu_check.md` (both rewritten after every step, so a killed run still leaves its results) and
one log per step. Work files (corpus, runs, checkpoints, the HF export, installed wheels) go to
`--work` (default runs/gpu_check_work), outside `--out`.

`--wheels DIR` (built by tools/gpu_wheels.sh): wheels of what the host lacks (megatron-core,
DeepSpeed, datasets and their needs), installed offline with `pip install --no-index --no-deps
--target WORK/site` (or unpacked, where pip is missing), for every wheel whose package the host
lacks or has in an older version; the steps run with PYTHONPATH=<repo>:WORK/site.

This file imports only the standard library (the check must report even where torch breaks);
the hidden `--worker` modes are the small programs some steps run in their own process.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
TAG = "[gpu_check]"
WORK_MARKER = ".gpu_check_work"
TAIL_LINES = 30

# b: tolerance of the resumed run (see the module docstring); cuBLAS is deterministic only with a
# fixed workspace configuration
BF16_RESUME_REL = 2.0**-8
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# c: tolerance of the two-process layouts against one process
GPU_LAYOUT_REL, CPU_LAYOUT_REL = 1e-4, 1e-5
# e / f: the targets (paper ratios; MFU as a share of the chip's dense bf16 peak)
TRAIN_TARGETS = {2: 1.23, 3: 1.30}
TRAIN_MFU_TARGET = 0.40
DECODE_TARGETS = {4: 2.06, 2: 1.60}

PROMPTS = (
    "def main():\n",
    "import os\nimport sys\n\n",
    "class Parser:\n    def __init__(self",
    "for index in range(",
)

# packages whose versions the environment record names (those the host brings and the wheels)
PACKAGES = (
    "torch", "triton", "transformers", "tokenizers", "safetensors", "megatron-core", "deepspeed",
    "datasets", "numpy", "pyarrow", "pytest", "PyYAML", "tensorboard", "pydantic", "packaging",
    "typing-extensions", "huggingface-hub", "transformer-engine",
)


# -- results -------------------------------------------------------------------------------------


class StepTimeout(Exception):
    """The step ran past its limit; its processes were killed. `output`: what the killed
    command had printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class StepFailed(Exception):
    """A command of the step failed; the message is one line."""


@dataclass
class Outcome:
    status: str  # passed | failed | skipped
    reason: str = ""
    findings: list[str] = field(default_factory=list)


@dataclass
class Proc:
    rc: int
    output: str
    seconds: float


class Context:
    """What every step gets: settings, paths, the environment of its commands, its log."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path, env: dict[str, str]) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.out = out
        self.work = work
        self.env = env
        self.python = sys.executable
        self.environment: dict[str, Any] = {}
        self.log = out / "setup.log"
        self.deadline = float("inf")
        self.figures: dict[str, Any] = {}  # filled as a step goes, kept even if it times out

    @property
    def cuda(self) -> bool:
        return bool(self.environment.get("cuda_available")) and not self.dry

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: Sequence[str], *, what: str, env: Optional[dict[str, str]] = None,
            check: bool = True) -> Proc:
        """Run `cmd` from the repo root, output appended to the step's log, killed (with every
        process it started) at the step's deadline."""
        timeout = self.remaining()
        if timeout <= 1:
            raise StepTimeout(f"no time left for {what}")
        full_env = dict(self.env, **(env or {}))
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n$ {shlex.join(str(c) for c in cmd)}\n")
            log.flush()
            start_offset = log.tell()
            started = time.monotonic()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                rc = None
            seconds = time.monotonic() - started
            log.write(f"\n{TAG} {'killed at the step limit' if rc is None else f'exit {rc}'} after {seconds:.1f} s\n")
        with open(self.log, encoding="utf-8", errors="replace") as log:
            log.seek(start_offset)
            output = log.read()
        if rc is None:
            raise StepTimeout(f"{what} ran past the step's limit", output)
        if check and rc != 0:
            raise StepFailed(f"{what} exited {rc}: {error_line(output)}")
        return Proc(rc, output, seconds)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every descendant (torchrun starts its workers in
    sessions of their own, so the group alone would leave them running)."""
    victims = [proc.pid] + descendants(proc.pid)
    for pid in victims:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def error_line(output: str) -> str:
    """The most telling line of a failed command: its `error: ...` line, else the last
    exception line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(TAG)]
    for pattern in (r"^error: ", r"^(\w+\.)*\w*(Error|Exception)\b", r"^FAILED "):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "(no output)"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- shared pieces: corpus, training launches, metrics ----------------------------------------------


def toy_overrides(ctx: Context) -> list[str]:
    """configs/tiny.yaml as it is on the GPU; smaller still for the CPU dry run."""
    if not ctx.dry:
        return []
    return ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.vocab_size=512",
            "model.seq_length=32", "training.global_batch_size=4"]


def ensure_corpus(ctx: Context) -> list[str]:
    """The embedded stdlib corpus with its own BPE (as launch/quickstart.sh makes it, fewer
    documents); returns the data overrides."""
    data = ctx.work / "data"
    prefix = data / "stdlib"
    if not (prefix.with_name("stdlib_train.idx").is_file() and (data / "tokenizer").is_dir()):
        # vocab: model.vocab_size; held out: a few documents, enough rows for a validation pass
        docs, vocab, held_out = ("20", "512", "0.1") if ctx.dry else ("600", "4096", "0.01")
        workers = "1" if ctx.dry else str(min(4, os.cpu_count() or 1))
        ctx.run([ctx.python, "tools/preprocess_data.py", "--input", "stdlib", "--output-prefix", prefix,
                 "--train-tokenizer", "--vocab-size", vocab, "--max-documents", docs,
                 "--validation-fraction", held_out, "--workers", workers, "--no-progress"],
                what="preprocess_data.py")
    return [f"data.train={prefix}_train", f"data.valid={prefix}_valid", f"data.tokenizer={data / 'tokenizer'}"]


def common_overrides(ctx: Context) -> list[str]:
    return ensure_corpus(ctx) + toy_overrides(ctx) + ["logging.tensorboard=false", "logging.progress=false"]


def pretrain_cmd(ctx: Context, run_dir: Path, overrides: list[str], nproc: int = 1,
                 deterministic: bool = False) -> list[str]:
    """The real CLI (`python -m mor_megatron.pretrain`), under torchrun for several processes;
    `deterministic`: through this file's worker, which turns on torch's deterministic
    algorithms and then calls the same `mor_megatron.pretrain.main`."""
    args = ["--config", "configs/tiny.yaml", f"logging.dir={run_dir}", *overrides]
    if nproc > 1:
        return [ctx.python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "-m", "mor_megatron.pretrain", *args]
    if deterministic:
        return [ctx.python, str(Path(__file__).resolve()), "--worker", "pretrain-deterministic", "--", *args]
    return [ctx.python, "-m", "mor_megatron.pretrain", *args]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in rows if key in row}


def train_checkpointed_run(ctx: Context, run_dir: Path, steps: int, save_every: int) -> list[str]:
    """The uninterrupted run of step b (step d reuses it when b did not run); returns its overrides."""
    overrides = common_overrides(ctx) + [f"training.train_steps={steps}", f"training.save_interval={save_every}"]
    if ctx.cuda:
        overrides.append("training.bf16=true")
    ctx.run(pretrain_cmd(ctx, run_dir, overrides, deterministic=True), what="uninterrupted run",
            env=DETERMINISTIC_ENV)
    return overrides


def tag_for(step: int) -> str:
    return f"step_{step:08d}"  # mor_megatron.training.checkpoint_files.tag_for


# -- a. CUDA-marked tests ---------------------------------------------------------------------------


def parse_pytest(output: str) -> dict[str, Any]:
    """Counts of the pytest summary line, skip reasons (-rs) and failed test ids."""
    counts: dict[str, int] = {}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    if summary:
        words = r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)"
        for number, word in re.findall(words, summary[-1]):
            counts["errors" if word.startswith("error") else word] = int(number)
    skips = [m.group(1).strip() for m in re.finditer(r"^SKIPPED \[\d+\] (.*)$", output, re.M)]
    failed = [m.group(1).strip() for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", output, re.M)]
    return {"counts": counts, "skip_reasons": skips[:12], "failed": failed[:20]}


def pytest_outcome(proc: Proc, figures: dict[str, Any], what: str) -> Outcome:
    counts = figures["counts"]
    if proc.rc == 5:
        return Outcome("skipped", f"{what}: no test collected")
    if proc.rc != 0:
        failed = ", ".join(figures["failed"][:5]) or error_line(proc.output)
        return Outcome("failed", f"{what}: {failed}")
    if not counts.get("passed") and counts.get("skipped"):
        reasons = sorted({r.split(": ", 1)[-1] for r in figures["skip_reasons"]})
        return Outcome("skipped", f"{what}: all {counts['skipped']} skipped ({'; '.join(reasons)[:200]})")
    return Outcome("passed")


def step_cuda_tests(ctx: Context) -> Outcome:
    proc = ctx.run([ctx.python, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                   what="pytest -m cuda", check=False)
    ctx.figures.update(parse_pytest(proc.output))
    return pytest_outcome(proc, ctx.figures, "CUDA-marked tests")


# -- b. train, checkpoint, resume --------------------------------------------------------------------


def resume_tolerance(loss: float, cuda: bool) -> float:
    return BF16_RESUME_REL * abs(loss) if cuda else 0.0


def step_train_resume(ctx: Context) -> Outcome:
    steps, save = (6, 3) if ctx.dry else (20, 10)
    full, resumed = ctx.work / "b_full", ctx.work / "b_resumed"
    overrides = train_checkpointed_run(ctx, full, steps, save)
    # the second run: a copy of the step-10 checkpoint in a run directory of its own
    source = full / "checkpoints" / tag_for(save)
    if not source.is_dir():
        raise StepFailed(f"the uninterrupted run left no checkpoint {source}")
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, resumed / "checkpoints" / source.name)
    (resumed / "checkpoints" / "latest").write_text(source.name)
    proc = ctx.run(pretrain_cmd(ctx, resumed, overrides, deterministic=True), what="resumed run",
                   env=DETERMINISTIC_ENV)
    if "resumed from" not in proc.output:
        raise StepFailed("the second run did not report 'resumed from' (it started over?)")

    first, second = metrics(full), metrics(resumed)
    loss_a, loss_b = by_step(first, "train/loss"), by_step(second, "train/loss")
    grad_a, grad_b = by_step(first, "train/grad_norm"), by_step(second, "train/grad_norm")
    compared = list(range(save + 1, steps + 1))
    if sorted(loss_b) != compared or any(s not in loss_a for s in compared):
        raise StepFailed(f"resumed run logged steps {sorted(loss_b)}, expected {compared}")
    loss_delta = max(abs(loss_a[s] - loss_b[s]) for s in compared)
    grad_delta = max(abs(grad_a[s] - grad_b[s]) for s in compared)
    tolerance = resume_tolerance(min(abs(loss_a[s]) for s in compared), ctx.cuda)
    speeds = [row["train/tokens_per_s"] for row in first[1:] if "train/tokens_per_s" in row]
    ctx.figures.update({
        "precision": "bf16" if ctx.cuda else "fp32",
        "steps": steps, "checkpoint_step": save,
        "loss_uninterrupted": [round(loss_a[s], 6) for s in compared],
        "loss_resumed": [round(loss_b[s], 6) for s in compared],
        "max_abs_loss_delta": loss_delta, "max_abs_grad_norm_delta": grad_delta,
        "bit_exact": loss_delta == 0.0 and grad_delta == 0.0,
        "tolerance_abs_loss": tolerance,
        "final_valid_loss": first[-1].get("valid/loss"),
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
    })
    if loss_delta == 0.0 and grad_delta == 0.0:
        return Outcome("passed")
    if loss_delta <= tolerance:
        return Outcome("passed", findings=[
            f"resume is not bit-exact under deterministic settings: max |delta loss| {loss_delta:.3g} "
            f"(bound {tolerance:.3g}), max |delta grad norm| {grad_delta:.3g}"])
    return Outcome("failed", f"resumed losses differ from the uninterrupted run by up to {loss_delta:.3g} "
                             f"(bound {tolerance:.3g})")


# -- c. two processes on one GPU over gloo -------------------------------------------------------------

COLLECTIVES = (
    "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter", "all_gather_into_tensor",
    "allgather_into_tensor", "_allgather_base", "all_gather", "allgather", "all_reduce", "allreduce",
    "all_to_all", "alltoall", "broadcast", "barrier", "reduce", "gather", "scatter", "send", "recv",
)
GLOO_REFUSALS = (
    re.compile(r"no support for (\w+) in Gloo", re.I),
    re.compile(r"Gloo\w*(?:::(\w+))?.{0,120}?(?:not supported|unsupported|does not support|not implemented|"
               r"only supports? CPU|expect(?:s|ed)? (?:a )?CPU|must be (?:on )?CPU)", re.I),
    re.compile(r"(?:not supported|unsupported|does not support|not implemented).{0,80}?\bgloo\b", re.I),
)


def gloo_limitation(output: str) -> Optional[str]:
    """'op: the error line' where gloo refused a collective on CUDA tensors, else None."""
    for line in output.splitlines():
        for pattern in GLOO_REFUSALS:
            match = pattern.search(line)
            if not match:
                continue
            named = next((g for g in match.groups() if g), None) if match.groups() else None
            op = named or next((c for c in COLLECTIVES if re.search(rf"\b{c}\b", line)), "a collective")
            return f"{op}: {line.strip()[:240]}"
    return None


def compare_series(ours: list[dict], reference: list[dict], rel: float) -> tuple[float, Optional[str]]:
    """(largest relative difference of loss and grad norm, a problem or None)."""
    worst = 0.0
    for key in ("train/loss", "train/grad_norm"):
        mine, theirs = by_step(ours, key), by_step(reference, key)
        if sorted(mine) != sorted(theirs) or not theirs:
            return worst, f"{key}: logged steps {sorted(mine)} vs {sorted(theirs)}"
        for step, value in theirs.items():
            worst = max(worst, abs(mine[step] - value) / max(abs(value), 1e-12))
    return worst, (None if worst <= rel else f"differs from one process by {worst:.3g} relative (bound {rel:g})")


def step_two_processes(ctx: Context) -> Outcome:
    steps = 3 if ctx.dry else 5
    rel = GPU_LAYOUT_REL if ctx.cuda else CPU_LAYOUT_REL
    base = common_overrides(ctx) + [f"training.train_steps={steps}", "training.bf16=false"]
    init = ctx.work / "c_init"  # every layout starts from these weights (TP shards its own init)
    ctx.run([ctx.python, "tools/init_weights.py", "--config", "configs/tiny.yaml", "--output", init, *base],
            what="init_weights.py")
    base.append(f"training.init_from={init}")
    reference = ctx.work / "c_single"
    ctx.run(pretrain_cmd(ctx, reference, base), what="one-process reference")
    ref_rows = metrics(reference)
    shared = {"MOR_DEVICE": "cuda:0", "MOR_DIST_BACKEND": "gloo"} if ctx.cuda else {}
    layouts = {"dp2": ["training.micro_batch_size=1"], "tp2": ["parallel.tensor_model_parallel_size=2"]}
    results: dict[str, dict[str, Any]] = {}
    ctx.figures.update({"backend": "gloo", "device": "cuda:0 (shared)" if ctx.cuda else "cpu",
                        "precision": "fp32", "steps": steps, "tolerance_rel": rel, "layouts": results})
    for name, layout in layouts.items():
        run_dir = ctx.work / f"c_{name}"
        proc = ctx.run(pretrain_cmd(ctx, run_dir, base + layout, nproc=2), what=f"{name} (2 processes)",
                       env=shared, check=False)
        if proc.rc != 0:
            refused = gloo_limitation(proc.output)
            if refused:
                results[name] = {"status": "skipped", "reason": f"gloo cannot carry CUDA tensors for {refused}"}
            else:
                results[name] = {"status": "failed", "reason": f"exited {proc.rc}: {error_line(proc.output)}"}
            continue
        worst, problem = compare_series(metrics(run_dir), ref_rows, rel)
        results[name] = {"status": "failed" if problem else "passed", "max_rel_diff": worst,
                         **({"reason": problem} if problem else {})}
    statuses = {r["status"] for r in results.values()}
    summary = "; ".join(f"{n}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
                        for n, r in results.items())
    if "failed" in statuses:
        return Outcome("failed", summary)
    if "skipped" in statuses:
        return Outcome("skipped", summary)
    return Outcome("passed")


# -- d. HF export and generate() against the engine ------------------------------------------------------


def step_hf_generate(ctx: Context) -> Outcome:
    new_tokens = 8 if ctx.dry else 24
    checkpoints = ctx.work / "b_full" / "checkpoints"
    if not (checkpoints / "latest").is_file():  # step b did not run (or failed early): train here
        steps, save = (6, 3) if ctx.dry else (20, 10)
        train_checkpointed_run(ctx, ctx.work / "b_full", steps, save)
    hf_dir, tokenizer = ctx.work / "d_hf", ctx.work / "data" / "tokenizer"
    ctx.run([ctx.python, "tools/convert_to_hf.py", "--checkpoint", checkpoints, "--output", hf_dir,
             "--tokenizer", tokenizer], what="convert_to_hf.py")
    ids_file, hf_out, engine_out = ctx.work / "d_prompt_ids.txt", ctx.work / "d_hf.jsonl", ctx.work / "d_engine.jsonl"
    hf = ctx.run([ctx.python, str(Path(__file__).resolve()), "--worker", "hf-generate", "--",
                  str(hf_dir), str(ids_file), str(hf_out), str(new_tokens)], what="transformers generate()")
    engine = ctx.run([ctx.python, "tools/generate.py", "--checkpoint", checkpoints, "--prompts", ids_file,
                      "--token-ids", "--greedy", "--max-tokens", str(new_tokens), "--output", engine_out],
                     what="tools/generate.py")
    theirs = [json.loads(line) for line in hf_out.read_text().splitlines()]
    ours = [json.loads(line) for line in engine_out.read_text().splitlines()]
    rows = []
    for prompt, hf_row, our_row in zip(PROMPTS, theirs, ours):
        a, b = hf_row["token_ids"], our_row["token_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        rows.append({"prompt": prompt, "prompt_tokens": len(hf_row["prompt_ids"]), "equal_prefix": same,
                     "new_tokens": len(a), "equal": a == b})
    speed = re.search(r"\(([\d.]+) tok/s\)", engine.output)
    ctx.figures.update({
        "device": reported_device(hf.output), "new_tokens": new_tokens, "prompts": rows,
        "all_equal": all(r["equal"] for r in rows) and len(rows) == len(PROMPTS),
        "engine_tokens_per_s": float(speed.group(1)) if speed else None,
    })
    if ctx.figures["all_equal"]:
        return Outcome("passed")
    differing = [f"{r['prompt']!r} from token {r['equal_prefix']}" for r in rows if not r["equal"]]
    return Outcome("failed", "greedy tokens differ: " + "; ".join(differing))


def reported_device(output: str) -> Optional[str]:
    match = re.search(r"@hf device=(\S+)", output)
    return match.group(1) if match else None


# -- e. training throughput at the 360M shape ----------------------------------------------------------


def chip_peak_tflops(gpu_name: Optional[str]) -> Optional[float]:
    """The dense bf16 peak of the project's MFU table (mor_megatron/training/metrics.py), read
    without importing torch."""
    if not gpu_name:
        return None
    source = (REPO / "mor_megatron" / "training" / "metrics.py").read_text()
    match = re.search(r"^GPU_PEAK_TFLOPS\s*=\s*(\{.*?\})", source, re.M | re.S)
    table = ast.literal_eval(match.group(1)) if match else {}
    return next((value for key, value in table.items() if key in gpu_name), None)


def bench_train_figures(report: dict, peak: Optional[float]) -> tuple[dict[str, Any], list[str]]:
    models = {}
    for name, record in report["models"].items():
        models[name] = {
            "tokens_per_s": record["tokens_per_s"],
            "median_step_ms": record["step_time_s"] * 1e3,
            "peak_memory_gib": record["peak_memory_bytes"] / 2**30,
            "achieved_tflops": record["achieved_tflops"],
            "of_mm_probe": record["fraction_of_probe"],
            "mfu_of_chip_peak": record["achieved_tflops"] / peak if peak else None,
        }
    findings, ratios = [], {}
    for comparison in report["comparisons"]["mor_vs_vanilla"]:
        nr = comparison["num_recursions"]
        speedup = 1.0 / comparison["step_time_ratio"]
        target = TRAIN_TARGETS.get(nr)
        ratios[f"MoR-{nr} / {comparison['vanilla']} tokens/s"] = {
            "ratio": speedup, "target": target, "met": None if target is None else speedup >= target,
            "flops_ratio": comparison["flops_ratio"], "memory_ratio": comparison["memory_ratio"],
        }
        if target is not None and speedup < target:
            findings.append(f"training MoR-{nr}: {speedup:.2f}x vanilla tokens/s, target >= {target:.2f}x")
    vanilla = next((m for n, m in models.items() if n.startswith("vanilla")), None)
    if vanilla and vanilla["mfu_of_chip_peak"] is not None and vanilla["mfu_of_chip_peak"] < TRAIN_MFU_TARGET:
        findings.append(f"training vanilla MFU {vanilla['mfu_of_chip_peak']:.1%} of the {peak:g} TFLOP/s "
                        f"bf16 peak, target >= {TRAIN_MFU_TARGET:.0%}")
    figures = {"device": report["device"], "settings": {k: report["settings"][k] for k in
               ("dtype", "batch_size", "seq_length", "steps", "warmup", "hidden_size", "effective_layers")},
               "chip_peak_tflops": peak, "mm_probe_tflops": statistics.median(report["probe"]["samples_tflops"]),
               "models": models, "ratios": ratios, "vanilla_mfu_target": TRAIN_MFU_TARGET}
    return figures, findings


def step_bench_train(ctx: Context) -> Outcome:
    result = ctx.work / "e_bench_train.json"
    if ctx.dry:
        options = ["--config", "configs/tiny.yaml", "--seq-length", "16", "--batch-size", "1", "--steps", "1",
                   "--warmup", "0", "--threads", "1", "--recursions", "2", "--probe-size", "64",
                   "--no-transformers", "model.hidden_size=32", "model.ffn_hidden_size=64",
                   "model.vocab_size=128"]
    else:
        options = ["--config", "configs/vanilla_360m.yaml", "--seq-length", "2048", "--batch-size", "8",
                   "--dtype", "bfloat16", "--recursions", "2,3", "--steps", "10", "--warmup", "3"]
    ctx.run([ctx.python, "tools/bench_train.py", *options, "--json", result], what="bench_train.py")
    shutil.copy(result, ctx.out / result.name)
    peak = chip_peak_tflops(ctx.environment.get("gpu"))
    figures, findings = bench_train_figures(json.loads(result.read_text()), peak)
    ctx.figures.update(figures)
    return Outcome("passed", findings=findings)


# -- f. decode throughput at the 360M shape ------------------------------------------------------------


def parse_bench_decode(output: str) -> dict[str, Any]:
    """The fixed-batch and max-batch tables and the transformers line of bench_decode.py."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    current = None
    row = re.compile(r"^(vanilla|MoR-\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+|nan)x\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|nan)x"
                     r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|nan)x\s*$")
    for line in output.splitlines():
        if line.startswith("fixed batch"):
            current = "fixed_batch"
        elif line.startswith("max batch in"):
            current = "max_batch"
        match = row.match(line)
        if match and current:
            g = match.groups()
            tables.setdefault(current, {})[g[0]] = {
                "batch": int(g[1]), "tokens_per_s": float(g[2]), "vs_vanilla": float(g[3]),
                "kv_row_kib": float(g[4]), "layers_per_token": float(g[8]), "compute_ratio": float(g[9]),
            }
    hf = re.search(r"our engine ([\d.]+) tok/s, transformers generate\(\) with a static cache ([\d.]+) tok/s: "
                   r"([\d.]+)x; equal greedy tokens ([\d.]+)%", output)
    if hf:
        tables["vs_transformers"] = {"engine_tokens_per_s": float(hf.group(1)),
                                     "transformers_tokens_per_s": float(hf.group(2)),
                                     "ratio": float(hf.group(3)), "equal_greedy_tokens_pct": float(hf.group(4))}
    return tables


def decode_runs(ctx: Context) -> list[tuple[str, list[str]]]:
    """(name, options) per bench_decode.py run: every model of a run has the same depth L and
    middle-cycle needs (L-2) % Nr == 0, so MoR-4 (L=34) runs apart from MoR-2/3 (L=32)."""
    if ctx.dry:
        shape = ["--hidden", "32", "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--vocab", "128",
                 "--batch", "2", "--prompt-len", "4", "--gen-len", "2", "--memory-budget-mib", "1",
                 "--max-batch-cap", "4", "--repeats", "1"]
        return [("L8", shape + ["--effective-layers", "8", "--recursions", "2", "3", "--no-hf"]),
                ("L10", shape + ["--effective-layers", "10", "--recursions", "4"])]
    # bench_decode's docstring command, but an 8000 MiB budget under a 1024 cap: its 60000 MiB with
    # the default cap of 128 puts every model at batch 128, so the max batch would not depend on
    # the cache sizes at all; here it does (vanilla ~590 rows, MoR-2/3/4 ~800-900). One repeat.
    shape = ["--hidden", "960", "--heads", "15", "--kv-heads", "5", "--ffn", "2560", "--vocab", "49152",
             "--batch", "32", "--memory-budget-mib", "8000", "--max-batch-cap", "1024", "--prompt-len", "64",
             "--gen-len", "256", "--dtype", "bf16", "--repeats", "1"]
    return [("L32", shape + ["--effective-layers", "32", "--recursions", "2", "3", "--no-hf"]),
            ("L34", shape + ["--effective-layers", "34", "--recursions", "4"])]


def decode_findings(figures: dict[str, Any]) -> list[str]:
    findings = []
    for run in figures.values():
        for name, record in run.get("max_batch", {}).items():
            nr = int(name.split("-")[1]) if name.startswith("MoR-") else None
            target = DECODE_TARGETS.get(nr) if nr else None
            if target is not None and record["vs_vanilla"] < target:
                findings.append(f"decode {name} at the max batch ({record['batch']}): {record['vs_vanilla']:.2f}x "
                                f"vanilla tokens/s, target >= {target:.2f}x")
    return findings


def step_bench_decode(ctx: Context) -> Outcome:
    for name, options in decode_runs(ctx):
        try:
            proc = ctx.run([ctx.python, "tools/bench_decode.py", *options], what=f"bench_decode.py ({name})")
        except StepTimeout as err:  # the tables printed before a timeout still count
            ctx.figures[name] = parse_bench_decode(err.output)
            raise
        ctx.figures[name] = parse_bench_decode(proc.output)
    for name, run in ctx.figures.items():
        batches = {m: r["batch"] for m, r in run.get("max_batch", {}).items()}
        if batches and len(set(batches.values())) == 1:
            run["note"] = f"every model at the same max batch {next(iter(batches.values()))} (--max-batch-cap)"
    findings = decode_findings(ctx.figures)
    for name, record in [(n, r.get("vs_transformers")) for n, r in ctx.figures.items()]:
        if record and record["equal_greedy_tokens_pct"] < 100.0:
            findings.append(f"decode {name}: engine and transformers agree on {record['equal_greedy_tokens_pct']}% "
                            "of greedy tokens")
    return Outcome("passed", findings=findings)


# -- g. Triton kernels compiled ----------------------------------------------------------------------------


def parse_bench_kernels(output: str) -> list[dict[str, Any]]:
    rows = []
    for line in output.splitlines():
        match = re.match(r"^(S=\d+ B=\d+ D=\d+ k=\d+)\s+([\d.\s]+)$", line.strip())
        if not match:
            continue
        values = [float(v) for v in match.group(2).split()]
        names = (["ref_fwd_ms", "ref_fwd_bwd_ms", "triton_fwd_ms", "triton_fwd_bwd_ms", "fwd_speedup",
                  "fwd_bwd_speedup", "triton_gb_s"] if len(values) == 7
                 else ["ref_fwd_ms", "ref_fwd_bwd_ms", "ref_gb_s"])
        rows.append({"case": match.group(1), **dict(zip(names, values))})
    return rows


def step_kernels(ctx: Context) -> Outcome:
    # the compiled path: TRITON_INTERPRET is unset for every step (step_environment); the
    # interpreter tests, which set it themselves, are the CPU suite's and left out here
    tests = ctx.run([ctx.python, "-m", "pytest", "tests/test_kernels_gated_scatter.py", "-q", "-rs",
                     "-p", "no:cacheprovider", "-k", "not interpreter"], what="kernel tests", check=False)
    ctx.figures["tests"] = parse_pytest(tests.output)
    outcome = pytest_outcome(tests, ctx.figures["tests"], "kernel tests")
    options = (["--device", "cpu", "--shapes", "16x2x8", "--k-fracs", "0.5", "--min-run-time", "0.01"]
               if ctx.dry else [])
    bench = ctx.run([ctx.python, "-m", "tools.bench_kernels", *options], what="bench_kernels.py")
    ctx.figures["bench"] = parse_bench_kernels(bench.output)
    header = next((line for line in bench.output.splitlines() if line.startswith("gated_scatter_add")), "")
    ctx.figures["bench_settings"] = header.strip()
    if outcome.status == "passed" and ctx.figures["tests"]["skip_reasons"]:
        outcome.findings.append("kernel tests skipped: " + "; ".join(ctx.figures["tests"]["skip_reasons"]))
    return outcome


# -- the runner ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Context], Outcome]
    limit_s: int  # on the GPU
    dry_limit_s: int  # --dry-run on CPU

    @property
    def slug(self) -> str:
        return self.run.__name__.removeprefix("step_")


STEPS = (
    # dry-run limits: about 1.5x what each step took on the 2-core CPU machine under load
    Step("a", "CUDA-marked tests (pytest -m cuda)", step_cuda_tests, 45, 45),
    Step("b", "pretrain, checkpoint, resume equals the uninterrupted run", step_train_resume, 75, 75),
    Step("c", "2 processes sharing 1 GPU over gloo: DP2, TP2 vs 1 process", step_two_processes, 75, 150),
    Step("d", "HF export + transformers generate() vs engine", step_hf_generate, 40, 60),
    Step("e", "bench_train (360M, bf16, seq 2048 on the GPU)", step_bench_train, 90, 45),
    Step("f", "bench_decode (360M on the GPU)", step_bench_decode, 120, 45),
    Step("g", "Triton kernel tests compiled + bench_kernels", step_kernels, 35, 40),
)


class Report:
    """gpu_check.json and gpu_check.md, rewritten whole after every change."""

    def __init__(self, out: Path, dry: bool, budget: float) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "mode": "dry-run (CPU, toy sizes)" if dry else "GPU",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "updated": None, "budget_s": budget, "command": shlex.join([sys.executable, *sys.argv]),
            "install": None, "environment": {}, "steps": {}, "findings": [],
        }

    def write(self) -> None:
        self.data["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.data["findings"] = [f"{key}: {finding}" for key, step in self.data["steps"].items()
                                 for finding in step.get("findings", [])]
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", render_markdown(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, self.out / name)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _is_table(value: Any) -> bool:
    """A dict of flat dicts (models -> their figures): shown as a markdown table."""
    return (isinstance(value, dict) and bool(value) and all(
        isinstance(row, dict) and row and not any(isinstance(v, (dict, list)) for v in row.values())
        for row in value.values()))


def _table_lines(value: dict[str, dict[str, Any]], indent: str) -> list[str]:
    columns = list(dict.fromkeys(column for row in value.values() for column in row))
    lines = ["", f"{indent}| | " + " | ".join(columns) + " |", indent + "|---" * (len(columns) + 1) + "|"]
    for name, row in value.items():
        lines.append(f"{indent}| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return lines + [""]


def _figure_lines(figures: Any, indent: str = "") -> list[str]:
    lines = []
    for key, value in figures.items():
        if _is_table(value):
            lines.append(f"{indent}- {key}:")
            lines += _table_lines(value, indent + "  ")
        elif isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines += _figure_lines(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}- {key}:")
            for item in value:
                lines.append(f"{indent}  - " + ", ".join(f"{k} {_fmt(v)}" for k, v in item.items()))
        else:
            lines.append(f"{indent}- {key}: {_fmt(value)}")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [f"# GPU check ({data['mode']})", "",
             f"Started {data['started']}, updated {data['updated']}; budget {data['budget_s']:.0f} s.",
             f"Command: `{data['command']}`", ""]
    if data["mode"].startswith("dry-run"):
        lines += ["Dry run: toy sizes on CPU, to keep the check from rotting; its performance figures and "
                  "target findings say nothing about a GPU.", ""]
    lines += ["## Environment", ""]
    for key in ("python", "torch", "cuda", "gpu", "gpu_memory_gib", "capability", "driver", "nccl"):
        if env.get(key) is not None:
            lines.append(f"- {key}: {env[key]}")
    packages = env.get("packages") or {}
    if packages:
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v))
    if data.get("install"):
        install = data["install"]
        lines.append(f"- wheels ({install['method']}): installed {', '.join(install['installed']) or 'none'}; "
                     f"kept the host's {', '.join(install['kept']) or 'none'}")
    lines += ["", "## Steps", "", "| step | what | status | seconds | reason |", "|---|---|---|---|---|"]
    for key, step in data["steps"].items():
        reason = (step.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {key} | {step['title']} | {step['status']} | {step['seconds']:.1f} | {reason} |")
    lines += ["", "## Findings", ""] + ([f"- {f}" for f in data["findings"]] or ["- none"])
    for key, step in data["steps"].items():
        lines += ["", f"## {key}. {step['title']}: {step['status']}", "", f"Log: `{step['log']}`", ""]
        lines += _figure_lines(step.get("figures") or {})
        if step.get("tail"):
            lines += ["", "```", step["tail"], "```"]
    return "\n".join(lines)


def run_step(step: Step, ctx: Context, report: Report, budget_end: float) -> None:
    limit = step.dry_limit_s if ctx.dry else step.limit_s
    limit = min(limit, budget_end - time.monotonic())
    log = ctx.out / f"{step.key}_{step.slug}.log"
    log.write_text("")
    record = {"title": step.title, "status": "running", "seconds": 0.0, "limit_s": round(limit, 1),
              "reason": "", "log": log.name, "figures": {}, "findings": [], "tail": ""}
    report.data["steps"][step.key] = record
    report.write()
    print(f"{TAG} {step.key}. {step.title}: started (limit {limit:.0f} s)", flush=True)
    ctx.log, ctx.figures = log, {}
    ctx.deadline = time.monotonic() + limit
    started = time.monotonic()
    try:
        if limit < 5:
            raise StepTimeout("no time left in the check's budget")
        outcome = step.run(ctx)
    except StepTimeout as err:
        outcome = Outcome("timeout", str(err))
    except StepFailed as err:
        outcome = Outcome("failed", str(err))
    except Exception as err:  # a bug in a step must not stop the others
        outcome = Outcome("failed", f"{type(err).__name__} in the check itself: {err}")
    record.update(status=outcome.status, seconds=round(time.monotonic() - started, 1), reason=outcome.reason,
                  figures=ctx.figures, findings=outcome.findings, tail=tail(log))
    report.write()
    print(f"{TAG} {step.key}. {outcome.status} in {record['seconds']:.1f} s"
          + (f": {outcome.reason}" if outcome.reason else ""), flush=True)
    for finding in outcome.findings:
        print(f"{TAG}    finding: {finding}", flush=True)


# -- setup: environment, wheels ---------------------------------------------------------------------------

ENV_PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
except Exception as err:
    info["torch_error"] = repr(err)
names = json.loads(os.environ["GPU_CHECK_PACKAGES"])
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
info["packages"] = versions
def where(module):
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    return spec.origin or next(iter(spec.submodule_search_locations or []), None)
info["resolves"] = {m: where(m) for m in ("megatron", "deepspeed", "datasets", "mor_megatron")}
print("@env " + json.dumps(info))
"""


def probe_environment(ctx: Context, extra_packages: Sequence[str]) -> dict[str, Any]:
    names = list(dict.fromkeys([*PACKAGES, *extra_packages]))
    proc = ctx.run([ctx.python, "-c", ENV_PROBE], what="environment probe",
                   env={"GPU_CHECK_PACKAGES": json.dumps(names)}, check=False)
    line = next((l for l in proc.output.splitlines() if l.startswith("@env ")), None)
    info = json.loads(line[5:]) if line else {"probe_error": error_line(proc.output)}
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
        except (subprocess.TimeoutExpired, OSError):
            info["driver"] = None
    return info


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0]))


def host_version(name: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels(ctx: Context, wheels: Path, target: Path) -> dict[str, Any]:
    """Install, offline, every wheel of `wheels` whose package the host lacks or has older."""
    chosen, kept = [], []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        have = host_version(name)
        if have is not None and version_key(have) >= version_key(version):
            kept.append(f"{name} {have}")
        else:
            chosen.append(wheel)
    target.mkdir(parents=True, exist_ok=True)
    method = "nothing to install"
    if chosen:
        proc = ctx.run([ctx.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "-q", "--target", target, *chosen],
                       what="pip install --target", check=False)
        method = "pip install --no-index --no-deps --target"
        if proc.rc != 0:  # no pip on the host: a wheel is a zip of the files site-packages holds
            for wheel in chosen:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(target)
            method = "unzipped (pip failed)"
    return {"dir": str(wheels), "target": str(target), "method": method,
            "installed": [" ".join(wheel_name_version(w)) for w in chosen], "kept": kept,
            "names": [wheel_name_version(w)[0] for w in sorted(wheels.glob("*.whl"))]}


def step_environment(args: argparse.Namespace, site: Optional[Path]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO)] + ([str(site)] if site else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"  # a killed step's log still holds what it printed
    env.pop("TRITON_INTERPRET", None)
    env.pop("DS_ACCELERATOR", None)  # each tool picks DeepSpeed's accelerator for its own device
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # toy sizes on CPU even where a GPU is present
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def prepare_work(work: Path) -> None:
    """A fresh work directory; one that this check did not create is never deleted."""
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        raise SystemExit(f"error: --work {work} exists and was not made by gpu_check.py: pick another folder")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("made by tools/gpu_check.py; emptied at every run\n")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"),
                        help="results folder (default: $OUT if set, else runs/gpu_check)")
    parser.add_argument("--work", default=str(REPO / "runs" / "gpu_check_work"),
                        help="scratch folder for corpus, runs, checkpoints, exports, wheels (emptied)")
    parser.add_argument("--wheels", help="folder of wheels to install offline (tools/gpu_wheels.sh)")
    parser.add_argument("--steps", default=",".join(s.key for s in STEPS), help="subset, e.g. a,b,e")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU (gloo, fp32)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock limit of the whole check")
    parser.add_argument("--worker", choices=("pretrain-deterministic", "hf-generate"), help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rest and not args.worker:
        parser.error(f"unexpected arguments: {' '.join(args.rest)}")
    keys = [k.strip() for k in args.steps.split(",") if k.strip()]
    unknown = sorted(set(keys) - {s.key for s in STEPS})
    if unknown or not keys:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; choose from a-g")
    args.step_keys = keys
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, [a for a in args.rest if a != "--"])
    started = time.monotonic()
    budget_end = started + args.budget_s
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.log"), out / "gpu_check.json", out / "gpu_check.md", out / "e_bench_train.json"]:
        old.unlink(missing_ok=True)
    prepare_work(work)
    report = Report(out, args.dry_run, args.budget_s)
    site = work / "site" if args.wheels else None
    ctx = Context(args, out, work, step_environment(args, site))
    ctx.deadline = started + min(120.0, args.budget_s)  # setup: install + probe
    print(f"{TAG} {report.data['mode']}: results in {out}", flush=True)
    try:
        if args.wheels:
            report.data["install"] = install_wheels(ctx, Path(args.wheels).resolve(), site)
            print(f"{TAG} wheels: {report.data['install']['method']}: "
                  f"{', '.join(report.data['install']['installed']) or 'none needed'}", flush=True)
        names = report.data["install"]["names"] if report.data["install"] else []
        ctx.environment = report.data["environment"] = probe_environment(ctx, names)
    except StepTimeout as err:
        report.data["environment"] = {"probe_error": str(err)}
    report.write()
    env = ctx.environment
    print(f"{TAG} python {env.get('python')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
          f"GPU {env.get('gpu') or 'none'}", flush=True)
    if not args.dry_run and not env.get("cuda_available"):
        print("error: no CUDA device is visible: run on a GPU host, or pass --dry-run for the CPU rehearsal",
              file=sys.stderr)
        return 2
    for step in STEPS:
        if step.key in args.step_keys:
            run_step(step, ctx, report, budget_end)
    statuses = {key: s["status"] for key, s in report.data["steps"].items()}
    print(f"{TAG} done in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in statuses.items()) + f"; see {out / 'gpu_check.md'}", flush=True)
    return 0 if all(v in ("passed", "skipped") for v in statuses.values()) else 1


# -- workers: small programs some steps run in a process of their own ----------------------------------------


def run_worker(kind: str, argv: list[str]) -> int:
    if kind == "pretrain-deterministic":
        return _pretrain_deterministic(argv)
    return _hf_generate(*argv)


def _pretrain_deterministic(argv: list[str]) -> int:
    """`mor_megatron.pretrain.main(argv)` with torch's deterministic algorithms (warn-only: an op
    without a deterministic variant still runs) and uninitialised memory left as it is (filling
    it with NaN would change what a kernel that relies on masking sees, not what we test)."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.utils, "deterministic"):
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    from mor_megatron.pretrain import main as pretrain_main

    return pretrain_main(argv)


def _hf_generate(hf_dir: str, ids_file: str, out_file: str, new_tokens: str) -> int:
    """Greedy `generate()` of the exported folder for PROMPTS (tokenized with the exported
    tokenizer), writing the prompt ids (for the engine) and the new tokens."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # exactly `new_tokens` tokens, as the engine makes them
    print(f"@hf device={device} model={type(model).__name__}", flush=True)
    ids_lines, out_lines = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tokens = torch.tensor([ids], device=device)
            generated = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                       max_new_tokens=int(new_tokens), pad_token_id=0)
            ids_lines.append(" ".join(map(str, ids)))
            out_lines.append(json.dumps({"prompt_ids": ids, "token_ids": generated[0, len(ids):].tolist()}))
    Path(ids_file).write_text("\n".join(ids_lines) + "\n")
    Path(out_file).write_text("\n".join(out_lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
