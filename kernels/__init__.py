"""Fused kernels for the MoR hot paths (Triton on CUDA, PyTorch reference elsewhere)."""

from .gated_scatter import (
    HAS_TRITON,
    gated_scatter_add,
    gated_scatter_add_triton,
    triton_interpret_enabled,
)
from .reference import gated_scatter_add_reference, stream_rows

__all__ = [
    "HAS_TRITON",
    "gated_scatter_add",
    "gated_scatter_add_reference",
    "gated_scatter_add_triton",
    "stream_rows",
    "triton_interpret_enabled",
]
