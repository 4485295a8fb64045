"""`MoRConfig`: megatron-core's `TransformerConfig` plus the Mixture-of-Recursions settings.

One dataclass flows through model, trainer and tools. `effective_layers` is the paper's unrolled
depth L; megatron's `num_layers` is derived from it and counts the layers that own weights (what
megatron builds, splits over pipeline stages and names in checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_megatron.device import compute_device
from mor_megatron.errors import UserError
from mor_megatron.sharing import (
    ROUTABLE_STRATEGIES,
    SHARING_STRATEGIES,
    RecursionPlan,
    build_plan,
    depth_error,
)

ROUTERS = ("expert_choice", "token_choice", "none")
KV_MODES = ("recursion_wise", "share_first")
ROUTER_ACTIVATIONS = {"expert_choice": ("sigmoid", "tanh"), "token_choice": ("softmax", "sigmoid")}
DEFAULT_ALPHA = {"expert_choice": 0.1, "token_choice": 1.0}


class ConfigError(UserError, ValueError):
    """A configuration problem, stated in one line that names the fix."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")


def default_capacities(num_recursions: int) -> tuple[float, ...]:
    """c_r = (Nr - r + 1) / Nr: the capacities of a perfectly balanced token-choice router."""
    return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


@dataclass
class MoRConfig(TransformerConfig):
    """Llama-architecture MoR model. Defaults follow MOR_SPEC (middle-cycle, expert-choice)."""

    # Llama defaults in place of megatron's GPT ones.
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    # on GPUs megatron initialises its weights on the device (no host copy of a large model)
    use_cpu_initialization: bool = field(default_factory=lambda: compute_device().type != "cuda")

    # Language model.
    vocab_size: int = 49152
    seq_length: int = 2048
    rotary_base: float = 10000.0
    tie_embeddings: bool = True

    # Recursion.
    effective_layers: int = 0
    num_recursions: int = 1
    sharing: str = "middle_cycle"

    # Routing.
    router: str = "expert_choice"
    router_activation: Optional[str] = None
    router_alpha: Optional[float] = None
    capacities: Optional[tuple[float, ...]] = None
    router_aux_loss_coeff: float = 0.001
    router_z_loss_coeff: float = 0.0
    router_balance_loss_coeff: float = 0.1
    aux_router: bool = False
    aux_router_loss_coeff: float = 1.0
    kv_mode: str = "recursion_wise"
    # gated scatter of the block output: "auto" (Triton on CUDA), "triton" or "torch"
    scatter_kernel: str = "auto"
    # token-choice: cap each rank's tokens at step r to factor x c_r x tokens (None: no cap)
    token_choice_capacity_factor: Optional[float] = None

    def __post_init__(self) -> None:
        self._validate_mor()
        plan = self.recursion_plan
        if self.num_layers not in (0, plan.num_unique_layers):
            raise ConfigError(
                f"num_layers={self.num_layers} conflicts with effective_layers="
                f"{self.effective_layers} ({plan.num_unique_layers} unique layers): "
                "set effective_layers only; num_layers is derived"
            )
        self.num_layers = plan.num_unique_layers
        if self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
        super().__post_init__()

    def _validate_mor(self) -> None:
        _choice("sharing", self.sharing, SHARING_STRATEGIES)
        _choice("router", self.router, ROUTERS)
        _choice("kv_mode", self.kv_mode, KV_MODES)
        _choice("scatter_kernel", self.scatter_kernel, ("auto", "triton", "torch"))
        nr = self.num_recursions
        if not isinstance(nr, int) or nr < 1:
            raise ConfigError(f"num_recursions={nr} must be a positive integer")
        if self.effective_layers < 1:
            raise ConfigError("effective_layers must be set to the unrolled depth L (e.g. 32)")
        if self.sharing == "none" and nr != 1:
            raise ConfigError(
                f"sharing 'none' runs every layer once, but num_recursions={nr}: "
                "set num_recursions to 1 or choose a sharing strategy"
            )
        message = depth_error(self.sharing, self.effective_layers, nr)
        if message:
            raise ConfigError(message)
        if self.router != "none" and self.sharing not in ROUTABLE_STRATEGIES:
            raise ConfigError(
                f"router '{self.router}' needs a recursion block: set sharing to "
                f"{' or '.join(ROUTABLE_STRATEGIES)}, or router to none"
            )
        self._validate_attention_shape()
        if self.router == "none":
            return
        allowed = ROUTER_ACTIVATIONS[self.router]
        if self.router_activation is None:
            self.router_activation = allowed[0]
        _choice(f"{self.router} router_activation", self.router_activation, allowed)
        if self.router_alpha is None:
            self.router_alpha = DEFAULT_ALPHA[self.router]
        self._validate_capacities()
        factor = self.token_choice_capacity_factor
        if factor is not None and (self.router != "token_choice" or factor <= 0):
            raise ConfigError(
                f"token_choice_capacity_factor={factor} needs router token_choice and a positive "
                "value (e.g. 1.25), or remove it"
            )

    def _validate_attention_shape(self) -> None:
        heads, groups = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
        tp = self.tensor_model_parallel_size
        if self.vocab_size % tp:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size={tp}: "
                f"pad the vocabulary to a multiple of {tp} (e.g. {-(-self.vocab_size // tp) * tp})"
            )
        if heads < 1 or self.hidden_size < 1:
            raise ConfigError("hidden_size and num_attention_heads must be positive")
        if self.kv_channels is None and self.hidden_size % heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}: "
                "change one of them or set kv_channels"
            )
        if heads % groups:
            raise ConfigError(
                f"num_attention_heads={heads} is not divisible by num_query_groups={groups}: "
                f"use a divisor of {heads} for num_query_groups"
            )
        if heads % tp or groups % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} must divide num_attention_heads={heads} and "
                f"num_query_groups={groups}: choose a TP size dividing {math.gcd(heads, groups)}"
            )

    def _validate_capacities(self) -> None:
        nr = self.num_recursions
        if self.capacities is None:
            self.capacities = default_capacities(nr)
        caps = tuple(float(c) for c in self.capacities)
        if len(caps) != nr:
            raise ConfigError(
                f"capacities has {len(caps)} entries but num_recursions={nr}: give one per recursion"
            )
        if any(not 0.0 < c <= 1.0 for c in caps):
            raise ConfigError(f"capacities {list(caps)} must lie in (0, 1]")
        if any(later > earlier for earlier, later in zip(caps, caps[1:])):
            raise ConfigError(
                f"capacities {list(caps)} increase: hierarchical filtering needs a "
                "non-increasing list, e.g. the default (Nr-r+1)/Nr"
            )
        if self.kv_mode == "share_first" and self.router == "expert_choice" and caps[0] != 1.0:
            raise ConfigError(
                f"kv_mode share_first reuses step-1 keys of every token, but capacities[0]="
                f"{caps[0]}: set capacities[0] to 1.0 or use kv_mode recursion_wise"
            )
        self.capacities = caps

    @property
    def recursion_plan(self) -> RecursionPlan:
        return build_plan(self.sharing, self.effective_layers, self.num_recursions)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def capacity_tokens(self, seq_len: int) -> list[int]:
        """k_r = max(1, floor(c_r * S)) tokens per sequence at each recursion (expert-choice)."""
        return [max(1, math.floor(c * seq_len + 1e-9)) for c in self.capacities]
