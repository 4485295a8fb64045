"""Layout-free weights: a megatron dist-checkpoint of the model, written and read at any TP/PP.

A training checkpoint keeps them under `step_N/universal/` (with the optimizer state); an HF
import or `tools/init_weights.py` writes a bare folder of them. Training (`training.init_from`,
resume at another layout), decoding (`inference/loading.py`) and the HF export read them here,
so none of them imports another's package. Every read checks each tensor's global shape first.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mor_megatron.checkpoint_files import CheckpointError

__all__ = ["check_shapes", "load_weights", "save_weights"]


def check_shapes(expected: dict, directory: Path) -> None:
    """Every tensor `expected` holds is in the dist-checkpoint at `directory` with its global shape."""
    try:
        stored = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as err:  # megatron raises several types for unreadable metadata
        raise CheckpointError(f"{directory} is not a readable dist-checkpoint ({type(err).__name__}); "
                              "give a checkpoint directory written by this project") from None
    for tensor in nested_values(expected):
        if not isinstance(tensor, ShardedTensor):
            continue
        found = stored.get(tensor.key)
        if found is None:
            raise CheckpointError(f"{directory} has no tensor {tensor.key}: it holds another model; "
                                  "start from a checkpoint of this model's config")
        if tuple(found.global_shape) != tuple(tensor.global_shape):
            raise CheckpointError(
                f"{directory}: {tensor.key} has shape {tuple(found.global_shape)}, this model needs "
                f"{tuple(tensor.global_shape)}; start from a checkpoint of this model's config"
            )


def load_weights(model, directory: str) -> None:
    """Initialise the model from layout-free weights (a checkpoint's `universal/` or any megatron
    dist-checkpoint of this model)."""
    path = Path(directory)
    if (path / "universal").is_dir():
        path = path / "universal"
    if not path.is_dir():
        raise CheckpointError(f"training.init_from={directory} does not exist: give a checkpoint directory")
    expected = {"model": model.sharded_state_dict()}
    check_shapes(expected, path)
    loaded = dist_checkpointing.load(expected, str(path), strict="assume_ok_unexpected")
    model.load_state_dict(loaded["model"])


def save_weights(model, directory: str) -> None:
    """Layout-free weights alone (used to start other runs from the same initial model)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():  # the directory exists before any rank writes into it
        dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, directory)
