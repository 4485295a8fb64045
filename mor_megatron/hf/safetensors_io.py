"""Read and write HF weight folders: `model.safetensors`, or shards plus
`model.safetensors.index.json` above a size threshold. Pickled weights (`pytorch_model.bin`) can
run code when unpickled: they are read only on the user's explicit `allow_pickle`, and then still
through torch's restricted `weights_only` unpickler."""

from __future__ import annotations

import json
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

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


# safetensors' dtype names; the rank orders a file's tensors as safetensors itself does (larger
# items first, then by name), so that a streamed file is byte-identical to `save_file`'s
_DTYPES = {
    torch.float64: ("F64", 8), torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2),
    torch.int64: ("I64", 8), torch.int32: ("I32", 4), torch.int16: ("I16", 2), torch.int8: ("I8", 1),
    torch.uint8: ("U8", 1), torch.bool: ("BOOL", 1),
}
_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")  # safetensors' Dtype enum order


@dataclass(frozen=True)
class TensorSpec:
    """What a streamed file will hold under `name`, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype, device="meta").element_size()  # size only, no storage


class SafetensorsWriter:
    """Write tensors one at a time into `model.safetensors` (or shards plus the index above
    `max_shard_bytes`, split in name order as `write_safetensors` does): each file's header is
    written first from `specs`, each tensor's bytes at their offset when it comes, so memory holds
    one tensor at a time. `close()` checks every tensor came and returns the file names."""

    def __init__(self, specs: Sequence[TensorSpec], output: Path, max_shard_bytes: int,
                 metadata: Optional[dict[str, str]] = None) -> None:
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in sorted(specs, key=lambda spec: spec.name):
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        self.output = Path(output)
        self.names = (["model.safetensors"] if len(shards) == 1 else
                      [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        self.total = sum(spec.nbytes for spec in specs)
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (file, absolute offset, spec)
        self._files = []
        for index, (file_name, shard) in enumerate(zip(self.names, shards)):
            header = self._header(shard, metadata or {"format": "pt"}, index)
            handle = open(self.output / file_name, "wb")
            handle.write(struct.pack("<Q", len(header)) + header)
            handle.truncate(8 + len(header) + sum(spec.nbytes for spec in shard))
            self._files.append(handle)
        self._written: set[str] = set()

    def _header(self, shard: list[TensorSpec], metadata: dict[str, str], index: int) -> bytes:
        ordered = sorted(shard, key=lambda spec: (-_ORDER.index(_DTYPES[spec.dtype][0]), spec.name))
        entries: dict[str, object] = {"__metadata__": metadata}
        offset, starts = 0, {}
        for spec in ordered:
            entries[spec.name] = {"dtype": _DTYPES[spec.dtype][0], "shape": list(spec.shape),
                                  "data_offsets": [offset, offset + spec.nbytes]}
            starts[spec.name] = offset
            offset += spec.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
        for spec in ordered:
            self._where[spec.name] = (index, 8 + len(text) + starts[spec.name], spec)
        return text

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype or name in self._written:
            raise ConversionError(f"tensor {name}: {tuple(tensor.shape)} {tensor.dtype} does not match its planned "
                                  f"{spec.shape} {spec.dtype} (or came twice): a bug in the export, please report it")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        handle = self._files[index]
        handle.seek(offset)
        handle.write(memoryview(data))
        self._written.add(name)

    def close(self) -> list[str]:
        for handle in self._files:
            handle.close()
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise ConversionError(f"tensor {missing[0]} was planned but never written: a bug in the export, please report it")
        if len(self.names) > 1:
            weight_map = {name: self.names[index] for name, (index, _, _) in self._where.items()}
            index_json = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.output / INDEX).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
        return list(self.names)


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(tensor.shape), tensor.dtype)


def write_safetensors(tensors: dict[str, torch.Tensor], output: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` (in name order) into `output`; returns the file names."""
    writer = SafetensorsWriter([spec_of(name, t) for name, t in tensors.items()], output, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.close()


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
