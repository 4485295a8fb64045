"""`ModuleSpec`s of the MoR layers: megatron `TransformerLayer`s whose linears are megatron's
tensor-parallel ones (local backend) or Transformer Engine's (te backend), and whose core attention
runs over a recursion step's active tokens (`ActiveTokenAttention`, SDPA, local;
`TEActiveTokenAttention`, TE fused attention, te).

apex: megatron's `LocalSpecProvider.layer_norm` (megatron/core/models/backends.py) returns apex's
`FusedLayerNorm` when apex imports, but only for LayerNorm: for `rms_norm=True` it always returns
`WrappedTorchNorm` (torch.nn.RMSNorm), and megatron's `FusedLayerNorm`
(megatron/core/fusions/fused_layer_norm.py) asserts normalization == "LayerNorm". So the local
backend's RMSNorm uses apex's fused kernel itself (`ApexRMSNorm`) where apex is importable, and
torch's RMSNorm otherwise; apex is never required."""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mor_megatron.errors import UserError
from mor_megatron.model.attention import ActiveTokenAttention
from mor_megatron.model.te_attention import TEActiveTokenAttention

BACKENDS = ("local", "te")


class BackendUnavailableError(UserError, RuntimeError):
    """The requested backend cannot run on this machine."""


try:  # NVIDIA apex, built from source (the PyPI package named "apex" is unrelated)
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
except ImportError:
    fused_rms_norm_affine = None


class ApexRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same `weight`, same checkpoints) whose CUDA forward is apex's fused kernel
    (`apex.normalization.fused_layer_norm.fused_rms_norm_affine`); megatron's norm-builder
    signature, as `WrappedTorchNorm`."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)  # as megatron's norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            return fused_rms_norm_affine(x, self.weight, self.normalized_shape, self.eps)
        return super().forward(x)


def _local_rms_norm() -> type:
    """apex's fused RMSNorm where apex imports, else megatron's choice (torch.nn.RMSNorm)."""
    if fused_rms_norm_affine is not None:
        return ApexRMSNorm
    return LocalSpecProvider().layer_norm(rms_norm=True)


class QKNorm:
    """The q/k norm of megatron's own GPT specs (`qk_norm if qk_layernorm else IdentityOp`, over
    one head's channels): the layer norm class where `config.qk_layernorm` is set, else
    `IdentityOp`. Decided when the layer is built, as the spec is made without the config."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, *, norm: type, **kwargs):
        if not config.qk_layernorm:
            return IdentityOp()
        return build_module(norm, config=config, hidden_size=hidden_size, eps=eps)


def _qk_norm(norm: type) -> ModuleSpec:
    return ModuleSpec(module=QKNorm, params={"norm": norm})


def _te_provider():
    """Transformer Engine's spec provider, or one clear error where it cannot run."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend 'te' needs a CUDA GPU with Transformer Engine: use backend 'local' on CPU"
        )
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        # megatron-core 0.16.1 imports without TE (te = MagicMock(), HAVE_TE = False in
        # megatron/core/extensions/transformer_engine.py): the import above never fails
        if not HAVE_TE:
            raise ImportError("transformer_engine is not importable")
    except ImportError as err:
        raise BackendUnavailableError(
            "backend 'te' needs Transformer Engine: pip install --no-build-isolation "
            f"-r requirements-gpu.txt, or use backend 'local' ({err})"
        ) from None
    return TESpecProvider()


def get_mor_layer_spec(backend: str = "local") -> ModuleSpec:
    """A Llama layer (RMSNorm, GQA self-attention with RoPE, SwiGLU MLP) as a `ModuleSpec`; with
    `config.qk_layernorm` its queries and keys are normalised per head by the same RMSNorm class.

    The same spec builds unique and shared layers; sharing is decided by the decoder, which
    reuses one built layer at every recursion.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        provider = LocalSpecProvider()
        qkv, fc1 = provider.column_parallel_linear(), provider.column_parallel_linear()
        input_norm = pre_mlp_norm = qk_norm = _local_rms_norm()
        core_attention = ActiveTokenAttention
    else:
        provider = _te_provider()
        # TE fuses each pre-norm into the following linear.
        qkv = fc1 = provider.column_parallel_layer_norm_linear()
        input_norm = pre_mlp_norm = IdentityOp
        qk_norm = provider.layer_norm(rms_norm=True, for_qk=True)
        core_attention = TEActiveTokenAttention
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=_qk_norm(qk_norm),
                    k_layernorm=_qk_norm(qk_norm),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=provider.row_parallel_linear()),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=(
                {
                    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
                }
                if backend == "local"
                else {}
            ),
        ),
    )


def get_mor_block_spec(num_layers: int, backend: str = "local") -> TransformerBlockSubmodules:
    """`num_layers` unique layers plus the final RMSNorm."""
    layer = get_mor_layer_spec(backend)
    final_norm = _local_rms_norm() if backend == "local" else _te_provider().layer_norm(rms_norm=True)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
