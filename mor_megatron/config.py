"""`MoRConfig`: megatron-core's `TransformerConfig` plus the Mixture-of-Recursions settings.

One dataclass flows through model, trainer and tools. `effective_layers` is the paper's unrolled
depth L; megatron's `num_layers` is derived from it and counts the layers that own weights (what
megatron builds, splits over pipeline stages and names in checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_megatron.device import compute_device
from mor_megatron.errors import UserError
from mor_megatron.ranges import check_ranges
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
# Settings whose default depends on the router: left unset (None), each takes its router's value,
# so switching `router` alone switches the gate too (a config file must not pin these).
ROUTER_DEFAULTS = {
    router: {"router_activation": ROUTER_ACTIVATIONS[router][0], "router_alpha": DEFAULT_ALPHA[router]}
    for router in ROUTER_ACTIVATIONS
}

# c_r * S in floating point can land just below a whole number (0.7 * 90 = 62.99999999999999):
# floor must not lose that token, so k_r is floored after adding this much.
CAPACITY_ROUNDING_SLACK = 1e-9

# The megatron-core `TransformerConfig` settings the MoR model honours (its layers, GPT embedding
# and output, schedules, precision), with those megatron derives itself or the code sets (hooks,
# init functions). Any other inherited setting changed from its default would be accepted and
# silently ignored by the MoR layers, so validation refuses it.
MEGATRON_FIELDS = frozenset({
    # shape and layer
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "softmax_scale", "add_qkv_bias", "rotary_interleaved", "qk_layernorm",
    "fp32_residual_connection",
    # initialisation
    "init_method_std", "embedding_init_method_std", "perform_initialization", "init_method",
    "output_layer_init_method", "embedding_init_method",
    # precision
    "fp16", "bf16", "params_dtype", "pipeline_dtype", "autocast_dtype", "fp8", "fp8_recipe",
    "fp8_param", "fp8_margin", "fp8_interval", "fp8_amax_history_len", "fp8_amax_compute_algo",
    "fp8_wgrad", "fp8_dot_product_attention", "fp8_multi_head_attention", "tp_only_amax_red",
    "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
    # fused kernels
    "gradient_accumulation_fusion", "bias_activation_fusion", "bias_dropout_fusion",
    "apply_rope_fusion", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
    "deterministic_mode",
    # layout, pipeline schedule, recompute (set by the run from its parallel/training sections)
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_tensor_parallel_size",
    "microbatch_group_size_per_vp_stage", "deallocate_pipeline_outputs", "batch_p2p_comm",
    "cp_comm_type", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "recompute_modules", "cuda_graph_scope",
    # set by the code: megatron's schedule hooks and objects
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func",
    "param_sync_func", "_cpu_offloading_context", "attention_backend", "quant_recipe",
})

# Fields megatron itself assigns on a built config: its pipeline schedule installs the
# gradient/parameter sync hooks, its block keeps the CPU-offloading context.
RUNTIME_FIELDS = frozenset({
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func",
    "param_sync_func", "_cpu_offloading_context",
})


class ConfigError(UserError, ValueError):
    """A configuration problem, stated in one line that names the fix."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")


def default_capacities(num_recursions: int) -> tuple[float, ...]:
    """c_r = (Nr - r + 1) / Nr: the capacities of a perfectly balanced token-choice router."""
    return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory called), or MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclass
class MoRConfig(TransformerConfig):
    """Llama-architecture MoR model. Defaults follow docs/DESIGN.md 2-3 (middle-cycle, expert-choice).

    Built once and then frozen: assigning a setting afterwards raises (megatron's own runtime
    hooks, `RUNTIME_FIELDS`, excepted); derive a changed copy with `dataclasses.replace`.
    """

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
        if self.pipeline_dtype is None:  # activations sent between pipeline stages
            self.pipeline_dtype = torch.bfloat16 if self.bf16 else self.params_dtype
        super().__post_init__()
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen") and name in self.__dataclass_fields__ and name not in RUNTIME_FIELDS:
            raise ConfigError(
                f"MoRConfig.{name} cannot change after the config is built: set it where the config "
                "is made (YAML or the constructor), or derive a copy with dataclasses.replace"
            )
        super().__setattr__(name, value)

    def _validate_megatron_fields(self) -> None:
        """Refuse inherited settings the MoR layers would ignore (see `MEGATRON_FIELDS`)."""
        own = MoRConfig.__annotations__
        for f in dataclasses.fields(TransformerConfig):
            if f.name in own or f.name in MEGATRON_FIELDS or not f.init:
                continue
            if getattr(self, f.name) != field_default(f):
                raise ConfigError(
                    f"model.{f.name}={getattr(self, f.name)!r} is a megatron-core setting the MoR "
                    "layers do not implement (it would be ignored): remove it"
                )
        if self.normalization != "RMSNorm":
            raise ConfigError(
                f"normalization '{self.normalization}' is not supported: the MoR layers are "
                "Llama-shaped and always use RMSNorm; remove model.normalization"
            )

    def _validate_mor(self) -> None:
        self._validate_megatron_fields()
        check_ranges("model", self)
        _choice("sharing", self.sharing, SHARING_STRATEGIES)
        _choice("router", self.router, ROUTERS)
        _choice("kv_mode", self.kv_mode, KV_MODES)
        _choice("scatter_kernel", self.scatter_kernel, ("auto", "triton", "torch"))
        nr = self.num_recursions
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
        for name, default in ROUTER_DEFAULTS[self.router].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        _choice(f"{self.router} router_activation", self.router_activation, ROUTER_ACTIVATIONS[self.router])
        self._validate_capacities()
        factor = self.token_choice_capacity_factor
        if factor is not None and self.router != "token_choice":
            raise ConfigError(
                f"token_choice_capacity_factor={factor} needs router token_choice: remove it"
            )

    def _validate_attention_shape(self) -> None:
        heads, groups = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
        tp = self.tensor_model_parallel_size
        if self.vocab_size % tp:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size={tp}: "
                f"pad the vocabulary to a multiple of {tp} (e.g. {-(-self.vocab_size // tp) * tp})"
            )
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
        return [max(1, math.floor(c * seq_len + CAPACITY_ROUNDING_SLACK)) for c in self.capacities]
