"""The Triton SQS-GLU kernels (sqs.ops.triton_sqs_glu), checked at four levels so
that most of it runs on machines without a GPU:

  * import safety: the module imports, and says it is unavailable, without triton;
  * interpreter: with triton installed, the kernels run on CPU tensors under
    TRITON_INTERPRET=1 and are compared with `sqs.core.sqs_math` /
    `sqs_grad_math`. This runs in a subprocess: the variable must be set before
    triton is imported, and it switches every Triton kernel of the process to the
    interpreter, so setting it here would leak into other test modules;
  * ahead-of-time compile: the kernels lower to cubin for sm_80 and sm_90 with no GPU
    present (catches lowering/type errors the interpreter does not see);
  * gpu (marked `gpu`, skipped without CUDA): the real kernels through
    `sqs.ops.sqs_glu` on CUDA tensors, against the reference and gradcheck.

Run the interpreter cases by hand with
    TRITON_INTERPRET=1 python tests/test_triton_kernel.py
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sqs.core import sqs_grad_math, sqs_math

HAVE_TRITON = importlib.util.find_spec("triton") is not None
SRC = str(Path(__file__).resolve().parents[1] / "src")
NO_TRITON = "triton is not installed (pip install 'sqs[triton]' or pip install triton)"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


# ---- shared reference and case list (used by the interpreter and the GPU tests) ----

def _reference(g, w, v, c, lam, p):
    """(y, dw, dv) in the input dtype, computed in float32 (float64 for float64) and
    rounded once, as the kernels do."""
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    gc, wc, vc = g.to(cd), w.to(cd), v.to(cd)
    s = sqs_math(vc, c, lam, p)
    y = wc * s
    dw = gc * s
    dv = gc * wc * sqs_grad_math(vc, c, lam, p)
    return tuple(t.to(w.dtype) for t in (y, dw, dv))


def _tol(dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return {}  # torch's defaults for fp16/bf16 allow about one rounding step


def _make(layout, shape, dtype, device, seed=0):
    """(g, w, v) with the requested memory layout; v includes exact zeros, tiny and
    large values so the v == 0 conventions and both regimes are exercised."""
    gen = torch.Generator().manual_seed(seed)
    g, w, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    v = v * 2
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-6, 1e4, -3e3], dtype=torch.float64)
    k = min(len(special), v.numel())
    v.view(-1)[:k] = special[:k]
    g, w, v = (t.to(dtype=dtype, device=device) for t in (g, w, v))
    if layout == "chunk":  # w, v = h.chunk(2, -1): row stride 2n, read in place
        w, v = torch.cat([w, v], -1).chunk(2, -1)
        g = torch.cat([g, torch.zeros_like(g)], -1).chunk(2, -1)[0]
    elif layout == "transposed":  # unit stride on the first dim: needs a copy
        g, w, v = (t.mT.contiguous().mT for t in (g, w, v))
    return g, w, v


# (name, layout, shape, dtype, c, lam, p)
CASES = [
    ("p1_default", "contig", (4, 37), torch.float32, 0.01, 0.5, 1.0),
    ("p2", "contig", (4, 37), torch.float32, 0.01, 0.5, 2.0),
    ("p0.5", "contig", (4, 37), torch.float32, 0.01, 0.5, 0.5),
    ("p1.7_c_neg", "contig", (4, 37), torch.float32, -0.05, 0.3, 1.7),
    ("c_neg_p1", "contig", (4, 37), torch.float32, -0.05, 0.5, 1.0),
    ("big_c_lam", "contig", (4, 37), torch.float32, 0.2, 1.0, 1.0),
    ("bilinear_c0_lam0", "contig", (4, 37), torch.float32, 0.0, 0.0, 1.0),
    ("bilinear_c0_lam0_p2", "chunk", (4, 37), torch.float32, 0.0, 0.0, 2.0),
    ("chunk_p1", "chunk", (3, 5, 48), torch.float32, 0.01, 0.5, 1.0),
    ("chunk_p0.5", "chunk", (3, 5, 48), torch.float32, 0.01, 0.5, 0.5),
    ("chunk_narrow_rows", "chunk", (300, 3), torch.float32, 0.01, 0.5, 1.0),
    ("chunk_wide_rows", "chunk", (2, 5000), torch.float32, 0.01, 0.5, 2.0),
    ("flat_large", "contig", (3, 5000), torch.float32, 0.01, 0.5, 1.0),
    ("transposed", "transposed", (6, 37), torch.float32, 0.01, 0.5, 0.5),
    ("one_d", "contig", (129,), torch.float32, 0.01, 0.5, 1.0),
    ("bf16_contig", "contig", (8, 64), torch.bfloat16, 0.01, 0.5, 1.0),
    ("bf16_chunk", "chunk", (8, 64), torch.bfloat16, 0.01, 0.5, 1.0),
    ("bf16_chunk_p2", "chunk", (8, 64), torch.bfloat16, -0.05, 0.5, 2.0),
    ("fp16_chunk", "chunk", (8, 64), torch.float16, 0.01, 0.5, 0.5),
    ("fp64_p1", "contig", (8, 33), torch.float64, 0.01, 0.5, 1.0),
    ("fp64_chunk_p1.7", "chunk", (8, 33), torch.float64, -0.05, 0.3, 1.7),
]


def _check_case(fwd, bwd, case, device) -> list[str]:
    """Run one case through the kernels `fwd`/`bwd`; return the failures."""
    name, layout, shape, dtype, c, lam, p = case
    g, w, v = _make(layout, shape, dtype, device)
    w0, v0, g0 = w.clone(), v.clone(), g.clone()
    y = fwd(w, v, c, lam, p)
    dw, dv = bwd(g, w, v, c, lam, p)
    ry, rdw, rdv = _reference(g, w, v, c, lam, p)
    errs = []
    for label, got, want in (("y", y, ry), ("dw", dw, rdw), ("dv", dv, rdv)):
        if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
            errs.append(f"{name}: {label} is {tuple(got.shape)} {got.dtype} {got.device}, "
                        f"want {tuple(want.shape)} {want.dtype} {want.device}")
            continue
        try:
            if c == 0 and lam == 0 and dtype == torch.float32:  # exactly the bilinear GLU
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:
                torch.testing.assert_close(got, want, **_tol(dtype))
        except AssertionError as e:
            errs.append(f"{name}: {label} mismatch: {e}")
    if not (torch.equal(w, w0) and torch.equal(v, v0) and torch.equal(g, g0)):
        errs.append(f"{name}: the kernels modified their inputs")
    return errs


def _interpreter_main() -> int:
    """Entry point of the interpreter subprocess (TRITON_INTERPRET=1 already set)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    import time

    from sqs.ops import triton_sqs_glu as K

    from sqs import ops as ops_mod
    t0 = time.perf_counter()
    errs = []
    for case in CASES:
        errs += _check_case(K._forward, K._backward, case, "cpu")
    # degenerate shapes
    for shape in [(0, 8), (3, 0), ()]:
        w, v, g = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        y = K._forward(w, v, 0.01, 0.5, 1.0)
        dw, dv = K._backward(g, w, v, 0.01, 0.5, 1.0)
        ry, rdw, rdv = _reference(g, w, v, 0.01, 0.5, 1.0)
        for got, want in ((y, ry), (dw, rdw), (dv, rdv)):
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                errs.append(f"shape {shape}: wrong result {got} vs {want}")
    # the public entry points accept CPU tensors only because the interpreter is on
    y = K.forward(*_make("contig", (2, 5), torch.float32, "cpu")[1:], 0.01, 0.5, 1.0)
    # the whole autograd path: sqs.ops.sqs_glu with the triton backend chosen (the interpreter
    # lets it take CPU tensors)
    try:
        ops_mod.set_backend("triton")
        for p in (1.0, 0.5):
            h = torch.randn(4, 6, 2 * 40, dtype=torch.float32, requires_grad=True)
            w, v = h.chunk(2, -1)
            y = ops_mod.sqs_glu(w, v, c=0.01, lam=0.5, p=p)
            gy = torch.randn_like(y)
            (gh,) = torch.autograd.grad(y, h, gy)
            ry, rdw, rdv = _reference(gy, w.detach(), v.detach(), 0.01, 0.5, p)
            torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gh, torch.cat([rdw, rdv], -1), rtol=1e-5, atol=1e-6)
            # the packed op (what sqs.nn.GLU calls): the kernel writes dw, dv into dx's halves
            hp = h.detach().clone().requires_grad_()
            yp = ops_mod.sqs_glu_packed(hp, c=0.01, lam=0.5, p=p)
            (ghp,) = torch.autograd.grad(yp, hp, gy)
            torch.testing.assert_close(yp, ry, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ghp, gh, rtol=1e-6, atol=1e-7)
        g2, w2, v2 = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
        try:  # an `out` that only a copy could view as rows must be refused, not silently dropped
            K._backward(g2, w2, v2, 0.01, 0.5, 1.0, out=(torch.empty(3, 5).T, torch.empty(3, 5).T))
            errs.append("backward accepted a non-row-viewable out tensor")
        except ValueError:
            pass
        # gradcheck of the kernels (float64 is computed in float64), off the jump at 0
        for c, lam, p in ((0.01, 0.5, 1.0), (0.01, 0.5, 0.5), (-0.05, 0.3, 1.7)):
            h = torch.randn(3, 2 * 5, dtype=torch.float64) * 2
            h = torch.where(h.abs() < 1e-2, h + 0.05, h).requires_grad_()
            f = lambda x: ops_mod.sqs_glu(*x.chunk(2, -1), c=c, lam=lam, p=p)  # noqa: E731
            if not torch.autograd.gradcheck(f, (h,), raise_exception=False):
                errs.append(f"gradcheck failed for c={c}, lam={lam}, p={p}")
    except AssertionError as e:
        errs.append(f"autograd through sqs_glu: {e}")
    finally:
        ops_mod.set_backend("auto")
    dt = time.perf_counter() - t0
    print(f"interpreter: {len(CASES)} cases + degenerate shapes + autograd (plain and packed) + gradcheck "
          f"in {dt:.2f} s")
    for e in errs:
        print("FAIL", e)
    return 1 if errs else 0


