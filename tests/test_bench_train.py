"""`tools/bench_train.py` end to end at a very small shape: JSON keys, positive numbers, and ratios
that are computed from the measured values. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mor_megatron.tools.bench_train import paper_depth  # noqa: E402

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
         "--recursions", "4", "--probe-size", "128", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MoR vs vanilla" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)
    return json.loads(out.read_text())


def test_models_and_keys(report):
    models = report["models"]
    # L=4, Nr=4: (4-2) % 4 != 0, so L' = 2 + 4*1 = 6, compared with a vanilla of that depth
    assert set(models) == {"vanilla L=4", "mor nr=4", "vanilla L=6", "transformers L=4"}
    assert models["mor nr=4"]["effective_layers"] == 6
    assert models["mor nr=4"]["unique_layers"] == 3  # 1 + 1 shared + 1
    for name, record in models.items():
        for key in MODEL_KEYS:
            assert key in record, (name, key)
        assert len(record["step_times_s"]) == 2
        for key in ("params", "step_time_s", "tokens_per_s", "training_flops_per_token",
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
    assert set(rows) == {"mor nr=4"}
    assert rows["mor nr=4"]["vanilla"] == "vanilla L=6"
    for name, row in rows.items():
        mor, vanilla = models[name], models[row["vanilla"]]
        assert row["step_time_ratio"] == pytest.approx(mor["step_time_s"] / vanilla["step_time_s"])
        assert row["flops_ratio"] == pytest.approx(
            mor["training_flops_per_token"] / vanilla["training_flops_per_token"]
        )
        assert 0 < row["flops_ratio"] < 1
        assert row["overhead"] == pytest.approx(row["step_time_ratio"] / row["flops_ratio"])
        assert row["verdict"] == ("PASS" if row["overhead"] <= row["target"] else "MISS")
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
