"""Per-GPU memory estimate: parameter/optimizer accounting and how each layout knob moves it."""

import json
import subprocess
import sys

import pytest

from mor_megatron.report import embedding_params, non_embedding_params
from mor_megatron.sizing import GB, Layout, training_memory, stage_memory
from mor_megatron.yaml_config import load_model_config


@pytest.fixture(scope="module")
def mor360():
    return load_model_config("configs/mor_360m_nr3.yaml")


def test_single_gpu_states_are_the_parameter_count_times_bytes(mor360):
    stage = stage_memory(mor360, Layout(zero_stage=0))[0]
    params = non_embedding_params(mor360) + embedding_params(mor360)
    assert stage["parameters_gib"] * GB == pytest.approx(2 * params, rel=1e-4)
    assert stage["gradients_gib"] * GB == pytest.approx(2 * params, rel=1e-4)
    assert stage["optimizer_gib"] * GB == pytest.approx(12 * params, rel=1e-4)


def test_layout_knobs(mor360):
    base = stage_memory(mor360, Layout(data_parallel=8, zero_stage=0))[0]
    zero1 = stage_memory(mor360, Layout(data_parallel=8, zero_stage=1))[0]
    zero3 = stage_memory(mor360, Layout(data_parallel=8, zero_stage=3))[0]
    assert zero1["optimizer_gib"] == pytest.approx(base["optimizer_gib"] / 8)
    assert zero3["parameters_gib"] == pytest.approx(base["parameters_gib"] / 8)
    tp2 = stage_memory(mor360, Layout(tensor_parallel=2))[0]
    one = stage_memory(mor360, Layout())[0]
    assert tp2["parameters_gib"] < one["parameters_gib"] and tp2["activations_gib"] < one["activations_gib"]
    recompute = stage_memory(mor360, Layout(recompute=True))[0]
    assert recompute["activations_gib"] < one["activations_gib"] / 2
    bigger = stage_memory(mor360, Layout(micro_batch_size=4))[0]
    assert bigger["activations_gib"] == pytest.approx(4 * one["activations_gib"], rel=1e-6)
    stages = stage_memory(mor360, Layout(pipeline_parallel=2))
    assert len(stages) == 2


def test_mor_needs_less_activation_memory_than_vanilla(mor360):
    vanilla = load_model_config("configs/vanilla_360m.yaml")
    ours = training_memory(mor360, Layout(micro_batch_size=8))["max_total_gib"]
    theirs = training_memory(vanilla, Layout(micro_batch_size=8))["max_total_gib"]
    assert ours < theirs


def test_model_report_prints_memory_for_a_layout():
    out = subprocess.run(
        [sys.executable, "tools/model_report.py", "--config", "configs/mor_1_7b_nr3.yaml", "--tp", "2",
         "--pp", "2", "--dp", "8", "--micro-batch", "2", "--recompute"],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(out.stdout)
    memory = report["memory_per_gpu"]
    assert memory["layout"]["tensor_parallel"] == 2 and len(memory["stages"]) == 2
    assert memory["max_total_gib"] == max(s["total_gib"] for s in memory["stages"])
