"""The gate, its derivative, the GLU family and the fused op."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sqs
from sqs import functional as SF
from sqs.ops import sqs_glu, sqs_glu_packed

PARAMS = [  # (c, lam, p): the paper's default and edge cases (p != 1, c < 0, c = lam = 0)
    (0.01, 0.5, 1.0),
    (0.01, 0.5, 2.0),
    (0.01, 0.5, 0.5),
    (-0.05, 0.5, 1.0),
    (-0.05, 0.3, 1.7),
    (0.0, 0.0, 1.0),
    (0.2, 1.0, 1.0),
]
GATES = ["relu", "gelu", "swiglu", "bilinear", "sqs", "silu", "identity"]  # names and the aliases


@pytest.mark.parametrize("c,lam,p", PARAMS)
def test_gradcheck_sqs_gate(glu_pair, c, lam, p):
    _, v = glu_pair()
    assert torch.autograd.gradcheck(lambda x: SF.sqs(x, c, lam, p), (v,))


@pytest.mark.parametrize("c,lam,p", PARAMS)
def test_gradcheck_fused_glu(glu_pair, c, lam, p):
    w, v = glu_pair()
    assert torch.autograd.gradcheck(lambda a, b: sqs_glu(a, b, c, lam, p), (w, v))


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_every_gate(glu_pair, gate):
    w, v = glu_pair(seed=1)
    assert torch.autograd.gradcheck(lambda a, b: SF.glu(a, b, gate), (w, v))


@pytest.mark.parametrize("backend", ["compiled", "eager"])
@pytest.mark.parametrize("c,lam,p", PARAMS)
def test_fused_matches_reference_forward_and_backward(glu_pair, backend, c, lam, p):
    w, v = glu_pair((64, 33), seed=2, dtype=torch.float32)
    g = torch.randn(64, 33)
    with sqs.ops.backend(backend):
        y = sqs_glu(w, v, c, lam, p)
        dw, dv = torch.autograd.grad(y, (w, v), g)
    w2, v2 = w.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    y2 = w2 * SF.sqs_reference(v2, c, lam, p)
    dw2, dv2 = torch.autograd.grad(y2, (w2, v2), g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, dw2, rtol=1e-5, atol=1e-6)
    # The naive formula differentiates |v|^p and sgn; away from 0 the derivatives agree.
    torch.testing.assert_close(dv, dv2, rtol=1e-4, atol=1e-5)


def test_fused_non_contiguous_chunk_views():
    h = torch.randn(8, 2 * 16, requires_grad=True)
    w, v = h.chunk(2, -1)
    assert not w.is_contiguous()
    y = sqs_glu(w, v)
    y.sum().backward()
    ref_h = h.detach().clone().requires_grad_()
    rw, rv = ref_h.chunk(2, -1)
    (rw * SF.sqs_reference(rv)).sum().backward()
    torch.testing.assert_close(y, rw * SF.sqs_reference(rv))
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c,lam,p", PARAMS)
def test_gradcheck_packed_glu(glu_pair, c, lam, p):
    w, v = glu_pair(seed=4)
    x = torch.cat((w, v), -1).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sqs_glu_packed(t, c, lam, p), (x,))


@pytest.mark.parametrize("backend", ["compiled", "eager"])
@pytest.mark.parametrize("shape", [(64, 2 * 33), (3, 5, 2 * 16), (2 * 7,)])
def test_packed_equals_two_half_op(backend, shape):
    """GLU uses the packed op; it must give sqs_glu's values and the same gradient of x."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).requires_grad_()
    g = torch.randn(shape[:-1] + (shape[-1] // 2,))
    with sqs.ops.backend(backend):
        y = sqs_glu_packed(x, 0.05, 0.4, 1.3)
        (dx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_()
    y2 = sqs_glu(*x2.chunk(2, -1), 0.05, 0.4, 1.3)
    (dx2,) = torch.autograd.grad(y2, x2, g)
    assert y.shape == y2.shape and dx.shape == x.shape
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx, dx2, rtol=1e-6, atol=1e-7)


def test_packed_saves_only_x_and_rejects_odd_width():
    x = torch.randn(4, 6, requires_grad=True)
    (saved,) = sqs_glu_packed(x).grad_fn.saved_tensors
    assert saved.data_ptr() == x.data_ptr()
    with pytest.raises(ValueError, match=r"must be even.*sqs_glu"):
        sqs_glu_packed(torch.randn(4, 5))


def test_c_lam_zero_is_exactly_bilinear(glu_pair):
    w, v = glu_pair((5, 9), dtype=torch.float32)
    torch.testing.assert_close(sqs_glu(w, v, c=0.0, lam=0.0), w * v, rtol=0, atol=0)
    torch.testing.assert_close(SF.sqs(v, c=0.0, lam=0.0), v, rtol=0, atol=0)


def test_derivative_at_zero_follows_spec():
    v = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(SF.sqs(v, 0.01, 0.5, 1.0).sum(), v)
    torch.testing.assert_close(g, torch.full_like(g, 1 + 0.5 * 0.01))
    for p in (0.5, 2.0):
        (g,) = torch.autograd.grad(SF.sqs(v, 0.01, 0.5, p).sum(), v)
        assert torch.isfinite(g).all() and torch.allclose(g, torch.ones_like(g))


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=64)
hyper = st.tuples(st.floats(-0.5, 0.5), st.floats(0.01, 3.0), st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))


