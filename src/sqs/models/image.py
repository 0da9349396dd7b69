"""Image classifier of the paper's Sec. 4: embed -> N GLU layers -> head.

    x      = E img                      (784 -> d, no bias)
    x      = x + P_l[(W_l x) * gate(V_l x)]   for each layer   (residual if n_layers > 1)
    logits = H x                        (d -> 10, no bias)

With one layer there is no residual and no norm, so for the identity gate every
logit is exactly a quadratic form in the embedded input:
    logit_a = sum_i (H P)_ai (w_i . x)(v_i . x) = x^T B_a x,   B_a = sum_i (H P)_ai w_i v_i^T
which `sqs.interp.spectra` decomposes. For n_layers > 1 the layers add to a residual
stream (optionally normalised first); see `residual` and `norm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sqs.nn import GLU

N_PIXELS = 28 * 28
N_CLASSES = 10


@dataclass
class ImageModelConfig:
    n_layers: int = 1
    d_model: int = 128
    d_hidden: int = 128
    gate: str = "sqs"
    gate_kwargs: dict = field(default_factory=dict)
    residual: bool = True  # only used when n_layers > 1
    norm: str = "none"  # "none" | "rms": RMSNorm before each GLU (only when n_layers > 1)
    d_in: int = N_PIXELS
    n_classes: int = N_CLASSES

    def __post_init__(self):
        if self.norm not in ("none", "rms"):
            raise ValueError(f"ImageModelConfig: `norm` must be 'none' or 'rms', got {self.norm!r}")
        if self.n_layers < 1:
            raise ValueError(f"ImageModelConfig: `n_layers` must be >= 1, got {self.n_layers}")

    @property
    def is_quadratic(self) -> bool:
        """True when logits are a quadratic form of the embedded input (for linear gates)."""
        return self.n_layers == 1


class ImageClassifier(nn.Module):
    def __init__(self, cfg: ImageModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.d_in, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(
            GLU(cfg.d_model, cfg.d_hidden, cfg.d_model, gate=cfg.gate, bias=False, **cfg.gate_kwargs)
            for _ in range(cfg.n_layers)
        )
        deep = cfg.n_layers > 1
        self.norms = nn.ModuleList(
            nn.RMSNorm(cfg.d_model) if (deep and cfg.norm == "rms") else nn.Identity() for _ in range(cfg.n_layers)
        )
        self.residual = deep and cfg.residual
        self.head = nn.Linear(cfg.d_model, cfg.n_classes, bias=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(img.flatten(1))
        for norm, layer in zip(self.norms, self.layers):
            y = layer(norm(x))
            x = x + y if self.residual else y
        return self.head(x)
