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
    """The model's forward; a MoR model keeps each step's selection mask (`router_output.selections`)."""
    extra = {"record_selections": True} if isinstance(model, MoRGPTModel) else {}
    if "routing_mode" in kwargs:
        extra["routing_mode"] = kwargs.pop("routing_mode")
    return model(tokens, positions, None, extra_block_kwargs=extra or None, **kwargs)


@torch.no_grad()
def generate_sequential(model, prompt: list[int], params=None, max_seq=None, tokenizer=None) -> list[int]:
    """One request alone, prefill then one token at a time through `IncrementalDecoder`: the
    reference the engine's continuous batching is checked against."""
    from mor_megatron.inference import IncrementalDecoder, SamplingParams
    from mor_megatron.inference.sampling import make_generator, sample, stop_reason

    params = params or SamplingParams()
    decoder = IncrementalDecoder(model, max_batch=1, max_seq=max_seq)
    generator = make_generator(params, decoder.device)
    decode = tokenizer.decode if tokenizer is not None else None
    logits = decoder.forward(torch.tensor([prompt], device=decoder.device))[0, -1]
    generated: list[int] = []
    while True:
        generated.append(sample(logits, params, generator))
        fed = len(prompt) + len(generated) - 1  # `decoder.lengths[0]`, counted on the host
        if stop_reason(generated, params, decode) or fed >= decoder.caches.max_seq:
            return generated
        logits = decoder.forward(torch.tensor([[generated[-1]]], device=decoder.device))[0, -1]
