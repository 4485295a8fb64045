"""Fused gated scatter-add for the MoR residual update (Triton, with a PyTorch fallback).

In a Mixture-of-Recursions step only the ``k`` tokens the router kept per
sequence column go through the shared block; their output ``y`` is gated and
added back into the residual stream::

    out = hidden.clone(); out[index[j, b], b, :] += gate[j, b] * y[j, b, :]

with ``hidden [S, B, D]``, ``index [k, B]`` (per column duplicate-free; the MoR
router also sorts it, which this kernel does not need), ``gate [k, B]`` and
``y [k, B, D]``. Eager PyTorch (the reference) spends a multiply and an
``index_add`` over whole rows (plus a full clone) on it, and the backward an
``index_select`` and a reduction. Here it is one forward pass and one backward kernel.

Forward design (single pass rather than "copy, then add the gated rows"):
a tiny ``[S, B]`` inverse map ``inv[s, b] = j`` (``-1`` when token ``s`` was
not selected) is built with one small ``scatter_``; then one program per output
row ``(s, b)`` (and D block) reads ``hidden``, reads ``gate``/``y`` only when the
row is selected (masked loads touch no memory otherwise) and writes ``out``
once. That moves ``2*S*B*D + k*B*D`` elements instead of the
``2*S*B*D + 3*k*B*D`` of a clone followed by a read-modify-write of the
selected rows (about 30% less traffic at ``k = S/2``), and it needs no ordering
between a copy and the add.

Backward: ``d_hidden = d_out`` (returned as is, no copy). One program per
``(j, b)`` gathers row ``d_out[index[j, b], b, :]`` once, loops over D, writes
``d_y = gate * d_out_row`` and reduces ``d_gate = sum(y * d_out_row)`` in fp32.
Indices are duplicate-free per column, so every program owns the rows it
writes: no atomics, deterministic results.

All math is done in fp32 (fp64 for fp64 inputs) and stored in each output's
dtype. The module imports without a GPU and without triton; the kernels are
JIT-wrapped lazily so that ``TRITON_INTERPRET=1`` (Triton's CPU interpreter,
used by the tests) is honoured whenever it is set, even after import.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .reference import _check_shapes, gated_scatter_add_reference

try:  # triton is optional: CPU-only machines fall back to the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "gated_scatter_add",
    "gated_scatter_add_reference",
    "gated_scatter_add_triton",
    "triton_interpret_enabled",
]

# Largest D tile one program handles at once (forward: per program; backward:
# per loop iteration). Module-level so tests can shrink it to exercise the
# multi-block paths on small, interpreter-friendly shapes.
_MAX_BLOCK_D = 1024

_BACKENDS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------
# Triton kernels (plain functions; wrapped by triton.jit lazily, see _kernels)
# They only use builtins (no helpers from triton.language.standard such as
# tl.zeros / tl.sum, which are jit-wrapped at triton import), so they also run
# under an interpreter enabled after triton was imported (e.g. in pytest).
# --------------------------------------------------------------------------
def _gated_scatter_fwd_impl(
    hidden_ptr,
    inv_ptr,
    gate_ptr,
    y_ptr,
    out_ptr,
    B,
    D,
    BLOCK_D: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    # One program per (output row r = s * B + b, D block).
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    b = row % B
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D

    j = tl.load(inv_ptr + row).to(tl.int64)  # -1: token not selected
    sel = j >= 0
    src = tl.maximum(j, 0) * B + b  # clamped so even masked addresses stay in range

    h = tl.load(hidden_ptr + row * D + offs, mask=dmask, other=0.0)
    g = tl.load(gate_ptr + src, mask=sel, other=0.0)
    # Vector form of `sel` (the interpreter rejects a block & scalar mask).
    ymask = dmask & ((offs * 0 + j) >= 0)
    yv = tl.load(y_ptr + src * D + offs, mask=ymask, other=0.0)
    if IS_FP64:
        h = h.to(tl.float64)
        g = g.to(tl.float64)
        yv = yv.to(tl.float64)
    else:
        h = h.to(tl.float32)
        g = g.to(tl.float32)
        yv = yv.to(tl.float32)
    # where(): unselected rows are copied bit-exactly (keeps -0.0, ignores y).
    out = tl.where(sel, h + g * yv, h)
    tl.store(out_ptr + row * D + offs, out.to(out_ptr.dtype.element_ty), mask=dmask)


def _gated_scatter_bwd_impl(
    dout_ptr,
    index_ptr,
    gate_ptr,
    y_ptr,
    dy_ptr,
    dgate_ptr,
    B,
    D,
    BLOCK_D: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    # One program per selected row r = j * B + b; loops over D so the d_gate
    # reduction stays inside the program (no atomics, no second pass).
    row = tl.program_id(0).to(tl.int64)
    b = row % B
    s = tl.load(index_ptr + row).to(tl.int64)
    src = s * B + b

    g = tl.load(gate_ptr + row)
    if IS_FP64:
        g = g.to(tl.float64)
        acc = tl.full([BLOCK_D], 0.0, dtype=tl.float64)
    else:
        g = g.to(tl.float32)
        acc = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        m = offs < D
        do = tl.load(dout_ptr + src * D + offs, mask=m, other=0.0)
        yv = tl.load(y_ptr + row * D + offs, mask=m, other=0.0)
        if IS_FP64:
            do = do.to(tl.float64)
            yv = yv.to(tl.float64)
        else:
            do = do.to(tl.float32)
            yv = yv.to(tl.float32)
        tl.store(dy_ptr + row * D + offs, (g * do).to(dy_ptr.dtype.element_ty), mask=m)
        acc += yv * do
    # == tl.sum(acc, 0) (which is this very reduce), spelled out because tl.sum
    # is itself @triton.jit-wrapped when triton is imported, so it cannot run
    # under an interpreter switched on after that import; the interpreter maps
    # this combine function to numpy's sum.
    tl.store(dgate_ptr + row, tl.reduce(acc, 0, tl.standard._sum_combine).to(dgate_ptr.dtype.element_ty))


_KERNEL_CACHE: dict[bool, tuple[Any, Any]] = {}


def triton_interpret_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), read live."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        try:
            return bool(knobs.runtime.interpret)
        except AttributeError:
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernels() -> tuple[Any, Any]:
    """JIT-wrap the kernels for the current interpreter mode (cached per mode).

    ``triton.jit`` decides compiled vs interpreted when it wraps a function, so
    wrapping lazily (instead of decorating at import) lets the mode follow
    ``TRITON_INTERPRET`` at call time.
    """
    mode = triton_interpret_enabled()
    kern = _KERNEL_CACHE.get(mode)
    if kern is None:
        kern = (triton.jit(_gated_scatter_fwd_impl), triton.jit(_gated_scatter_bwd_impl))
        _KERNEL_CACHE[mode] = kern
    return kern


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 1)), _MAX_BLOCK_D)


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def _check_triton_usable(t: torch.Tensor) -> None:
    """Raise a one-line error when the Triton path cannot run on ``t``'s device."""
    if not HAS_TRITON:
        raise RuntimeError("gated_scatter_add(backend='triton'): triton is not installed; use backend='torch' or 'auto'")
    if t.device.type != "cuda" and not triton_interpret_enabled():
        raise RuntimeError(
            f"gated_scatter_add(backend='triton') needs CUDA tensors (got device '{t.device}'); "
            "set TRITON_INTERPRET=1 to run the Triton interpreter on CPU, or use backend='torch'/'auto'"
        )


