"""Output projection + cross-entropy in row chunks, never holding the full logits.

Why: a language model's last step, logits = h @ W^T then cross-entropy, makes a
(tokens, vocab) float32 tensor, plus its log-softmax and its gradient of the same
size. At the TinyStories CPU setting (8,192 tokens x 4,096 vocab) each is 134 MB:
too big for the allocator to reuse (glibc returns such blocks to the OS, so every
step pays page faults on ~0.5 GB), and the memory-bound passes over them cost more
than all the GLU layers together. Here each chunk of rows computes its logits, its
loss and, when a gradient is wanted, its share of dL/dh and dL/dW straight away
(the loss is the graph's end, so softmax - onehot is the whole backward); backward
only scales the stored gradients. The matmul FLOPs are unchanged; the peak memory
of this step drops from O(tokens x vocab) to O(chunk x vocab). Liger-Kernel's fused
linear cross-entropy is the same idea on GPUs.
"""

from __future__ import annotations

import torch

# Rows per chunk: about 2M logits (8 MB in float32), small enough to stay in cache
# levels and in the allocator's reusable pool, large enough for efficient matmuls.
_CHUNK_ELEMENTS = 2**21
# ...but never fewer than this many rows: each chunk's dL/dW update reads and writes the whole
# (vocab, d) gradient, so at a large vocabulary thin chunks turn the step memory-bound. Measured
# on CPU at 4,096 tokens x d 576 -> vocab 49,152 (fp32, 2 threads): 42 rows (2M logits) took 2.1x
# the plain loss's CPU time, 256 rows 1.0-1.2x, for 50 MB of logits per chunk instead of 805 MB.
_MIN_CHUNK_ROWS = 256


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // vocab)


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: `reduction` must be 'mean' or 'sum', got {reduction!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: need h (N, d) and weight (vocab, d), got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"linear_cross_entropy: `targets` must be int64 of shape ({h.shape[0]},), "
                         f"got {targets.dtype} {tuple(targets.shape)}")


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed loss of one chunk, its logits and their logsumexp (float32)."""
    logits = h @ w.T
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return loss, logits, lse


def _chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, need_h: bool,
             need_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over all rows and, where asked, its gradients dL/dh and dL/dW (float32)."""
    with torch.autocast(h.device.type, enabled=False):
        hf, wf = h.float(), weight.float()
        dh = torch.empty_like(hf) if need_h else None
        dw = torch.zeros_like(wf) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], rows):
            hc, tc = hf[i:i + rows], targets[i:i + rows]
            loss, logits, lse = _chunk_loss(hc, wf, tc)
            total += loss
            if not (need_h or need_w):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(tc), device=grad.device), tc] -= 1.0
            if need_h:
                dh[i:i + rows] = grad @ wf
            if need_w:
                dw.addmm_(grad.T, hc)
    return total, dh, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                chunk_rows: int | None) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[:2]  # e.g. a frozen output layer: no dW
        total, dh, dw = _chunked(h, weight, targets, _chunk_rows(weight.shape[0], chunk_rows), need_h, need_w)
        ctx.save_for_backward(dh, dw)
        ctx.scale, ctx.dtypes = (1.0 / h.shape[0] if reduction == "mean" else 1.0), (h.dtype, weight.dtype)
        return total * ctx.scale

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dh, dw = ctx.saved_tensors
        s = g * ctx.scale
        return (None if dh is None else (dh * s).to(ctx.dtypes[0]),
                None if dw is None else (dw * s).to(ctx.dtypes[1]), None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets) in float32, computed chunk by chunk.

    h (N, d), weight (vocab, d), targets (N,) int64. Same value and gradients as the
    two-step form up to float rounding. Without a gradient to compute (no_grad, or
    neither input requires grad) it only evaluates the loss, chunk by chunk.
    """
    _check(h, weight, targets, reduction)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(h, weight, targets, reduction, chunk_rows)
    total, _, _ = _chunked(h, weight, targets, _chunk_rows(weight.shape[0], chunk_rows), False, False)
    return total / h.shape[0] if reduction == "mean" else total
