"""The MoR rules, once: the recursion schedule and what one recursion step decides and computes.

Pure functions of tensors (no modules, no process groups), called by the training decoder
(`model/decoder.py`), the reference decoder (`inference/decode.py`) and the depth-wise engine
(`inference/engine.py`). The self-contained Hugging Face model (`hf/modeling_mor.py`) carries
copies (the same code without the docstrings), each marked `# Copied from
mor_megatron.model.rules.<name>`; `tests/test_rule_copies.py` fails when a copy and its source
differ. Design: docs/DESIGN.md
sections 3 (expert-choice) and 4 (token-choice).

Recursion steps are numbered from 0 (`r`); a token-choice depth is the 0-based index of the last
step a token runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mor_megatron.config import MoRConfig

# -- the recursion schedule ---------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One unique layer run on every token, or one recursion step (router + shared block)."""

    kind: str  # "layer" or "recursion"
    index: int  # unique layer index, or 0-based recursion step


def decoder_units(config: MoRConfig) -> list[Unit]:
    """All units of the model in execution order: prefix layers, the recursion steps, suffix
    layers (the unrolled layers when there is no router). Which unique layers each unit runs
    is `config.recursion_plan` (`mor_megatron.sharing`)."""
    plan = config.recursion_plan
    if config.router == "none":
        return [Unit("layer", index) for index in plan.unrolled]
    return (
        [Unit("layer", index) for index in plan.prefix]
        + [Unit("recursion", r) for r in range(plan.num_recursions)]
        + [Unit("layer", index) for index in plan.suffix]
    )


def unit_layers(config: MoRConfig, units: list[Unit]) -> list[int]:
    """Unique layer indices the units need, sorted."""
    plan = config.recursion_plan
    needed: set[int] = set()
    for unit in units:
        needed.update(plan.block if unit.kind == "recursion" else (unit.index,))
    return sorted(needed)


# -- expert-choice ------------------------------------------------------------------------------

ROUTING_MODES = ("topk", "threshold")


def expert_choice_gate(logits: torch.Tensor, alpha: float, activation: str) -> torch.Tensor:
    """g = alpha * act(logit): the weight of the step's block output in the residual update."""
    act = torch.sigmoid if activation == "sigmoid" else torch.tanh
    return alpha * act(logits)


def threshold_continue(logits: torch.Tensor, aux_logits: Optional[torch.Tensor], capacity: float) -> torch.Tensor:
    """The causal (decoding) rule: a candidate runs this step iff sigmoid(decide) >= 0.5, i.e.
    decide >= 0, where decide is the auxiliary router's logit when there is one. A step of
    capacity 1 keeps every candidate, as top-k with k = all tokens does."""
    if capacity >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    decide = aux_logits if aux_logits is not None else logits
    return decide.detach() >= 0


def topk_select(logits: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rule over `[S, B]` logits: per sequence the k highest-scoring candidates.
    Returns the `[S, B]` selection and the `[k, B]` positions in original order (causal masks
    over the gathered tokens stay correct)."""
    masked = logits.detach().masked_fill(~candidates, float("-inf"))
    index = masked.topk(k, dim=0).indices.sort(dim=0).values
    return torch.zeros_like(candidates).scatter(0, index, True), index


@dataclass
class ExpertChoiceDecision:
    selected: torch.Tensor  # [S, B] bool
    index: Optional[torch.Tensor]  # [k, B] sorted positions (top-k), None for threshold decisions


def expert_choice_select(
    logits: torch.Tensor,
    aux_logits: Optional[torch.Tensor],
    candidates: torch.Tensor,
    k: int,
    capacity: float,
    mode: str,
) -> ExpertChoiceDecision:
    """Step r's tokens among `candidates`, the previous step's (hierarchical filtering):
    "topk" (training) or "threshold" (causal, as decoding)."""
    if mode == "topk":
        return ExpertChoiceDecision(*topk_select(logits, candidates, k))
    if mode != "threshold":
        raise ValueError(f"unknown routing mode '{mode}': use one of {', '.join(ROUTING_MODES)}")
    return ExpertChoiceDecision(candidates & threshold_continue(logits, aux_logits, capacity), None)


def gated_update(hidden: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """H <- H + g * f(H) for the tokens that ran the step (`gate` has `update`'s shape without
    its last axis); f includes the block's own residual connections."""
    return hidden + gate.unsqueeze(-1) * update


# -- token-choice -------------------------------------------------------------------------------


def token_choice_probs(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-depth router probabilities `[..., Nr]`: softmax over depths, or independent sigmoids."""
    return logits.softmax(dim=-1) if activation == "softmax" else logits.sigmoid()


def token_choice_depth(probs: torch.Tensor) -> torch.Tensor:
    """The depth a token chooses, 0-based: its most probable one."""
    return probs.detach().argmax(dim=-1)


def token_choice_gate(probs: torch.Tensor, depth: torch.Tensor, alpha: float) -> torch.Tensor:
    """g = alpha * p_depth: the weight of the token's recursion output when it leaves."""
    return alpha * probs.gather(-1, depth.unsqueeze(-1)).squeeze(-1)


def token_choice_runs(depth: torch.Tensor, r: int) -> torch.Tensor:
    """Whether a token runs recursion step r: ungated, for as long as its depth lasts."""
    return depth >= r


def token_choice_combine(h1: torch.Tensor, gate: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
    """H = H_1 + g * F_depth(H_1): a token leaves the recursion once, gated by its depth's weight."""
    return h1 + gate.unsqueeze(-1) * running


def token_choice_capacity_limit(factor: float, capacity: float, tokens: int) -> int:
    """Most tokens step r may take under a capacity factor: factor x c_r x tokens, rounded up."""
    return math.ceil(factor * capacity * tokens)


def token_choice_drop(
    active: torch.Tensor, gate: torch.Tensor, depth: torch.Tensor, r: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `limit` active tokens of highest gate at step r (training); the others leave now,
    as if their chosen depth were step r-1. Returns (active, depth)."""
    score = gate.detach().masked_fill(~active, float("-inf")).reshape(-1)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter(0, score.topk(limit).indices, True)
    keep = keep.view_as(active)
    return keep, torch.where(active & ~keep, r - 1, depth)