@settings(max_examples=60, deadline=None)
@given(x=st.lists(finite, min_size=1, max_size=32), h=hyper)
def test_sqs_is_odd_and_zero_at_zero(x, h):
    c, lam, p = h
    t = torch.tensor(x, dtype=torch.float64)
    torch.testing.assert_close(SF.sqs(-t, c, lam, p), -SF.sqs(t, c, lam, p))
    assert SF.sqs(torch.zeros(1, dtype=torch.float64), c, lam, p).item() == 0.0


@settings(max_examples=40, deadline=None)
@given(h=hyper, sign=st.sampled_from([-1.0, 1.0]))
def test_sqs_saturates_at_plus_minus_one_over_lam_for_p1(h, sign):
    c, lam, _ = h
    big = torch.tensor([sign * 1e12], dtype=torch.float64)
    torch.testing.assert_close(SF.sqs(big, c, lam, 1.0), torch.tensor([sign / lam], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(x=st.lists(st.floats(1e-3, 1e-1), min_size=1, max_size=16))
def test_sqs_is_near_identity_in_bilinear_regime(x):
    # c << |v| << 1/lam: sqs(v) ~ v. With c = 1e-6, lam = 1e-6 the relative error is ~1e-3.
    t = torch.tensor(x, dtype=torch.float64)
    torch.testing.assert_close(SF.sqs(t, 1e-6, 1e-6, 1.0), t, rtol=2e-3, atol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), h=hyper, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fused_equals_reference_within_dtype_tolerance(seed, h, dtype):
    c, lam, p = h
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(17, 19, generator=g)
    v = torch.randn(17, 19, generator=g) * 3
    ref = (w.double() * SF.sqs_math(v.double(), c, lam, p)).to(dtype)
    out = sqs_glu(w.to(dtype), v.to(dtype), c, lam, p)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backward_close_to_float32(glu_pair, dtype):
    w, v = glu_pair((32, 32), seed=3, dtype=torch.float32)
    g = torch.randn(32, 32)
    dw, dv = torch.autograd.grad(sqs_glu(w, v), (w, v), g)
    wh, vh = w.detach().to(dtype).requires_grad_(), v.detach().to(dtype).requires_grad_()
    dwh, dvh = torch.autograd.grad(sqs_glu(wh, vh), (wh, vh), g.to(dtype))
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(dwh.float(), dw, rtol=tol, atol=tol)
    torch.testing.assert_close(dvh.float(), dv, rtol=tol, atol=tol)


def test_fused_saves_only_w_and_v(glu_pair):
    w, v = glu_pair((4, 4), dtype=torch.float32)
    y = sqs_glu(w, v)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == w.data_ptr() and saved[1].data_ptr() == v.data_ptr()


# ---- errors name the argument -------------------------------------------------

def test_unknown_gate_is_named(glu_pair):
    w, v = glu_pair()
    with pytest.raises(ValueError, match=r"`gate` 'tanh'.*relu"):
        SF.glu(w, v, "tanh")


@pytest.mark.parametrize("p", [0.0, -1.0])
def test_nonpositive_p_is_named(p):
    with pytest.raises(ValueError, match=r"`p` must be > 0"):
        SF.sqs(torch.ones(2), p=p)
    with pytest.raises(ValueError, match=r"`p` must be > 0"):
        sqs.nn.GLU(4, 4, gate="sqs", p=p)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"`w` and `v` must have the same shape"):
        SF.glu(torch.ones(2, 3), torch.ones(3, 2))


def test_gate_params_for_parameterless_gate_rejected():
    with pytest.raises(ValueError, match="takes no parameters"):
        sqs.nn.GLU(4, 4, gate="relu", c=0.1)


def test_aliases():
    assert SF.canonical_gate("bilinear") == "bilinear"
    assert SF.canonical_gate("SwiGLU") == "swiglu"
    assert SF.canonical_gate("silu") == "swiglu" and SF.canonical_gate("identity") == "bilinear"
    assert sqs.nn.GLU(4, 4, gate="identity").gate == "bilinear"


# ---- modules -------------------------------------------------------------------

@pytest.mark.parametrize("gate,d_out", itertools.product(GATES, [None, 5]))
def test_glu_shapes_and_weight_accessors(gate, d_out):
    m = sqs.nn.GLU(6, 8, d_out, gate=gate)
    x = torch.randn(2, 3, 6)
    y = m(x)
    assert y.shape == (2, 3, d_out or 8)
    assert m.W.shape == (8, 6) and m.V.shape == (8, 6)
    assert (m.P is None) == (d_out is None)
    if d_out:
        assert m.P.shape == (d_out, 8)
    # The accessors are the weights the layer uses: rebuild the output by hand.
    act = SF.gate_fn(gate)
    h = (x @ m.W.T) * act(x @ m.V.T)
    expect = h @ m.P.T if d_out else h
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert not m.W.requires_grad


def test_sqs_module_in_llama_style_mlp():
    act = sqs.nn.SQS(c=0.02, lam=0.4, p=1.0)
    gate, up, down = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    x = torch.randn(4, 8)
    y = down(act(gate(x)) * up(x))
    y.sum().backward()
    assert gate.weight.grad is not None
    torch.testing.assert_close(act(x), SF.sqs_reference(x, 0.02, 0.4, 1.0))
    assert "c=0.02" in repr(act)


# ---- backends: choosing one, and falling back per call -------------------------

def test_backend_context_restores_previous_choice_also_on_error():
    before = sqs.ops.get_backend()
    with sqs.ops.backend("eager"):
        assert sqs.ops.get_backend() == "eager"
        sqs_glu(torch.randn(2, 3), torch.randn(2, 3))
        assert sqs.ops.last_backend() == "eager"
    assert sqs.ops.get_backend() == before
    with pytest.raises(KeyError):
        with sqs.ops.backend("eager"):
            raise KeyError("inside")
    assert sqs.ops.get_backend() == before
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*eager"):
        with sqs.ops.backend("fast"):
            pass
    assert sqs.ops.get_backend() == before


def test_eager_backend_fixture(eager_backend):
    assert sqs.ops.get_backend() == "eager"


def test_jit_trace_falls_back_for_that_call_only():
    """Tracing a model records the eager math; the compiled path stays on for later calls."""
    if "compiled" not in sqs.ops.available_backends():
        pytest.skip("torch.compile cannot build kernels here")
    m = sqs.nn.GLU(8, 16, 8)
    x = torch.randn(4, 8)
    with sqs.ops.backend("compiled"):
        traced = torch.jit.trace(m, x, check_trace=False)
        assert sqs.ops.last_backend() == "eager"
        torch.testing.assert_close(traced(x), m(x))
        assert sqs.ops.last_backend() == "compiled"
        m(x).sum().backward()
        assert sqs.ops.last_backend() == "compiled"
    assert "compiled" in sqs.ops.available_backends()


_FAULTS = """
import warnings, torch

def flaky_compile(fn, **kw):  # compiles nothing; fails the way the test asks
    def run(*args):
        if args[0].dtype == torch.float64:
            raise {error}
        return fn(*args)
    return run

torch.compile = flaky_compile
import sqs
x32, x64 = torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sqs.ops.sqs_glu_packed(x64)
    first = sqs.ops.last_backend()
    sqs.ops.sqs_glu_packed(x32)
    print("BACKENDS", first, sqs.ops.last_backend(), sqs.ops.available_backends())
    sqs.ops.sqs_glu_packed(x64)
print("WARNINGS", len(caught), *[str(w.message) for w in caught], sep="\\n")
"""


@pytest.mark.parametrize("error,expect", [
    ("RuntimeError('dtype not supported by this kernel')", ("eager compiled ['eager', 'compiled'",
                                                           "RuntimeError: dtype not supported by this kernel",
                                                           "other calls stay compiled")),
    ("__import__('torch._inductor.exc', fromlist=['x']).InvalidCxxCompiler()", ("eager eager ['eager']",
                                                                                "InvalidCxxCompiler",
                                                                                "C++ compiler")),
])
def test_compile_failure_warns_with_its_cause_and_stays_local(error, expect):
    """A compile error for one kind of input sends only that kind to eager, warning once with
    the error itself; only a broken C++ toolchain turns compilation off for the process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SQS_BACKEND": "auto", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = _FAULTS.format(error=error)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNINGS\n1\n" in r.stdout, r.stdout  # once, not at every call
    for text in expect:
        assert text in r.stdout, r.stdout


def test_fused_glu_inside_a_users_torch_compile_has_no_graph_break():
    """Under an outer torch.compile the fused op hands Inductor plain math (fullgraph would raise on a break)."""
    w, v = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10, requires_grad=True)
    f = torch.compile(lambda w, v: SF.glu_packed(torch.cat([w, v], -1), "sqs").sum()
                      + SF.glu(w, v, "sqs", lam=0.3).sum(), fullgraph=True)
    out = f(w, v)
    out.backward()
    ref_w, ref_v = w.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = (ref_w * SF.sqs(ref_v)).sum() + (ref_w * SF.sqs(ref_v, lam=0.3)).sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w.grad, ref_w.grad)
    torch.testing.assert_close(v.grad, ref_v.grad)
