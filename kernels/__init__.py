"""Fused kernels for the MoR hot paths (Triton on CUDA, PyTorch reference elsewhere)."""

from kernels.gated_scatter import (
    HAS_TRITON,
    gated_scatter_add,
    gated_scatter_add_triton,
    triton_interpret_enabled,
)
from kernels.reference import gated_scatter_add_reference

__all__ = [
    "HAS_TRITON",
    "gated_scatter_add",
    "gated_scatter_add_reference",
    "gated_scatter_add_triton",
    "triton_interpret_enabled",
]
