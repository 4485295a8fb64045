"""The `mpu` object DeepSpeed asks for, answered from megatron-core's parallel state.

DeepSpeed's "model parallel" is megatron's tensor x pipeline group: it names checkpoint files by
its rank and counts non-tensor-parallel parameters once per group in the gradient norm. Passing
`mpu=None` with TP=2 is silently wrong (rank 0 would broadcast over rank 1's shard), so the
engine always gets this adapter. It deliberately has no `initialize_sequence_parallel`: DeepSpeed
ignores an mpu that has one.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMpu:
    """Forwards DeepSpeed's mpu calls to `megatron.core.parallel_state`."""

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=ps.get_model_parallel_group())

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(dist.get_process_group_ranks(ps.get_data_parallel_group()))

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()