def _check_dtypes_devices(hidden: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("hidden", hidden), ("gate", gate), ("y", y)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"gated_scatter_add: {name} must be fp32/bf16/fp16/fp64, got {t.dtype}")
    devs = {hidden.device, index.device, gate.device, y.device}
    if len(devs) != 1:
        raise ValueError(f"gated_scatter_add: all tensors must be on one device, got {sorted(map(str, devs))}")


def _use_fp64(*ts: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in ts)


def _on_device_of(t: torch.Tensor):
    """Make `t`'s GPU current for a launch: Triton launches on the current CUDA device (and its
    stream), whatever device the pointers it is handed live on."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _fwd(hidden: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s, b, d = hidden.shape
    k = index.shape[0]
    out = torch.empty_like(hidden)
    if out.numel() == 0:
        return out
    # inv[s, b] = j if index[j, b] == s else -1 (int32: k <= S < 2**31).
    inv = torch.full((s, b), -1, dtype=torch.int32, device=hidden.device)
    j_ids = torch.arange(k, dtype=torch.int32, device=hidden.device).unsqueeze(1).expand(k, b)
    inv.scatter_(0, index.to(torch.int64), j_ids)
    block_d = _block_d(d)
    fwd_kernel, _ = _kernels()
    grid = (s * b, triton.cdiv(d, block_d))
    with _on_device_of(hidden):
        fwd_kernel[grid](
            hidden, inv, gate, y, out, b, d,
            BLOCK_D=block_d, IS_FP64=_use_fp64(hidden, gate, y), num_warps=_num_warps(block_d),
        )
    return out


def _bwd(
    d_out: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    k, b, d = y.shape
    d_y = torch.empty_like(y)
    d_gate = torch.empty_like(gate)
    if y.numel() == 0:
        return d_y, d_gate.zero_()
    block_d = _block_d(d)
    _, bwd_kernel = _kernels()
    with _on_device_of(y):
        bwd_kernel[(k * b,)](
            d_out, index, gate, y, d_y, d_gate, b, d,
            BLOCK_D=block_d, IS_FP64=_use_fp64(d_out, gate, y), num_warps=_num_warps(block_d),
        )
    return d_y, d_gate


class _GatedScatterAdd(torch.autograd.Function):
    """Autograd wrapper: forward/backward each one Triton launch (plus the inverse map)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden, index, gate, y = hidden.contiguous(), index.contiguous(), gate.contiguous(), y.contiguous()
        out = _fwd(hidden, index, gate, y)
        ctx.save_for_backward(index, gate, y)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None]:
        index, gate, y = ctx.saved_tensors
        need_hidden, _, need_gate, need_y = ctx.needs_input_grad
        d_gate = d_y = None
        if need_gate or need_y:
            d_y, d_gate = _bwd(d_out.contiguous(), index, gate, y)
        return (d_out if need_hidden else None), None, (d_gate if need_gate else None), (d_y if need_y else None)


