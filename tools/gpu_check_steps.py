"""The eight steps of `tools/gpu_check.py` (a-h, described in its docstring) and the parsers that
read the tools' output. Standard library only: torch and the rest run in the steps' subprocesses."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import statistics
from pathlib import Path
from typing import Any, Optional

from mor_megatron.tools.gpu_check_proc import REPO, Context, Outcome, Proc, StepFailed, StepTimeout, error_line, free_port

# the file whose hidden `--worker` modes some steps run in a process of their own
GPU_CHECK = REPO / "tools" / "gpu_check.py"

# b: tolerance of the resumed run (see the docstring of tools/gpu_check.py); cuBLAS is deterministic only with a
# fixed workspace configuration
BF16_RESUME_REL = 2.0**-8
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# c: tolerance of the two-process layouts against one process
GPU_LAYOUT_REL, CPU_LAYOUT_REL = 1e-4, 1e-5
# e / f: the targets (paper ratios; MFU as a share of the chip's dense bf16 peak)
TRAIN_TARGETS = {2: 1.23, 3: 1.30}
TRAIN_MFU_TARGET = 0.40
# h: the trainer's step over the model-only step (bench_train's paired ratio)
TRAINER_OVERHEAD_TARGET = 1.03
DECODE_TARGETS = {4: 2.06, 2: 1.60}

PROMPTS = (
    "def main():\n",
    "import os\nimport sys\n\n",
    "class Parser:\n    def __init__(self",
    "for index in range(",
)


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
        return [ctx.python, str(GPU_CHECK), "--worker", "pretrain-deterministic", "--", *args]
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
    return f"step_{step:08d}"  # mor_megatron.checkpoint_files.tag_for


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
    hf = ctx.run([ctx.python, str(GPU_CHECK), "--worker", "hf-generate", "--",
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
    findings, ratios = [f"bench_train: {note}" for note in report.get("notes", [])], {}
    for comparison in report["comparisons"]["mor_vs_vanilla"]:
        nr = comparison["num_recursions"]
        speedup = 1.0 / comparison["step_time_ratio"]
        expert_choice = comparison.get("router", "expert_choice") == "expert_choice"
        label = f"MoR-{nr}" if expert_choice else f"MoR-TC-{nr}"
        target = TRAIN_TARGETS.get(nr) if expert_choice else None  # the paper's speedups: expert-choice
        ratios[f"{label} / {comparison['vanilla']} tokens/s"] = {
            "ratio": speedup, "target": target, "met": None if target is None else speedup >= target,
            "flops_ratio": comparison["flops_ratio"], "memory_ratio": comparison["memory_ratio"],
            "padding_overhead": comparison.get("padding_overhead", 0.0),
            # step-time ratio over the as-routed FLOPs ratio (bench_train's targets: 1.03, token-choice 1.05)
            "time_over_flops": comparison["step_time_ratio"] / comparison["flops_ratio"],
            "time_over_flops_target": comparison.get("target"),
        }
        if target is not None and speedup < target:
            findings.append(f"training MoR-{nr}: {speedup:.2f}x vanilla tokens/s, target >= {target:.2f}x")
    vanilla = next((m for n, m in models.items() if n.startswith("vanilla")), None)
    if vanilla and vanilla["mfu_of_chip_peak"] is not None and vanilla["mfu_of_chip_peak"] < TRAIN_MFU_TARGET:
        findings.append(f"training vanilla MFU {vanilla['mfu_of_chip_peak']:.1%} of the {peak:g} TFLOP/s "
                        f"bf16 peak, target >= {TRAIN_MFU_TARGET:.0%}")
    trainer = {}
    for row in report["comparisons"].get("trainer_overhead", []):
        ratio = row["paired_ratio"] if row["paired_ratio"] is not None else row["step_time_ratio"]
        trainer[row["trainer"]] = {"vs_model_only": ratio, "target": TRAINER_OVERHEAD_TARGET,
                                   "met": ratio <= TRAINER_OVERHEAD_TARGET}
        if ratio > TRAINER_OVERHEAD_TARGET:
            findings.append(f"{row['trainer']}: step {ratio:.3f}x the model-only step, "
                            f"target <= {TRAINER_OVERHEAD_TARGET:.2f}x")
    figures = {"device": report["device"], "settings": {k: report["settings"][k] for k in
               ("dtype", "batch_size", "seq_length", "steps", "warmup", "hidden_size", "effective_layers")},
               "chip_peak_tflops": peak, "mm_probe_tflops": statistics.median(report["probe"]["samples_tflops"]),
               "models": models, "ratios": ratios, "vanilla_mfu_target": TRAIN_MFU_TARGET}
    if trainer:
        figures["trainer_vs_model_only"] = trainer
    return figures, findings


def run_bench_train(ctx: Context, options: list[str], name: str) -> Outcome:
    """bench_train.py with `options`, its JSON copied into --out, its figures and findings read."""
    result = ctx.work / f"{name}.json"
    ctx.run([ctx.python, "tools/bench_train.py", *options, "--json", result], what="bench_train.py")
    shutil.copy(result, ctx.out / result.name)
    peak = chip_peak_tflops(ctx.environment.get("gpu"))
    figures, findings = bench_train_figures(json.loads(result.read_text()), peak)
    ctx.figures.update(figures)
    return Outcome("passed", findings=findings)


# the CPU dry run's toy shape for steps e and h
DRY_BENCH_TRAIN = ["--config", "configs/tiny.yaml", "--seq-length", "16", "--batch-size", "1", "--steps", "1",
                   "--threads", "1", "--recursions", "2", "--probe-size", "64", "--no-transformers",
                   "model.hidden_size=32", "model.ffn_hidden_size=64", "model.vocab_size=128"]


def step_bench_train(ctx: Context) -> Outcome:
    """Eager expert-choice MoR-2/3 and token-choice MoR-3 (issue #18: per-sequence attention, its
    padding overhead and as-routed FLOPs ratio) against vanilla."""
    if ctx.dry:
        options = DRY_BENCH_TRAIN + ["--token-choice", "2", "--warmup", "0", "--loops", "model", "--compile", "off"]
    else:
        options = ["--config", "configs/vanilla_360m.yaml", "--seq-length", "2048", "--batch-size", "8",
                   "--dtype", "bfloat16", "--recursions", "2,3", "--token-choice", "3", "--steps", "10",
                   "--warmup", "3", "--loops", "model", "--compile", "off"]
    return run_bench_train(ctx, options, "e_bench_train")


# -- h. compiled training at the 360M shape: model-only and through the trainer -------------------------


def step_bench_train_compiled(ctx: Context) -> Outcome:
    """bench_train.py --compile on at the shapes of configs/mor_360m_nr{2,3,4}.yaml (MoR-4 at
    L=34 with the vanilla model of that depth), both loops, bf16; every model in memory at once,
    hence batch 2. A few timed steps after the compiling warm-up."""
    # token-choice is timed eagerly in step e; here only the expert-choice jobs, to fit the limit
    options = ["--loops", "model,trainer", "--compile", "on", "--warmup", "2", "--token-choice", ""]
    if ctx.dry:
        options = DRY_BENCH_TRAIN + options
    else:
        options += ["--config", "configs/vanilla_360m.yaml", "--seq-length", "2048", "--batch-size", "2",
                    "--dtype", "bfloat16", "--recursions", "2,3,4", "--steps", "3",
                    "--no-transformers"]
    outcome = run_bench_train(ctx, options, "h_bench_train_compiled")
    compiled = {name: record.get("compiled_layers") for name, record in
                json.loads((ctx.out / "h_bench_train_compiled.json").read_text())["models"].items()}
    ctx.figures["compiled_layers"] = compiled
    if not compiled or not all(compiled.values()):
        return Outcome("failed", f"jobs without a compiled layer: {compiled}")
    return outcome


# -- f. decode throughput at the 360M shape ------------------------------------------------------------


def parse_bench_decode(output: str) -> dict[str, Any]:
    """The fixed-batch and max-batch tables and the transformers line of bench_decode.py."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    current = None
    row = re.compile(r"^(vanilla|MoR-\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+|nan)x\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|nan)x"
                     r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|nan)x\s*$")
    static = re.compile(r"^\s+(vanilla|MoR-\d+)\s+([\d.]+) tok/s \(([\d.]+)x the engine\), vs vanilla ([\d.]+)x, "
                        r"layers/tok ([\d.]+)$")
    for line in output.splitlines():
        if line.startswith("fixed batch"):
            current = "fixed_batch"
        elif line.startswith("max batch in"):
            current = "max_batch"
        elif line.startswith("static decode tick, eager"):
            current = "static_eager"
        elif line.startswith("static decode tick"):
            current = "static_compiled"
        found = static.match(line)
        if found and current and current.startswith("static"):
            g = found.groups()
            tables.setdefault(current, {})[g[0]] = {
                "tokens_per_s": float(g[1]), "vs_engine": float(g[2]), "vs_vanilla": float(g[3]),
                "layers_per_token": float(g[4])}
            continue
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
        return [("L8", shape + ["--effective-layers", "8", "--recursions", "2", "3", "--no-hf", "--static"]),
                ("L10", shape + ["--effective-layers", "10", "--recursions", "4"])]
    # bench_decode's docstring command, but an 8000 MiB budget under a 1024 cap: its 60000 MiB with
    # the default cap of 128 puts every model at batch 128, so the max batch would not depend on
    # the cache sizes at all; here it does (vanilla ~590 rows, MoR-2/3/4 ~800-900). One repeat.
    shape = ["--hidden", "960", "--heads", "15", "--kv-heads", "5", "--ffn", "2560", "--vocab", "49152",
             "--batch", "32", "--memory-budget-mib", "8000", "--max-batch-cap", "1024", "--prompt-len", "64",
             "--gen-len", "256", "--dtype", "bf16", "--repeats", "1"]
    # --static: the fixed batch again through the static-shape tick (eager: compiling a 32-layer
    # tick with inductor does not fit this step's time)
    return [("L32", shape + ["--effective-layers", "32", "--recursions", "2", "3", "--no-hf", "--static"]),
            ("L34", shape + ["--effective-layers", "34", "--recursions", "4", "--static"])]


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
    bench = ctx.run([ctx.python, "-m", "mor_megatron.tools.bench_kernels", *options], what="bench_kernels.py")
    ctx.figures["bench"] = parse_bench_kernels(bench.output)
    header = next((line for line in bench.output.splitlines() if line.startswith("gated_scatter_add")), "")
    ctx.figures["bench_settings"] = header.strip()
    if outcome.status == "passed" and ctx.figures["tests"]["skip_reasons"]:
        outcome.findings.append("kernel tests skipped: " + "; ".join(ctx.figures["tests"]["skip_reasons"]))
    return outcome
