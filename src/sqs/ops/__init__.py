"""Fused kernels and their autograd Functions (Liger-Kernel's split: the math and
the kernels here, thin `nn.Module` wrappers in `sqs.nn`)."""

from sqs.ops.fused_glu import SQSGLUFunction, available_backends, get_backend, set_backend, sqs_glu

__all__ = ["SQSGLUFunction", "available_backends", "get_backend", "set_backend", "sqs_glu"]
