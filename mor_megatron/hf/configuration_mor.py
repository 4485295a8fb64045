"""Hugging Face configuration of a Mixture-of-Recursions (MoR) causal LM.

Self-contained (imports only transformers), so that it can be copied next to exported weights and
loaded with `trust_remote_code=True`. Written by mor-megatron's `tools/convert_to_hf.py`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import PretrainedConfig

SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence", "none")
ROUTERS = ("expert_choice", "token_choice", "none")
KV_MODES = ("recursion_wise", "share_first")
ACTIVATIONS = {"expert_choice": ("sigmoid", "tanh"), "token_choice": ("softmax", "sigmoid")}
DEFAULT_ALPHA = {"expert_choice": 0.1, "token_choice": 1.0}


# Mirrors mor_megatron.sharing.build_plan, as a dict of lists (tests/test_rule_copies.py)
def recursion_plan(sharing: str, effective_layers: int, num_recursions: int) -> dict[str, list[int]]:
    """Which unique layer runs at each unrolled depth, and the (prefix, block, suffix) split.

    cycle / middle_cycle: `unrolled = prefix + block * Nr + suffix`, one recursion step is one pass
    through `block`; sequence / middle_sequence repeat each layer Nr times in place.
    """
    L, nr = effective_layers, num_recursions
    middle = sharing.startswith("middle_")
    body = L - (2 if middle else 0)
    if sharing == "none":
        layers = list(range(L))
        return {"unrolled": layers, "prefix": [], "block": layers, "suffix": []}
    if body <= 0 or body % nr:
        raise ValueError(
            f"{sharing} sharing needs {'(L-2)' if middle else 'L'} divisible by num_recursions={nr}, "
            f"but effective_layers={L}"
        )
    depth = body // nr
    first = 1 if middle else 0
    block = list(range(first, first + depth))
    prefix, suffix = ([0], [depth + 1]) if middle else ([], [])
    if sharing.endswith("cycle"):
        unrolled = prefix + block * nr + suffix
        return {"unrolled": unrolled, "prefix": prefix, "block": block, "suffix": suffix}
    unrolled = prefix + [layer for layer in block for _ in range(nr)] + suffix
    return {"unrolled": unrolled, "prefix": prefix, "block": [], "suffix": suffix}


class MoRHFConfig(PretrainedConfig):
    """Llama shape (RMSNorm, RoPE, GQA, SwiGLU, no biases) plus the MoR recursion and routing.

    `num_hidden_layers` counts the unique layers (those that own weights); `effective_layers` is
    the unrolled depth L. Routing at inference is the causal threshold rule: expert-choice keeps a
    candidate when sigmoid(logit) >= 0.5 (steps of capacity 1 keep every candidate); token-choice
    runs each token to the depth its router picks.
    """

    model_type = "mor"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_attention_heads: int = 9,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-5,
        rotary_base: float = 10000.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        effective_layers: int = 32,
        num_recursions: int = 3,
        sharing: str = "middle_cycle",
        router: str = "expert_choice",
        router_activation: Optional[str] = None,
        router_alpha: Optional[float] = None,
        capacities: Optional[Sequence[float]] = None,
        aux_router: bool = False,
        kv_mode: str = "recursion_wise",
        use_cache: bool = True,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        **kwargs,
    ) -> None:
        kwargs.pop("num_hidden_layers", None)  # derived
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rotary_base = float(rotary_base)
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.effective_layers = effective_layers
        self.num_recursions = num_recursions
        self.sharing = sharing
        self.router = router
        self.aux_router = aux_router
        self.kv_mode = kv_mode
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._check_choices()
        self.num_hidden_layers = len(set(recursion_plan(sharing, effective_layers, num_recursions)["unrolled"]))
        self.router_activation = router_activation
        self.router_alpha = router_alpha
        self.capacities = list(capacities) if capacities is not None else None
        if router != "none":
            self.router_activation = router_activation or ACTIVATIONS[router][0]
            self.router_alpha = float(router_alpha if router_alpha is not None else DEFAULT_ALPHA[router])
            if capacities is None:
                self.capacities = [(num_recursions - r) / num_recursions for r in range(num_recursions)]
            self._check_routing()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def plan(self) -> dict[str, list[int]]:
        return recursion_plan(self.sharing, self.effective_layers, self.num_recursions)

    def _check_choices(self) -> None:
        for name, value, allowed in (
            ("sharing", self.sharing, SHARING),
            ("router", self.router, ROUTERS),
            ("kv_mode", self.kv_mode, KV_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.router != "none" and self.sharing not in ("cycle", "middle_cycle"):
            raise ValueError(f"router '{self.router}' needs sharing cycle or middle_cycle")

    def _check_routing(self) -> None:
        if self.router_activation not in ACTIVATIONS[self.router]:
            raise ValueError(f"{self.router} router_activation must be one of {ACTIVATIONS[self.router]}")
        if len(self.capacities) != self.num_recursions:
            raise ValueError("capacities needs one entry per recursion")
        if self.kv_mode == "share_first" and self.router == "expert_choice" and self.capacities[0] < 1.0:
            raise ValueError("kv_mode share_first needs capacities[0] = 1.0 with expert-choice routing")
