"""The fused SQS-GLU op: y = w * sqs(v), saving only w and v.

Why fused: eager PyTorch evaluates sqs(v) as ~6 elementwise kernels, each a full
pass over memory, and autograd keeps their outputs for backward. The op is
memory-bound, so the fastest form is one pass in forward (read w, v; write y) and
one in backward (read g, w, v; write dw, dv).

Backends, chosen per call:
  * ``triton``   CUDA tensors when `triton` imports (sqs.ops.triton_sqs_glu).
  * ``compiled`` torch.compile (Inductor) of the two pointwise functions below. On
                 CPU Inductor emits one vectorised OpenMP C++ loop per function.
                 We chose it over a hand-written extension because it needs no
                 build step of ours, handles every dtype and stride, and is kept by
                 the PyTorch team. It needs a C++ compiler at first use; Inductor
                 caches the result on disk, so only the first call pays for it.
  * ``eager``    the same math in plain PyTorch, the fallback. Still saves only w and
                 v, so memory stays low; speed is that of the unfused formula.

The fallback is decided per call: under `torch.jit.trace`/`torch.jit.script` the
call runs eager (TorchScript cannot record a compiled function), and a compile
error for one kind of input (dtype, device, layout) sends only that kind to eager,
with a warning that names the error. Only a missing or broken C++ toolchain turns
the compiled path off for the whole process. `last_backend()` says which backend
served the latest call.

Choose one with the environment variable ``SQS_BACKEND``, `set_backend`, or for a
block of code `with sqs.ops.backend("eager"): ...`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import torch

from sqs.core import (DEFAULT_C, DEFAULT_LAM, DEFAULT_P, KINDS, SAT, ConfigError, check_pair, check_tensor,
                      compute_dtype, gate_constants, gate_value, gate_value_and_grad)
from sqs.ops.gate import SQSFunction

BACKENDS = ("auto", "compiled", "eager", "triton")
_backend = os.environ.get("SQS_BACKEND", "auto").lower()
_toolchain_error: str | None = None  # set once Inductor proved it cannot build C++ here
_failed_variants: dict[tuple, str] = {}  # kinds of input whose compile failed -> the error
_compiled: dict[str, Callable] = {}
_last_backend: str | None = None


def set_backend(name: str) -> None:
    """Select the kernel backend: auto (default), compiled, eager or triton."""
    global _backend
    if name not in BACKENDS:
        raise ConfigError(f"set_backend: unknown backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    """The backend selected by `set_backend`, `backend(...)` or SQS_BACKEND ("auto" by default)."""
    if _backend not in BACKENDS:
        raise ConfigError(f"SQS_BACKEND={_backend!r} is not a backend; choose one of {BACKENDS}")
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the block and restore the previous choice on exit (also on error).

        with sqs.ops.backend("eager"):
            y = model(x)
    """
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def last_backend() -> str | None:
    """Which backend ("compiled", "triton" or "eager") served the latest forward or backward
    of the fused op in this process; None before the first call."""
    return _last_backend


def _triton_available() -> bool:
    try:
        from sqs.ops import triton_sqs_glu
    except Exception:
        return False
    return triton_sqs_glu.available()


