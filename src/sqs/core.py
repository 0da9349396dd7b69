"""The SQS gate's definition and the rules every layer above shares.

    sqs(v)  = (v - c*sgn(v)) / (1 + lam*|v|^p)
    sqs'(v) = [1 + lam*(1-p)*|v|^p + lam*p*c*|v|^(p-1)] / (1 + lam*|v|^p)^2

This module is the bottom floor of the package (it imports only torch, the standard
library and `sqs.io`'s error classes): the formula (`sqs_math`, `sqs_grad_math`,
`sqs_reference`, and the kernel forms `gate_constants`, `gate_value`,
`gate_value_and_grad` that every backend evaluates), the parameter and argument checks,
the dtype rule, the gate vocabulary, the device rule (`resolve_device`) and a TOML loader
that works on every supported Python. The kernels in `sqs.ops`, the functions in
`sqs.functional` and the modules in `sqs.nn` all take them from here, so a reader checks
the maths and the names in one place.

Conventions (docs/gate.md): sgn(0) = 0, so sqs is odd and sqs(0) = 0. The jump of size 2c
at 0 carries no gradient (as ReLU's kink); the derivative at v = 0 is 1 + lam*c for p = 1
and 1 otherwise (for p < 1 the one-sided derivative diverges; we take the finite value
rather than return inf).

Numerics (docs/gate.md, "Every float input"): for every v of a supported dtype and every
allowed (c, lam, p) the gate and its derivative are finite for finite v (a value beyond the
dtype's range saturates at its largest finite value), take their limits at v = +-inf, and
are NaN only where v is NaN. The kernel forms below are written for that: no intermediate
overflows or turns into inf/inf, 0*inf or 0/0.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Union

import torch

from sqs.io import ArgumentTypeError, ConfigError, UserError

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # Python 3.10: the same parser, packaged as `tomli` (a dependency there)
    import tomli as _toml

DEFAULT_C = 0.01
DEFAULT_LAM = 0.5
DEFAULT_P = 1.0

#: The paper's gate names, used everywhere a user sees a gate (flags, run directories, JSON keys,
#: tables, plots, benchmark rows).
GATES = ("relu", "gelu", "swiglu", "bilinear", "sqs")
#: How a gate is written in tables and plot legends.
GATE_LABEL = {"relu": "ReLU", "gelu": "GELU", "swiglu": "SwiGLU", "bilinear": "Bilinear", "sqs": "SQS"}
#: Also accepted by the Python API and the CLI, mapped to the names above: `silu` (and `swish`) is
#: SwiGLU's gate, `identity` (and `linear`) the bilinear GLU's.
GATE_ALIASES = {"silu": "swiglu", "swish": "swiglu", "identity": "bilinear", "linear": "bilinear"}
#: The tensor dtypes the gate and the GLU ops accept (half precision is computed in float32).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Scalar = Union[float, torch.Tensor]  # kernel constants: numbers, or 0-d tensors in compiled kernels


# ---- arguments ------------------------------------------------------------------

def canonical_gate(name: str) -> str:
    """Map a gate name or alias (case-insensitive) to its name in `GATES`; raise naming the valid ones."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"glu: `gate` must be a string, got {type(name).__name__}")
    key = name.lower()
    key = GATE_ALIASES.get(key, key)
    if key not in GATES:
        valid = ", ".join(GATES + tuple(GATE_ALIASES))
        raise ConfigError(f"glu: unknown `gate` {name!r}; choose one of: {valid}")
    return key


def check_real(name: str, val: Any, where: str = "sqs") -> float:
    """`val` as a finite float; a bool, string, tensor, complex or non-finite value is refused by name.

    (A bool is an int to Python, but `lam=True` is a mistake, not 1.0.)
    """
    if isinstance(val, torch.Tensor):
        raise ArgumentTypeError(f"{where}: `{name}` must be a Python number, got a tensor (use float(t))")
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise ArgumentTypeError(f"{where}: `{name}` must be a real number, got {type(val).__name__} {val!r}")
    f = float(val)
    if not math.isfinite(f):
        raise ConfigError(f"{where}: `{name}` must be finite, got {val}")
    return f


def sqs_params(c: Any, lam: Any, p: Any) -> tuple[float, float, float]:
    """(c, lam, p) as floats, checked: finite numbers, lam >= 0, p > 0 (c may be negative)."""
    c, lam, p = check_real("c", c), check_real("lam", lam), check_real("p", p)
    if p <= 0:
        raise ConfigError(f"sqs: `p` must be > 0 (|v|^p shrinks the gate), got p={p}")
    if lam < 0:
        raise ConfigError(f"sqs: `lam` must be >= 0 (a negative lam makes 1 + lam|v|^p cross zero), got lam={lam}")
    return c, lam, p


