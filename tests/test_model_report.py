"""Model accounting: analytic parameters vs a built model, paper sizes, FLOPs, KV cache, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mor_megatron.config import MoRConfig
from mor_megatron.report import (
    embedding_params,
    forward_flops_breakdown,
    forward_flops_per_token,
    kv_bytes_per_layer_token,
    kv_cache_breakdown,
    kv_cache_bytes_per_token,
    layer_matmul_params,
    model_report,
    non_embedding_params,
    training_flops_per_token,
    vanilla_config,
)
from mor_megatron.yaml_config import load_model_config
from model_helpers import build

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def config_360m(name: str) -> MoRConfig:
    return load_model_config(ROOT / "configs" / f"{name}.yaml")


def shape(**overrides) -> MoRConfig:
    """A small Llama shape; `overrides` pick the recursion and routing."""
    base = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=160,
                vocab_size=256, seq_length=120)
    return MoRConfig(**{**base, **overrides})


# -- parameters vs a real model -------------------------------------------------------------------


def real_counts(config: MoRConfig) -> tuple[int, int]:
    """(non-embedding, embedding) parameters of the built model (needs the `parallel` fixture)."""
    model = build(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embedding" in name)
    return total - embedding, embedding


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.aux_router=true"],
        ["model.router=token_choice"],
        ["model.sharing=none", "model.router=none", "model.num_recursions=1"],
    ],
    ids=["expert_choice", "aux_router", "token_choice", "vanilla"],
)
def test_analytic_params_match_built_model(parallel, overrides: list[str]) -> None:
    config = load_model_config(TINY, overrides)
    assert real_counts(config) == (non_embedding_params(config), embedding_params(config))


# -- paper sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, millions",
    [("vanilla_360m", 315), ("mor_360m_nr2", 167), ("mor_360m_nr3", 118), ("mor_360m_nr4", 98)],
)
def test_360m_non_embedding_params(name: str, millions: int) -> None:
    assert non_embedding_params(config_360m(name)) == pytest.approx(millions * 1e6, rel=0.02)


def test_360m_embedding_params() -> None:
    assert embedding_params(config_360m("vanilla_360m")) == 49152 * 960


def test_vanilla_counterpart_has_same_shape() -> None:
    mor = config_360m("mor_360m_nr4")
    vanilla = vanilla_config(mor)
    assert (vanilla.sharing, vanilla.router, vanilla.num_layers) == ("none", "none", 34)
    assert layer_matmul_params(vanilla) == layer_matmul_params(mor)
    assert model_report(mor)["vanilla"]["effective_layers"] == 34


# -- FLOPs ---------------------------------------------------------------------------------------


def test_vanilla_flops_by_hand() -> None:
    config = shape(effective_layers=6, sharing="none", router="none")
    D, V, S, L, H, hd = 64, 256, 120, 6, 4, 16
    matmul = D * (4 + 2 * 2) * hd + H * hd * D + D * 2 * 160 + 160 * D
    attention = L * 2 * 2 * H * hd * S * (S + 1) / 2 / S
    assert forward_flops_per_token(config) == pytest.approx(2 * L * matmul + 2 * D * V + attention)
    assert training_flops_per_token(config) == pytest.approx(3 * forward_flops_per_token(config))


def test_mor_flops_by_hand() -> None:
    config = shape(effective_layers=8, num_recursions=3)  # 1 + 2x3 + 1, k = 120, 80, 40
    S, D, Hhd = 120, 64, 64
    matmul = layer_matmul_params(config)
    parts = forward_flops_breakdown(config)
    assert parts["matmuls"] == pytest.approx(2 * matmul * (2 + 2 * (1 + 2 / 3 + 1 / 3)))
    causal = lambda n: 2 * 2 * Hhd * n * (n + 1) / 2  # noqa: E731
    expected = (2 * causal(S) + 2 * (causal(120) + causal(80) + causal(40))) / S
    assert parts["attention"] == pytest.approx(expected)
    # step r scores the candidates left by step r-1: S, k_1 = S, k_2 = 2S/3
    assert parts["routers"] == pytest.approx(2 * D * (1 + 1 + 2 / 3))
    assert parts["lm_head"] == 2 * D * 256


def test_share_first_attention_by_hand() -> None:
    config = shape(effective_layers=8, num_recursions=3, kv_mode="share_first")
    S, Hhd = 120, 64
    causal = 2 * 2 * Hhd * S * (S + 1) / 2
    block = causal + 2 * 2 * Hhd * (80 + 40) * (S + 1) / 2
    expected = (2 * causal + 2 * block) / S
    assert forward_flops_breakdown(config)["attention"] == pytest.approx(expected)


def test_token_choice_flops_assume_balance() -> None:
    ec = shape(effective_layers=8, num_recursions=3)
    tc = shape(effective_layers=8, num_recursions=3, router="token_choice")
    ec_parts, tc_parts = forward_flops_breakdown(ec), forward_flops_breakdown(tc)
    assert tc_parts["matmuls"] == ec_parts["matmuls"]
    assert tc_parts["attention"] == ec_parts["attention"]
    assert tc_parts["routers"] == 2 * 64 * 3


def test_flops_as_run_count_the_padding() -> None:
    """Given the shared block's as-run fractions (rows over B x S, pads included), the FLOPs
    count them: the analytic fractions give the analytic figure, more rows more matmul and
    attention FLOPs; the trainer reads the fractions off its router statistics."""
    from mor_megatron.report import step_fractions
    from mor_megatron.training.metrics import as_run_fractions

    for kv_mode in ("recursion_wise", "share_first"):
        tc = shape(effective_layers=8, num_recursions=3, router="token_choice", kv_mode=kv_mode)
        analytic = step_fractions(tc)
        assert training_flops_per_token(tc, analytic) == pytest.approx(training_flops_per_token(tc))
        run = [1.0, 0.75, 0.5]  # e.g. padded rows of an unbalanced batch
        parts, base = forward_flops_breakdown(tc, run), forward_flops_breakdown(tc)
        block, unique, seq = len(tc.recursion_plan.block), 2, tc.seq_length
        assert parts["matmuls"] - base["matmuls"] == pytest.approx(
            2 * layer_matmul_params(tc) * block * (sum(run) - sum(analytic)))
        heads_dim = tc.num_attention_heads * tc.head_dim
        pairs = [n * (n + 1) / 2 for n in (seq * f for f in run)]
        if kv_mode == "share_first":  # later steps: f x S queries over (S + 1) / 2 keys on average
            pairs[1:] = [f * seq * (seq + 1) / 2 for f in run[1:]]
        expected = 4 * heads_dim * (unique * seq * (seq + 1) / 2 + block * sum(pairs)) / seq
        assert parts["attention"] == pytest.approx(expected)
        assert parts["lm_head"] == base["lm_head"] and parts["routers"] == base["routers"]
    with pytest.raises(ValueError, match="3 recursion steps"):
        forward_flops_breakdown(tc, [1.0])
    assert model_report(tc)["flops_routing"].startswith("balanced")
    router = {"router/r1/run_tokens": 240.0, "router/r2/run_tokens": 180.0, "router/r3/run_tokens": 120.0}
    assert as_run_fractions(router, 3, 240) == [1.0, 0.75, 0.5]
    assert as_run_fractions({"router/r1/run_tokens": 240.0}, 3, 240) is None


def test_mor_saves_flops_vs_vanilla() -> None:
    ratios = [model_report(config_360m(f"mor_360m_nr{nr}"))["ratio_to_vanilla"] for nr in (2, 3, 4)]
    flops = [r["forward_flops_per_token"] for r in ratios]
    assert all(f < 1 for f in flops) and flops == sorted(flops, reverse=True)


# -- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nr", [2, 3, 4])
def test_recursion_wise_kv_ratio(nr: int) -> None:
    """On the recursion layers MoR caches (Nr+1)/(2Nr) of vanilla's bytes (S divisible by Nr)."""
    config = shape(effective_layers=2 + 2 * nr, num_recursions=nr)
    vanilla_block = 2 * nr * kv_bytes_per_layer_token(config)  # the 2*Nr unrolled block layers
    assert kv_cache_breakdown(config)["block"] / vanilla_block == pytest.approx((nr + 1) / (2 * nr))


