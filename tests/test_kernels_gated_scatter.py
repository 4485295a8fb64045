"""Tests for the fused MoR gated scatter-add (kernels/gated_scatter.py).

The Triton path runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
The module wraps its kernels with ``triton.jit`` lazily, per interpreter mode,
so setting the variable with ``monkeypatch`` inside a test is enough; shapes
are kept tiny because the interpreter executes every program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mor_megatron.kernels.gated_scatter as gs
from mor_megatron.kernels import gated_scatter_add, gated_scatter_add_reference

REPO = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(not gs.HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton path through the CPU interpreter for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gs.triton_interpret_enabled()


def _sorted_unique_index(s: int, b: int, k: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """Per column: k distinct token positions in [0, S), sorted ascending (what the MoR router produces)."""
    cols = [torch.randperm(s, generator=gen)[:k].sort().values for _ in range(b)]
    return torch.stack(cols, dim=1).to(device)


def _make(s: int, b: int, d: int, k: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    index = _sorted_unique_index(s, b, k, gen, device)
    gate = torch.rand(k, b, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(k, b, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    d_out = torch.randn(s, b, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return hidden, index, gate, y, d_out


def _run(fn, hidden, index, gate, y, d_out, **kw):
    """Forward + backward; returns (out, d_hidden, d_gate, d_y)."""
    h, g, yy = (t.detach().clone().requires_grad_(True) for t in (hidden, gate, y))
    out = fn(h, index, g, yy, **kw)
    out.backward(d_out)
    return out.detach(), h.grad, g.grad, yy.grad


def _run_ref_fp32(hidden, index, gate, y, d_out):
    """Reference in fp32 from the (possibly bf16) inputs, each result cast back to its input's dtype."""
    res = _run(gated_scatter_add_reference, hidden.float(), index, gate.float(), y.float(), d_out.float())
    return tuple(r.to(t.dtype) for r, t in zip(res, (hidden, hidden, gate, y)))


# (S, B, D, k, max D tile): k=1, k=S, B in {1, 3}, D not a power of two, S=1 corner;
# a 32-wide tile makes D=70/100 span several D blocks (forward grid dim 1,
# backward loop) without interpreter-unfriendly sizes.
CASES = [
    (1, 1, 3, 1, 1024),
    (8, 1, 5, 1, 1024),
    (8, 3, 24, 8, 1024),
    (11, 3, 17, 4, 1024),
    (13, 3, 100, 5, 1024),
    (13, 3, 100, 5, 32),
    (6, 1, 70, 6, 32),
]

TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
# d_gate is a length-D reduction: summation order differs, so allow a little more in fp32.
TOL_DGATE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def test_reference_matches_naive_loop() -> None:
    hidden, index, gate, y, _ = _make(9, 3, 7, 4, torch.float64, seed=1)
    expect = hidden.clone()
    for j in range(index.shape[0]):
        for b in range(index.shape[1]):
            expect[index[j, b], b, :] += gate[j, b] * y[j, b, :]
    torch.testing.assert_close(gated_scatter_add_reference(hidden, index, gate, y), expect, rtol=0, atol=0)


def test_reference_rejects_bad_shapes() -> None:
    hidden, index, gate, y, _ = _make(6, 2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="gate must be"):
        gated_scatter_add_reference(hidden, index, gate[:, :1], y)
    with pytest.raises(ValueError, match="index must be"):
        gated_scatter_add_reference(hidden, torch.zeros(7, 2, dtype=torch.int64), gate, y)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "S{}_B{}_D{}_k{}_tile{}".format(*c))
def test_triton_interpreter_matches_reference(
    interpret: None, monkeypatch: pytest.MonkeyPatch, case, dtype: torch.dtype
) -> None:
    s, b, d, k, max_block_d = case
    monkeypatch.setattr(gs, "_MAX_BLOCK_D", max_block_d)
    hidden, index, gate, y, d_out = _make(s, b, d, k, dtype, seed=s * 100 + d)

    got = _run(gated_scatter_add, hidden, index, gate, y, d_out, backend="triton")
    ref = _run_ref_fp32(hidden, index, gate, y, d_out)
    for name, g, r in zip(("out", "d_hidden", "d_gate", "d_y"), got, ref):
        assert g.dtype == r.dtype == dtype, name
        tol = TOL_DGATE[dtype] if name == "d_gate" else TOL[dtype]
        torch.testing.assert_close(g.float(), r.float(), **tol, msg=lambda m: f"{name}: {m}")

    # Rows that were not selected are copied bit-exactly.
    selected = torch.zeros(s, b, dtype=torch.bool)
    selected.scatter_(0, index, True)
    assert torch.equal(got[0][~selected], hidden[~selected])


@needs_triton
def test_triton_interpreter_noncontiguous_and_partial_grads(interpret: None) -> None:
    s, b, d, k = 9, 3, 12, 5
    hidden, index, gate, y, d_out = _make(s, b, d, k, torch.float32, seed=7)
    # Non-contiguous views of the same values.
    hidden_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    gate_nc = gate.t().contiguous().t()
    y_nc = y[:, :, :].transpose(1, 2).contiguous().transpose(1, 2)
    assert not (hidden_nc.is_contiguous() or gate_nc.is_contiguous() or y_nc.is_contiguous())

    yy = y_nc.clone().requires_grad_(True)  # only y needs a gradient
    out = gated_scatter_add(hidden_nc, index, gate_nc, yy, backend="triton")
    out.backward(d_out)
    ref = _run(gated_scatter_add_reference, hidden, index, gate, y, d_out)
    torch.testing.assert_close(out.detach(), ref[0], **TOL[torch.float32])
    torch.testing.assert_close(yy.grad, ref[3], **TOL[torch.float32])