def gated_scatter_add_triton(
    hidden: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Triton path of :func:`gated_scatter_add` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``index`` must be duplicate-free per column: duplicates are not summed as in
    ``scatter_add`` (only one of them would land). Not validated, because that
    would need a device sync on the hot path.
    """
    _check_shapes(hidden, index, gate, y)
    _check_dtypes_devices(hidden, index, gate, y)
    _check_triton_usable(hidden)
    return _GatedScatterAdd.apply(hidden, index, gate, y)


def gated_scatter_add(
    hidden: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """``out = hidden`` with ``gate[j, b] * y[j, b, :]`` added at row ``index[j, b]`` of column ``b``.

    The MoR residual update of one recursion step, out of place so autograd
    keeps ``hidden``. ``backend``: ``"auto"`` uses the fused Triton kernel for
    CUDA tensors when triton imports and the PyTorch reference otherwise;
    ``"triton"`` forces the kernel (on CPU only with ``TRITON_INTERPRET=1``,
    else a one-line RuntimeError); ``"torch"`` forces the reference.
    """
    if backend == "torch":
        return gated_scatter_add_reference(hidden, index, gate, y)
    if backend == "auto":
        if HAS_TRITON and hidden.is_cuda:
            return gated_scatter_add_triton(hidden, index, gate, y)
        return gated_scatter_add_reference(hidden, index, gate, y)
    if backend == "triton":
        return gated_scatter_add_triton(hidden, index, gate, y)
    raise ValueError(f"gated_scatter_add: backend must be one of {_BACKENDS}, got {backend!r}")
