"""Token shards in megatron-core's indexed format (`PREFIX.bin` + `PREFIX.idx`).

One shard sequence per document, each document ending with EOS, written by megatron-core's
`IndexedDatasetBuilder` and read back with its memory-mapped `IndexedDataset`. The `.bin` file is
the documents' tokens back to back, so it is also the shard's concatenated token stream.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

from mor_megatron.data.errors import DataError


def _indexed_dataset_module() -> Any:
    """megatron-core's indexed_dataset module (imported lazily: megatron.core takes seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits, else int32 (megatron-core's own choice)."""
    return _indexed_dataset_module().DType.optimal_dtype(vocab_size)


class ShardWriter:
    """Append EOS-terminated documents to `PREFIX.bin/.idx`; files appear only on `close()`."""

    def __init__(self, prefix: str, vocab_size: int, eos_id: int) -> None:
        mod = _indexed_dataset_module()
        self.prefix = prefix
        self.eos_id = eos_id
        self.dtype = mod.DType.optimal_dtype(vocab_size)
        self._tmp = prefix + ".tmp"
        self._builder = mod.IndexedDatasetBuilder(mod.get_bin_path(self._tmp), dtype=self.dtype)
        self._mod = mod
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Add one document (its tokens without EOS; EOS is appended here)."""
        doc = np.empty(len(tokens) + 1, dtype=self.dtype)
        doc[:-1] = tokens
        doc[-1] = self.eos_id
        self._builder.add_document(doc, [doc.size])
        self.documents += 1
        self.tokens += doc.size

    def close(self) -> list[str]:
        """Write the index and move both files into place; return their paths."""
        mod = self._mod
        self._builder.finalize(mod.get_idx_path(self._tmp))
        paths = []
        for get in (mod.get_bin_path, mod.get_idx_path):
            os.replace(get(self._tmp), get(self.prefix))
            paths.append(get(self.prefix))
        return paths

    def abort(self) -> None:
        """Drop the partial files."""
        self._builder.data_file.close()
        for path in (self._tmp + ".bin", self._tmp + ".idx"):
            if os.path.exists(path):
                os.remove(path)


def open_shard(prefix: str) -> Any:
    """Open `PREFIX.bin/.idx` as megatron-core's `IndexedDataset`, after checking it is whole.

    Raises `DataError` for a missing file, an unreadable index, an empty shard, or a `.bin`
    whose size does not match the index (truncated or from another run).
    """
    mod = _indexed_dataset_module()
    idx_path, bin_path = mod.get_idx_path(prefix), mod.get_bin_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"shard file not found: {path}; fix: check the data path prefix (without "
                ".bin/.idx) or create it with tools/preprocess_data.py"
            )
    try:
        # megatron's own .idx parser; read before mmapping .bin since numpy cannot mmap 0 bytes
        index = mod._IndexReader(idx_path, multimodal=False)
        expected_bytes = int(index.sequence_lengths.sum(dtype=np.int64)) * index.dtype_size
        documents = int(index.document_count) - 1
        del index
    except Exception as exc:
        raise DataError(
            f"shard index {idx_path} is unreadable ({type(exc).__name__}); fix: re-create the "
            "shard with tools/preprocess_data.py"
        ) from exc
    if expected_bytes == 0:
        raise DataError(
            f"shard {prefix} is empty ({documents} documents, 0 tokens); fix: re-run "
            "tools/preprocess_data.py on input that has text"
        )
    actual_bytes = os.path.getsize(bin_path)
    if actual_bytes != expected_bytes:
        raise DataError(
            f"shard {prefix}: .idx expects {expected_bytes} bytes but .bin has {actual_bytes} "
            "(truncated or from another run); fix: re-create both files with "
            "tools/preprocess_data.py"
        )
    return mod.IndexedDataset(prefix, multimodal=False, mmap=True)


def shard_meta_path(prefix: str) -> str | None:
    """`BASE_meta.json` that tools/preprocess_data.py writes next to `BASE_train` / `BASE_valid`."""
    for split in ("_train", "_valid"):
        if prefix.endswith(split):
            return prefix[: -len(split)] + "_meta.json"
    return None


def check_shard_vocab(prefix: str, vocab_size: int) -> None:
    """Raise `DataError` when the shard's preprocessing record names a larger vocabulary than the
    model's (its token ids would index past the embedding). Cheap: reads `BASE_meta.json` only;
    shards without a readable record are not checked."""
    meta = shard_meta_path(prefix)
    try:
        with open(meta or "", encoding="utf-8") as f:
            shard_vocab = int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if shard_vocab > vocab_size:
        raise DataError(
            f"shard {prefix} was tokenized with a vocabulary of {shard_vocab} ids ({meta}) but "
            f"model.vocab_size is {vocab_size}; fix: set model.vocab_size >= {shard_vocab} or "
            "re-create the shard with the model's tokenizer"
        )


def read_documents(prefix: str) -> list[np.ndarray]:
    """Every document of a shard as an int64 array (EOS included); for checks and tests."""
    dataset = open_shard(prefix)
    return [np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))]


class TokenStream:
    """A shard's concatenated tokens, cut into rows of `seq_length + 1` with stride `seq_length`.

    Row r is tokens[r*S : r*S + S + 1]: consecutive rows share one token, so every token after
    the first is a label exactly once per epoch. `num_rows = (num_tokens - 1) // S`.
    """

    def __init__(self, prefix: str, seq_length: int) -> None:
        if seq_length < 1:
            raise DataError(f"seq_length {seq_length} must be >= 1; fix: pass a positive seq_length")
        self.prefix = prefix
        self.seq_length = seq_length
        self.dataset = open_shard(prefix)
        self.dtype = self.dataset.index.dtype
        self.num_tokens = int(self.dataset.sequence_lengths.sum(dtype=np.int64))
        self.num_rows = (self.num_tokens - 1) // seq_length
        if self.num_rows < 1:
            raise DataError(
                f"shard {prefix} has {self.num_tokens} tokens, fewer than one row of "
                f"seq_length + 1 = {seq_length + 1}; fix: lower seq_length or add documents"
            )

    def row(self, r: int) -> np.ndarray:
        """Row `r` (0 <= r < num_rows): `seq_length + 1` tokens as int64."""
        itemsize = np.dtype(self.dtype).itemsize
        data = self.dataset.bin_reader.read(
            dtype=self.dtype, count=self.seq_length + 1, offset=int(r) * self.seq_length * itemsize
        )
        return data.astype(np.int64)