def _triton_usable(t: torch.Tensor) -> bool:
    """CUDA tensors with triton and a GPU, or any tensor under Triton's interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return _triton_available()
    try:
        from sqs.ops import triton_sqs_glu
    except Exception:
        return False
    return triton_sqs_glu.triton is not None and triton_sqs_glu._interpreting()


def available_backends() -> list[str]:
    """The backends that can run here ("compiled" is absent once the C++ toolchain failed)."""
    out = ["eager"]
    if _toolchain_error is None:
        out.append("compiled")
    if torch.cuda.is_available() and _triton_available():
        out.append("triton")
    return out


# ---- the two pointwise functions every backend computes -------------------------
# `kind` and `k` are the gate's kernel form and constants (`sqs.core.gate_constants`): the
# compiled kernels get `k` as 0-d tensors and are compiled once per form, not per value.

def _fwd(w: torch.Tensor, v: torch.Tensor, kind: str, *k) -> torch.Tensor:
    cd = compute_dtype(v.dtype)
    return (w.to(cd) * gate_value(v.to(cd), kind, k, w.dtype)).to(w.dtype)


def _bwd(g: torch.Tensor, w: torch.Tensor, v: torch.Tensor, kind: str, *k) -> tuple[torch.Tensor, torch.Tensor]:
    cd = compute_dtype(v.dtype)
    gc = g.to(cd)
    s, ds = gate_value_and_grad(v.to(cd), kind, k, w.dtype)
    return (gc * s).to(w.dtype), (gc * w.to(cd) * ds).to(v.dtype)


# Packed forms: x = [w | v] along the last dim, straight out of one [W; V] projection.
# Reading x whole and writing dx whole keeps every access contiguous, and it spares the
# copy autograd makes to join dw and dv into the gradient of x when w, v are chunk views.

def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, v) = the two halves of the last dim, as views."""
    h = x.shape[-1] // 2
    return x[..., :h], x[..., h:]


def _fwd_packed(x: torch.Tensor, kind: str, *k) -> torch.Tensor:
    return _fwd(*_halves(x), kind, *k)


def _bwd_packed(g: torch.Tensor, x: torch.Tensor, kind: str, *k) -> torch.Tensor:
    return torch.cat(_bwd(g, *_halves(x), kind, *k), dim=-1)


_N_CONSTANTS = {"lam0": 1, "p1": 5, "general": 7}  # len(k) of each gate form (sqs.core.gate_constants)


def _of_kind(fn: Callable, kind: str) -> Callable:
    """fn(tensors..., *k) with the gate form fixed: each compiled kernel holds one form's arithmetic."""
    n = _N_CONSTANTS[kind.removesuffix(SAT)]

    def with_kind(*args):
        return fn(*args[:-n], kind, *args[-n:])
    return with_kind


_GENERAL = {"fwd": _fwd, "bwd": _bwd, "fwd_packed": _fwd_packed, "bwd_packed": _bwd_packed}
_KERNELS = {f"{name}_{kind}{sat}": _of_kind(fn, kind + sat)
            for name, fn in _GENERAL.items() for kind in KINDS for sat in ("", SAT)}


# Variants: 4 dtypes x {contiguous, strided} per kernel (one kernel per gate form): well under this.
_RECOMPILE_LIMIT = 64


def _get_compiled(name: str) -> Callable:
    if name not in _compiled:
        import torch._dynamo

        # Dynamo's default limit (8 recompiles per function) would silently drop us to
        # eager after a few dtypes and layouts; raise it once (never lower it).
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * _RECOMPILE_LIMIT)
        _compiled[name] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
    return _compiled[name]


_scalar_cache: dict[tuple, tuple] = {}


def _scalars(v: torch.Tensor, k: tuple) -> tuple:
    """The gate's constants as 0-d tensors so a new value does not recompile (cached per value)."""
    cd = compute_dtype(v.dtype)
    key = (k, cd, v.device)
    out = _scalar_cache.get(key)
    if out is None:
        out = tuple(torch.tensor(x, dtype=cd, device=v.device) for x in k)
        if len(_scalar_cache) > 256:
            _scalar_cache.clear()
        _scalar_cache[key] = out
    return out


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n), a view for contiguous tensors and `chunk` halves alike.

    Compiled kernels specialise on rank, dtype and stride pattern; feeding them
    only 2-D tensors keeps the number of variants small (one per dtype and layout).
    """
    if t.dim() == 2:
        return t
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def _cause(e: BaseException) -> str:
    """`Type: first line` of an exception, for a one-line warning."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__


_TOOLCHAIN_ERRORS = {"InvalidCxxCompiler", "CppCompileError"}


