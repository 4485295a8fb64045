"""Equal-training-FLOPs study: vanilla and MoR models from one base shape, each trained through
mor-pretrain for the steps that spend the same training FLOPs; one table, study.json, study.png.

    python tools/isoflop.py --base configs/isoflop_tiny.yaml --budget 6e12 \\
        --train data/stdlib1k_train --valid data/stdlib1k_valid --tokenizer data/tokenizer1k \\
        --out runs/isoflop --seeds 1 2

is the CPU miniature (6 models x 2 seeds, about 50 minutes on 2 cores; the 1,024-token shards
come from the README's preprocess_data.py line). On GPUs the same command with `--base configs/vanilla_135m.yaml
model.effective_layers=26` (a depth that Nr 2, 3 and 4 all share), FineWeb-Edu shards, the
paper-scale --budget and `--nproc 8` reproduces the paper's equal-compute comparison.

From the base config's width and effective depth the tool derives each model of `MODELS`: vanilla
(the settings of `report.vanilla_config`), MoR Nr=2/3/4 (expert-choice, recursion-wise KV,
middle-cycle), Nr=3 token-choice and Nr=3 KV sharing (`kv_mode: share_first`). Each model trains
for train_steps = round(budget / (report.training_flops_per_token x tokens per step)): the paper's
accounting, 3 x forward FLOPs with the routers' capacities. A budget that gives fewer than
`MIN_STEPS` steps, or FLOPs off the budget by more than 1% after rounding, is refused.

Every run is a normal run in <out>/<model>-seed<S>/ (config.yaml, train.log, metrics.jsonl,
TensorBoard, a checkpoint every 1/`SAVE_POINTS` of its steps, the newest kept), with
~`EVAL_POINTS` validation passes, warm-up `WARMUP_FRACTION` of its steps and the base's WSD shape.
A rerun skips the runs whose metrics.jsonl reached their last step and resumes an interrupted one
from its newest checkpoint (a SIGTERM or Ctrl-C saves one at once; a killed run loses at most
1/`SAVE_POINTS` of its steps); curves read the last record of each step.
Overrides (`section.key=value`) apply to the base; the tool then sets train_steps, warmup_steps,
eval_interval, save_interval, seed, data.* and logging.dir itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

MIN_STEPS = 50
MAX_FLOPS_ERROR = 0.01
EVAL_POINTS = 10
WARMUP_FRACTION = 0.05  # the same schedule shape for every run: warm-up and WSD decay scale with steps
KEEP_CHECKPOINTS = 1
# checkpoints a run writes: a run killed without a signal (no save) loses at most 1/SAVE_POINTS
SAVE_POINTS = 4

_EC = {"sharing": "middle_cycle", "router": "expert_choice", "kv_mode": "recursion_wise"}
# model name -> the MoRConfig settings it changes on the vanilla model of the base shape
MODELS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "mor2": {**_EC, "num_recursions": 2},
    "mor3": {**_EC, "num_recursions": 3},
    "mor4": {**_EC, "num_recursions": 4},
    "mor3_tc": {**_EC, "num_recursions": 3, "router": "token_choice", "router_z_loss_coeff": 1e-5},
    "mor3_kvshare": {**_EC, "num_recursions": 3, "kv_mode": "share_first"},
}
LINE_STYLES = ("-", "--", ":", "-.")


def model_names(text: str) -> list[str]:
    """An argparse type: comma-separated names of `MODELS`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of distinct models from {', '.join(MODELS)}")
    return names


model_names.bad_example = "vanilla,mor9"


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_float, positive_int, seed

    parser = ToolParser(prog="mor-isoflop", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base YAML config (its width and depth)")
    parser.add_argument("--budget", required=True, type=positive_float, help="training FLOPs per run, e.g. 1.6e13")
    parser.add_argument("--train", required=True, help="training shard prefix (or weighted blend)")
    parser.add_argument("--valid", required=True, help="validation shard prefix")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder the shards were made with")
    parser.add_argument("--out", required=True, help="study folder: one run folder per model and seed")
    parser.add_argument("--seeds", nargs="+", type=seed, default=[1, 2], help="training seeds [1 2]")
    parser.add_argument("--models", type=model_names, default=list(MODELS),
                        help=f"comma-separated models [{','.join(MODELS)}]")
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: study(args), args.debug)