def check_sqs_params(c: Any, lam: Any, p: Any) -> None:
    """Reject hyperparameters the formula does not define, naming the argument."""
    sqs_params(c, lam, p)


def check_tensor(name: str, t: Any, where: str) -> None:
    """`t` must be a tensor of a supported float dtype (`DTYPES`); raise naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        kind = "floating point" if not t.is_floating_point() else "float16, bfloat16, float32 or float64"
        raise ArgumentTypeError(f"{where}: `{name}` must be {kind}, got {t.dtype}")


def check_pair(w: Any, v: Any) -> None:
    """The two GLU branches must be float tensors agreeing in shape, dtype and device; raise naming the mismatch."""
    check_tensor("w", w, "glu")
    check_tensor("v", v, "glu")
    if w.shape != v.shape:
        raise ConfigError(f"glu: `w` and `v` must have the same shape, got w {tuple(w.shape)} and v {tuple(v.shape)}")
    if w.dtype != v.dtype:
        raise ConfigError(f"glu: `w` and `v` must have the same dtype, got {w.dtype} and {v.dtype}")
    if w.device != v.device:
        raise ConfigError(f"glu: `w` and `v` must be on the same device, got {w.device} and {v.device}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are evaluated in float32 and rounded once at the end."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def param_limit(dtype: torch.dtype) -> float:
    """The largest |c|, lam, p and lam*|c| the kernels accept for inputs of `dtype`: 2^63 for the
    float32 arithmetic of fp16/bf16/fp32 inputs, 2^511 for float64. Below it every constant the
    kernels use (1 + lam*c, p*c, max/lam, ...) is a finite number of the compute dtype with room to
    spare; beyond it the gate is a step function to working precision anyway."""
    return 2.0 ** (math.frexp(torch.finfo(compute_dtype(dtype)).max)[1] // 2 - 1)


# ---- the gate in kernel form ---------------------------------------------------------
#
# Three forms, chosen on the host from (c, lam, p); each backend (eager, compiled, Triton)
# evaluates the same one with the constants `gate_constants` returns:
#
#   "lam0"     lam = 0:     sqs(v) = v - c sgn v, sqs'(v) = 1.
#   "p1"       p = 1:       sqs(v) = (v - c sgn v) / (1 + lam |v|),  sqs'(v) = (kappa t) t,
#                           t = 1 / (1 + lam |v|), kappa = 1 + lam c (no pow, no log).
#              Where lam |v| would overflow (|v| >= A = max / (2 lam), and v = +-inf) the value is
#              the limit +-1/lam and sqs' = 0: there they differ from the exact values by less than
#              (1 + lam |c|) / (max / 2), far below one rounding given lam |c| <= param_limit.
#   "general"  other p:     u = lam |v|^p = 2^e, e = p log2|v| + log2 lam (no |v|^p that
#              overflows while lam |v|^p does not). With m2 = 2^(-|e|/2), m = m2^2 (= u for
#              u < 1, 1/u for u >= 1) and h = 1 / (1 + m):
#                sqs(v)  = N h                       (u < 1),   (N m2)(m2 h)   (u >= 1),
#                sqs'(v) = h^2 B + (h^2 (q_s y)) (q y),  y = m2 / sqrt(|v|)  (y^2 = u/|v| or 1/(u|v|)),
#                B       = 1 + (1-p) m               (u < 1),   m2 (m2 (m + 1 - p))  (u >= 1),
#              with N = v - c sgn v, q = sqrt(p |c|) and q_s = sgn(c) q (so q_s q = p c, computed
#              as sqrt(p) sqrt(|c|): a p c too small for the dtype would lose its digits). Every
#              intermediate stays in range; the c term, which diverges at 0 for p < 1, saturates.
#
# All forms: v = +-inf gives the limit +-L (host constant: inf for lam = 0 or p < 1, 1/lam for
# p = 1, 0 for p > 1; saturated at the output dtype's max when finite) and sqs' = 0 (1 for
# lam = 0); finite values beyond the output dtype's range saturate at its max; NaN stays NaN.

KINDS = ("lam0", "p1", "general")


def gate_constants(c: Any, lam: Any, p: Any, dtype: torch.dtype) -> tuple[str, tuple[float, ...]]:
    """(kind, constants) of the kernel form for (c, lam, p) and inputs of `dtype`, after checking
    the parameters (finite, lam >= 0, p > 0, and within `param_limit(dtype)`), naming the argument.

    `kind` is "lam0", "p1" or "general", with `SAT` appended when values can exceed the dtype's
    range (they are then saturated)."""
    c, lam, p = sqs_params(c, lam, p)
    if dtype not in DTYPES:
        raise ArgumentTypeError(f"sqs: inputs must be float16, bfloat16, float32 or float64, got {dtype}")
    cd = compute_dtype(dtype)
    limit = param_limit(dtype)
    fix = "use float64 tensors or a smaller value" if cd != torch.float64 else "use a smaller value"
    tiny = torch.finfo(cd).tiny
    for name, val, bound, ok in (("c", c, f"|c| <= {limit:.3g}", abs(c) <= limit),
                                 ("lam", lam, f"lam <= {limit:.3g}", lam <= limit),
                                 ("p", p, f"{tiny:.3g} <= p <= {limit:.3g}", tiny <= p <= limit),
                                 ("lam*|c|", lam * abs(c), f"lam*|c| <= {limit:.3g}", lam * abs(c) <= limit)):
        if not ok:
            raise ConfigError(f"sqs: `{name}`={val:g} is out of range for {dtype} inputs (their {cd} arithmetic "
                              f"needs {bound}); {fix}")
    big = torch.finfo(dtype).max
    if lam == 0.0:
        kind, k = "lam0", (c,)
    elif p == 1.0:
        kind, k = "p1", (c, lam, 1.0 + lam * c, 0.5 * torch.finfo(cd).max / lam, min(1.0 / lam, big))
    else:
        q = math.sqrt(p) * math.sqrt(abs(c))
        kind, k = "general", (c, p, math.log2(lam), 1.0 - p, math.copysign(q, c) if c else 0.0, q,
                              0.0 if p > 1.0 else math.inf)
    return (kind + SAT if _may_exceed(kind, c, lam, dtype) else kind), k


#: Appended to a kernel form whose values can exceed the output dtype's range: they are saturated.
SAT = "+sat"


def _may_exceed(kind: str, c: float, lam: float, dtype: torch.dtype) -> bool:
    """Whether sqs or sqs' of some finite input of `dtype` can exceed its largest value: only for
    float16/bfloat16 (computed in float32) and large |c|, small lam or large lam*c. Where it cannot
    (the paper's defaults, say), the kernels skip the clamps."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    big = torch.finfo(dtype).max
    if kind != "p1":  # |sqs| <= |v| + |c|; sqs' of the general form is always clamped
        return abs(c) >= big * 2.0 ** -24
    # p = 1: |sqs| is largest at v = 0 (|c|) or at the largest v; |sqs'| <= |1 + lam c|.
    sup = max(abs(c), (big + abs(c)) / (1.0 + lam * big), abs(1.0 + lam * c))
    return sup >= big * (1.0 - 2.0 ** -8)


def _form(kind: str) -> tuple[str, bool]:
    """(the form, whether to saturate) of a kernel kind from `gate_constants`."""
    return (kind[: -len(SAT)], True) if kind.endswith(SAT) else (kind, False)


def _saturate(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    big = torch.finfo(out_dtype).max
    return x.clamp(-big, big)  # NaN stays NaN


def _general_parts(v: torch.Tensor, k: tuple) -> tuple:
    c, p, log2_lam = k[:3]
    a = v.abs()
    e = p * torch.log2(a) + log2_lam
    small = e < 0
    m2 = torch.exp2(-0.5 * e.abs())
    m = m2 * m2
    h = 1.0 / (1.0 + m)
    n = v - c * torch.sign(v)
    g = torch.where(small, n * h, (n * m2) * (m2 * h))
    return a, small, m2, m, h, g


def _tiny_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps  # the smallest positive subnormal: sqrt(|v|) never divides by 0


def gate_value(v: torch.Tensor, kind: str, k: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    """sqs(v) in v's dtype (the compute dtype; results to be rounded to `out_dtype`), in the
    kernel form `kind` with constants `k` from `gate_constants` (numbers or 0-d tensors)."""
    kind, narrow = _form(kind)
    if kind == "lam0":
        y = v - k[0] * torch.sign(v)
        return torch.where(torch.isinf(v), v, _saturate(y, out_dtype)) if narrow else y
    s = torch.sign(v)
    if kind == "p1":
        c, lam, _, a_over, limit_inf = k
        a = v.abs()
        y = torch.where(a >= a_over, s * limit_inf, (v - c * s) / (1.0 + lam * a))
        return _saturate(y, out_dtype) if narrow else y
    y = _general_parts(v, k)[5]
    if narrow:
        y = _saturate(y, out_dtype)
    return torch.where(torch.isinf(v), s * k[6], y)


def gate_value_and_grad(v: torch.Tensor, kind: str, k: tuple,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqs(v), sqs'(v)) sharing their intermediates (the fused backward needs both)."""
    kind, narrow = _form(kind)
    if kind == "lam0":
        return gate_value(v, kind + (SAT if narrow else ""), k, out_dtype), torch.where(torch.isnan(v), v, 1.0)
    s = torch.sign(v)
    if kind == "p1":
        c, lam, kappa, a_over, limit_inf = k
        a = v.abs()
        over = a >= a_over
        t = 1.0 / (1.0 + lam * a)
        y = torch.where(over, s * limit_inf, (v - c * s) * t)
        dy = torch.where(over, 0.0, (kappa * t) * t)
        return (_saturate(y, out_dtype), _saturate(dy, out_dtype)) if narrow else (y, dy)
    one_minus_p, q_signed, q, limit_inf = k[3:]
    a, small, m2, m, h, y = _general_parts(v, k)
    h2 = h * h
    b = torch.where(small, 1.0 + one_minus_p * m, m2 * (m2 * (m + one_minus_p)))
    r = m2 / torch.sqrt(a.clamp_min(_tiny_subnormal(v.dtype)))
    dy = _saturate(h2 * b + (h2 * (q_signed * r)) * (q * r), out_dtype)
    if narrow:
        y = _saturate(y, out_dtype)
    return torch.where(torch.isinf(v), s * limit_inf, y), dy


def _check_math_args(v: Any, c: Any, lam: Any, p: Any) -> tuple[str, tuple]:
    check_tensor("v", v, "sqs_math")
    return gate_constants(c, lam, p, v.dtype)


def sqs_math(v: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """sqs(v), computed in v's dtype (no upcast: call it with float32 values for half inputs).

    The plain function behind every kernel (no autograd Function): finite for finite v,
    the limits at +-inf, NaN only for NaN. With c = lam = 0 this is exactly v.
    """
    kind, k = _check_math_args(v, c, lam, p)
    return gate_value(v, kind, k, v.dtype)


def sqs_grad_math(v: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM,
                  p: float = DEFAULT_P) -> torch.Tensor:
    """sqs'(v) in v's dtype, with the value at v = 0 defined as in the module docstring."""
    kind, k = _check_math_args(v, c, lam, p)
    return gate_value_and_grad(v, kind, k, v.dtype)[1]


def sqs_reference(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """The formula written naively with autograd through every op: the baseline the
    fused paths are checked against and the `naive` row of the benchmarks. (Naive also in
    its numerics: inf/inf at v = +-inf; the kernels above are the robust form.)"""
    check_tensor("x", x, "sqs_reference")
    check_sqs_params(c, lam, p)
    return (x - c * torch.sign(x)) / (1 + lam * x.abs() ** p)


# ---- devices ------------------------------------------------------------------------

class DeviceError(UserError, ValueError):
    """A --device that does not exist here; the message lists the devices that do."""


def available_devices() -> list[str]:
    """The device names this process can use: cpu, then cuda:0..N-1 and mps where present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: Any = "auto") -> torch.device:
    """A --device value as a torch.device that exists here, or a DeviceError listing those that do.

    "auto" (or None) is this rank's GPU when CUDA is available (LOCAL_RANK under torchrun), else
    the CPU; "cuda" without an index is cuda:LOCAL_RANK. A torch.device is checked the same way.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, (str, torch.device)):
        raise ArgumentTypeError(f"`device` must be a string such as 'cpu' or 'cuda:0', got {type(name).__name__}")
    avail = available_devices()
    hint = f"available here: {', '.join(avail)} (or auto)"
    try:
        dev = torch.device(name.strip() if isinstance(name, str) else name)
    except (RuntimeError, ValueError) as e:
        raise DeviceError(f"--device {name}: not a device name; {hint}") from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {name}: {why}; {hint}")
        index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if not 0 <= index < torch.cuda.device_count():
            raise DeviceError(f"--device {name}: there is no cuda:{index} ({torch.cuda.device_count()} GPU(s)); {hint}")
        return torch.device("cuda", index)
    if dev.type == "mps" and "mps" in avail:
        return torch.device("mps")
    raise DeviceError(f"--device {name}: not available here; {hint}")


# ---- files ----------------------------------------------------------------------------

def load_toml(path: str | Path | Any) -> dict[str, Any]:
    """Parse a TOML file (`tomllib` on Python >= 3.11, `tomli` before); errors name the file.

    `path` is a filesystem path or anything with `.open("rb")`, e.g. an
    `importlib.resources.files(...)` entry for a config shipped in the package.
    """
    if isinstance(path, str):
        path = Path(path)
    with path.open("rb") as f:
        try:
            return _toml.load(f)
        except _toml.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e}); fix the file's syntax") from e
