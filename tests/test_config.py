"""MoRConfig validation: each problem raises one line that names the fix."""

import pytest

from mor_megatron.config import ConfigError, MoRConfig, default_capacities
from mor_megatron.model.specs import BackendUnavailableError, get_mor_layer_spec
from mor_megatron.sharing import build_plan

BASE = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)


def config(**overrides) -> MoRConfig:
    return MoRConfig(**{**BASE, "effective_layers": 8, "num_recursions": 3, **overrides})


def raises(match: str, **overrides) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        config(**overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_follow_the_paper():
    cfg = config()
    assert (cfg.sharing, cfg.router, cfg.kv_mode) == ("middle_cycle", "expert_choice", "recursion_wise")
    assert (cfg.router_activation, cfg.router_alpha, cfg.router_aux_loss_coeff) == ("sigmoid", 0.1, 0.001)
    assert cfg.capacities == pytest.approx((1.0, 2 / 3, 1 / 3))
    assert default_capacities(4) == (1.0, 0.75, 0.5, 0.25)
    assert cfg.num_layers == 4 and cfg.normalization == "RMSNorm" and cfg.gated_linear_unit
    assert not cfg.add_bias_linear
    token = config(router="token_choice")
    assert (token.router_activation, token.router_alpha) == ("softmax", 1.0)


def test_sharing_plans():
    assert build_plan("middle_cycle", 8, 3).unrolled == (0, 1, 2, 1, 2, 1, 2, 3)
    assert build_plan("middle_sequence", 8, 3).unrolled == (0, 1, 1, 1, 2, 2, 2, 3)
    assert build_plan("cycle", 9, 3).unrolled == (0, 1, 2) * 3
    assert build_plan("sequence", 9, 3).unrolled == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert build_plan("none", 4, 1).unrolled == (0, 1, 2, 3)
    assert config(effective_layers=34, num_recursions=4).num_layers == 10


def test_middle_depth_not_divisible_names_nearest_depths():
    message = raises("divisible", effective_layers=32, num_recursions=4)
    assert "(L-2)" in message and "30" in message and "34" in message


def test_cycle_depth_not_divisible():
    message = raises("divisible", effective_layers=8, sharing="cycle")
    assert "6 or 9" in message


def test_increasing_capacities():
    raises("increase", capacities=(0.5, 1.0, 0.25))


def test_capacity_count_and_range():
    raises("one per recursion", capacities=(1.0, 0.5))
    raises(r"\(0, 1\]", capacities=(1.0, 0.5, 0.0))


def test_share_first_needs_full_first_step():
    raises("capacities\\[0\\]", kv_mode="share_first", capacities=(0.9, 0.5, 0.25))


def test_heads_not_divisible_by_query_groups():
    raises("num_query_groups", num_query_groups=3)


def test_hidden_not_divisible_by_heads():
    raises("hidden_size=66", hidden_size=66)


def test_tensor_parallel_must_divide_heads_and_groups():
    raises("tensor_model_parallel_size=4", tensor_model_parallel_size=4)


@pytest.mark.parametrize(
    "field,value",
    [("sharing", "cyclic"), ("router", "expert"), ("kv_mode", "shared"), ("router_activation", "relu")],
)
def test_unknown_names(field, value):
    message = raises(f"unknown .*'{value}'", **{field: value})
    assert "choose one of" in message


def test_routing_needs_a_recursion_block():
    raises("needs a recursion block", sharing="sequence", effective_layers=9)


def test_none_sharing_with_recursions():
    raises("set num_recursions to 1", sharing="none", router="none")


def test_num_layers_is_derived():
    raises("num_layers is derived", num_layers=8)


def test_missing_depth():
    with pytest.raises(ConfigError, match="effective_layers must be set"):
        MoRConfig(**BASE)


def test_te_backend_on_cpu_is_one_clear_error():
    with pytest.raises(BackendUnavailableError, match="use backend 'local'"):
        get_mor_layer_spec("te")
    with pytest.raises(ValueError, match="unknown backend"):
        get_mor_layer_spec("fast")


@pytest.mark.parametrize("num_recursions,depth", [(2, 8), (3, 8), (4, 10)])
def test_pipeline_plan_balances_recursion_steps(num_recursions, depth):
    from mor_megatron.parallel.pipeline import plan_stages, stage_flops, unit_forward_flops
    from mor_megatron.model.rules import decoder_units

    cfg = config(effective_layers=depth, num_recursions=num_recursions, seq_length=256, vocab_size=512)
    stages = plan_stages(cfg, 2)
    assert [u for stage in stages for u in stage] == decoder_units(cfg)
    assert all(stages)
    flops = stage_flops(cfg, stages)
    # no other split point does better
    units = decoder_units(cfg)
    head = 2 * cfg.hidden_size * cfg.vocab_size * cfg.seq_length
    for cut in range(1, len(units)):
        first = sum(unit_forward_flops(cfg, u) for u in units[:cut])
        second = sum(unit_forward_flops(cfg, u) for u in units[cut:]) + head
        assert max(flops) <= max(first, second) + 1e-6


def test_pipeline_plan_keeps_shared_kv_recursions_together():
    from mor_megatron.parallel.pipeline import plan_stages

    cfg = config(kv_mode="share_first", seq_length=64)
    stages = plan_stages(cfg, 2)
    holders = [i for i, stage in enumerate(stages) if any(u.kind == "recursion" for u in stage)]
    assert len(holders) == 1
    with pytest.raises(ValueError, match="at most 3 stages"):
        plan_stages(cfg, 4)
