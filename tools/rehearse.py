"""Rehearse a config's whole life on this machine: train at TP=2, resume at TP=1, export to HF, load it.

    python tools/rehearse.py --config configs/mor_1_7b_nr3.yaml [--seq-length 64] [--out DIR] [section.key=value ...]

Each phase is the real tool in a subprocess, on the CPU (gloo):
1. `train-tp2`: `mor-pretrain` under `torchrun --nproc_per_node 2` at TP=2 trains 2 steps on a
   generated token shard (random ids, no hub) and saves a checkpoint;
2. `resume-tp1`: `mor-pretrain` in one process at TP=1 resumes from that checkpoint's
   layout-free form (`universal/`) and trains 1 more step;
3. `export`: `tools/convert_to_hf.py` writes the HF folder;
4. `load-hf`: transformers' `AutoModelForCausalLM.from_pretrained` loads it (`trust_remote_code`,
   as a user would) and runs one forward: every parameter loaded, finite logits.

Per phase it reports wall time and each process's peak resident memory: the trainers' ranks read
their own `VmHWM` at exit (`MOR_MEMORY_PROBE`, `mor_megatron.training.memory_probe`), the
converter's and the loader's come from `os.wait4` on them; what all of a phase's processes hold
together is sampled (`mor_megatron.processes.tree_pss_bytes`). The probe also measures, after each
optimizer update, the bytes of parameters, gradients and optimizer state on every rank; they are
compared with `tools/model_report.py`'s estimate for the same layout (`mor_megatron.sizing`;
target: within 10%).
The export's peak is compared with twice its largest tensor group (the HF tensors one checkpoint
tensor becomes) plus the converter's own footprint (`EXPORT_CONSTANT_BYTES`). One table is printed
at the end; the figures go to `OUT/rehearsal.json`. Timings on a shared machine are noisy.

Training runs in bf16 with ZeRO-1 unless overridden (DeepSpeed holds 20 bytes per parameter: bf16
weights and gradients, fp32 gradient accumulation, master and moments). On a host with less memory
`training.bf16=false training.zero_stage=0 model.params_dtype=float32` holds 16 (the 1.7B's
figures in the README were taken so on 24 GB); `--max-rss-gib` stops a phase that would take more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from mor_megatron.processes import tree_pss_bytes
from mor_megatron.tools.gpu_check_proc import error_line, free_port

REPO = Path(__file__).resolve().parent.parent
GIB, MIB = 1024**3, 1024**2
TOLERANCE = 0.10  # measured vs estimated parameters / gradients / optimizer state
KINDS = ("parameters", "gradients", "optimizer")
# the converter's own footprint, apart from the tensors it converts (interpreter, torch, megatron,
# transformers, the weightless model): measured 0.45 GiB at the toy shape of tests/test_rehearse.py and
# at 218M parameters; 0.75 GiB leaves room for other builds of the libraries
EXPORT_CONSTANT_BYTES = 3 * GIB // 4


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_float, positive_int

    parser = ToolParser(prog="mor-rehearse", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--seq-length", type=positive_int, default=64, help="training sequence length")
    parser.add_argument("--out", default="runs/rehearsal", help="folder for the run, the export and the JSON")
    parser.add_argument("--timeout", type=positive_int, default=3600, help="seconds allowed per phase")
    parser.add_argument("--max-rss-gib", type=positive_float, default=None,
                        help="stop a phase whose processes together hold more resident memory (GiB)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.hidden_size=256")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mor_megatron.errors import run_cli

    return run_cli(lambda: rehearse(args), args.debug)


# -- phases -------------------------------------------------------------------------------------


def _env(probe: Optional[Path] = None) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MOR_DEVICE="cpu",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MOR_DIST_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if probe is not None:
        env["MOR_MEMORY_PROBE"] = str(probe)
    return env


def _run(name: str, command: list[str], log: Path, timeout: int, probe: Optional[Path] = None,
         max_rss: Optional[int] = None) -> dict:
    """Run one phase; its wall time, exit code, the peak RSS of its process tree's largest process
    (`os.wait4`) and the largest memory its processes held together (sampled every 0.5 s). The
    phase is stopped when that passes `max_rss` bytes; its processes are the OOM killer's first
    choice (`_oom_first`), not the machine's other work."""
    start = time.perf_counter()
    watch = {"held": 0}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=_env(probe),
                                start_new_session=True)
        try:
            status, usage = _wait4(proc.pid, timeout, max_rss, watch)
        except (TimeoutError, MemoryError) as err:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise PhaseFailed(name, str(err), log, watch["held"]) from None
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise PhaseFailed(name, f"exit code {proc.returncode}", log, watch["held"])
    return {"phase": name, "wall_s": round(wall, 1), "tree_peak_rss_bytes": usage.ru_maxrss * 1024,
            "tree_held_peak_bytes": watch["held"]}


