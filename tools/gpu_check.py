"""The project's one-call check on one GPU: every GPU-only claim measured in one command.

    python tools/gpu_check.py [--wheels .whl] [--out DIR] [--steps a,b,...]   # on a CUDA host
    python tools/gpu_check.py --dry-run                                      # the same at toy sizes on CPU

Steps (each in its own subprocesses under its own time limit; a failure or a timeout is recorded
and the next step runs; the whole check stays within `--budget-s`, 720 s by default):

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
  e. `tools/bench_train.py --dtype bfloat16 --loops model --compile off` at the paper's 360M
     shape, sequence 2048: vanilla, MoR-2, MoR-3 and token-choice MoR-3 tokens/s, MFU against the
     chip's dense bf16 peak, peak memory, the ratios (targets: MoR-2 >= 1.23x, MoR-3 >= 1.30x
     vanilla tokens/s; vanilla MFU >= 40%), token-choice's padding overhead and its step time over
     its as-routed FLOPs ratio.
  f. `tools/bench_decode.py` at the paper's 360M shape (L=32 for MoR-2/3, L=34 for MoR-4, each
     against the vanilla model of its depth) at batch 32 and at the largest batch of an 8000 MiB
     budget (weights + KV caches, below the 1024 cap for every model); targets at the max batch:
     MoR-4 >= 2.06x, MoR-2 >= 1.60x vanilla tokens/s. `--static`: batch 32 also through the
     static-shape decode tick (`StaticBatchDecoder`, eager).
  g. the Triton kernel tests compiled (tests/test_kernels_gated_scatter.py, no TRITON_INTERPRET)
     and `tools/bench_kernels.py`.
  h. `tools/bench_train.py --compile on --loops model,trainer` at the shapes of
     configs/mor_360m_nr{2,3,4}.yaml (vanilla L=32, MoR-2/3 at L=32, MoR-4 and vanilla at L=34),
     bf16, sequence 2048, batch 2 (all ten jobs in GPU memory at once), 3 timed steps after a
     compiling warm-up of 2: per-layer torch.compile model-only and `training.compile: true`
     through mor-pretrain; every job must have compiled layers (a compiled path missing from the
     tree is a failure); MoR/vanilla time/FLOPs and trainer/model-only ratios are findings.
A missed performance target is a finding, recorded, not a failure.

Writes into `--out` (default `$OUT` if set, else runs/gpu_check): `gpu_check.json`,
`gpu_check.md` (both rewritten after every step, so a killed run still leaves its results) and
one log per step. Work files (corpus, runs, checkpoints, the HF export, installed wheels) go to
`--work` (default runs/gpu_check_work), outside `--out`.

`--wheels DIR` (built by tools/gpu_wheels.sh): wheels of what the host lacks (megatron-core,
DeepSpeed, datasets and their needs), installed offline with `pip install --no-index --no-deps
--target WORK/site` (or unpacked, where pip is missing), for every wheel whose package the host
lacks or has in an older version; the steps run with PYTHONPATH=<repo>:WORK/site.

This file (the command line, the runner, the setup and the hidden `--worker` modes: the small
programs some steps run in their own process), tools/gpu_check_steps.py (the steps),
tools/gpu_check_proc.py (their processes) and tools/gpu_check_report.py (the JSON and markdown)
import only the standard library (the check must report even where torch breaks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # `python tools/gpu_check.py`: sys.path[0] is tools/, not the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mor_megatron.errors import UserError, run_cli
from mor_megatron.tools.gpu_check_proc import REPO, TAG, Context, Outcome, StepFailed, StepTimeout, error_line, tail
from mor_megatron.tools.gpu_check_report import Report
from mor_megatron.tools.gpu_check_steps import (
    PROMPTS, step_bench_decode, step_bench_train, step_bench_train_compiled, step_cuda_tests, step_hf_generate,
    step_kernels, step_train_resume, step_two_processes,
)
# read from this module by tests/test_gpu_check.py
from mor_megatron.tools.gpu_check_steps import (  # noqa: F401
    chip_peak_tflops, decode_findings, gloo_limitation, parse_bench_decode, parse_bench_kernels,
    parse_pytest, resume_tolerance,
)

WORK_MARKER = ".gpu_check_work"

# packages whose versions the environment record names (those the host brings and the wheels)
PACKAGES = (
    "torch", "triton", "transformers", "tokenizers", "safetensors", "megatron-core", "deepspeed",
    "datasets", "numpy", "pyarrow", "pytest", "PyYAML", "tensorboard", "pydantic", "packaging",
    "typing-extensions", "huggingface-hub", "transformer-engine",
)


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
    Step("e", "bench_train (360M, bf16, seq 2048 on the GPU)", step_bench_train, 110, 60),
    Step("f", "bench_decode (360M on the GPU)", step_bench_decode, 120, 45),
    Step("g", "Triton kernel tests compiled + bench_kernels", step_kernels, 35, 40),
    Step("h", "bench_train compiled, model-only and trainer (360M, bf16 on the GPU)", step_bench_train_compiled,
         240, 300),
)


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
        raise UserError(f"--work {work} exists and was not made by gpu_check.py: pick another folder")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("made by tools/gpu_check.py; emptied at every run\n")


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_float

    parser = ToolParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"),
                        help="results folder (default: $OUT if set, else runs/gpu_check)")
    parser.add_argument("--work", default=str(REPO / "runs" / "gpu_check_work"),
                        help="scratch folder for corpus, runs, checkpoints, exports, wheels (emptied)")
    parser.add_argument("--wheels", help="folder of wheels to install offline (tools/gpu_wheels.sh)")
    parser.add_argument("--steps", default=",".join(s.key for s in STEPS), help="subset, e.g. a,b,e")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU (gloo, fp32)")
    parser.add_argument("--budget-s", type=positive_float, default=720.0, help="wall-clock limit of the whole check")
    parser.add_argument("--worker", choices=("pretrain-deterministic", "hf-generate"), help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rest and not args.worker:
        parser.error(f"unexpected arguments: {' '.join(args.rest)}")
    keys = [k.strip() for k in args.steps.split(",") if k.strip()]
    unknown = sorted(set(keys) - {s.key for s in STEPS})
    if unknown or not keys:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; choose from a-h")
    args.step_keys = keys
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, [a for a in args.rest if a != "--"])
    return run_cli(lambda: check(args), args.debug)


def check(args: argparse.Namespace) -> int:
    """Run the chosen steps; 0 when every one passed or was skipped."""
    started = time.monotonic()
    budget_end = started + args.budget_s
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.log"), out / "gpu_check.json", out / "gpu_check.md", out / "e_bench_train.json",
                out / "h_bench_train_compiled.json"]:
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
        raise UserError("no CUDA device is visible: run on a GPU host, or pass --dry-run for the CPU rehearsal")
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
