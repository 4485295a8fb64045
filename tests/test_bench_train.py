"""`tools/bench_train.py` end to end at a very small shape, model-only and through the real trainer
(eager: the compiled jobs run in the dry run of tools/gpu_check.py, step h): JSON keys, positive
numbers, and ratios that are computed from the measured values. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mor_megatron.tools.bench_train import job_name, paper_depth, summarize  # noqa: E402

MODEL_KEYS = (
    "kind", "effective_layers", "unique_layers", "params", "step_times_s", "step_time_s",
    "tokens_per_s", "training_flops_per_token", "achieved_tflops", "fraction_of_probe",
    "peak_memory_bytes", "min_step_time_s", "losses",
)


def test_paper_depth_rule():
    assert paper_depth(8, 2) == 8 and paper_depth(8, 3) == 8
    assert paper_depth(8, 4) == 10  # 2 + 4 * ceil(6 / 4)
    assert paper_depth(32, 4) == 34 and paper_depth(30, 4) == 30
    assert paper_depth(2, 3) == 5  # at least one block layer


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    config = tmp_path_factory.getbasetemp() / "bench_tiny.yaml"
    config.write_text(
        "model:\n  hidden_size: 32\n  num_attention_heads: 4\n  num_query_groups: 2\n"
        "  ffn_hidden_size: 64\n  vocab_size: 128\n  seq_length: 16\n  effective_layers: 4\n"
    )
    proc = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--config", str(config), "--batch-size", "2",
         "--seq-length", "16", "--steps", "2", "--warmup", "0", "--threads", "1",
         "--recursions", "4", "--token-choice", "4", "--probe-size", "128", "--loops", "model,trainer", "--compile", "off",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MoR vs vanilla" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)
    return json.loads(out.read_text())


def test_models_and_keys(report):
    from mor_megatron.training.config import TrainingConfig

    assert report["settings"]["grad_clip"] == TrainingConfig().grad_clip  # both loops, the trainer's default
    models = report["models"]
    # L=4, Nr=4: (4-2) % 4 != 0, so L' = 2 + 4*1 = 6, compared with a vanilla of that depth
    megatron = {"vanilla L=4", "mor nr=4", "mor tc nr=4", "vanilla L=6"}
    assert set(models) == megatron | {f"{name} [trainer]" for name in megatron} | {"transformers L=4"}
    for name in ("mor nr=4", "mor nr=4 [trainer]", "mor tc nr=4", "mor tc nr=4 [trainer]"):
        assert models[name]["effective_layers"] == 6
        assert models[name]["unique_layers"] == 3  # 1 + 1 shared + 1
        # as run (pads included) >= as routed; expert-choice top-k runs no pads
        routing = models[name]["routing"]
        assert len(routing["run_tokens"]) == 2 and all(len(step) == 4 for step in routing["run_tokens"])
        assert models[name]["training_flops_per_token"] >= models[name]["routed_flops_per_token"]
        assert models[name]["padding_overhead"] >= 0
        if "tc" not in name:
            assert routing["run_tokens"] == routing["selected_tokens"] and models[name]["padding_overhead"] == 0
    # the trainer ran mor-pretrain's own model: the same parameters, its own logged losses
    for name in megatron:
        trainer = models[f"{name} [trainer]"]
        assert trainer["loop"] == "trainer" and trainer["params"] == models[name]["params"]
        assert len(trainer["losses"]) == 2 and all(loss > 0 for loss in trainer["losses"])
    for name, record in models.items():
        for key in MODEL_KEYS:
            assert key in record, (name, key)
        assert len(record["step_times_s"]) == 2 and len(record["cpu_times_s"]) == 2
        for key in ("params", "step_time_s", "cpu_time_s", "tokens_per_s", "training_flops_per_token",
                    "achieved_tflops", "fraction_of_probe", "peak_memory_bytes"):
            assert record[key] > 0, (name, key)
    assert report["probe"]["tflops"] > 0 and len(report["probe"]["samples_tflops"]) == 2
    assert report["settings"]["tokens_per_step"] == 32


def test_ratios_come_from_measurements(report):
    models, comparisons = report["models"], report["comparisons"]
    tokens = report["settings"]["tokens_per_step"]
    for record in models.values():
        times = sorted(record["step_times_s"])
        assert record["step_time_s"] == pytest.approx((times[0] + times[1]) / 2)
        assert record["min_step_time_s"] == times[0]
        assert record["tokens_per_s"] == pytest.approx(tokens / record["step_time_s"])
        assert record["achieved_tflops"] == pytest.approx(
            record["training_flops_per_token"] * record["tokens_per_s"] / 1e12
        )
        assert record["fraction_of_probe"] == pytest.approx(
            record["achieved_tflops"] / report["probe"]["tflops"]
        )
    rows = {row["mor"]: row for row in comparisons["mor_vs_vanilla"]}
    assert set(rows) == {"mor nr=4", "mor nr=4 [trainer]", "mor tc nr=4", "mor tc nr=4 [trainer]"}
    assert rows["mor nr=4"]["vanilla"] == rows["mor tc nr=4"]["vanilla"] == "vanilla L=6"
    assert rows["mor nr=4 [trainer]"]["vanilla"] == "vanilla L=6 [trainer]"
    assert rows["mor tc nr=4"]["target"] == 1.05 and rows["mor nr=4"]["target"] == 1.03
    for name, row in rows.items():
        mor, vanilla = models[name], models[row["vanilla"]]
        assert row["step_time_ratio"] == pytest.approx(mor["step_time_s"] / vanilla["step_time_s"])
        assert row["flops_ratio"] == pytest.approx(  # as routed
            mor["routed_flops_per_token"] / vanilla["training_flops_per_token"]
        )
        assert row["padding_overhead"] == mor["padding_overhead"]
        assert 0 < row["flops_ratio"] < 1
        assert row["overhead"] == pytest.approx(row["step_time_ratio"] / row["flops_ratio"])
        assert row["verdict"] == ("PASS" if row["paired_overhead"] <= row["target"] else "MISS")
        assert row["min_overhead"] == pytest.approx(
            mor["min_step_time_s"] / vanilla["min_step_time_s"] / row["flops_ratio"]
        )
        pairs = sorted(m / v for m, v in zip(mor["step_times_s"], vanilla["step_times_s"]))
        assert row["paired_overhead"] == pytest.approx((pairs[0] + pairs[1]) / 2 / row["flops_ratio"])
    vs = comparisons["ours_vs_transformers"]
    assert vs["tokens_per_s_ratio"] == pytest.approx(
        models["vanilla L=4"]["tokens_per_s"] / models["transformers L=4"]["tokens_per_s"]
    )
    # same shape, same accounting: identical FLOPs per token and parameter counts
    assert models["vanilla L=4"]["training_flops_per_token"] == models["transformers L=4"][
        "training_flops_per_token"
    ]
    assert models["vanilla L=4"]["params"] == models["transformers L=4"]["params"]
    assert {row["model"] for row in comparisons["model_flops_utilization"]} == set(models)
    probe = report["probe"]
    size = probe["size"]
    samples = sorted(2 * size**3 / t / 1e12 for t in probe["step_times_s"])
    assert probe["tflops"] == pytest.approx((samples[0] + samples[1]) / 2)
    overhead = {row["trainer"]: row for row in comparisons["trainer_overhead"]}
    assert set(overhead) == {"vanilla L=4 [trainer]", "mor nr=4 [trainer]", "mor tc nr=4 [trainer]",
                             "vanilla L=6 [trainer]"}
    for name, row in overhead.items():
        trainer, model = models[name], models[row["model_only"]]
        assert row["step_time_ratio"] == pytest.approx(trainer["step_time_s"] / model["step_time_s"])
        pairs = sorted(t / m for t, m in zip(trainer["step_times_s"], model["step_times_s"]))
        assert row["paired_ratio"] == pytest.approx((pairs[0] + pairs[1]) / 2)


def _record(model: str, times: list[float], flops: float, loop: str = "model", compiled: bool = False) -> dict:
    return {"model": model, "loop": loop, "compiled": compiled, "step_times_s": times,
            "training_flops_per_token": flops, "peak_memory_bytes": 1}


def test_variants_pair_within_their_own_loop_and_compile_setting():
    """MoR is compared with the vanilla job of its own loop and compile setting, the trainer with
    the model-only job of its compile setting, compiled with eager of its loop; each from the
    paired per-cycle ratios (here cycle 2 ran on a machine twice as slow: pairing cancels it)."""
    flops = {"vanilla L=6": 10.0, "mor nr=4": 8.0}
    base = {"vanilla L=6": [1.0, 2.0, 1.0], "mor nr=4": [0.8, 1.6, 0.8]}
    scale = {("model", False): 1.0, ("trainer", False): 1.02, ("model", True): 0.5, ("trainer", True): 0.6}
    models = {}
    for (loop, compiled), factor in scale.items():
        for name, times in base.items():
            slower = 1.1 if (name, loop, compiled) == ("mor nr=4", "trainer", True) else 1.0
            models[job_name(name, loop, compiled)] = _record(
                name, [t * factor * slower for t in times], flops[name], loop, compiled)
    entries = [{"name": "vanilla L=6", "role": "vanilla"},
               {"name": "mor nr=4", "role": "mor", "vanilla": "vanilla L=6", "num_recursions": 4,
                "effective_layers": 6}]
    probe = {"samples_tflops": [1.0, 1.0, 1.0]}
    out = summarize(models, entries, probe, None, tokens_per_step=100)
    mor = {row["mor"]: row for row in out["mor_vs_vanilla"]}
    assert mor["mor nr=4"]["vanilla"] == "vanilla L=6" and mor["mor nr=4"]["paired_overhead"] == pytest.approx(1.0)
    assert mor["mor nr=4 [trainer, compiled]"]["vanilla"] == "vanilla L=6 [trainer, compiled]"
    assert mor["mor nr=4 [trainer, compiled]"]["paired_overhead"] == pytest.approx(1.1)
    assert [mor[name]["verdict"] for name in ("mor nr=4", "mor nr=4 [trainer, compiled]")] == ["PASS", "MISS"]
    trainer = {row["trainer"]: row for row in out["trainer_overhead"]}
    assert trainer["vanilla L=6 [trainer]"]["model_only"] == "vanilla L=6"
    assert trainer["vanilla L=6 [trainer]"]["paired_ratio"] == pytest.approx(1.02)
    assert trainer["vanilla L=6 [trainer]"]["verdict"] == "PASS"
    assert trainer["vanilla L=6 [trainer, compiled]"]["model_only"] == "vanilla L=6 [compiled]"
    assert trainer["vanilla L=6 [trainer, compiled]"]["paired_ratio"] == pytest.approx(1.2)
    assert trainer["vanilla L=6 [trainer, compiled]"]["verdict"] == "MISS"
    speedup = {(row["model"], row["loop"]): row for row in out["compile_speedup"]}
    assert speedup[("vanilla L=6", "model")]["tokens_per_s_ratio"] == pytest.approx(2.0)
    assert speedup[("vanilla L=6", "trainer")]["paired_ratio"] == pytest.approx(1.02 / 0.6)


def test_token_choice_flops_as_routed_and_as_run():
    """A token-choice job's FLOPs per token from the token counts its steps recorded: as run
    (pads included: what the achieved FLOP/s count), as routed (what the MoR/vanilla FLOPs ratio
    uses), and the padding overhead between them; without statistics, the analytic figure."""
    from model_helpers import tiny_config
    from mor_megatron.report import training_flops_per_token
    from mor_megatron.tools.bench_train import routing_flops

    config = tiny_config(router="token_choice")  # S = 24, Nr = 3; micro-batch of 2: 48 slots
    routing = {"run_tokens": [[48, 36, 24], [48, 40, 20]], "selected_tokens": [[48, 30, 14], [48, 34, 16]]}
    out = routing_flops(config, routing, 48)
    assert out["run_fractions"] == pytest.approx([1.0, 38 / 48, 22 / 48])
    assert out["routed_fractions"] == pytest.approx([1.0, 32 / 48, 15 / 48])
    assert out["training_flops_per_token"] == pytest.approx(training_flops_per_token(config, out["run_fractions"]))
    assert out["routed_flops_per_token"] == pytest.approx(training_flops_per_token(config, out["routed_fractions"]))
    assert out["padding_overhead"] == pytest.approx(
        out["training_flops_per_token"] / out["routed_flops_per_token"] - 1) and out["padding_overhead"] > 0
    analytic = routing_flops(config, None, 48)
    assert analytic["padding_overhead"] == 0
    assert analytic["training_flops_per_token"] == analytic["routed_flops_per_token"] == training_flops_per_token(config)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_model_only_loop_clips_to_the_trainers_norm(parallel, clip):
    """The model-only step clips its gradients to the trainer's `training.grad_clip` before AdamW
    steps, so both loops run the same update; 0 leaves them unclipped (a random model's gradient
    norm is far above 1e-3)."""
    import torch

    from model_helpers import tiny_config
    from mor_megatron.tools.bench_train import _Session
    from mor_megatron.yaml_config import dump_model_config

    config = tiny_config(effective_layers=4, num_recursions=2)
    spec = dict(kind="megatron", model=dump_model_config(config), batch_size=2, seq_length=config.seq_length,
                vocab_size=config.vocab_size, warmup=0, steps=1, threads=torch.get_num_threads(),
                dtype="float32", seed=0, lr=1e-3, grad_clip=clip)
    session = _Session(spec)
    norms = []
    step = session.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in session.model.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return step(*args, **kwargs)

    session.optimizer.step = recording_step
    session.step()
    assert len(norms) == 1
    if clip:
        assert norms[0] <= clip * (1 + 1e-4)
    else:
        assert norms[0] > 1e-2


def test_trainer_grad_clip_is_the_trainers_own():
    from mor_megatron.tools.bench_train import trainer_grad_clip
    from mor_megatron.tools.bench_train_trainer import run_sections
    from mor_megatron.training.config import TrainingConfig

    assert trainer_grad_clip([]) == TrainingConfig().grad_clip
    assert trainer_grad_clip(["logging.log_interval=2", "training.grad_clip=0.25"]) == 0.25
    assert trainer_grad_clip(["training.grad_clip=0"]) == 0.0
    spec = dict(batch_size=2, warmup=1, steps=2, seed=0, lr=1e-3, dtype="float32", grad_clip=0.25, model={})
    assert run_sections(spec, "run", "data")["training"]["grad_clip"] == 0.25
