"""Parameters that live on several pipeline stages: the shared block and the tied embedding.

Each is one logical parameter: replicas start equal, their gradients are summed across the stages
holding them before every optimizer step (DeepSpeed never runs megatron's `finalize_model_grads`,
so this is our own step), and all replicas but one carry `ds_pipe_replicated` so the gradient norm
counts them once. Dist-checkpointing stores one copy: the decoder's `replica_layers` names the
layers whose state another stage saves (`MoRDecoder.sharded_state_dict` marks them non-main).
`parallel/setup.py` `parallelize` runs the setup here once per built model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from mor_megatron.config import MoRConfig
from mor_megatron.model.rules import Unit

# one group per stage placement (models of other configs in one process place the block elsewhere)
# and per pipeline group (a re-initialised parallel state has new groups)
_BLOCK_GROUPS: dict[tuple, Optional[dist.ProcessGroup]] = {}


def block_stages(stages: list[list[Unit]]) -> list[int]:
    """Pipeline ranks whose units include a recursion step."""
    return [rank for rank, units in enumerate(stages) if any(u.kind == "recursion" for u in units)]


def shared_block_group(stages: list[list[Unit]]) -> Optional[dist.ProcessGroup]:
    """The group of this rank's pipeline peers that hold a shared-block replica (None if one).

    Every rank must call this: groups are created collectively for every pipeline group.
    """
    holders = block_stages(stages)
    pipeline_group = parallel_state.get_pipeline_model_parallel_group()
    key = (tuple(holders), id(pipeline_group))
    if key in _BLOCK_GROUPS:
        return _BLOCK_GROUPS[key]
    block_group = None
    if len(holders) > 1 and len(holders) == pipeline_group.size():
        block_group = pipeline_group
    elif len(holders) > 1:
        mine = parallel_state._PIPELINE_GLOBAL_RANKS  # this rank's pipeline, stage order
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, list(mine))
        for pipeline in sorted({tuple(p) for p in everyone}):
            group = dist.new_group([pipeline[stage] for stage in holders])
            if list(pipeline) == list(mine):
                block_group = group
        if parallel_state.get_pipeline_model_parallel_rank() not in holders:
            block_group = None
    _BLOCK_GROUPS[key] = block_group
    return block_group


def shared_block_layers(model: nn.Module, config: MoRConfig) -> list[str]:
    """Keys of the shared block's layers in this stage's `decoder.layers` (none on a stage
    without recursion steps)."""
    return [str(index) for index in config.recursion_plan.block if str(index) in model.decoder.layers]


def shared_block_parameters(model: nn.Module, config: MoRConfig) -> list[nn.Parameter]:
    layers = model.decoder.layers
    return [param for key in shared_block_layers(model, config) for param in layers[key].parameters()]


def setup_replicas(model: nn.Module, config: MoRConfig, stages: list[list[Unit]]) -> None:
    """Broadcast the shared block from its first holder and mark the other replicas: for
    DeepSpeed's gradient norm (`ds_pipe_replicated`) and for dist-checkpointing (the decoder's
    `replica_layers`). Collective over every rank."""
    group = shared_block_group(stages)
    if group is None:
        return
    holders = block_stages(stages)
    owner = dist.get_global_rank(group, 0)
    is_owner = parallel_state.get_pipeline_model_parallel_rank() == holders[0]
    with torch.no_grad():
        for param in shared_block_parameters(model, config):
            dist.broadcast(param.data, src=owner, group=group)
            param.ds_pipe_replicated = not is_owner
    model.decoder.replica_layers = frozenset() if is_owner else frozenset(shared_block_layers(model, config))


def mark_embedding_replica(model: nn.Module) -> None:
    """The last stage's copy of the tied embedding counts once in the gradient norm."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if getattr(model, "post_process", False) and not getattr(model, "pre_process", True):
        weight = model.shared_embedding_or_output_weight()
        if weight is not None:
            weight.ds_pipe_replicated = True


def sync_replica_grads(model: nn.Module, config: MoRConfig, stages: list[list[Unit]]) -> None:
    """Sum gradients of replicated parameters across the stages holding them."""
    group = shared_block_group(stages)
    if group is not None:
        for param in shared_block_parameters(model, config):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
    if (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        and parallel_state.is_rank_in_embedding_group(ignore_virtual=True)
        and model.share_embeddings_and_output_weights
    ):
        weight = model.shared_embedding_or_output_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
