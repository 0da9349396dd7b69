"""Triton kernels for the fused SQS-GLU, y = w * sqs(v), forward and backward.

    sqs(v)  = (v - c*sgn(v)) / (1 + lam*|v|^p)
    sqs'(v) = [1 + lam*(1-p)*|v|^p + lam*p*c*|v|^(p-1)] / (1 + lam*|v|^p)^2
            = (1 + lam*c) / (1 + lam*|v|)^2                       for p == 1
    forward:  y  = w * sqs(v)
    backward: dw = g * sqs(v),  dv = g * w * sqs'(v)

Conventions and numerics as in `sqs.core`: sgn(0) = 0; at v == 0, |v|^(p-1) is
1 for p == 1 (the simple form above) and 0 otherwise; finite for finite v
(saturating), the limits at +-inf, NaN only for NaN. The kernels evaluate the
same three forms as `sqs.core.gate_value_and_grad` (lam = 0, p = 1, general p),
with the same host-side constants (`sqs.core.gate_constants`).

Design (after Liger-Kernel's SwiGLU: one pass over memory each way, the gate
recomputed in backward from the saved w and v, nothing else saved):

* Row-wise layout. Each tensor is seen as (n_rows, n_cols) over its last
  dimension, with unit column stride and its *own* row stride, so the
  non-contiguous halves of ``w, v = h.chunk(2, -1)`` (row stride 2H) are read in
  place without a copy. Only a tensor that cannot be viewed that way (a
  transposed one, say) is made contiguous first.
* 2-D tiles instead of Liger's one-program-per-row. A program handles a
  BLOCK_M x BLOCK_N tile, BLOCK_N = next power of two of the row width (capped at
  _MAX_BLOCK_N; wider rows are split over several column blocks, so there is no
  width limit), and BLOCK_M rows so that a tile holds about _TILE elements.
  One-program-per-row leaves most of each program idle for the narrow rows this
  project uses (GLU hidden width 128: 128 elements per program); the tile keeps
  every program the same size whatever the width. BLOCK_M = 1 is Liger's kernel.
* Flat fast path. When every tensor of the call is contiguous, the whole tensor is
  one "row" of numel elements: no masked lanes from padding a non-power-of-two
  width, the plain 1-D elementwise kernel. Same kernel, other view.
* Arithmetic in float32 for fp16/bf16/fp32 inputs, float64 for float64 inputs
  (so `torch.autograd.gradcheck` on CUDA checks the real kernel); results are
  rounded once, to the input dtype, on store. The gate's constants are passed as
  fp64 scalars and rounded to the compute dtype in the kernel.
* The gate form is a `tl.constexpr` (KIND): lam = 0 and p = 1 have no pow and no
  log. Other p use lam |v|^p = exp2(p log2|v| + log2 lam) (exact 0 at v == 0
  since p > 0), one log2/exp2 pair for the gate and its derivative. In float32,
  subnormal |v| are scaled by 2^24 before log2/sqrt, so a GPU's fast
  approximations that flush subnormals to zero do not turn them into 0/0.
* Backward allocates exactly dw and dv (fresh buffers; the saved w and v are
  never overwritten, autograd may still need them elsewhere), or writes into the
  two halves of one gradient buffer it is given (`out=`, the packed op's dx).
* Offsets are int64: no overflow on tensors past 2^31 elements.

`forward`/`backward` are what `sqs.ops.fused_glu` calls for CUDA tensors;
`_forward`/`_backward` are the same without the device check, for the Triton
interpreter (TRITON_INTERPRET=1, CPU tensors) in the tests. Importing this
module never fails: without triton the kernels are simply not defined and
`available()` is False.
"""

import os

import torch

from sqs.core import KINDS, gate_constants
from sqs.core import SAT as SAT_SUFFIX

try:  # triton is optional (the `triton` extra); never fail at import
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken install
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = ["available", "forward", "backward"]

_TILE = 2048  # elements per program (8 per thread at 8 warps: 16-byte vectors for bf16/fp16)
_MAX_BLOCK_N = 2048  # widest column block; wider rows use several column blocks


