"""Token shards in megatron-core's indexed format (`PREFIX.bin` + `PREFIX.idx`).

One shard sequence per document, each document ending with EOS, written in megatron-core's layout
by `ShardWriter` and read back with megatron-core's memory-mapped `IndexedDataset`. The `.bin` file
is the documents' tokens back to back, so it is also the shard's concatenated token stream.
"""

from __future__ import annotations

import json
import os
import struct
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


# megatron-core's .idx layout (indexed_dataset._IndexWriter) and dtype choice (DType), written
# here without importing megatron.core: that import costs seconds, a third of tokenizing the
# embedded corpus on 2 cores. test_data_preprocess checks the bytes against megatron's own builder.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_DTYPE_CODES = {np.uint16: 8, np.int32: 4}
_UINT16_CARDINALITY = 65500


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits, else int32 (megatron-core's `DType.optimal_dtype`)."""
    return np.uint16 if vocab_size < _UINT16_CARDINALITY else np.int32


class ShardWriter:
    """Append EOS-terminated documents to `PREFIX.bin/.idx`; files appear only on `close()`.

    Tokens stream straight to `.bin`; only the per-document lengths (4 bytes each) stay in memory.
    """

    def __init__(self, prefix: str, vocab_size: int, eos_id: int) -> None:
        self.prefix = prefix
        self.eos_id = eos_id
        self.dtype = token_dtype(vocab_size)
        self._tmp = prefix + ".tmp"
        self._bin = open(self._tmp + ".bin", "wb")
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Add one document (its tokens without EOS; EOS is appended here)."""
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([tokens.size], dtype=np.int64))

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Add documents given back to back in `flat` (no EOS) with `lengths` tokens each (all > 0
        or not: a length-0 document becomes EOS alone); EOS is appended to each here."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            return
        sizes = lengths + 1
        out = np.empty(int(sizes.sum()), dtype=self.dtype)
        ends = np.cumsum(sizes)
        is_eos = np.zeros(out.size, dtype=bool)
        is_eos[ends - 1] = True
        out[~is_eos] = flat  # numpy casts to the shard dtype (ids < vocab_size fit)
        out[is_eos] = self.eos_id
        self._bin.write(out.tobytes())
        self._lengths.append(sizes.astype(np.int32))
        self.documents += int(lengths.size)
        self.tokens += int(out.size)

    def close(self) -> list[str]:
        """Write the index and move both files into place; return their paths."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(self.dtype).itemsize
        with open(self._tmp + ".idx", "wb") as f:
            f.write(_INDEX_HEADER)
            f.write(struct.pack("<Q", _INDEX_VERSION))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))  # sequences: one per document
            f.write(struct.pack("<Q", lengths.size + 1))  # document boundaries 0..n
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(lengths.size + 1, dtype=np.int64).tobytes())
        paths = []
        for ext in (".bin", ".idx"):
            os.replace(self._tmp + ext, self.prefix + ext)
            paths.append(self.prefix + ext)
        return paths

    def abort(self) -> None:
        """Drop the partial files."""
        self._bin.close()
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


# token ids read per chunk when a shard is scanned for its largest id (bounded memory)
SCAN_CHUNK_TOKENS = 1 << 24


def max_token_id(prefix: str) -> int:
    """The largest token id in the shard `PREFIX.bin`, read in chunks through a memory map."""
    dataset = open_shard(prefix)
    tokens = np.memmap(_indexed_dataset_module().get_bin_path(prefix), dtype=dataset.index.dtype, mode="r")
    return max(int(tokens[i : i + SCAN_CHUNK_TOKENS].max()) for i in range(0, len(tokens), SCAN_CHUNK_TOKENS))


def _token_count(prefix: str) -> int:
    """Tokens in `PREFIX.bin` (its size over the index's token width)."""
    return os.path.getsize(_indexed_dataset_module().get_bin_path(prefix)) // open_shard(prefix).index.dtype_size


def _recorded_vocab(prefix: str) -> int | None:
    """The vocabulary size `BASE_meta.json` records, if that record describes this very shard
    (the token count it records for the shard's split equals the shard's); None otherwise (no
    record, or one left by an earlier corpus under the same prefix)."""
    meta = shard_meta_path(prefix)
    try:
        with open(meta or "", encoding="utf-8") as f:
            record = json.load(f)
        vocab = int(record["vocab_size"])
        split = prefix.rsplit("_", 1)[1]  # "train" or "valid": a record exists for those only
        recorded = int(record["tokens"][split])
        return vocab if recorded == _token_count(prefix) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError):
        return None


def check_shard_vocab(prefix: str, vocab_size: int) -> None:
    """Raise `DataError` when a token id of the shard is >= `vocab_size` (it would index past
    the embedding). With a preprocessing record that matches the shards (`_recorded_vocab`) this
    reads that record; otherwise (no record, or a stale one from an earlier corpus) it scans the
    shard's tokens, once, before training."""
    recorded = _recorded_vocab(prefix)
    if recorded is not None:
        if recorded > vocab_size:
            raise DataError(
                f"shard {prefix} was tokenized with a vocabulary of {recorded} ids ({shard_meta_path(prefix)}) but "
                f"model.vocab_size is {vocab_size}; fix: set model.vocab_size >= {recorded} or "
                "re-create the shard with the model's tokenizer"
            )
        return
    top = max_token_id(prefix)
    if top >= vocab_size:
        raise DataError(
            f"shard {prefix} holds token id {top}, beyond model.vocab_size {vocab_size}; fix: set "
            f"model.vocab_size >= {top + 1} or re-create the shard with the model's tokenizer"
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
