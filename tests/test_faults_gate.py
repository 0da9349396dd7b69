"""The gate over its whole argument space (issue 19, item 8).

For every input of every supported dtype (zeros, subnormals, the dtype's largest values, +-inf,
NaN) and every allowed (c, lam, p) (any c, lam >= 0, p > 0, up to `sqs.core.param_limit`), through
every backend (eager, compiled, Triton under its CPU interpreter when installed):

* sqs(v) and sqs'(v) are finite for finite v; a value beyond the dtype's range saturates at its
  largest finite value;
* at v = +-inf they are the limits: sqs -> +-1/lam (p = 1), 0 (p > 1), +-inf (p < 1 or lam = 0),
  sqs' -> 0 (1 for lam = 0);
* NaN in gives NaN out, and only there;
* every value agrees with the exact one (mpmath at 256 bits, from the same rounded inputs) within
  a bound derived from the arithmetic: a few roundings of the compute dtype relative to the size
  of the formula's terms, widened by the error of log2/exp2 for general p, plus the final
  rounding to the output dtype;
* the gate is odd and its derivative even, bit for bit.

The tests are hypothesis properties with bounded example counts (the suite stays fast).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import mpmath
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sqs
from sqs.core import DTYPES, compute_dtype, param_limit
from sqs.io import ArgumentTypeError, ConfigError
from sqs.ops import sqs_glu, sqs_glu_packed

mpmath.mp.prec = 256
INF = float("inf")
NAN = float("nan")
HAVE_TRITON = __import__("importlib").util.find_spec("triton") is not None
SRC = str(Path(__file__).resolve().parents[1] / "src")
PROPS = settings(max_examples=int(os.environ.get("SQS_GATE_EXAMPLES", "25")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the exact gate (the oracle) --------------------------------------------------

def exact(v: float, c: float, lam: float, p: float) -> tuple:
    """(sqs(v), sqs'(v), scale of sqs, scale of sqs', log-error factor) in mpmath, for one float v.

    The scales are the sizes of the terms each formula adds, which bound the rounding error a
    careful evaluation makes; the factor counts the roundings through log2/exp2 (general p)."""
    mp = mpmath.mpf
    if math.isnan(v):
        return (None,) * 5
    s = 0 if v == 0 else (1 if v > 0 else -1)
    if math.isinf(v):
        if lam == 0:
            return mp(v), mp(1), mp(0), mp(0), 1
        lim = 1 / mp(lam) if p == 1 else (mp(0) if p > 1 else mpmath.inf)
        return s * lim, mp(0), mp(0), mp(0), 1
    a, c_, lam_, p_ = abs(mp(v)), mp(c), mp(lam), mp(p)
    u = lam_ * a ** p_ if a > 0 else mp(0)
    r = 1 / (1 + u)
    val = s * (a - c_) * r
    if a == 0:
        der = 1 + lam_ * c_ if p == 1 else mp(1)
        cterm = abs(lam_ * c_) if p == 1 else mp(0)
    else:
        cterm_signed = lam_ * p_ * c_ * a ** (p_ - 1) * r * r
        der = (1 + lam_ * (1 - p_) * a ** p_) * r * r + cterm_signed
        cterm = abs(cterm_signed)
    scale_val = (a + abs(c_)) * r
    scale_der = (1 + abs(1 - p_) * u) * r * r + cterm
    logs = 1 if (p == 1 or lam == 0 or a == 0) else 2 + abs(p * math.log2(float(a))) + abs(math.log2(lam))
    return val, der, scale_val, scale_der, logs


def rounded(x, dtype: torch.dtype) -> float:
    """An exact value as the dtype holds it: a finite value beyond its range saturates at its max."""
    big = torch.finfo(dtype).max
    if mpmath.isfinite(x) and abs(x) > big:
        return math.copysign(big, float(x))
    return float(x)


def check_values(v: torch.Tensor, got_val: torch.Tensor, got_der: torch.Tensor | None, c, lam, p, what: str):
    """Every element of (sqs(v), sqs'(v)) as computed against the exact values."""
    dt = v.dtype
    fc, fo = torch.finfo(compute_dtype(dt)), torch.finfo(dt)
    errors = []
    for i, x in enumerate(v.double().tolist()):
        gv = float(got_val[i])
        gd = None if got_der is None else float(got_der[i])
        if math.isnan(x):
            if not math.isnan(gv) or (gd is not None and not math.isnan(gd)):
                errors.append(f"v=nan: got ({gv}, {gd}), want nan")
            continue
        val, der, sv, sd, logs = exact(x, c, lam, p)
        for name, got, want, scale in (("sqs", gv, val, sv), ("sqs'", gd, der, sd)):
            if got is None:
                continue
            if math.isnan(got) or (math.isinf(got) and math.isfinite(x)):
                errors.append(f"{name}({x!r}) = {got}: not finite")
                continue
            if math.isinf(x) and name == "sqs" and mpmath.isinf(want):
                if got != float(want):
                    errors.append(f"{name}({x!r}) = {got}, want the limit {float(want)}")
                continue
            target = rounded(want, dt)
            tol = (16 * fc.eps * logs * float(scale) + 2 * fo.eps * abs(target)
                   + 4 * fc.tiny * (1 + abs(p * c)) + fo.tiny * fo.eps)
            if not abs(got - target) <= tol:
                errors.append(f"{name}({x!r}) = {got!r}, want {target!r} (tol {tol:.3g})")
    assert not errors, f"{what} {dt} c={c!r} lam={lam!r} p={p!r}:\n  " + "\n  ".join(errors[:12])


# ---- strategies: the whole argument space ---------------------------------------------

SPECIAL = [0.0, -0.0, 1.0, -1.0, INF, -INF, NAN]


@st.composite
def inputs(draw, dtype: torch.dtype, n: int = 24) -> torch.Tensor:
    """n values of `dtype` spread over its whole range (log-uniform exponents, both signs),
    with its edge values: zeros, the smallest subnormal and normal, the largest, +-inf, NaN."""
    fi = torch.finfo(dtype)
    edges = [fi.tiny * fi.eps, fi.tiny, fi.max, fi.eps, 1.0 / fi.eps]
    lo, hi = math.frexp(fi.tiny * fi.eps)[1] - 1, math.frexp(fi.max)[1] - 1

    def one() -> float:
        kind = draw(st.integers(0, 3))
        if kind == 0:
            return draw(st.sampled_from(SPECIAL + edges + [-x for x in edges]))
        sign = draw(st.sampled_from([1.0, -1.0]))
        return sign * math.ldexp(draw(st.floats(1.0, 2.0, exclude_max=True)), draw(st.integers(lo, hi)))

    vals = [one() for _ in range(n)]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def log_uniform(lo_exp: int, hi_exp: int):
    return st.builds(lambda m, e: math.ldexp(m, e), st.floats(1.0, 2.0, exclude_max=True), st.integers(lo_exp, hi_exp))


@st.composite
def params(draw, dtype: torch.dtype) -> tuple[float, float, float]:
    """(c, lam, p) anywhere in the allowed range for `dtype`: c of either sign or 0, lam = 0 or
    any positive size, p = 1 or any positive size (weighted towards the paper's region)."""
    limit_exp = math.frexp(param_limit(dtype))[1] - 2
    tiny_exp = math.frexp(torch.finfo(compute_dtype(dtype)).tiny)[1]
    c = draw(st.one_of(st.just(0.0), st.just(0.01), st.floats(-2, 2),
                       st.builds(lambda s, x: s * x, st.sampled_from([1.0, -1.0]), log_uniform(-60, limit_exp))))
    lam = draw(st.one_of(st.just(0.0), st.just(0.5), st.floats(0, 4),
                         log_uniform(-140, limit_exp)))
    p = draw(st.one_of(st.just(1.0), st.just(2.0), st.floats(0.05, 4), log_uniform(tiny_exp, limit_exp)))
    if lam * abs(c) > param_limit(dtype):  # the joint bound: lam*|c| <= param_limit
        c = math.copysign(param_limit(dtype) / lam, c)
    return c, lam, p


dtypes = st.sampled_from(DTYPES)


# ---- the gate alone (eager autograd Function) and the kernel forms -------------------------

@PROPS
@given(data=st.data(), dtype=dtypes)
def test_gate_and_its_derivative_over_every_input_and_parameter(data, dtype):
    c, lam, p = data.draw(params(dtype))
    v = data.draw(inputs(dtype)).requires_grad_()
    y = sqs.functional.sqs(v, c, lam, p)
    (d,) = torch.autograd.grad(y, v, torch.ones_like(y))
    assert y.dtype == dtype and d.dtype == dtype
    check_values(v.detach(), y.detach(), d, c, lam, p, "sqs.functional.sqs")


@PROPS
@given(data=st.data(), dtype=dtypes)
def test_gate_is_odd_and_its_derivative_even_bit_for_bit(data, dtype):
    c, lam, p = data.draw(params(dtype))
    v = data.draw(inputs(dtype))
    y, d = (sqs.core.gate_value_and_grad(v.to(compute_dtype(dtype)), *sqs.core.gate_constants(c, lam, p, dtype), dtype))
    y2, d2 = (sqs.core.gate_value_and_grad((-v).to(compute_dtype(dtype)), *sqs.core.gate_constants(c, lam, p, dtype),
                                           dtype))
    torch.testing.assert_close(y2, -y, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(d2, d, rtol=0, atol=0, equal_nan=True)


# ---- the fused GLU on every backend -------------------------------------------------

def glu_outputs(v: torch.Tensor, c, lam, p, packed: bool):
    """(y, dw, dv) of the fused op with w = g = 1, so that y = dw = sqs(v) and dv = sqs'(v)."""
    w = torch.ones_like(v)
    if packed:
        x = torch.cat([w, v.detach()]).reshape(1, -1).requires_grad_()
        y = sqs_glu_packed(x, c, lam, p)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        n = v.numel()
        return y.reshape(-1), dx.reshape(-1)[:n], dx.reshape(-1)[n:]
    w = w.requires_grad_()
    v = v.detach().requires_grad_()
    y = sqs_glu(w, v, c, lam, p)
    dw, dv = torch.autograd.grad(y, (w, v), torch.ones_like(y))
    return y, dw, dv


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_fused_glu_over_every_input_and_parameter(backend):
    @PROPS
    @given(data=st.data(), dtype=dtypes, packed=st.booleans() if backend == "eager" else st.just(False))
    def prop(data, dtype, packed):
        c, lam, p = data.draw(params(dtype))
        v = data.draw(inputs(dtype))
        with sqs.ops.backend(backend):
            y, dw, dv = glu_outputs(v, c, lam, p, packed)
            assert sqs.ops.last_backend() == backend
        check_values(v, y.detach(), dv, c, lam, p, f"sqs_glu ({backend}, packed={packed})")
        check_values(v, dw, None, c, lam, p, f"sqs_glu dw ({backend}, packed={packed})")

    prop()


@pytest.mark.usefixtures("eager_backend")  # the products, not the backends (checked above)
@PROPS
@given(data=st.data(), dtype=dtypes)
def test_glu_outputs_are_finite_for_finite_inputs_and_factors_up_to_one(data, dtype):
    """|w|, |g| <= 1 and finite v: y, dw and dv are finite (the factors never overflow)."""
    c, lam, p = data.draw(params(dtype))
    v = data.draw(inputs(dtype))
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    w = (torch.rand(v.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype).requires_grad_()
    v.requires_grad_()
    y = sqs_glu(w, v, c, lam, p)
    dw, dv = torch.autograd.grad(y, (w, v), torch.full_like(y, -1.0))
    assert torch.isfinite(y).all() and torch.isfinite(dw).all() and torch.isfinite(dv).all()


_TRITON_PROP = """
import os, sys
sys.path.insert(0, os.environ["SQS_TEST_DIR"])
import test_faults_gate as T
T.triton_property()
print("TRITON-PROPERTY-OK")
"""


def triton_property(device: str = "cpu"):
    """The same property through the Triton kernels: on CPU tensors with TRITON_INTERPRET=1 set,
    or on a GPU (`device="cuda"`)."""
    from sqs.ops import triton_sqs_glu as K

    @settings(max_examples=int(os.environ.get("SQS_GATE_EXAMPLES", "12")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    def prop(data, dtype):
        c, lam, p = data.draw(params(dtype))
        v = data.draw(inputs(dtype, n=16))
        if dtype == torch.bfloat16 and device == "cpu":  # the interpreter's bfloat16 flushes subnormals to 0
            v = torch.where(v.abs() < torch.finfo(dtype).tiny, torch.zeros_like(v), v)
        w = torch.ones_like(v, device=device)
        y = K._forward(w, v.to(device), c, lam, p).cpu()
        dw, dv = (t.cpu() for t in K._backward(w, w, v.to(device), c, lam, p))
        check_values(v, y, dv, c, lam, p, f"triton ({device})")
        check_values(v, dw, None, c, lam, p, f"triton dw ({device})")

    prop()


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_kernels_over_every_input_and_parameter_under_the_interpreter():
    env = {k: v for k, v in os.environ.items()}
    env.update(TRITON_INTERPRET="1", SQS_TEST_DIR=str(Path(__file__).parent),
               PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _TRITON_PROP], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "TRITON-PROPERTY-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA device and triton")
def test_triton_kernels_over_every_input_and_parameter_on_the_gpu():
    """The GPU's fast log2/exp2/division approximations, checked against the same bound."""
    triton_property("cuda")


# ---- the limits, named ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_limits_at_infinity_for_each_regime(dtype, backend):
    """sqs(+inf) = 1/lam (p = 1), 0 (p > 1), inf (p < 1), inf (lam = 0); sqs'(+-inf) = 0 (1 for lam = 0)."""
    v = torch.tensor([INF, -INF], dtype=dtype, requires_grad=True)
    for (c, lam, p), want, dwant in (((0.01, 0.5, 1.0), 2.0, 0.0), ((0.01, 4.0, 1.0), 0.25, 0.0),
                                     ((0.01, 0.5, 2.0), 0.0, 0.0), ((0.01, 0.5, 0.5), INF, 0.0),
                                     ((-3.0, 0.0, 1.0), INF, 1.0)):
        w = torch.ones_like(v, requires_grad=True)
        with sqs.ops.backend(backend):
            y = sqs_glu(w, v, c, lam, p)
            _, dv = torch.autograd.grad(y, (w, v), torch.ones_like(y))
        assert y.tolist() == [want, -want], (c, lam, p, y)
        assert dv.tolist() == [dwant, dwant], (c, lam, p, dv)


# ---- arguments are checked at the boundary and named -----------------------------------

@pytest.mark.parametrize("call,match,error", [
    (lambda: sqs.functional.sqs([1.0, 2.0]), "`x` must be a torch.Tensor", ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2, dtype=torch.int64)), "`x` must be floating point", ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2, dtype=torch.complex64)), "`x` must be floating point",
     ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2).to(torch.float8_e4m3fn)), "`x` must be float16, bfloat16",
     ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2), c="0.1"), "`c` must be a real number", ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2), lam=True), "`lam` must be a real number", ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2), p=torch.tensor(1.0)), "`p` must be a Python number",
     ArgumentTypeError),
    (lambda: sqs.functional.sqs(torch.ones(2), lam=NAN), "`lam` must be finite", ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2), c=-INF), "`c` must be finite", ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2), lam=-0.5), "`lam` must be >= 0", ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2), p=0), "`p` must be > 0", ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2), lam=1e30), r"`lam`=1e\+30 is out of range for torch.float32",
     ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2, dtype=torch.float16), c=-1e20), r"`c`=-1e\+20 is out of range",
     ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2), p=1e-40), r"`p`=1e-40 is out of range", ConfigError),
    (lambda: sqs.functional.sqs(torch.ones(2), c=1e10, lam=1e10), r"`lam\*\|c\|`=1e\+20 is out of range", ConfigError),
    (lambda: sqs.functional.glu(torch.ones(2), [1.0, 2.0]), "`v` must be a torch.Tensor", ArgumentTypeError),
    (lambda: sqs.functional.glu(torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), "relu"),
     "`w` must be floating point", ArgumentTypeError),
    (lambda: sqs.functional.glu(torch.ones(2), torch.ones(2), gate=3), "`gate` must be a string", ArgumentTypeError),
    (lambda: sqs.functional.glu(torch.ones(2), torch.ones(2), "relu", c=0.1), "takes no parameters", ConfigError),
    (lambda: sqs.functional.glu(torch.ones(2), torch.ones(2), "sqs", lamda=0.1), "unknown sqs parameter",
     ConfigError),
    (lambda: sqs.functional.glu_packed(torch.ones(3), "relu"), "last dim of `x`.*must be even", ConfigError),
    (lambda: sqs.functional.glu_packed("x", "relu"), "`x` must be a torch.Tensor", ArgumentTypeError),
    (lambda: sqs.functional.glu_packed(torch.ones(4), "sqs", p=-1), "`p` must be > 0", ConfigError),
    (lambda: sqs.functional.gate_fn("tanh"), "unknown `gate` 'tanh'", ConfigError),
    (lambda: sqs.functional.sqs_math([1.0], 0.1), "`v` must be a torch.Tensor", ArgumentTypeError),
    (lambda: sqs.functional.sqs_reference(torch.ones(2), lam=-1), "`lam` must be >= 0", ConfigError),
    (lambda: sqs.nn.SQS(lam=-1), "`lam` must be >= 0", ConfigError),
    (lambda: sqs.nn.SQS(c=[0.1]), "`c` must be a real number", ArgumentTypeError),
    (lambda: sqs.nn.SQS()("x"), "`x` must be a torch.Tensor", ArgumentTypeError),
    (lambda: sqs.nn.GLU(True, 4), "`d_in` must be a positive int", ConfigError),
    (lambda: sqs.nn.GLU(4, 0), "`d_hidden` must be a positive int", ConfigError),
    (lambda: sqs.nn.GLU(4, 4, d_out=2.0), "`d_out` must be a positive int or None", ConfigError),
    (lambda: sqs.nn.GLU(4, 4, bias="yes"), "`bias` must be True or False", ArgumentTypeError),
    (lambda: sqs.nn.GLU(4, 4, gate="sqs", p=0), "`p` must be > 0", ConfigError),
    (lambda: sqs.nn.GLU(4, 4)(torch.ones(2, 5)), r"`x` must have 4 features in its last dim, got shape \(2, 5\)",
     ConfigError),
    (lambda: sqs.nn.GLU(4, 4)(torch.ones(2, 4, dtype=torch.int64)), "`x` must be floating point",
     ArgumentTypeError),
    (lambda: sqs.ops.set_backend(3), "unknown backend 3", ConfigError),
])
def test_every_entry_point_names_a_bad_argument(call, match, error):
    with pytest.raises(error, match=match):
        call()


def test_argument_errors_stay_value_and_type_errors():
    """Python callers catching ValueError/TypeError keep working; the CLI sees a UserError (one line)."""
    assert issubclass(ConfigError, ValueError) and issubclass(ArgumentTypeError, TypeError)
    assert issubclass(ArgumentTypeError, sqs.io.UserError)


def test_parameters_at_the_limit_are_accepted_and_finite():
    for dtype in DTYPES:
        big = param_limit(dtype)
        v = torch.tensor([0.0, 1e-3, 1.0, 3.0, torch.finfo(dtype).max], dtype=dtype, requires_grad=True)
        for c, lam, p in ((1.0, big, big), (-big, 1.0, 1.0), (big, 1.0 / big, torch.finfo(compute_dtype(dtype)).tiny),
                          (-1.0, big, 0.5)):
            y = sqs.functional.sqs(v, c, lam, p)
            (d,) = torch.autograd.grad(y, v, torch.ones_like(y))
            assert torch.isfinite(y).all() and torch.isfinite(d).all(), (dtype, c, lam, p, y, d)