def _toolchain_failure(e: BaseException) -> BaseException | None:
    """The exception in e's chain that says Inductor cannot build C++ here, or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x).__name__ in _TOOLCHAIN_ERRORS:
            return x
        todo += [x.__cause__, x.__context__, getattr(x, "inner_exception", None)]
    return None


def _variant(name: str, flat: tuple) -> tuple:
    """What a compiled kernel specialises on, as far as a failure could depend on it."""
    t = flat[-1]
    return (name, t.dtype, t.device.type, tuple(x.is_contiguous() for x in flat))


def _run_compiled(op: str, tensors: tuple, kind: str, k: tuple, shape: torch.Size):
    """The compiled kernel `op` for gate form `kind` on 2-D views of `tensors`, outputs viewed as
    `shape`; None when it cannot run for these inputs (the caller then computes eagerly)."""
    global _toolchain_error
    name = f"{op}_{kind}"
    flat = tuple(_as_2d(t) for t in tensors)
    key = _variant(name, flat)
    if key in _failed_variants:
        return None
    try:
        out = _get_compiled(name)(*flat, *_scalars(flat[-1], k))
    except Exception as e:
        broken = _toolchain_failure(e)
        if broken is not None:  # no working C++ compiler: no compiled kernel can ever build
            _toolchain_error = _cause(broken)
            warnings.warn(
                f"sqs: Inductor cannot build the compiled SQS-GLU kernel ({_toolchain_error}); every call now "
                "uses the eager backend (correct, slower). Install a working C++ compiler (gcc/clang) to get "
                "the compiled path, or set SQS_BACKEND=eager to skip it and silence this warning.",
                RuntimeWarning, stacklevel=4)
        else:  # this kind of input only; other calls stay compiled
            _failed_variants[key] = _cause(e)
            t = flat[-1]
            warnings.warn(
                f"sqs: torch.compile of the fused SQS-GLU kernel failed for {t.dtype} tensors on {t.device.type} "
                f"({_failed_variants[key]}); such calls use the eager backend (correct, slower), other calls "
                "stay compiled. Set SQS_BACKEND=eager to skip compilation.",
                RuntimeWarning, stacklevel=4)
        return None
    if isinstance(out, tuple):
        return tuple(o.view(shape) if o.shape != shape else o for o in out)
    return out.view(shape) if out.shape != shape else out


def _in_torchscript() -> bool:
    """True while torch.jit.trace/script records this call: a compiled function cannot be recorded."""
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def _resolve(t: torch.Tensor) -> str:
    b = get_backend()
    if b == "triton":
        if not _triton_usable(t):
            raise ConfigError("sqs: backend 'triton' needs CUDA tensors and an importable triton; "
                              "use set_backend('auto') to fall back automatically")
        return "triton"
    if b == "auto" and t.is_cuda and _triton_available():
        return "triton"
    if b == "eager" or _toolchain_error is not None or _in_torchscript():
        return "eager"
    return "compiled"


def _out_shape(kind: str, x: torch.Tensor) -> torch.Size:
    if kind == "fwd_packed":
        return x.shape[:-1] + (x.shape[-1] // 2,)
    return x.shape


def _dispatch(op: str, tensors: tuple, params: tuple, gate: tuple):
    """Run kernel `op` ("fwd", "bwd", "fwd_packed", "bwd_packed") on the chosen backend.
    `params` = (c, lam, p) for Triton, `gate` = (kind, k) from `sqs.core.gate_constants`."""
    global _last_backend
    chosen = _resolve(tensors[-1])
    if chosen == "compiled":
        out = _run_compiled(op, tensors, *gate, _out_shape(op, tensors[-1]))
        if out is not None:
            _last_backend = "compiled"
            return out
        chosen = "eager"
    _last_backend = chosen
    if op.endswith("_packed"):  # triton and eager work on the two halves (views, no copy)
        x = tensors[-1]
        if op == "fwd_packed":
            if chosen == "triton":
                from sqs.ops import triton_sqs_glu

                return triton_sqs_glu.forward(*_halves(x), *params)
            return _fwd(*_halves(x), gate[0], *gate[1])
        if chosen == "triton":  # the kernel writes dw and dv straight into the halves of dx
            from sqs.ops import triton_sqs_glu

            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            triton_sqs_glu.backward(tensors[0], *_halves(x), *params, out=_halves(dx))
            return dx
        return torch.cat(_bwd(tensors[0], *_halves(x), gate[0], *gate[1]), dim=-1)
    if chosen == "triton":
        from sqs.ops import triton_sqs_glu

        fn = triton_sqs_glu.forward if op == "fwd" else triton_sqs_glu.backward
        return fn(*tensors, *params)
    fn = _fwd if op == "fwd" else _bwd
    return fn(*tensors, gate[0], *gate[1])


class SQSGLUFunction(torch.autograd.Function):
    """y = w * sqs(v); saves only w and v, recomputes the gate in backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, v: torch.Tensor, params: tuple, gate: tuple) -> torch.Tensor:
        ctx.save_for_backward(w, v)
        ctx.params, ctx.gate = params, gate
        return _dispatch("fwd", (w, v), params, gate)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, v = ctx.saved_tensors
        dw, dv = _dispatch("bwd", (g.contiguous() if g.is_cuda else g, w, v), ctx.params, ctx.gate)
        return dw, dv, None, None