@needs_triton
def test_triton_interpreter_gradcheck_float64(interpret: None) -> None:
    hidden, index, gate, y, _ = _make(5, 2, 3, 3, torch.float64, seed=3)
    inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, gate, y))

    def fn(h: torch.Tensor, g: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return gated_scatter_add(h, index, g, yy, backend="triton")

    try:
        fn(*inputs)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"float64 not supported by the Triton interpreter here: {exc!r}")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dispatcher_backends_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, index, gate, y, _ = _make(7, 3, 6, 3, torch.float32, seed=5)
    ref = gated_scatter_add_reference(hidden, index, gate, y)
    # "auto" on CPU is the reference, even with the interpreter available.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    monkeypatch.setattr(gs, "gated_scatter_add_triton", lambda *a: calls.append(1))
    assert torch.equal(gated_scatter_add(hidden, index, gate, y), ref)
    assert torch.equal(gated_scatter_add(hidden, index, gate, y, backend="torch"), ref)
    assert not calls
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_scatter_add(hidden, index, gate, y, backend="cuda")


def _run_snippet(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@needs_triton
def test_triton_backend_on_cpu_without_interpreter_errors() -> None:
    proc = _run_snippet(
        """
        import torch
        from mor_megatron.kernels import gated_scatter_add
        h = torch.zeros(4, 2, 3); idx = torch.tensor([[0, 1], [2, 3]]); g = torch.ones(2, 2); y = torch.ones(2, 2, 3)
        try:
            gated_scatter_add(h, idx, g, y, backend="triton")
        except RuntimeError as e:
            print("ERR:" + str(e))
        else:
            print("NO ERROR")
        """
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("ERR:"), proc.stdout + proc.stderr
    assert "\n" not in line and "needs CUDA tensors" in line and "TRITON_INTERPRET=1" in line


def test_module_imports_without_triton() -> None:
    proc = _run_snippet(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch
        import mor_megatron.kernels as kernels
        from mor_megatron.kernels import gated_scatter_add, gated_scatter_add_reference
        assert not kernels.HAS_TRITON
        h = torch.randn(4, 2, 3); idx = torch.tensor([[0, 1], [2, 3]]); g = torch.rand(2, 2); y = torch.randn(2, 2, 3)
        assert torch.equal(gated_scatter_add(h, idx, g, y), gated_scatter_add_reference(h, idx, g, y))
        try:
            gated_scatter_add(h, idx, g, y, backend="triton")
        except RuntimeError as e:
            print("ERR:" + str(e))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERR:" in proc.stdout and "triton is not installed" in proc.stdout


def _ptxas_available() -> bool:
    if not gs.HAS_TRITON:
        return False
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm90_without_gpu(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Ahead-of-time compile of both kernels down to a cubin for an H100 target.

    The interpreter does not type-check like the real compiler; this catches
    compiled-path errors on a machine with no GPU.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fwd, bwd = gs._kernels()
    consts = {"BLOCK_D": 1024, "IS_FP64": False}
    p = f"*{dtype}"
    sig_fwd = dict(hidden_ptr=p, inv_ptr="*i32", gate_ptr=p, y_ptr=p, out_ptr=p, B="i32", D="i32",
                   BLOCK_D="constexpr", IS_FP64="constexpr")
    sig_bwd = dict(dout_ptr=p, index_ptr="*i64", gate_ptr=p, y_ptr=p, dy_ptr=p, dgate_ptr=p, B="i32", D="i32",
                   BLOCK_D="constexpr", IS_FP64="constexpr")
    target = GPUTarget("cuda", 90, 32)
    for fn, sig in ((fwd, sig_fwd), (bwd, sig_bwd)):
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options={"num_warps": 4})
        assert compiled.asm.get("cubin"), fn


def test_bench_tool_runs_on_cpu(capsys: pytest.CaptureFixture) -> None:
    from mor_megatron.tools.bench_kernels import main

    main(["--device", "cpu", "--shapes", "16x2x8", "--k-fracs", "0.5", "--min-run-time", "0.01"])
    out = capsys.readouterr().out
    assert "S=16 B=2 D=8 k=8" in out and "Triton timing needs CUDA" in out and "token rows" not in out
    main(["--device", "cpu", "--shapes", "16x2x8", "--k-fracs", "0.5", "--min-run-time", "0.01", "--row-ops"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("rows S=16 B=2 D=8 k=8"))
    assert len(row.split()) == 5 + 6 and "token rows" in out
    # gpu_check reads the first table only: the second's rows are not taken for its cases
    from mor_megatron.tools.gpu_check_steps import parse_bench_kernels

    assert [r["case"] for r in parse_bench_kernels(out)] == ["S=16 B=2 D=8 k=8"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(257, 3, 960, 100), (128, 8, 2048, 128), (64, 2, 1000, 1)],
                         ids=lambda s: "S{}_B{}_D{}_k{}".format(*s))
def test_triton_cuda_matches_reference(monkeypatch: pytest.MonkeyPatch, shape, dtype: torch.dtype) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, b, d, k = shape
    hidden, index, gate, y, d_out = _make(s, b, d, k, dtype, seed=11, device="cuda")
    got = _run(gated_scatter_add, hidden, index, gate, y, d_out, backend="auto")  # auto -> Triton on CUDA
    ref = _run_ref_fp32(hidden, index, gate, y, d_out)
    for name, g, r in zip(("out", "d_hidden", "d_gate", "d_y"), got, ref):
        assert g.dtype == r.dtype == dtype, name
        tol = dict(rtol=1e-5, atol=1e-4) if name == "d_gate" and dtype == torch.float32 else TOL[dtype]
        torch.testing.assert_close(g.float(), r.float(), **tol, msg=lambda m: f"{name}: {m}")
