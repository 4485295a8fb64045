"""Pretraining data: embedded corpus, tokenizers, megatron-core shards, training-side readers.

Names are imported lazily (megatron.core and transformers take seconds to import):

    from mor_megatron.data import PretrainingBatches, ValidationBatches, DataError
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "stdlib_documents": "corpus",
    "write_stdlib_jsonl": "corpus",
    "TextTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "EOS_TOKEN": "tokenizer",
    "ShardWriter": "shards",
    "open_shard": "shards",
    "read_documents": "shards",
    "TokenStream": "shards",
    "PretrainingBatches": "dataset",
    "ValidationBatches": "dataset",
    "parse_blend": "dataset",
    "PreprocessConfig": "preprocess",
    "run_preprocess": "preprocess",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mor_megatron.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"mor_megatron.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
