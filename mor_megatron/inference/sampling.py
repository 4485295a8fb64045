"""Sampling options and next-token selection: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    temperature 0 is greedy (argmax); top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p; top_k > 0 keeps the k most likely. A request ends after
    `max_tokens` new tokens, at a token of `stop_token_ids` (kept in the output), or when the
    decoded text contains one of `stop_strings` (needs the engine's tokenizer; the text is cut
    before it).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """`logits` `[..., V]` with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - ordered.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def greedy_tokens(logits: Tensor) -> Tensor:
    """argmax over the last axis, as `max(...).indices` (the same first index among equal maxima
    and NaNs): torch's CPU argmax kernel takes ~1.5x as long over a decode tick's logits."""
    return logits.max(dim=-1).indices


def sample(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> int:
    """One token id from `logits` `[V]`."""
    if params.greedy:
        return int(greedy_tokens(logits))
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = scaled.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A seeded generator for a request with a seed (reproducible sampling), else None."""
    if params.seed is None or params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def stop_reason(
    generated: list[int], params: SamplingParams, decode: Optional[Callable[[list[int]], str]] = None
) -> Optional[str]:
    """"stop" at a stop token or stop string, "length" at `max_tokens`, else None."""
    if generated and generated[-1] in params.stop_token_ids:
        return "stop"
    if params.stop_strings and decode is not None:
        text = decode(generated)
        if any(stop in text for stop in params.stop_strings):
            return "stop"
    if len(generated) >= params.max_tokens:
        return "length"
    return None


def cut_at_stop(text: str, params: SamplingParams) -> str:
    """`text` up to the first stop string (the whole text when none occurs)."""
    cut = len(text)
    for stop in params.stop_strings:
        where = text.find(stop)
        if where >= 0:
            cut = min(cut, where)
    return text[:cut]
