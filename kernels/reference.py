"""Plain-PyTorch references for the fused kernels in :mod:`mor_megatron.kernels`.

They define the math the Triton kernels must reproduce, are the CPU fallback
of the dispatchers, and are what the tests and the benchmark compare against.
"""

from __future__ import annotations

import torch

__all__ = ["gated_scatter_add_reference", "stream_rows"]


def stream_rows(index: torch.Tensor) -> torch.Tensor:
    """Flat row of each ``[k, B]`` entry in the ``[S * B, D]`` view of an ``[S, B, D]`` stream
    (``index[j, b] * B + b``), ``[k * B]`` in ``(j, b)`` order.

    Tokens move as whole rows (``index_select`` / ``index_add`` / ``index_copy``), not through
    an index expanded over D (``gather`` / ``scatter_add``), which on CPU costs 1.3-2.5x more,
    forward and backward (``tools/bench_kernels.py --row-ops``); on CUDA both are
    deterministic under ``torch.use_deterministic_algorithms``."""
    width = index.shape[1]
    return (index * width + torch.arange(width, device=index.device, dtype=index.dtype)).reshape(-1)


def gated_scatter_add_reference(
    hidden: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Return ``hidden`` with ``gate[j, b] * y[j, b, :]`` added to row ``index[j, b]`` of column ``b``.

    This is the MoR residual update of one recursion step: only the tokens the
    router kept (``index``, ``[k, B]``) get the gated block output ``y``
    (``[k, B, D]``) added back into the residual stream ``hidden``
    (``[S, B, D]``). Out of place, so autograd keeps ``hidden``. Duplicate
    indices in a column would be summed here (``index_add``) but are not
    allowed by the fused kernel.
    """
    _check_shapes(hidden, index, gate, y)
    s, b, d = hidden.shape
    src = (gate.unsqueeze(-1) * y).to(hidden.dtype).reshape(-1, d)
    return hidden.reshape(-1, d).index_add(0, stream_rows(index), src).view(s, b, d)


def _check_shapes(hidden: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    """Fail early with a readable message instead of a cryptic indexing error."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [S, B, D], got shape {tuple(hidden.shape)}")
    s, b, d = hidden.shape
    if index.dim() != 2 or index.shape[1] != b or not (1 <= index.shape[0] <= s):
        raise ValueError(f"index must be [k, B] with 1 <= k <= S={s}, B={b}; got shape {tuple(index.shape)}")
    k = index.shape[0]
    if tuple(gate.shape) != (k, b):
        raise ValueError(f"gate must be [k, B]=({k}, {b}), got shape {tuple(gate.shape)}")
    if tuple(y.shape) != (k, b, d):
        raise ValueError(f"y must be [k, B, D]=({k}, {b}, {d}), got shape {tuple(y.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be int64 (or int32), got {index.dtype}")
