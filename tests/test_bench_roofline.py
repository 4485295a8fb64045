"""tools/bench_roofline.py: its list of a step's kernels adds up to the FLOPs `report` counts for the
model (an independent sum over the calls as the model runs them), its ceiling is the FLOPs over
the summed kernel time, and it runs end to end at a small shape (its figures are the README's,
from a full run; nothing is asserted about speed)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_roofline  # noqa: E402
from bench_optimizer import _model  # noqa: E402

from mor_megatron.report import forward_flops_breakdown  # noqa: E402

SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=96", "model.seq_length=48"]


def _config(recursions, extra=()):
    args = bench_roofline.build_parser().parse_args(
        (["--recursions", str(recursions)] if recursions else []) + SMALL + list(extra))
    return _model(args)[1]


@pytest.mark.parametrize("recursions, extra", [
    (None, []),
    (2, []),
    (3, []),
    (4, ["model.num_query_groups=2"]),  # GQA: fewer key/value heads
    (3, ["model.gated_linear_unit=false"]),
])
def test_the_step_kernels_add_up_to_the_reports_flops(recursions, extra):
    config = _config(recursions, extra)
    batch = 3
    gemms, attention = bench_roofline.step_kernels(config, batch)
    counted = forward_flops_breakdown(config)
    expected = 3 * batch * config.seq_length * (counted["matmuls"] + counted["lm_head"] + counted["attention"])
    listed = (sum(g.flops * n for g, n in gemms.items())
              + sum(a.flops(config) * n for a, n in attention.items()))
    assert listed == pytest.approx(expected, rel=1e-12)
    layer_calls = sum(attention.values())
    assert layer_calls == len(config.recursion_plan.unrolled)  # one attention per layer call
    assert sum(gemms.values()) == 3 * (4 * layer_calls + 1)  # fwd, dgrad, wgrad of 4 linears + the head


def test_the_ceiling_is_the_flops_over_the_summed_kernel_time():
    config = _config(3)
    gemms, attention = bench_roofline.step_kernels(config, 2)
    gemm_s = {g: 1e-3 * (i + 1) for i, g in enumerate(gemms)}
    attention_s = {a: 2e-3 for a in attention}
    result = bench_roofline.ceiling(config, 2, gemm_s, attention_s, probe_flops_per_s=1e9)
    seconds = sum(gemm_s[g] * n for g, n in gemms.items()) + sum(2e-3 * n for n in attention.values())
    assert result["all"]["seconds"] == pytest.approx(seconds)
    assert result["all"]["share_of_probe"] == pytest.approx(result["all"]["flops"] / seconds / 1e9)
    assert result["all"]["flops"] == pytest.approx(result["gemms"]["flops"] + result["attention"]["flops"])


def test_runs_end_to_end(capsys):
    assert bench_roofline.main(["--repeats", "2", "--recursions", "2", "--probe-size", "128", *SMALL]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mor nr=2 and vanilla L=8, batch 4 x 48, ", out, re.M), out
    for model in ("mor nr=2", "vanilla L=8"):
        table = out.split(f"model: {model}\n", 1)[1]
        for kind in ("gemms", "attention", "all"):
            assert re.search(rf"^  {kind} +[\d.]+ +[\d.]+ +\d+ +\d+%$", table, re.M), (model, kind)
        assert re.search(r"^  ceiling: a step of these kernels alone reaches \d+% of the probe$", table, re.M)
    assert re.search(r"^mor nr=2 over vanilla L=8, kernel time over FLOPs: [\d.]+$", out, re.M), out


@pytest.mark.parametrize("recursions", [2, 3, 4])
def test_recursions_picks_the_mor_model_at_every_depth(recursions):
    """Nr=4 runs at L'=10, whose vanilla model plan_models appends after the MoR one."""
    config = _config(recursions)
    assert (config.router, config.num_recursions) == ("expert_choice", recursions)
