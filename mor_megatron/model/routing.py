"""MoR routers: expert-choice (one router per recursion step) and token-choice (one router).

The router modules, their losses and statistics (docs/DESIGN.md sections 3-4). The decision and
gate rules they apply are `rules.py`'s; the recursion loop that uses them lives in `decoder.py`.

Loss normalisation (expert-choice BCE): for each step the BCE-with-logits is averaged over that
step's candidates in the micro-batch (B x k_{r-1} logits), then summed over steps and multiplied by
`router_aux_loss_coeff`. The trainer scales the result like the LM loss (1 / micro-batches per
step, through megatron's `MoEAuxLossAutoScaler`), so the coefficient means the same thing at any
gradient-accumulation depth, unlike the public code which adds it per micro-batch unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor_megatron.config import MoRConfig
from mor_megatron.model.rules import expert_choice_gate, token_choice_depth, token_choice_gate, token_choice_probs


def _router_linear(config: MoRConfig, outputs: int) -> nn.Linear:
    """Linear(d_model -> outputs, no bias), N(0, init_method_std) init as the model's other
    linears, replicated on tensor-parallel ranks."""
    linear = nn.Linear(config.hidden_size, outputs, bias=False, dtype=config.params_dtype)
    nn.init.normal_(linear.weight, mean=0.0, std=config.init_method_std)
    return linear


@dataclass
class RouterOutput:
    """Everything one forward's routing produced, for the loss and for logging.

    Per-recursion lists hold detached 0-dim tensors. `selections[r]`, the `[S, B]` boolean mask
    of tokens the shared block ran on at step r, is kept only when the forward is asked to
    (`record_selections=True`: parity checks, depth visualisation).
    """

    aux_loss: Tensor
    first_step: int = 0  # global index of the first recursion step this stage ran
    losses: dict[str, Tensor] = field(default_factory=dict)
    selected_tokens: list[Tensor] = field(default_factory=list)
    # rows the shared block ran on, pads included (docs/DESIGN.md 4.1): what the FLOPs follow
    run_tokens: list[Tensor] = field(default_factory=list)
    sampling_accuracy: list[Tensor] = field(default_factory=list)
    dead_token_ratio: list[Tensor] = field(default_factory=list)
    drop_rate: list[Tensor] = field(default_factory=list)  # token-choice capacity drops
    selections: list[Tensor] = field(default_factory=list)
    depth_histogram: Optional[Tensor] = None
    max_vio: Optional[Tensor] = None

    def metrics(self) -> dict[str, float]:
        """Flat `router/...` scalars, recursion steps numbered from 1. One device-to-host copy for
        all of them (each `float(tensor)` on a GPU would be a synchronisation of its own)."""
        named: dict[str, Tensor] = {f"router/loss_{name}": value for name, value in self.losses.items()}
        named["router/aux_loss"] = self.aux_loss
        per_step = {
            "selected_tokens": self.selected_tokens,
            "run_tokens": self.run_tokens,
            "sampling_accuracy": self.sampling_accuracy,
            "dead_token_ratio": self.dead_token_ratio,
            "drop_rate": self.drop_rate,
        }
        for name, values in per_step.items():
            for step, value in enumerate(values, start=self.first_step + 1):
                named[f"router/r{step}/{name}"] = value
        if self.depth_histogram is not None:
            for depth, count in enumerate(self.depth_histogram, start=1):
                named[f"router/depth{depth}_tokens"] = count
            named["router/max_vio"] = self.max_vio
        values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in named.values()]).tolist()
        return dict(zip(named, values))


class ExpertChoiceRouter(nn.Module):
    """Router of one recursion step: score g = alpha * act(w^T h) on the unnormalised stream."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.alpha = config.router_alpha
        self.activation = config.router_activation
        self.linear = _router_linear(config, 1)
        self.aux = _router_linear(config, 1) if config.aux_router else None

    def forward(self, hidden: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """`[S, B, D]` -> router logits `[S, B]` and auxiliary-router logits on detached input."""
        logits = self.linear(hidden).squeeze(-1)
        aux = self.aux(hidden.detach()).squeeze(-1) if self.aux is not None else None
        return logits, aux

    def gate(self, logits: Tensor) -> Tensor:
        return expert_choice_gate(logits, self.alpha, self.activation)


def _global_count(count: Tensor, dp_group) -> tuple[Tensor, int]:
    """(candidates summed over data-parallel ranks, DP size); the local count without a group."""
    if dp_group is None:
        return count, 1
    total = count.detach().clone()
    torch.distributed.all_reduce(total, group=dp_group)
    return total, dp_group.size()


def expert_choice_losses(
    config: MoRConfig,
    logits: Tensor,
    aux_logits: Optional[Tensor],
    candidates: Tensor,
    selected: Tensor,
    dp_group=None,
) -> dict[str, Tensor]:
    """Unweighted per-step losses over the candidates: BCE (target = selected), z, aux-router BCE.

    Each is a sum over local candidates divided by the DP-global candidate count and multiplied by
    the DP size, so that after data-parallel gradient averaging it is the mean over every
    candidate of the global batch.
    """
    # sums under the candidate mask, not over `logits[candidates]`: a boolean index has a
    # data-dependent size, which on CUDA waits for the device (a host sync per recursion step)
    target = selected.to(logits.dtype)
    count, dp_size = _global_count(candidates.sum(dtype=torch.float32), dp_group)
    norm = dp_size / count.clamp(min=1.0)

    def over_candidates(per_token: Tensor) -> Tensor:
        return torch.where(candidates, per_token, 0.0).sum()

    bce = F.binary_cross_entropy_with_logits
    losses = {"bce": over_candidates(bce(logits, target, reduction="none")) * norm}
    if config.router_z_loss_coeff:
        losses["z"] = over_candidates(logits.square()) * norm
    if aux_logits is not None:
        losses["aux_router_bce"] = over_candidates(bce(aux_logits, target, reduction="none")) * norm
    return losses


def expert_choice_step_stats(
    logits: Tensor, candidates: Tensor, selected: Tensor
) -> dict[str, Tensor]:
    with torch.no_grad():  # masked sums, no boolean index: no host sync (`expert_choice_losses`)
        agree = ((logits >= 0) == selected) & candidates
        return {
            "selected_tokens": selected.sum(),
            "sampling_accuracy": agree.sum(dtype=torch.float32) / candidates.sum(dtype=torch.float32),
            # positions never selected at this step in any sequence of the micro-batch
            "dead_token_ratio": (~selected.any(dim=1)).float().mean(),
        }


class TokenChoiceRouter(nn.Module):
    """One router, applied once to the stream entering recursion 1, choosing a depth per token."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.alpha = config.router_alpha
        self.activation = config.router_activation
        self.num_recursions = config.num_recursions
        self.linear = _router_linear(config, config.num_recursions)

    def forward(self, hidden: Tensor, depth: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """`[S, B, D]` -> depth index `[S, B]` (0-based; the given `depth` when there is one),
        its gate `[S, B]`, and the router logits `[S, B, Nr]`."""
        logits = self.linear(hidden)
        probs = token_choice_probs(logits, self.activation)
        if depth is None:
            depth = token_choice_depth(probs)
        return depth, token_choice_gate(probs, depth, self.alpha), logits


def token_choice_losses(
    config: MoRConfig, logits: Tensor, depth: Tensor, dp_group=None
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Balancing loss sum_i f_i P_i (f_i = Nr x share of tokens at depth i, P_i = mean probability),
    z-loss mean(logsumexp^2); plus the depth histogram and MaxVio.

    f_i, the histogram and MaxVio use depth counts summed over data-parallel ranks (as megatron's
    `global_aux_loss`); P_i is the local mean, averaged over ranks by gradient averaging.
    """
    nr = config.num_recursions
    probs = token_choice_probs(logits, config.router_activation)
    counts = torch.bincount(depth.reshape(-1), minlength=nr).to(logits.dtype)
    if dp_group is not None:
        torch.distributed.all_reduce(counts, group=dp_group)
    share = counts / counts.sum()
    losses = {"balance": (nr * share * probs.reshape(-1, nr).mean(dim=0)).sum()}
    if config.router_z_loss_coeff:
        losses["z"] = torch.logsumexp(logits, dim=-1).square().mean()
    mean_load = counts.mean()
    max_vio = (counts.max() - mean_load) / mean_load
    return losses, counts.detach(), max_vio.detach()


def weighted_aux_loss(config: MoRConfig, losses: dict[str, Tensor]) -> Tensor:
    coeff = {
        "bce": config.router_aux_loss_coeff,
        "z": config.router_z_loss_coeff,
        "balance": config.router_balance_loss_coeff,
        "aux_router_bce": config.aux_router_loss_coeff,
    }
    return sum(coeff[name] * value for name, value in losses.items())
