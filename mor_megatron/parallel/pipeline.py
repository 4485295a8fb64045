"""Pipeline placement of MoR units, balanced by effective FLOPs.

Design (a) of the distributed-training issue: whole recursion steps are placed on stages. A stage
that runs any recursion step holds its own replica of the shared block; replicas start equal
(broadcast from the first stage holding them), their gradients are summed across those stages
before the optimizer step (as megatron ties the embedding across the first and last stage), and
every replica but the first is marked `ds_pipe_replicated` so DeepSpeed counts it once in the
gradient norm. The routing state (expert-choice candidates, token-choice depth/gate/H_1) crosses
stage boundaries packed with the hidden state (`model/boundary.py`). Recursive KV sharing keeps all
recursion steps on one stage, because step 1's keys would otherwise have to cross too.

Why (a) and not (b), the shared block's layers split over virtual-pipeline chunks: with (b) every
recursion step would need the full residual stream and the compacted tokens to cross each
boundary, and routing (once per step) would sit on one stage while its scatter sits on another.
With (a) a boundary carries one packed tensor and each stage's work is whole steps, whose costs
fall with k_r, which gives the balancer fine-grained pieces.
"""

from __future__ import annotations

from mor_megatron.config import MoRConfig
from mor_megatron.model.rules import Unit, decoder_units
from mor_megatron.report import causal_attention_flops, layer_matmul_params


def unit_forward_flops(config: MoRConfig, unit: Unit) -> float:
    """Forward FLOPs of one unit for one sequence of `config.seq_length` tokens."""
    seq = config.seq_length
    matmul = 2 * layer_matmul_params(config)
    if unit.kind == "layer":
        return matmul * seq + causal_attention_flops(config, seq, (seq + 1) / 2)
    k = config.capacity_tokens(seq)[unit.index]
    keys = (seq + 1) / 2 if config.kv_mode == "share_first" and unit.index > 0 else (k + 1) / 2
    per_layer = matmul * k + causal_attention_flops(config, k, keys)
    router = 2 * config.hidden_size * seq * (config.num_recursions if config.router == "token_choice" else 1)
    return len(config.recursion_plan.block) * per_layer + router


def _groups(config: MoRConfig) -> list[list[Unit]]:
    """Units that must stay on one stage: with KV sharing, all recursion steps together."""
    groups: list[list[Unit]] = []
    for unit in decoder_units(config):
        joined = config.kv_mode == "share_first" and unit.kind == "recursion"
        if joined and groups and groups[-1][-1].kind == "recursion":
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def plan_stages(config: MoRConfig, pipeline_size: int) -> list[list[Unit]]:
    """Split the units into `pipeline_size` contiguous non-empty runs minimising the costliest
    stage (the LM head counts on the last stage). Linear-partition dynamic programme."""
    groups = _groups(config)
    if pipeline_size > len(groups):
        raise ValueError(
            f"pipeline_model_parallel_size={pipeline_size} exceeds the {len(groups)} placeable "
            f"units of this model: use at most {len(groups)} stages"
        )
    cost = [sum(unit_forward_flops(config, u) for u in group) for group in groups]
    head = 2 * config.hidden_size * config.vocab_size * config.seq_length
    n = len(groups)
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    # best[s][i]: minimal max-stage cost placing groups[:i] on s stages; cut[s][i] the last cut
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pipeline_size + 1)]
    cut = [[0] * (n + 1) for _ in range(pipeline_size + 1)]
    best[0][0] = 0.0
    for s in range(1, pipeline_size + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                stage = prefix[i] - prefix[j] + (head if s == pipeline_size and i == n else 0.0)
                value = max(best[s - 1][j], stage)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(pipeline_size, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [[u for g in groups[a:b] for u in g] for a, b in reversed(bounds)]


def stage_flops(config: MoRConfig, stages: list[list[Unit]]) -> list[float]:
    """Forward FLOPs per sequence of each stage, LM head included on the last."""
    head = 2 * config.hidden_size * config.vocab_size * config.seq_length
    flops = [sum(unit_forward_flops(config, u) for u in stage) for stage in stages]
    flops[-1] += head
    return flops


def describe_stages(config: MoRConfig, stages: list[list[Unit]]) -> str:
    """One line per stage: its units and forward FLOPs, for the launch log."""
    lines = []
    for rank, (stage, flops) in enumerate(zip(stages, stage_flops(config, stages))):
        names = ", ".join(
            f"layer {u.index}" if u.kind == "layer" else f"recursion {u.index + 1}" for u in stage
        )
        lines.append(f"pipeline stage {rank}: {flops / 1e9:.3f} GFLOP/sequence forward [{names}]")
    return "\n".join(lines)
