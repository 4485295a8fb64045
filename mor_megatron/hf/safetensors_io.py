"""Read and write HF weight folders: `model.safetensors`, or shards plus
`model.safetensors.index.json` above a size threshold. Pickled weights (`pytorch_model.bin`) can
run code when unpickled: they are read only on the user's explicit `allow_pickle`, and then still
through torch's restricted `weights_only` unpickler."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from mor_megatron.hf.layouts import ConversionError
from mor_megatron.json_files import read_json

INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes of `5GB`, `500MB`, `2GiB` or a plain integer."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", size.upper())
    if not match or match.group(2) not in _UNITS:
        raise ConversionError(f"--max-shard-size {size!r} is not a size: use e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_safetensors(tensors: dict[str, torch.Tensor], output: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` (in name order) into `output`; returns the file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += _nbytes(tensor)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(output / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(_nbytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _shard_files(folder: Path, index: str, single: str) -> list[str]:
    if (folder / index).is_file():
        weight_map = read_json(folder / index, f"re-download or re-export {folder}", ("weight_map",), ConversionError)
        return sorted(set(weight_map["weight_map"].values()))
    return [single] if (folder / single).is_file() else []


def read_safetensors(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (single file or sharded with an index); safetensors only,
    unless `allow_pickle` lets a folder without them be read from `pytorch_model*.bin`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = _shard_files(folder, INDEX, "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    if files:
        for name in files:
            state.update(load_file(str(folder / name)))
        return state
    pickled = _shard_files(folder, PICKLE_INDEX, "pytorch_model.bin")
    if not pickled:
        raise ConversionError(f"{folder} has no model.safetensors or {INDEX}: give a Hugging Face model folder")
    if not allow_pickle:
        raise ConversionError(
            f"{folder} holds only pickled weights ({pickled[0]}), which can run code when loaded: convert "
            "them to safetensors, or pass --allow-pickle if you trust their source"
        )
    for name in pickled:
        try:
            state.update(torch.load(folder / name, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()[-1][:200]
            raise ConversionError(f"{folder / name} holds more than tensors and was not loaded ({reason}): "
                                  "get safetensors weights from a source you trust") from None
    return state
