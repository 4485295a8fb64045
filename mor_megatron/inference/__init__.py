"""MoR inference: static KV caches, causal incremental decoding, a depth-wise batching engine,
and a static-shape (compilable) decode tick for fixed batches."""

from mor_megatron.inference.cache import (
    CacheOverflowError,
    KVCacheSet,
    KVUsage,
    StaticKVCache,
    expected_recursion_ratio,
    kv_bytes_per_row,
)
from mor_megatron.inference.decode import (
    DecodeOutput,
    IncrementalDecoder,
    ModelStages,
)
from mor_megatron.inference.engine import Completion, Engine, EngineStats
from mor_megatron.inference.sampling import SamplingParams
from mor_megatron.inference.static_decode import StaticBatchDecoder, StaticDecodeStats

__all__ = [
    "CacheOverflowError",
    "Completion",
    "DecodeOutput",
    "Engine",
    "EngineStats",
    "IncrementalDecoder",
    "KVCacheSet",
    "KVUsage",
    "ModelStages",
    "SamplingParams",
    "StaticBatchDecoder",
    "StaticDecodeStats",
    "StaticKVCache",
    "expected_recursion_ratio",
    "kv_bytes_per_row",
]
