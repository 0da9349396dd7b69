"""Fused kernels and their autograd Functions (Liger-Kernel's split: the math and
the kernels here, thin `nn.Module` wrappers in `sqs.nn`)."""

from sqs.ops.fused_glu import (
    SQSGLUFunction,
    SQSGLUPackedFunction,
    available_backends,
    get_backend,
    set_backend,
    sqs_glu,
    sqs_glu_packed,
)

__all__ = ["SQSGLUFunction", "SQSGLUPackedFunction", "available_backends", "get_backend", "set_backend", "sqs_glu",
           "sqs_glu_packed"]