def _oom_first() -> None:
    """Make this process and the phases it starts (who inherit it) the OOM killer's first choice."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:  # no /proc: nothing to protect the machine's other work with
        pass


def _wait4(pid: int, timeout: int, max_rss: Optional[int], watch: dict):
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        if time.monotonic() > deadline:
            raise TimeoutError(f"ran past {timeout} s")
        held = tree_pss_bytes(pid)
        if held is None:  # processes came and went during every reading: the next one counts
            time.sleep(0.05)
            continue
        watch["held"] = max(watch["held"], held)
        if max_rss is not None and held > max_rss:
            raise MemoryError(f"its processes held {held / GIB:.1f} GiB, over --max-rss-gib {max_rss / GIB:g}")
        time.sleep(0.5)


class PhaseFailed(RuntimeError):
    def __init__(self, phase: str, why: str, log: Path, held: int = 0) -> None:
        line = error_line(log.read_text(errors="replace")) if log.is_file() else "(no log)"
        super().__init__(f"phase {phase} failed ({why}; {line}); log: {log}")
        self.phase, self.held = phase, held


def _probe(directory: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("rank_*.json"))]
    return sorted(records, key=lambda r: r["rank"])


# transformers' own loader on the export, as a user loads it: its class by the folder's `auto_map`, one
# forward; the last line printed is the phase's result
HF_LOAD = '''
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True, dtype="auto")
ids = torch.arange(8, device=model.device).remainder(model.config.vocab_size)[None]
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"loaded_class": type(model).__name__, "loaded_parameters": sum(p.numel() for p in model.parameters()),
                  "loaded_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "logits_shape": list(logits.shape), "logits_finite": bool(logits.isfinite().all())}))
'''


# -- estimates ------------------------------------------------------------------------------------


def _estimate(config: str, overrides: list[str], tp: int) -> tuple[dict, dict]:
    """model_report's per-GPU memory for the run at TP=`tp` (PP=1, DP=1), in bytes per item
    (unrounded: the report prints GiB to 3 decimals), and the layout it assumed."""
    from mor_megatron.sizing import GB, Layout, stage_memory
    from mor_megatron.training.config import load_run_config, zero_stage_for

    run = load_run_config(config, overrides + [f"parallel.tensor_model_parallel_size={tp}"])
    zero_stage = zero_stage_for(run.training.zero_stage, 1, 1, run.model.bf16)
    layout = Layout(tp, 1, 1, zero_stage, run.training.micro_batch_size,
                    run.training.recompute, run.model.bf16)
    stage = stage_memory(run.model, layout)[0]
    return {kind: int(round(stage[f"{kind}_gib"] * GB)) for kind in KINDS}, dict(vars(layout))


def _compare(records: list[dict], estimate: dict) -> list[dict]:
    rows = []
    for record in records:
        for kind in KINDS:
            measured = record["bytes"][kind]
            ratio = measured / estimate[kind] if estimate[kind] else float("inf")
            rows.append({"rank": record["rank"], "item": kind, "measured_bytes": measured,
                         "estimated_bytes": estimate[kind], "ratio": round(ratio, 3),
                         "holds": abs(ratio - 1.0) <= TOLERANCE})
    return rows


def _largest_group_bytes(config: str, overrides: list[str]) -> tuple[int, str]:
    """Bytes of the export's largest tensor group (one checkpoint tensor and the HF tensors it
    becomes, at the model's dtype) and its name."""
    from mor_megatron.hf.layouts import Dims, entries
    from mor_megatron.yaml_config import load_model_config

    model = load_model_config(config, overrides)
    width = model.params_dtype.itemsize
    best = max(entries(Dims.from_mor(model)), key=lambda e: sum(_numel(s) for s in e.shapes))
    return sum(_numel(s) for s in best.shapes) * width, best.megatron


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


# -- the rehearsal ----------------------------------------------------------------------------------


