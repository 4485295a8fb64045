"""Tiny MoR models for CPU tests."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from mor_megatron.config import MoRConfig
from mor_megatron.model import MoRGPTModel

TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=97,
    seq_length=24,
)


def tiny_config(**overrides) -> MoRConfig:
    settings = dict(TINY, effective_layers=8, num_recursions=3)
    settings.update(overrides)
    return MoRConfig(**settings)


def build(config: MoRConfig, seed: int = 0) -> MoRGPTModel:
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return MoRGPTModel(config)


def batch(config: MoRConfig, batch_size: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.seq_length), generator=generator)
    positions = torch.arange(config.seq_length).unsqueeze(0).expand(batch_size, -1)
    return tokens, positions


def logits(model: MoRGPTModel, tokens: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:
    extra = {"routing_mode": kwargs.pop("routing_mode")} if "routing_mode" in kwargs else None
    return model(tokens, positions, None, extra_block_kwargs=extra, **kwargs)
