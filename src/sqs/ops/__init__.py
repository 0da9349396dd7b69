"""Kernels and their autograd Functions: the gate alone (`sqs`), the fused GLU
(`sqs_glu`, `sqs_glu_packed`) and the chunked output-layer loss. The formulas come
from `sqs.core`; this package imports nothing else from `sqs` (Liger-Kernel's split:
the kernels here, thin `nn.Module` wrappers in `sqs.nn`).

Backends of the fused GLU: `compiled` (torch.compile, the default on CPU), `triton`
(CUDA) and `eager` (the fallback). Pick one for a block with `with backend("eager"):`.
"""

from sqs.ops.fused_glu import (
    BACKENDS,
    SQSGLUFunction,
    SQSGLUPackedFunction,
    available_backends,
    backend,
    get_backend,
    last_backend,
    set_backend,
    sqs_glu,
    sqs_glu_packed,
)
from sqs.ops.gate import SQSFunction, sqs
from sqs.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["BACKENDS", "SQSFunction", "SQSGLUFunction", "SQSGLUPackedFunction", "available_backends", "backend",
           "get_backend", "last_backend", "linear_cross_entropy", "set_backend", "sqs", "sqs_glu", "sqs_glu_packed"]