def rehearse(args: argparse.Namespace) -> dict:
    from mor_megatron.tools.bench_train_trainer import write_random_shard
    from mor_megatron.yaml_config import load_model_config

    _oom_first()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = load_model_config(args.config, list(args.overrides) + [f"model.seq_length={args.seq_length}"])
    shard = out / "data" / "random"
    shard.parent.mkdir(exist_ok=True)
    write_random_shard(str(shard), model.vocab_size, args.seq_length, samples=16, seed=1)
    run_dir = out / "run"
    for stale in (run_dir, out / "probe", out / "hf"):  # a rehearsal starts from nothing (no resume)
        shutil.rmtree(stale, ignore_errors=True)
    max_rss = int(args.max_rss_gib * GIB) if args.max_rss_gib else None
    common = [
        f"model.seq_length={args.seq_length}", f"data.train={shard}", f"logging.dir={run_dir}",
        "logging.progress=false", "logging.tensorboard=false", "logging.log_interval=1",
        "training.micro_batch_size=1", "training.global_batch_size=1", "training.lr_schedule=constant",
        "training.warmup_steps=0", "training.save_interval=0", "training.keep_checkpoints=1",  # disk: 25 GB each at 1.7B
        "training.bf16=true", *args.overrides,
    ]
    pretrain = [sys.executable, "-m", "mor_megatron.pretrain", "--config", args.config]
    phases, comparisons = [], {}
    report = {"config": args.config, "overrides": list(args.overrides), "seq_length": args.seq_length,
              "parameters": None, "phases": phases, "memory_vs_estimate": comparisons, "failed": None}
    try:
        for name, tp, steps, launcher in (
            ("train-tp2", 2, 2, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port())]),
            ("resume-tp1", 1, 3, []),
        ):
            overrides = common + [f"training.train_steps={steps}"]
            probe = out / "probe" / name
            command = (launcher + ["-m", "mor_megatron.pretrain", "--config", args.config] if launcher else pretrain)
            phase = _run(name, command + overrides + [f"parallel.tensor_model_parallel_size={tp}"],
                         out / f"{name}.log", args.timeout, probe, max_rss)
            records = _probe(probe)
            if not records or any(r["bytes"] is None for r in records):
                raise PhaseFailed(name, "no optimizer step was measured", out / f"{name}.log", phase["tree_held_peak_bytes"])
            phase["ranks"] = [{"rank": r["rank"], "peak_rss_bytes": r["peak_rss_bytes"], "steps": r["steps"],
                               "bytes": r["bytes"]} for r in records]
            phase["log"] = str(out / f"{name}.log")
            estimate, layout = _estimate(args.config, overrides, tp)
            comparisons[name] = {"layout": layout, "estimate_bytes": estimate, "rows": _compare(records, estimate)}
            phases.append(phase)
        text = (out / "resume-tp1.log").read_text()
        report["resumed_layout_free"] = "layout-free form" in text and "at step 2" in text
        hf = out / "hf"
        phase = _run("export", [sys.executable, "tools/convert_to_hf.py", "--checkpoint",
                                str(run_dir / "checkpoints"), "--output", str(hf), "--overwrite"],
                     out / "export.log", args.timeout, max_rss=max_rss)
        group, name = _largest_group_bytes(args.config, list(args.overrides))
        peak = phase["tree_peak_rss_bytes"]
        phase.update(ranks=[{"rank": 0, "peak_rss_bytes": peak}], log=str(out / "export.log"),
                     largest_group_bytes=group, largest_group=name, constant_bytes=EXPORT_CONSTANT_BYTES,
                     bound_bytes=2 * group + EXPORT_CONSTANT_BYTES, within_bound=peak <= 2 * group + EXPORT_CONSTANT_BYTES,
                     written_bytes=sum(p.stat().st_size for p in hf.glob("*.safetensors")))
        phases.append(phase)
        phase = _run("load-hf", [sys.executable, "-c", HF_LOAD, str(hf)], out / "load-hf.log", args.timeout,
                     max_rss=max_rss)
        loaded = json.loads((out / "load-hf.log").read_text().strip().splitlines()[-1])
        phase.update(ranks=[{"rank": 0, "peak_rss_bytes": phase["tree_peak_rss_bytes"]}], log=str(out / "load-hf.log"),
                     **loaded)
        phases.append(phase)
    except PhaseFailed as err:
        report["failed"] = str(err)
        records = _probe(out / "probe" / err.phase)  # what the failed phase measured before it stopped
        phases.append({"phase": err.phase, "wall_s": None, "failed": True, "tree_held_peak_bytes": err.held,
                       "ranks": [{"rank": r["rank"], "peak_rss_bytes": r["peak_rss_bytes"]} for r in records]})
    report["parameters"] = _parameter_count(args.config, list(args.overrides))
    for phase in phases:
        if phase["phase"] == "load-hf" and not phase.get("failed"):
            phase["holds"] = (phase["loaded_parameters"] == report["parameters"] and phase["logits_finite"]
                              and phase["logits_shape"][-1] >= _vocab_size(args.config, list(args.overrides)))
            if not phase["holds"] and not report["failed"]:
                report["failed"] = (f"phase load-hf: transformers loaded {phase['loaded_parameters']:,} parameters "
                                    f"(expected {report['parameters']:,}) with logits {phase['logits_shape']} "
                                    f"{'finite' if phase['logits_finite'] else 'NOT finite'}")
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(f"figures: {out / 'rehearsal.json'}")
    if report["failed"]:
        from mor_megatron.errors import UserError

        raise UserError(report["failed"])
    return report


