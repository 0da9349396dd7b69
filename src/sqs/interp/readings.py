"""Quadratic readings of a gated layer that account for the gate's shrink.

The paper's first-order reading treats the SQS gate as the identity. Over the range a
hidden unit actually sees, sqs(v) is closer to a unit-wise rescaling g_i * v, so the layer
w_i(x) * sqs(v_i(x)) ~ g_i * w_i(x) * v_i(x) stays a quadratic form with the unit's
contribution scaled by g_i. The gain that best fits a unit in least squares is

    g_i = sum_n pre_ni * post_ni / sum_n pre_ni^2

over the samples n the gain is fitted on (training data only; evaluate on held-out data).
"""

from __future__ import annotations

import torch


def unit_gains(pre: torch.Tensor, post: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-unit least-squares gain g with post[:, i] ~ g_i * pre[:, i].

    `pre` (N, h) are the gate's inputs v = V x, `post` (N, h) its outputs gate(v). A unit
    that never fires (sum pre^2 = 0) gets gain 1 (it contributes nothing either way). For the
    identity gate post == pre and every gain is exactly 1.
    """
    if pre.shape != post.shape or pre.dim() != 2:
        raise ValueError(f"unit_gains: `pre` and `post` must both be (N, h), got {tuple(pre.shape)} and {tuple(post.shape)}")
    pre64, post64 = pre.double(), post.double()
    num = torch.einsum("nh,nh->h", pre64, post64)
    den = torch.einsum("nh,nh->h", pre64, pre64)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.ones_like(den))