@pytest.mark.parametrize("nr", [2, 3, 4])
def test_recursion_wise_kv_ratio_without_unique_layers(nr: int) -> None:
    """Cycle sharing has no unique layers, so the whole-model ratio is the recursion-layer ratio."""
    config = shape(effective_layers=3 * nr, num_recursions=nr, sharing="cycle")
    ratio = kv_cache_bytes_per_token(config) / kv_cache_bytes_per_token(vanilla_config(config))
    assert ratio == pytest.approx((nr + 1) / (2 * nr))


@pytest.mark.parametrize("nr", [2, 3, 4])
def test_share_first_kv_ratio(nr: int) -> None:
    config = shape(effective_layers=2 + 2 * nr, num_recursions=nr, kv_mode="share_first")
    vanilla_block = 2 * nr * kv_bytes_per_layer_token(config)
    assert kv_cache_breakdown(config)["block"] / vanilla_block == pytest.approx(1 / nr)


def test_kv_bytes_per_layer() -> None:
    config = config_360m("vanilla_360m")
    assert kv_bytes_per_layer_token(config) == 2 * 5 * 64 * 2
    assert kv_cache_bytes_per_token(config) == 32 * 2 * 5 * 64 * 2


# -- the CLI -------------------------------------------------------------------------------------


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "model_report.py"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


def test_model_report_prints_json() -> None:
    result = run_report("--config", "configs/mor_360m_nr3.yaml", "model.seq_length=2048")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("effective_layers", "unique_layers", "non_embedding_params", "embedding_params",
                "forward_flops_per_token", "training_flops_per_token", "kv_cache_bytes_per_token"):
        assert key in report and key in report["vanilla"] and key in report["ratio_to_vanilla"]
    assert (report["effective_layers"], report["unique_layers"]) == (32, 12)
    assert report["vanilla"]["unique_layers"] == 32
    assert report["non_embedding_params"] == pytest.approx(118e6, rel=0.02)


def test_model_report_bad_config_is_one_line_error() -> None:
    result = run_report("--config", "configs/tiny.yaml", "model.hiden_size=3")
    assert result.returncode == 2
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: configs/tiny.yaml: unknown model key 'hiden_size'")