def _parameter_count(config: str, overrides: list[str]) -> int:
    from mor_megatron.report import embedding_params, non_embedding_params
    from mor_megatron.yaml_config import load_model_config

    model = load_model_config(config, overrides)
    return non_embedding_params(model) + embedding_params(model)


def _vocab_size(config: str, overrides: list[str]) -> int:
    from mor_megatron.yaml_config import load_model_config

    return load_model_config(config, overrides).vocab_size


def format_table(report: dict) -> str:
    """The rehearsal's figures as one plain-text table."""
    lines = [f"rehearsal of {report['config']} ({report['parameters'] / 1e6:,.0f}M parameters, "
             f"seq {report['seq_length']})",
             f"{'phase':<11} {'rank':>4} {'wall s':>8} {'peak RSS GiB':>13}  "
             f"{'item':<10} {'measured MiB':>12} {'estimate MiB':>12} {'ratio':>6}  within 10%"]
    for phase in report["phases"]:
        rows = {}
        for row in report["memory_vs_estimate"].get(phase["phase"], {}).get("rows", []):
            rows.setdefault(row["rank"], []).append(row)
        wall = "-" if phase["wall_s"] is None else f"{phase['wall_s']:.1f}"
        for rank in phase["ranks"]:
            head = f"{phase['phase']:<11} {rank['rank']:>4} {wall:>8} {rank['peak_rss_bytes'] / GIB:>13.3f}  "
            items = rows.get(rank["rank"], [])
            if not items:
                lines.append(head)
            for i, row in enumerate(items):
                lines.append((head if i == 0 else " " * len(head)) +
                             f"{row['item']:<10} {row['measured_bytes'] / MIB:>12.2f} {row['estimated_bytes'] / MIB:>12.2f} "
                             f"{row['ratio']:>6.3f}  {'yes' if row['holds'] else 'NO'}")
        lines.append(f"{'':<11} all processes of the phase together: {phase['tree_held_peak_bytes'] / GIB:.3f} GiB at most")
        if phase["phase"] == "export":
            lines.append(f"{'':<11} export peak {phase['ranks'][0]['peak_rss_bytes'] / GIB:.3f} GiB vs bound "
                         f"2 x largest group ({phase['largest_group']}, {phase['largest_group_bytes'] / GIB:.3f} GiB)"
                         f" + {phase['constant_bytes'] / GIB:.2f} GiB = {phase['bound_bytes'] / GIB:.3f} GiB: "
                         f"{'within' if phase['within_bound'] else 'OVER'}")
        if phase["phase"] == "load-hf" and "holds" in phase:
            lines.append(f"{'':<11} transformers loaded {phase['loaded_class']}: {phase['loaded_parameters']:,} parameters "
                         f"({phase['loaded_bytes'] / GIB:.3f} GiB; expected {report['parameters']:,}), logits "
                         f"{phase['logits_shape']} {'finite' if phase['logits_finite'] else 'NOT finite'}: "
                         f"{'ok' if phase['holds'] else 'WRONG'}")
    if report.get("failed"):
        lines.append(f"FAILED: {report['failed']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