class SQSGLUPackedFunction(torch.autograd.Function):
    """y = w * sqs(v) for x = [w | v]; saves only x, returns the gradient of x in one piece."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, params: tuple, gate: tuple) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.params, ctx.gate = params, gate
        return _dispatch("fwd_packed", (x,), params, gate)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        dx = _dispatch("bwd_packed", (g.contiguous() if g.is_cuda else g, x), ctx.params, ctx.gate)
        return dx, None, None


def sqs_glu(w: torch.Tensor, v: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM,
            p: float = DEFAULT_P) -> torch.Tensor:
    """Fused w * sqs(v) for any shape; see the module docstring for backends.

    The gate factor sqs(v) and the derivative factor sqs'(v) are finite for finite v, take
    their limits at v = +-inf and are NaN only where v is NaN (docs/gate.md); y, dw and dv are
    those factors times w and the incoming gradient, rounded once.
    """
    check_pair(w, v)
    kind, k = gate_constants(c, lam, p, v.dtype)
    if torch.compiler.is_compiling():
        # Inside the user's own torch.compile: the same math as plain ops, which Inductor fuses with
        # the neighbouring matmul epilogues; calling our separately compiled kernel would break the graph.
        return w * SQSFunction.apply(v, kind, k)
    return SQSGLUFunction.apply(w, v, (float(c), float(lam), float(p)), (kind, k))


def sqs_glu_packed(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM,
                   p: float = DEFAULT_P) -> torch.Tensor:
    """sqs_glu(*x.chunk(2, -1)) for x = [w | v], the output of one fused [W; V] projection.

    Same values as `sqs_glu` on the two halves; faster in training because the backward
    writes the gradient of x directly instead of dw and dv that autograd then copies
    together (`sqs.nn.GLU` uses this form).
    """
    check_tensor("x", x, "sqs_glu_packed")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ConfigError(f"sqs_glu_packed: the last dim of `x` holds [w | v] and must be even, got shape "
                          f"{tuple(x.shape)}; pass w and v separately to sqs_glu instead")
    kind, k = gate_constants(c, lam, p, x.dtype)
    if torch.compiler.is_compiling():  # see sqs_glu
        w, v = _halves(x)
        return w * SQSFunction.apply(v, kind, k)
    return SQSGLUPackedFunction.apply(x, (float(c), float(lam), float(p)), (kind, k))
