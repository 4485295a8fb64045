"""tools/isoflop.py: FLOPs-matched step counts from model_report, and a two-model study run end to
end through the real trainer (table, plot, JSON), whose rerun skips the finished runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mor_megatron.errors import UserError
from mor_megatron.report import training_flops_per_token
from mor_megatron.tools import isoflop
from mor_megatron.yaml_config import load_model_config, model_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = {
    "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128,
    "vocab_size": 512, "seq_length": 32, "effective_layers": 4, "num_recursions": 1,
    "sharing": "none", "router": "none", "params_dtype": "float32",
}
TOY_TRAINING = {"micro_batch_size": 4, "global_batch_size": 4, "eval_batches": 2}


def _args(base: Path, budget: float, out: Path, overrides=(), models=tuple(isoflop.MODELS), seeds=(1,)) -> object:
    return isoflop.build_parser().parse_args([*overrides,
        "--base", str(base), "--budget", str(budget), "--train", "T", "--valid", "V", "--out", str(out),
        "--models", ",".join(models), "--seeds", *map(str, seeds),
    ])


# the CPU miniature, and the GPU recipe's 135M base at a depth every Nr shares (1 + 24 + 1)
@pytest.mark.parametrize("base, overrides, budget", [
    ("isoflop_tiny", [], 3e13), ("vanilla_135m", ["model.effective_layers=26"], 1e18)])
def test_steps_spend_the_budget(base: str, overrides: list[str], budget: float, tmp_path: Path) -> None:
    path = ROOT / "configs" / f"{base}.yaml"
    shape = load_model_config(path, overrides)
    runs = isoflop.plan(_args(path, budget, tmp_path, overrides))
    assert [r.model for r in runs] == list(isoflop.MODELS)  # one seed
    expected = {"vanilla": (1, "none", "none"), "mor2": (2, "expert_choice", "recursion_wise"),
                "mor3": (3, "expert_choice", "recursion_wise"), "mor4": (4, "expert_choice", "recursion_wise"),
                "mor3_tc": (3, "token_choice", "recursion_wise"), "mor3_kvshare": (3, "expert_choice", "share_first")}
    for run in runs:
        # the model section mor-pretrain will read, accounted here without the tool's figures
        config = model_config_from_dict(run.sections["model"])
        nr, router, kv_mode = expected[run.model]
        assert (config.num_recursions, config.router) == (nr, router), run.model
        assert config.router == "none" or (config.kv_mode, config.sharing) == (kv_mode, "middle_cycle")
        assert (config.effective_layers, config.hidden_size, config.ffn_hidden_size) == (
            shape.effective_layers, shape.hidden_size, shape.ffn_hidden_size)
        tokens_per_step = run.sections["training"]["global_batch_size"] * config.seq_length
        spent = run.sections["training"]["train_steps"] * training_flops_per_token(config) * tokens_per_step
        assert abs(spent / budget - 1) <= 0.01, (run.model, spent, budget)
    steps = {run.model: run.steps for run in runs}
    assert steps["mor4"] > steps["mor3"] > steps["mor2"] > steps["vanilla"]  # cheaper tokens, more of them


def test_bad_budget_and_depth_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="steps: use at least"):
        isoflop.plan(_args(ROOT / "configs" / "isoflop_tiny.yaml", 1e11, tmp_path))
    with pytest.raises(UserError, match="override model.effective_layers=26 or 38"):
        isoflop.plan(_args(ROOT / "configs" / "vanilla_135m.yaml", 1e18, tmp_path))


def test_two_model_study_runs_and_rerun_skips(corpus, tmp_path: Path) -> None:
    base = tmp_path / "toy.yaml"
    base.write_text(yaml.safe_dump({"model": TOY_MODEL, "training": TOY_TRAINING,
                                    "logging": {"progress": False, "log_interval": 5}}))
    vanilla = model_config_from_dict(dict(TOY_MODEL, params_dtype="float32"))
    budget = 55 * training_flops_per_token(vanilla) * 4 * 32  # ~55 vanilla steps
    out = tmp_path / "study"
    command = [sys.executable, "tools/isoflop.py", "--base", str(base), "--budget", f"{budget:.6g}",
               "--train", corpus["train"], "--valid", corpus["valid"], "--tokenizer", corpus["tokenizer"],
               "--out", str(out), "--seeds", "1", "--models", "vanilla,mor2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = {line.split()[0]: line for line in first.stdout.splitlines()  # table rows only
            if line.split()[:1] in (["vanilla"], ["mor2"])}
    assert set(rows) == {"vanilla", "mor2"}, first.stdout
    summary = json.loads((out / "study.json").read_text())
    for name in ("vanilla", "mor2"):
        model = summary["models"][name]
        assert abs(model["training_flops"] / budget - 1) <= 0.01
        (run,) = model["runs"]
        assert len(run["curve"]) >= 9 and run["curve"][-1]["step"] == model["train_steps"]
        assert f"{run['valid_loss']:.4f}" in rows[name]
        assert (Path(run["directory"]) / "tensorboard").is_dir()
        saved = yaml.safe_load((Path(run["directory"]) / "config.yaml").read_text())["training"]
        assert saved["save_interval"] == max(1, model["train_steps"] // 4)  # a killed run loses <= 1/4
        assert (Path(run["directory"]) / "checkpoints" / f"step_{model['train_steps']:08d}").is_dir()
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert int.from_bytes(png[16:20], "big") >= 600 and int.from_bytes(png[20:24], "big") >= 400  # IHDR size

    lines = {name: (out / f"{name}-seed1" / "metrics.jsonl").read_text() for name in ("vanilla", "mor2")}
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 2, again.stdout
    assert {name: (out / f"{name}-seed1" / "metrics.jsonl").read_text() for name in lines} == lines
    assert json.loads((out / "study.json").read_text()) == summary  # same figures: nothing retrained
