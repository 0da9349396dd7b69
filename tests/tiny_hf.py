"""Tiny random Llama models for the pretrained-model tests: built from a config (no hub), saved as a
Hugging Face directory or written as a GGUF file with the `gguf` package's writer (f32 tensors, the
llama.cpp layout: renamed tensors, q/k rows permuted for its rotary convention, a byte-level vocabulary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)
#: The vocabulary written into the GGUF: 3 specials, letters, punctuation (byte-level BPE, no merges).
TOKENS = ([f"<{i}>" for i in range(3)] + [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)]
          + list("Ġ.,!?'Ċ:;"))[:VOCAB]


def tiny_llama(seed: int = 0, tie: bool = True):
    """A random LlamaForCausalLM small enough for a unit test (2 layers, d 32, MLP width 48)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections (transformers undoes it when it reads a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, arch: str = "llama") -> Path:
    """Write `model` (a tiny Llama) as a GGUF file with f32 tensors and a byte-level tokenizer."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_scores([0.0] * len(TOKENS))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    sd = model.state_dict()
    for hf_name, gguf_name in names.items():
        t = sd[hf_name].detach().float()
        if hf_name.endswith("q_proj.weight"):
            t = _permute(t, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute(t, c.num_key_value_heads)
        w.add_tensor(gguf_name, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