# -- planning ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One model and seed: its run config (sections), steps and accounting figures."""

    model: str
    seed: int
    sections: dict[str, dict]
    steps: int
    figures: dict[str, Any]
    tokens_per_step: int
    directory: Path
    curve: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.model}-seed{self.seed}"

    @property
    def flops_per_step(self) -> float:
        return self.figures["training_flops_per_token"] * self.tokens_per_step


def model_config(base: Any, model: str) -> Any:
    """The MoRConfig of `model` at the base's width and effective depth."""
    import dataclasses

    from mor_megatron.report import vanilla_config

    vanilla = vanilla_config(base)
    settings = MODELS[model]
    return dataclasses.replace(vanilla, num_layers=0, **settings) if settings else vanilla


def train_steps(budget: float, flops_per_step: float, model: str) -> int:
    """Steps that spend `budget`; one line when too few or too far off after rounding."""
    from mor_megatron.errors import UserError

    steps = round(budget / flops_per_step)
    if steps < MIN_STEPS:
        raise UserError(f"--budget {budget:.3g} gives {model} {steps} steps: use at least "
                        f"{MIN_STEPS * flops_per_step:.3g} FLOPs ({MIN_STEPS} steps)")
    if abs(steps * flops_per_step / budget - 1) > MAX_FLOPS_ERROR:
        raise UserError(f"--budget {budget:.3g}: {model}'s {steps} steps miss it by more than "
                        f"{MAX_FLOPS_ERROR:.0%}: use a larger budget")
    return steps


def check_depth(effective_layers: int, models: Sequence[str], base: str) -> None:
    """Every model at the same effective depth: middle-cycle needs L - 2 divisible by each Nr."""
    from mor_megatron.errors import UserError

    nrs = sorted({MODELS[m]["num_recursions"] for m in models if MODELS[m]})
    step = math.lcm(*nrs) if nrs else 1
    if (effective_layers - 2) % step:
        lower = 2 + (effective_layers - 2) // step * step
        raise UserError(
            f"{base}: effective_layers={effective_layers} cannot be shared by middle-cycle "
            f"Nr={','.join(map(str, nrs))} "
            f"(L-2 must be divisible by {step}): override model.effective_layers={lower} or {lower + step}")


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the study, checked before any of them starts."""
    from mor_megatron.errors import UserError
    from mor_megatron.report import model_figures
    from mor_megatron.training.config import TrainingConfig
    from mor_megatron.yaml_config import ConfigError, dump_model_config, load_sections, model_config_from_dict

    sections = load_sections(args.base, args.overrides)
    if "model" not in sections:
        raise UserError(f"{args.base}: no 'model:' section: pass a model config such as configs/isoflop_tiny.yaml")
    base = model_config_from_dict(sections["model"], args.base)
    training = sections.get("training", {})
    defaults = TrainingConfig()
    global_batch = int(training.get("global_batch_size", defaults.global_batch_size))
    tokens_per_step = global_batch * base.seq_length
    check_depth(base.effective_layers, args.models, args.base)
    shapes = {}
    for model in args.models:
        try:
            config = model_config(base, model)
        except ConfigError as err:
            raise UserError(f"{args.base}: cannot derive {model}: {err}") from None
        figures = model_figures(config)
        steps = train_steps(args.budget, figures["training_flops_per_token"] * tokens_per_step, model)
        shapes[model] = (config, figures, steps)
    runs = []
    for seed in args.seeds:  # seed-major: a study stopped half-way has every model at the first seed
        for model, (config, figures, steps) in shapes.items():
            directory = Path(args.out) / f"{model}-seed{seed}"
            run_sections = {
                **sections,
                "model": dump_model_config(config),
                "data": {**sections.get("data", {}), "train": args.train, "valid": args.valid,
                         "tokenizer": args.tokenizer},
                "training": {**training, "global_batch_size": global_batch, "train_steps": steps, "seed": seed,
                             "warmup_steps": round(WARMUP_FRACTION * steps),
                             "eval_interval": max(1, steps // EVAL_POINTS), "save_interval": max(1, steps // SAVE_POINTS),
                             "keep_checkpoints": KEEP_CHECKPOINTS},
                "logging": {**sections.get("logging", {}), "dir": str(directory)},
            }
            runs.append(Run(model, seed, run_sections, steps, figures, tokens_per_step, directory))
    return runs


# -- running ----------------------------------------------------------------------------------------


def read_metrics(directory: Path) -> list[dict]:
    """The run's metrics, the last record of each step (a resumed run reran the steps it lost)."""
    from mor_megatron.training.metrics import read_metrics as last_records

    return last_records(directory)