def available() -> bool:
    """True when triton imports and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _sat(x, big):
        """x clamped to [-big, big]; NaN stays NaN (both comparisons are false for it)."""
        return tl.where(x > big, big, tl.where(x < -big, -big, x))

    @triton.jit
    def _gate(v, k0, k1, k2, k3, k4, k5, k6, big, KIND: tl.constexpr, SAT: tl.constexpr, GRAD: tl.constexpr,
              IS_FP64: tl.constexpr):
        """(sqs(v), sqs'(v)) in the kernel form KIND (0 lam0, 1 p1, 2 general) of `sqs.core`, with
        its constants k0..k6 (`sqs.core.gate_constants`); sqs'(v) only when GRAD."""
        a = tl.abs(v)
        sgn = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)
        is_inf = a == float("inf")
        dy = v  # placeholder when GRAD is off
        if KIND == 0:  # lam = 0: v - c sgn v, derivative 1
            y = v - k0 * sgn
            if SAT:
                y = tl.where(is_inf, v, _sat(y, big))
            if GRAD:
                dy = tl.where(v != v, v, 1.0)
        else:
            if KIND == 1:  # p = 1: (v - c sgn) / (1 + lam |v|), derivative (kappa t) t; the limit past k3
                over = a >= k3
                if GRAD:
                    t = 1.0 / (1.0 + k1 * a)
                    y = tl.where(over, sgn * k4, (v - k0 * sgn) * t)
                    dy = tl.where(over, 0.0, (k2 * t) * t)
                    if SAT:
                        dy = _sat(dy, big)
                else:
                    y = tl.where(over, sgn * k4, (v - k0 * sgn) / (1.0 + k1 * a))
            else:  # general p: u = lam |v|^p = 2^e, in the two regimes u < 1 and u >= 1
                if IS_FP64:
                    lg = tl.log2(a)
                    sq = tl.sqrt(tl.maximum(a, 4.9406564584124654e-324))
                else:
                    # Subnormal |v| scaled by 2^24 first: a GPU's fast log2/sqrt may flush them to 0.
                    sub = a < 1.1754943508222875e-38
                    a_s = tl.where(sub, a * 16777216.0, a)
                    lg = tl.log2(a_s) - tl.where(sub, 24.0, 0.0)
                    sq = tl.sqrt(tl.maximum(a_s, 1.1754943508222875e-38)) * tl.where(sub, 0.000244140625, 1.0)
                e = k1 * lg + k2
                small = e < 0
                m2 = tl.exp2(-0.5 * tl.abs(e))
                m = m2 * m2
                h = 1.0 / (1.0 + m)
                n = v - k0 * sgn
                y = tl.where(small, n * h, (n * m2) * (m2 * h))
                if GRAD:
                    h2 = h * h
                    b = tl.where(small, 1.0 + k3 * m, m2 * (m2 * (m + k3)))
                    r = m2 / sq
                    dy = _sat(h2 * b + (h2 * (k4 * r)) * (k5 * r), big)
            if SAT:
                y = _sat(y, big)
            if KIND == 2:
                y = tl.where(is_inf, sgn * k6, y)
        return y, dy

    @triton.jit
    def _tile(pid, n_rows, n_cols, n_col_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Row and column offsets (int64) and mask of this program's tile."""
        pid_m = pid // n_col_blocks
        pid_n = pid % n_col_blocks
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return rows[:, None], cols[None, :], mask

    @triton.jit
    def _sqs_glu_fwd_kernel(
        w_ptr, v_ptr, y_ptr,
        w_row_stride, v_row_stride, y_row_stride,
        n_rows, n_cols, n_col_blocks,
        k0: tl.float64, k1: tl.float64, k2: tl.float64, k3: tl.float64, k4: tl.float64, k5: tl.float64,
        k6: tl.float64, big: tl.float64,
        KIND: tl.constexpr, SAT: tl.constexpr, IS_FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, n_col_blocks, BLOCK_M, BLOCK_N)
        CDT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
        w = tl.load(w_ptr + rows * w_row_stride + cols, mask=mask, other=0.0).to(CDT)
        v = tl.load(v_ptr + rows * v_row_stride + cols, mask=mask, other=0.0).to(CDT)
        s, _ = _gate(v, tl.full((), k0, CDT), tl.full((), k1, CDT), tl.full((), k2, CDT), tl.full((), k3, CDT),
                     tl.full((), k4, CDT), tl.full((), k5, CDT), tl.full((), k6, CDT), tl.full((), big, CDT),
                     KIND, SAT, False, IS_FP64)
        tl.store(y_ptr + rows * y_row_stride + cols, (w * s).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sqs_glu_bwd_kernel(
        g_ptr, w_ptr, v_ptr, dw_ptr, dv_ptr,
        g_row_stride, w_row_stride, v_row_stride, dw_row_stride, dv_row_stride,
        n_rows, n_cols, n_col_blocks,
        k0: tl.float64, k1: tl.float64, k2: tl.float64, k3: tl.float64, k4: tl.float64, k5: tl.float64,
        k6: tl.float64, big: tl.float64,
        KIND: tl.constexpr, SAT: tl.constexpr, IS_FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, n_col_blocks, BLOCK_M, BLOCK_N)
        CDT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
        g = tl.load(g_ptr + rows * g_row_stride + cols, mask=mask, other=0.0).to(CDT)
        w = tl.load(w_ptr + rows * w_row_stride + cols, mask=mask, other=0.0).to(CDT)
        v = tl.load(v_ptr + rows * v_row_stride + cols, mask=mask, other=0.0).to(CDT)
        s, ds = _gate(v, tl.full((), k0, CDT), tl.full((), k1, CDT), tl.full((), k2, CDT), tl.full((), k3, CDT),
                      tl.full((), k4, CDT), tl.full((), k5, CDT), tl.full((), k6, CDT), tl.full((), big, CDT),
                      KIND, SAT, True, IS_FP64)
        tl.store(dw_ptr + rows * dw_row_stride + cols, (g * s).to(dw_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + rows * dv_row_stride + cols, (g * w * ds).to(dv_ptr.dtype.element_ty), mask=mask)


# ---- host side -------------------------------------------------------------------

def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(n_rows, n_cols) view over the last dim with unit column stride; copies only
    when no such view exists (e.g. a transposed tensor)."""
    if t.dim() == 0:
        t = t.reshape(1)
    n_cols = t.shape[-1]
    if t.stride(-1) != 1 and n_cols != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n_cols)
    except RuntimeError:
        return t.contiguous().view(-1, n_cols)


def _layout(ins: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], int, int]:
    """2-D views of a call's tensors (inputs, then outputs).

    All contiguous -> one row of numel elements (the flat 1-D kernel); otherwise
    row-wise over the last dimension with per-tensor row strides."""
    if all(t.is_contiguous() for t in ins):
        numel = ins[0].numel()
        return [t.view(1, numel) for t in ins], 1, numel
    views = [_as_rows(t) for t in ins]
    n_rows, n_cols = views[0].shape
    return views, n_rows, n_cols


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _settings(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N, num_warps: a tile of about _TILE elements."""
    block_n = min(_next_pow2(n_cols), _MAX_BLOCK_N)
    block_m = max(1, min(_TILE // block_n, _next_pow2(n_rows)))
    tile = block_m * block_n
    num_warps = 2 if tile <= 256 else 4 if tile <= 1024 else 8
    return block_m, block_n, num_warps


def _launch(kernel, ins: tuple[torch.Tensor, ...], n_out: int, c: float, lam: float, p: float,
            outs: tuple[torch.Tensor, ...] | None = None):
    shape, dtype, device = ins[-1].shape, ins[-1].dtype, ins[-1].device
    if outs is None:
        outs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_out)]
    if outs[0].numel() == 0:
        return list(outs)
    tensors, n_rows, n_cols = _layout((*ins, *outs))
    for o, view in zip(outs, tensors[len(ins):]):
        if view.data_ptr() != o.data_ptr():  # _as_rows had to copy: the writes would be lost
            raise ValueError("sqs triton: an `out` tensor must be viewable as rows of its last dim, "
                             f"got shape {tuple(o.shape)} with strides {o.stride()}")
    block_m, block_n, num_warps = _settings(n_rows, n_cols)
    n_col_blocks = -(-n_cols // block_n)
    grid = (-(-n_rows // block_m) * n_col_blocks,)
    kind, k = gate_constants(c, lam, p, dtype)
    k = tuple(k) + (0.0,) * (7 - len(k))
    kernel[grid](
        *tensors,
        *(t.stride(0) for t in tensors),
        n_rows, n_cols, n_col_blocks,
        *k, torch.finfo(dtype).max,
        KIND=KINDS.index(kind.removesuffix(SAT_SUFFIX)), SAT=kind.endswith(SAT_SUFFIX),
        IS_FP64=(dtype == torch.float64),
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return list(outs)


def _check_triton() -> None:
    if triton is None:
        raise RuntimeError(f"sqs: the triton backend needs `triton` ({_TRITON_IMPORT_ERROR}); "
                           "install the `triton` extra or use another backend")


def _forward(w: torch.Tensor, v: torch.Tensor, c: float, lam: float, p: float) -> torch.Tensor:
    """y = w * sqs(v), no device check (also runs under TRITON_INTERPRET=1 on CPU)."""
    _check_triton()
    (y,) = _launch(_sqs_glu_fwd_kernel, (w, v), 1, c, lam, p)
    return y


def _backward(g: torch.Tensor, w: torch.Tensor, v: torch.Tensor, c: float, lam: float,
              p: float, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw, dv), no device check (also runs under TRITON_INTERPRET=1 on CPU)."""
    _check_triton()
    dw, dv = _launch(_sqs_glu_bwd_kernel, (g, w, v), 2, c, lam, p, out)
    return dw, dv


def _check_inputs(*ts: torch.Tensor) -> None:
    _check_triton()
    ref = ts[-1]
    for t in ts:
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError("sqs triton: all tensors must share shape, dtype and device, got "
                             + ", ".join(f"{tuple(x.shape)} {x.dtype} {x.device}" for x in ts))
    if not ref.is_floating_point():
        raise TypeError(f"sqs triton: tensors must be floating point, got {ref.dtype}")
    if not (ref.is_cuda or _interpreting()):
        raise RuntimeError(f"sqs triton: tensors must be on a CUDA device, got {ref.device} "
                           "(or set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)")


def forward(w: torch.Tensor, v: torch.Tensor, c: float, lam: float, p: float) -> torch.Tensor:
    """y = w * sqs(v) for CUDA tensors of one shape and float dtype (any strides)."""
    _check_inputs(w, v)
    return _forward(w, v, c, lam, p)


def backward(g: torch.Tensor, w: torch.Tensor, v: torch.Tensor, c: float, lam: float,
             p: float, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw, dv) = (g * sqs(v), g * w * sqs'(v)); allocates only dw and dv, or writes into
    `out` = (dw, dv) buffers of w's shape, e.g. the two halves of the packed op's dx."""
    _check_inputs(g, w, v, *(out or ()))
    return _backward(g, w, v, c, lam, p, out)
