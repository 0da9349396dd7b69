"""Triton kernels for the fused SQS-GLU, y = w * sqs(v), forward and backward.

    sqs(v)  = (v - c*sgn(v)) / (1 + lam*|v|^p)
    sqs'(v) = [1 + lam*(1-p)*|v|^p + lam*p*c*|v|^(p-1)] / (1 + lam*|v|^p)^2
            = (1 + lam*c) / (1 + lam*|v|)^2                       for p == 1
    forward:  y  = w * sqs(v)
    backward: dw = g * sqs(v),  dv = g * w * sqs'(v)

Conventions as in `sqs.core`: sgn(0) = 0; at v == 0, |v|^(p-1) is 1 for
p == 1 (the simple form above) and 0 otherwise.

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
  rounded once, to the input dtype, on store. Hyperparameters are passed as fp64
  scalars and rounded to the compute dtype in the kernel.
* p == 1 is a `tl.constexpr` specialisation: no pow, no log. Other p use
  |v|^p = exp2(p * log2|v|) (exact 0 at v == 0 since p > 0) and
  |v|^(p-1) = |v|^p / |v| for v != 0: one transcendental pair for both.
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
    def _sqs_parts(v, c, lam, p, P_IS_ONE: tl.constexpr):
        """sgn-shifted numerator, denominator and |v|^p of sqs(v)."""
        a = tl.abs(v)
        sgn = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)
        if P_IS_ONE:
            ap = a
        else:
            # |v|^p = exp2(p*log2|v|); 0 at v == 0 without evaluating log2(0).
            # Tested with `a == 0` (not `a > 0`) so that NaN propagates.
            ap = tl.where(a == 0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0, 1.0, a))))
        den = 1.0 + lam * ap
        return v - c * sgn, den, a, ap

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
        c: tl.float64, lam: tl.float64, p: tl.float64,
        P_IS_ONE: tl.constexpr, IS_FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, n_col_blocks, BLOCK_M, BLOCK_N)
        CDT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
        c_ = tl.full((), c, CDT)
        lam_ = tl.full((), lam, CDT)
        p_ = tl.full((), p, CDT)

        w = tl.load(w_ptr + rows * w_row_stride + cols, mask=mask, other=0.0).to(CDT)
        v = tl.load(v_ptr + rows * v_row_stride + cols, mask=mask, other=0.0).to(CDT)
        num, den, a, ap = _sqs_parts(v, c_, lam_, p_, P_IS_ONE)
        y = w * (num / den)
        tl.store(y_ptr + rows * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sqs_glu_bwd_kernel(
        g_ptr, w_ptr, v_ptr, dw_ptr, dv_ptr,
        g_row_stride, w_row_stride, v_row_stride, dw_row_stride, dv_row_stride,
        n_rows, n_cols, n_col_blocks,
        c: tl.float64, lam: tl.float64, p: tl.float64,
        P_IS_ONE: tl.constexpr, IS_FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, n_col_blocks, BLOCK_M, BLOCK_N)
        CDT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
        c_ = tl.full((), c, CDT)
        lam_ = tl.full((), lam, CDT)
        p_ = tl.full((), p, CDT)

        g = tl.load(g_ptr + rows * g_row_stride + cols, mask=mask, other=0.0).to(CDT)
        w = tl.load(w_ptr + rows * w_row_stride + cols, mask=mask, other=0.0).to(CDT)
        v = tl.load(v_ptr + rows * v_row_stride + cols, mask=mask, other=0.0).to(CDT)
        num, den, a, ap = _sqs_parts(v, c_, lam_, p_, P_IS_ONE)
        dw = g * (num / den)
        if P_IS_ONE:
            dsqs = (1.0 + lam_ * c_) / (den * den)
        else:
            # |v|^(p-1) = |v|^p / |v|, defined as 0 at v == 0 (p != 1)
            apm1 = tl.where(a == 0, 0.0, ap / tl.where(a == 0, 1.0, a))
            dsqs = (1.0 + lam_ * (1.0 - p_) * ap + lam_ * p_ * c_ * apm1) / (den * den)
        dv = g * w * dsqs
        tl.store(dw_ptr + rows * dw_row_stride + cols, dw.to(dw_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + rows * dv_row_stride + cols, dv.to(dv_ptr.dtype.element_ty), mask=mask)


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
    kernel[grid](
        *tensors,
        *(t.stride(0) for t in tensors),
        n_rows, n_cols, n_col_blocks,
        float(c), float(lam), float(p),
        P_IS_ONE=(float(p) == 1.0), IS_FP64=(dtype == torch.float64),
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