# ---- tests ------------------------------------------------------------------------

def test_module_imports_without_triton():
    """With `import triton` failing, the module still imports and reports unavailable."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch
        from sqs.ops import triton_sqs_glu as K
        assert K.available() is False
        assert K.triton is None and "triton" in K._TRITON_IMPORT_ERROR
        from sqs import ops
        assert "triton" not in ops.available_backends()
        try:
            K.forward(torch.ones(2), torch.ones(2), 0.01, 0.5, 1.0)
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("forward without triton should raise")
        # and the op itself still works (falls back to compiled/eager on CPU)
        w = torch.randn(3, 4, requires_grad=True); v = torch.randn(3, 4)
        with ops.backend("eager"):
            ops.sqs_glu(w, v).sum().backward()
        print("ok")
    """)
    r = _run(["-c", code], _env())
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_available_matches_environment():
    from sqs.ops import triton_sqs_glu as K

    assert K.available() == (HAVE_TRITON and torch.cuda.is_available())


def test_layout_reads_chunk_views_in_place():
    """The halves of h.chunk(2, -1) go to the kernel as strided views, not copies;
    all-contiguous inputs become one flat row; transposed inputs are copied."""
    from sqs.ops import triton_sqs_glu as K

    h = torch.randn(3, 5, 2 * 48)
    w, v = h.chunk(2, -1)
    views, n_rows, n_cols = K._layout((w, v))
    assert (n_rows, n_cols) == (15, 48)
    assert views[0].data_ptr() == w.data_ptr() and views[1].data_ptr() == v.data_ptr()
    assert views[0].stride() == (96, 1) and views[1].stride() == (96, 1)
    a, b = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    views, n_rows, n_cols = K._layout((a, b))
    assert (n_rows, n_cols) == (1, a.numel()) and views[0].data_ptr() == a.data_ptr()
    t = torch.randn(48, 15).t()
    views, n_rows, n_cols = K._layout((t, t))
    assert (n_rows, n_cols) == (15, 48) and views[0].is_contiguous()
    torch.testing.assert_close(views[0], t)


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
def test_kernels_under_triton_interpreter():
    """Forward and backward vs the reference on CPU via TRITON_INTERPRET=1."""
    r = _run([__file__], _env(TRITON_INTERPRET="1"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "interpreter:" in r.stdout, out


_AOT = textwrap.dedent("""
    import inspect, sys
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from sqs.ops import triton_sqs_glu as K
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        print("SKIP: this triton's ASTSource API differs"); sys.exit(0)

    def sig(kernel, n_ptr, dt):
        names = iter(kernel.arg_names)
        s = {next(names): "*" + dt for _ in range(n_ptr)}
        s.update({next(names): "i32" for _ in range(n_ptr + 3)})   # row strides, n_rows, n_cols, n_col_blocks
        s.update({next(names): "fp64" for _ in range(8)})          # the gate's constants k0..k6, big
        return s

    n = 0
    for arch, dtypes in ((90, ("fp32", "bf16", "fp16", "fp64")), (80, ("bf16",))):
        for dt in dtypes:
            for kind in (0, 1, 2):  # the gate forms of sqs.core: lam = 0, p = 1, general p
                for kernel, n_ptr in ((K._sqs_glu_fwd_kernel, 3), (K._sqs_glu_bwd_kernel, 5)):
                    consts = dict(KIND=kind, SAT=dt in ("bf16", "fp16"), IS_FP64=dt == "fp64",
                                  BLOCK_M=4, BLOCK_N=512)
                    s = sig(kernel, n_ptr, dt)
                    s.update({k: "constexpr" for k in consts})
                    ck = triton.compile(ASTSource(fn=kernel, signature=s, constexprs=consts),
                                        target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8))
                    ptx = ck.asm["ptx"]
                    assert len(ck.asm["cubin"]) > 0
                    if kind < 2:  # the constexpr specialisations lam = 0 and p = 1: no pow/exp/log at all
                        assert "ex2" not in ptx and "lg2" not in ptx, (dt, arch)
                    n += 1
    print(f"compiled {n} kernels")
""")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
def test_kernels_compile_for_cuda_without_gpu(tmp_path):
    """Lower both kernels to cubin for sm_90 (every dtype) and sm_80 (bf16); no GPU needed."""
    r = _run(["-c", _AOT], _env(TRITON_CACHE_DIR=str(tmp_path / "triton-cache")))
    out = r.stdout + r.stderr
    if "SKIP:" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, out
    assert "compiled 30 kernels" in r.stdout, out


# ---- real GPU ---------------------------------------------------------------------

def _gpu_ready() -> bool:
    if not (HAVE_TRITON and torch.cuda.is_available()):
        return False
    from sqs.ops import triton_sqs_glu as K

    return K.available()


needs_gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA device and triton")


@pytest.fixture
def triton_backend():
    from sqs import ops

    with ops.backend("triton"):
        yield ops


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_kernels_match_reference(case):
    from sqs.ops import triton_sqs_glu as K

    errs = _check_case(K.forward, K.backward, case, "cuda")
    assert not errs, "\n".join(errs)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c,lam,p", [(0.01, 0.5, 1.0), (0.01, 0.5, 2.0), (-0.05, 0.3, 0.5), (0.0, 0.0, 1.0)])
def test_gpu_autograd_through_sqs_glu(triton_backend, dtype, c, lam, p):
    """The op as models use it: chunked projection output, autograd, triton backend."""
    torch.manual_seed(0)
    h = torch.randn(64, 33, 2 * 256, device="cuda", dtype=dtype, requires_grad=True)
    w, v = h.chunk(2, -1)
    y = triton_backend.sqs_glu(w, v, c=c, lam=lam, p=p)
    gy = torch.randn_like(y)
    (gh,) = torch.autograd.grad(y, h, gy)
    ry, rdw, rdv = _reference(gy, w.detach(), v.detach(), c, lam, p)
    torch.testing.assert_close(y, ry, **_tol(dtype))
    torch.testing.assert_close(gh, torch.cat([rdw, rdv], -1), **_tol(dtype))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("c,lam,p", [(0.01, 0.5, 1.0), (0.01, 0.5, 2.0), (0.01, 0.5, 0.5), (-0.05, 0.3, 1.7),
                                     (0.0, 0.0, 1.0)])
def test_gpu_gradcheck_float64(triton_backend, c, lam, p):
    """gradcheck of the real kernel (float64 inputs are computed in float64)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(5, 2 * 7, device="cuda", dtype=torch.float64, generator=gen) * 2
    h = torch.where(h.abs() < 1e-2, h + 0.05, h).requires_grad_()  # off the jump at 0
    f = lambda x: triton_backend.sqs_glu(*x.chunk(2, -1), c=c, lam=lam, p=p)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h,))


@pytest.mark.gpu
@needs_gpu
def test_gpu_large_and_odd_shapes(triton_backend):
    """Past one tile in both directions, and widths that are not powers of two."""
    for shape in [(2048, 2 * 2048), (4096, 2 * 4100), (3, 7, 2 * 96), (1, 2 * 70000)]:
        h = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w, v = h.chunk(2, -1)
        y = triton_backend.sqs_glu(w, v)
        gy = torch.randn_like(y)
        (gh,) = torch.autograd.grad(y, h, gy)
        ry, rdw, rdv = _reference(gy, w.detach(), v.detach(), 0.01, 0.5, 1.0)
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(gh, torch.cat([rdw, rdv], -1))


if __name__ == "__main__":
    sys.exit(_interpreter_main())
