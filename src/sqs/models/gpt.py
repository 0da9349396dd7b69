"""A small nanoGPT-style decoder-only Transformer whose MLP is a GLU (Sec. 4.2.2).

    h_0 = E[tokens] + P[positions]
    h   = h + Attn(Norm(h))                  causal multi-head self-attention
    h   = h + GLU(Norm(h))                   (W x) * gate(V x), then the d_hidden -> d output projection
    logits = E^T Norm(h)                     (tied embeddings)
    loss   = cross-entropy(logits, next tokens), in row chunks (sqs.ops.linear_cross_entropy)

The paper gives only: 4 layers, model dim 128, GLU hidden dim 128, AdamW lr 1e-3,
weight decay 0.1, batch 512, cosine annealing. Everything else is ours, chosen to
be the standard small-decoder recipe (nanoGPT / Llama) and identical for every gate,
so that the gate is the only difference between runs:

* Pre-norm with RMSNorm (Llama's norm, the usual companion of GLU MLPs), one before
  attention, one before the MLP, one before the head; learnable scale, no bias.
* 4 heads of dim 32 (d_model / n_heads), causal attention through
  `F.scaled_dot_product_attention(is_causal=True)` (flash/memory-efficient kernels
  where available), no dropout (the paper mentions none; TinyStories is large
  compared with a 1 M-parameter model).
* Learned absolute position embeddings (nanoGPT), context 256 tokens by default.
* No biases anywhere (Linear layers and norms), as in Llama and the bilinear-MLP work.
* Tied input/output embeddings (nanoGPT): with a 4096-token vocabulary an untied head
  would be another 0.5 M parameters, more than the four blocks together.
* MLP = `sqs.nn.GLU(d_model, d_hidden, d_model, gate=...)`: W and V fused in one
  projection, the gate selectable (relu, gelu, silu, identity, sqs), then the
  output projection. d_hidden = 128 is the paper's "hidden dim" (so the MLP is
  narrower than the usual 8/3 d: the paper's choice, kept).
* Initialisation (nanoGPT/GPT-2): all weights N(0, 0.02); the two projections that
  write into the residual stream (attention output and GLU output) N(0, 0.02/sqrt(2L)).
* Weight decay (in the trainer) applies to matrices, i.e. also to the embeddings,
  not to norm scales (nanoGPT's rule).

`generate` samples autoregressively without a KV cache (readable; fast enough for
a 4-layer d=128 model); greedy (argmax) when temperature == 0, top-k optional, and
deterministic for a given `torch.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sqs.functional import canonical_gate
from sqs.nn import GLU
from sqs.ops.linear_cross_entropy import linear_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_hidden: int = 128
    gate: str = "sqs"
    gate_kwargs: dict = field(default_factory=dict)
    context: int = 256
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_hidden", "context"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"GPTConfig: `{name}` must be a positive int, got {val!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: `d_model` ({self.d_model}) must be divisible by `n_heads` ({self.n_heads})")
        self.gate = canonical_gate(self.gate)
        self.gate_kwargs = dict(self.gate_kwargs or {})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, elementwise_affine=True)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, elementwise_affine=True)
        self.mlp = GLU(cfg.d_model, cfg.d_hidden, cfg.d_model, gate=cfg.gate, bias=False, **cfg.gate_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, elementwise_affine=True)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm scales
            elif name.endswith("attn.out.weight") or name.endswith("mlp.out.weight"):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel() + (self.tok_emb.weight.numel() if self.head is not None else 0)
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) int64 token ids, T <= context -> logits (B, T, vocab).

        With `targets` (B, T) it returns the next-token cross-entropy instead (float32,
        `reduction` "mean" or "sum" over tokens), computed by `linear_cross_entropy`
        without materialising the logits. It goes through forward so that wrappers
        such as DistributedDataParallel see the whole computation.
        """
        B, T = idx.shape
        if T > self.cfg.context:
            raise ValueError(f"GPT: sequence of length {T} is longer than the context ({self.cfg.context})")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        out_w = self.tok_emb.weight if self.head is None else self.head.weight
        if targets is not None:
            return linear_cross_entropy(x.reshape(B * T, -1), out_w, targets.reshape(B * T), reduction)
        return x @ out_w.T

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, eos_id: int | None = None) -> torch.Tensor:
        """Append up to `max_new_tokens` tokens to idx (B, T); returns (B, T + n).

        temperature == 0 is greedy decoding (argmax; `top_k` and `generator` unused).
        Otherwise logits / temperature, optionally restricted to the `top_k` most
        likely tokens, sampled with `torch.multinomial(generator=generator)`, so the
        same generator seed gives the same text. Stops early once every row has
        produced `eos_id` (the rows that finished first are padded with eos_id).
        """
        if temperature < 0:
            raise ValueError(f"generate: `temperature` must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            top_k = None
        was_training = self.training
        self.eval()
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.context:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                if generator is not None and probs.device.type != generator.device.type:
                    nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
                else:
                    nxt = torch.multinomial(probs, 1, generator=generator)
            if eos_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                done |= nxt[:, 0] == eos_id
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return idx
