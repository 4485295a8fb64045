"""Load a training checkpoint into a single-process (TP=1, PP=1) model for decoding."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from mor_megatron.checkpoint_files import find_latest, read_meta
from mor_megatron.device import compute_device
from mor_megatron.errors import UserError


class LoadError(UserError, RuntimeError):
    """A checkpoint folder that cannot be decoded from, in one line naming the fix."""


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A `step_N` directory (has `meta.json`), or a checkpoints folder (its newest complete one)."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"--checkpoint {path} is not a directory: give a step_N checkpoint or its folder")
    if (path / "meta.json").is_file():
        return path
    found = find_latest(str(path), log=lambda message: None)
    if found is None:
        raise LoadError(f"no meta.json and no complete checkpoint in {path}: give a step_N directory")
    return found


def read_checkpoint_meta(directory: Union[str, Path]) -> dict:
    meta = read_meta(directory)
    if "model" not in meta.get("config", {}):
        raise LoadError(f"{directory}/meta.json has no config.model section: not a mor-megatron checkpoint")
    return meta


def load_model(checkpoint: Union[str, Path], device: Union[str, torch.device, None] = None):
    """(model in eval mode, its checkpoint directory, meta.json) from a training checkpoint."""
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.parallel.state import initialize_parallel
    from mor_megatron.weights import load_weights
    from mor_megatron.yaml_config import model_config_from_dict

    directory = resolve_checkpoint(checkpoint)
    meta = read_checkpoint_meta(directory)
    config = model_config_from_dict(meta["config"]["model"], f"{directory}/meta.json")
    initialize_parallel()  # binds the compute device (`torch.cuda.current_device()` on CUDA)
    device = compute_device() if device is None else torch.device(device)
    # build the weights where they will run: megatron allocates them on the host with
    # `use_cpu_initialization`, else on the current CUDA device (made `device` for the build)
    config = dataclasses.replace(config, use_cpu_initialization=device.type != "cuda")
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        model = MoRGPTModel(config)
    load_weights(model, str(directory))
    return model.to(device).eval(), directory, meta


def tokenizer_name(meta: dict, override: Optional[str] = None) -> Optional[str]:
    """The tokenizer to use: `override`, else the run's `data.tokenizer`."""
    return override or (meta.get("config", {}).get("data") or {}).get("tokenizer")
