"""Signed Quadratic Shrink (SQS) gated linear units.

    import sqs
    y = sqs.functional.glu(w, v, gate="sqs")      # fused w * sqs(v)
    mlp = sqs.nn.GLU(d_in, d_hidden, d_out, gate="sqs")
"""

from sqs import core, functional, nn, ops  # noqa: F401

__version__ = "0.1.0"