def finished(run: Run) -> bool:
    """The run's metrics reached its last step with a validation loss."""
    return any(row["step"] == run.steps and "valid/loss" in row for row in read_metrics(run.directory))


def write_config(run: Run) -> Path:
    """The run's config.yaml; one line when the folder holds a run made with other settings."""
    import yaml

    from mor_megatron.errors import UserError

    path = run.directory / "config.yaml"
    text = yaml.safe_dump(run.sections, sort_keys=False)
    if path.exists() and path.read_text() != text:
        raise UserError(f"{run.directory} holds a run with other settings (budget, base or overrides): "
                        "use another --out or delete that folder")
    run.directory.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def command(config: Path, nproc: int) -> list[str]:
    pretrain = ["-m", "mor_megatron.pretrain", "--config", str(config)]
    if nproc == 1:
        return [sys.executable, *pretrain]
    return [sys.executable, "-m", "mor_megatron.torchrun", "--standalone", "--nproc-per-node", str(nproc), *pretrain]


def _wall_path(run: Run) -> Path:
    return run.directory / "wall_time.json"


def launch(run: Run, nproc: int) -> None:
    """Train `run` with mor-pretrain (resuming from its checkpoint), its output in train.log; the
    wall time adds up over launches."""
    from mor_megatron.errors import UserError

    config = write_config(run)
    previous = json.loads(_wall_path(run).read_text())["wall_s"] if _wall_path(run).exists() else 0.0
    started = time.perf_counter()
    try:
        with open(run.directory / "train.log", "a") as log:
            code = subprocess.call(command(config, nproc), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        _wall_path(run).write_text(json.dumps({"wall_s": previous + time.perf_counter() - started}))
    if code != 0:
        tail = (run.directory / "train.log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"run {run.name} failed (exit {code}): {tail[0]} (log: {run.directory / 'train.log'})")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def execute(runs: list[Run], nproc: int) -> None:
    """Run what is not finished, with one progress line per run and an ETA from the runs so far."""
    flops_done, seconds = 0.0, 0.0
    for index, run in enumerate(runs, 1):
        head = f"[{index}/{len(runs)}] {run.name}: {run.steps} steps, {run.steps * run.tokens_per_step:,} tokens"
        if finished(run):
            print(f"{head}: finished earlier, skipped", flush=True)
            continue
        remaining = sum(r.steps * r.flops_per_step for r in runs[index - 1:] if not finished(r))
        eta = (f"study ETA {_clock(remaining * seconds / flops_done)}" if flops_done  # FLOPs/s of the runs so far
               else "study ETA after the first run")
        print(f"{head} ({eta})", flush=True)
        started = time.perf_counter()
        launch(run, nproc)
        seconds += time.perf_counter() - started
        flops_done += run.steps * run.flops_per_step


# -- results ----------------------------------------------------------------------------------------


def collect(run: Run) -> dict[str, Any]:
    rows = read_metrics(run.directory)
    run.curve = [(row["step"], row["valid/loss"]) for row in rows if "valid/loss" in row]
    wall = _wall_path(run)
    run.wall_s = json.loads(wall.read_text())["wall_s"] if wall.exists() else float("nan")
    loss = run.curve[-1][1]
    tokens = run.steps * run.tokens_per_step
    rates = sorted(row["train/tokens_per_s"] for row in rows if "train/tokens_per_s" in row)
    return {
        "seed": run.seed, "directory": str(run.directory), "train_steps": run.steps,
        "valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)),
        "wall_s": run.wall_s, "tokens_per_s": tokens / run.wall_s,
        # the trainer's own steady rate (median over the logged steps): no start-up, no evaluation
        "step_tokens_per_s": rates[len(rates) // 2] if rates else float("nan"),
        "curve": [{"step": step, "training_flops": step * run.flops_per_step, "valid_loss": value}
                  for step, value in run.curve],
    }


def summarize(runs: list[Run], budget: float) -> dict[str, Any]:
    """Figures of every model: accounting once, each seed's results, mean and spread."""
    models: dict[str, Any] = {}
    for run in runs:
        figures = run.figures
        params = figures["non_embedding_params"] + figures["embedding_params"]
        tokens = run.steps * run.tokens_per_step
        entry = models.setdefault(run.model, {
            "unique_layers": figures["unique_layers"], "effective_layers": figures["effective_layers"],
            "non_embedding_params": figures["non_embedding_params"], "total_params": params,
            "training_flops_per_token": figures["training_flops_per_token"], "train_steps": run.steps,
            "training_flops": run.steps * run.flops_per_step, "tokens": tokens,
            "tokens_per_param": tokens / params, "runs": [],
        })
        entry["runs"].append(collect(run))
    for entry in models.values():
        losses = [r["valid_loss"] for r in entry["runs"]]
        entry["valid_loss_mean"] = sum(losses) / len(losses)
        entry["valid_loss_spread"] = max(losses) - min(losses)  # max - min over seeds
        entry["valid_perplexity_mean"] = math.exp(min(entry["valid_loss_mean"], 50.0))
        entry["wall_s_mean"] = sum(r["wall_s"] for r in entry["runs"]) / len(entry["runs"])
        entry["tokens_per_s_mean"] = sum(r["tokens_per_s"] for r in entry["runs"]) / len(entry["runs"])
        entry["step_tokens_per_s_mean"] = sum(r["step_tokens_per_s"] for r in entry["runs"]) / len(entry["runs"])
    return {"budget": budget, "seeds": sorted({run.seed for run in runs}), "models": models}


def table(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    head = ["model", "unique", "non-emb params", "params", "train FLOPs", "tokens", "tok/param"]
    head += [f"loss s{s}" for s in seeds] + ["loss mean", "spread", "ppl mean", "wall s", "tok/s", "step tok/s"]
    rows = [head]
    for name, m in summary["models"].items():
        by_seed = {r["seed"]: r for r in m["runs"]}
        rows.append([
            name, str(m["unique_layers"]), f"{m['non_embedding_params']:,}", f"{m['total_params']:,}",
            f"{m['training_flops']:.4g}", f"{m['tokens']:,}", f"{m['tokens_per_param']:.2f}",
            *[f"{by_seed[s]['valid_loss']:.4f}" if s in by_seed else "-" for s in seeds],
            f"{m['valid_loss_mean']:.4f}", f"{m['valid_loss_spread']:.4f}", f"{m['valid_perplexity_mean']:.2f}",
            f"{m['wall_s_mean']:.0f}", f"{m['tokens_per_s_mean']:,.0f}", f"{m['step_tokens_per_s_mean']:,.0f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def plot(summary: dict[str, Any], path: Path) -> None:
    """Validation loss against training FLOPs: one colour per model, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the training machines
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10")
    for index, (name, m) in enumerate(summary["models"].items()):
        for run in m["runs"]:
            style = LINE_STYLES[summary["seeds"].index(run["seed"]) % len(LINE_STYLES)]
            axes.plot([p["training_flops"] for p in run["curve"]], [p["valid_loss"] for p in run["curve"]],
                      style, color=colours(index % 10), marker=".", label=f"{name} seed {run['seed']}")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("validation loss")
    axes.set_title(f"Equal training FLOPs ({summary['budget']:.3g} per run)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def study(args: argparse.Namespace) -> None:
    from mor_megatron.errors import UserError

    try:
        import matplotlib  # noqa: F401  (checked before hours of training, not after)
    except ImportError:
        raise UserError("matplotlib is not installed: pip install 'mor-megatron[study]'") from None
    runs = plan(args)
    for model in dict.fromkeys(run.model for run in runs):
        first = next(run for run in runs if run.model == model)
        print(f"{model}: {first.figures['unique_layers']} unique layers, {first.steps} steps, "
              f"{first.steps * first.flops_per_step:.4g} training FLOPs "
              f"({first.steps * first.flops_per_step / args.budget - 1:+.2%} of the budget)", flush=True)
    execute(runs, args.nproc)
    summary = summarize(runs, args.budget)
    out = Path(args.out)
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "study.png")
    print(table(summary))
    print(f"wrote {out / 'study.json'} and {out / 'study.png'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
