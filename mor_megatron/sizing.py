"""Per-GPU memory of a config at a parallel layout: pick a layout before renting nodes.

An estimate, per pipeline stage (the busiest one decides):
- parameters, gradients and AdamW state with mixed precision (bf16 weights and gradients, fp32
  master + two moments: 2 + 2 + 12 bytes per parameter; fp32 training: 4 + 4 + 8), divided by the
  tensor-parallel size and, per ZeRO stage, by the data-parallel size (ZeRO-1 the optimizer state,
  ZeRO-2 also gradients, ZeRO-3 also weights); bf16 at ZeRO-1 without pipelining adds the fp32
  gradient accumulation buffer (4 bytes per parameter). Stages that run recursions each hold the shared
  block; the first stage holds the embedding, the last its tied copy.
- activations of one micro-batch per layer call, from what autograd keeps for a Llama layer with
  fused attention (no S x S scores): norm inputs, q/k/v, attention output, fc1 input and output,
  SwiGLU output; a recursion step's layers see k_r tokens. Full recomputation keeps only each
  layer's input plus one layer's working set. The 1F1B schedule holds (PP - stage) micro-batches
  in flight on a stage. The last stage adds fp32 logits.
Not counted: framework workspace, communication buffers, fragmentation (keep 10-20% headroom).
"""

from __future__ import annotations

from dataclasses import dataclass

from mor_megatron.config import MoRConfig
from mor_megatron.model.rules import unit_layers
from mor_megatron.parallel.pipeline import plan_stages
from mor_megatron.report import layer_params, router_params

GB = 1024**3


@dataclass
class Layout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 1
    recompute: bool = False
    bf16: bool = True


def _layer_activation_elements(config: MoRConfig, tokens: int, tp: int) -> float:
    """Elements autograd keeps for one layer call over `tokens` tokens of one micro-batch."""
    h, f = config.hidden_size, config.ffn_hidden_size
    kv = (config.num_query_groups or config.num_attention_heads) * config.head_dim
    replicated = 4 * h  # two norm inputs, two normed linear inputs
    partitioned = (h + 2 * kv) + h + 2 * f + f  # q/k/v, attention output, fc1 output, SwiGLU output
    return tokens * (replicated + partitioned / tp)


def stage_memory(config: MoRConfig, layout: Layout) -> list[dict[str, float]]:
    """Estimated bytes per GPU on each pipeline stage, in GiB."""
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    seq, mbs = config.seq_length, layout.micro_batch_size
    stages = plan_stages(config, pp)
    width = 2 if layout.bf16 else 4
    optimizer_bytes = 12 if layout.bf16 else 8
    capacity = config.capacity_tokens(seq) if config.router != "none" else []
    block = len(config.recursion_plan.block)
    out = []
    for rank, units in enumerate(stages):
        params = len(unit_layers(config, units)) * layer_params(config) / tp
        if any(u.kind == "recursion" for u in units):
            params += router_params(config)
        if rank == 0 or rank == pp - 1:
            params += config.vocab_size * config.hidden_size / tp
        weights = params * width / (dp if layout.zero_stage >= 3 else 1)
        # bf16 at ZeRO-1 without PP: DeepSpeed's BF16_Optimizer sums gradients in an fp32 buffer
        # beside the bf16 .grad (training/optimizer.deepspeed_config); measured by tools/rehearse.py
        fp32_accumulation = 4 if layout.bf16 and layout.zero_stage == 1 and pp == 1 else 0
        grads = params * (width + fp32_accumulation) / (dp if layout.zero_stage >= 2 else 1)
        optimizer = params * optimizer_bytes / (dp if layout.zero_stage >= 1 else 1)

        calls = []  # (tokens per micro-batch) of every layer call on this stage
        for unit in units:
            if unit.kind == "layer":
                calls.append(seq * mbs)
            else:
                calls += [capacity[unit.index] * mbs] * block
        if layout.recompute:
            per_microbatch = sum(t * config.hidden_size for t in calls) + max(
                (_layer_activation_elements(config, t, tp) for t in calls), default=0.0
            )
        else:
            per_microbatch = sum(_layer_activation_elements(config, t, tp) for t in calls)
        # each recursion step writes a new [S, B, D] residual stream (out-of-place scatter)
        per_microbatch += sum(1 for u in units if u.kind == "recursion") * seq * mbs * config.hidden_size
        activations = per_microbatch * width * (pp - rank)
        if rank == pp - 1:
            activations += seq * mbs * config.vocab_size / tp * 4  # fp32 logits for the loss
        total = weights + grads + optimizer + activations
        out.append(
            {
                "stage": rank,
                "parameters_gib": weights / GB,
                "gradients_gib": grads / GB,
                "optimizer_gib": optimizer / GB,
                "activations_gib": activations / GB,
                "total_gib": total / GB,
            }
        )
    return out


def training_memory(config: MoRConfig, layout: Layout) -> dict:
    stages = stage_memory(config, layout)
    return {
        "layout": vars(layout),
        "stages": [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for s in stages],
        "max_total_gib": round(max(s["total_gib"] for s in stages), 3),
    }
