"""Load a pretrained gated-MLP language model (a Hugging Face directory or a GGUF file) and text for it.

    from sqs.integrations.pretrained import load_pretrained, text_blocks, lm_loss
    pre = load_pretrained("smollm2")               # the cached GGUF (`sqs data fetch smollm2`), or
    pre = load_pretrained("path/to/hf-model-dir")  # config.json + weights, or a .gguf file
    blocks = text_blocks(pre.tokenizer, "shakespeare", "heldout", context=256, max_blocks=32)
    lm_loss(pre.model, blocks)                      # mean next-token cross-entropy (nats)

What is accepted: model types whose MLP is ``down(act(gate(x)) * up(x))`` with separate
``gate_proj``/``up_proj``/``down_proj`` (`SUPPORTED_MODEL_TYPES`; Llama-family GGUF files such
as SmolLM2). A GGUF file is read by transformers (``from_pretrained(dir, gguf_file=...)``),
which needs the ``gguf`` package and, in transformers 5, ``accelerate`` (it refuses a GGUF
without it, though nothing of accelerate is used on CPU): ``pip install 'sqs[gguf]'``.
Quantized GGUF weights are unpacked to dense float tensors and the model is rebuilt as a
plain transformers model, so it trains, saves (`save_pretrained`) and reloads like any other.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqs.data.pretrained import SOURCES, fetched_path, text_split
from sqs.io import UserError

#: Model types whose gated MLP this module (and `sqs.integrations.convert`) handles.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: GGUF ``general.architecture`` values transformers maps to those model types.
SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
#: Model names `load_pretrained` resolves to a fetched file.
NAMED_MODELS = ("smollm2",)
INSTALL_GGUF = "pip install 'sqs[gguf]'"
#: The activation name a converted model's config carries (`sqs.integrations.transformers.SQS_NAME`).
SQS_GATE = "sqs"


class PretrainedError(UserError, ValueError):
    """A model path or file that cannot be loaded; the message names it and the fix."""


@dataclass
class Pretrained:
    """A loaded model, its tokenizer (None when the directory has none) and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    kind: str  # "hf-dir" or "gguf"


def _check_model_type(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PretrainedError(f"{where}: model type {model_type!r} is not supported; sqs reads and converts "
                              f"gated-MLP models of type {', '.join(SUPPORTED_MODEL_TYPES)}")


def _need_gguf() -> None:
    """Refuse early, naming the extra, when transformers could not read a GGUF file here."""
    missing = []
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise PretrainedError(f"reading a GGUF file needs the {' and '.join(missing)} package(s): {INSTALL_GGUF}")


def gguf_architecture(path: str | os.PathLike) -> str:
    """The ``general.architecture`` of a GGUF file, from its header (no tensor is read)."""
    _need_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, OSError) as e:
        raise PretrainedError(f"{path}: not a readable GGUF file ({e}); pass a .gguf model file") from e


def _resolve(path: str | os.PathLike, cache_dir) -> tuple[Path, str]:
    """(path, kind) for a name, a model directory, a directory holding one .gguf, or a .gguf file."""
    if str(path) in NAMED_MODELS:
        return fetched_path(str(path), cache_dir), "gguf"
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise PretrainedError(f"{p}: not a model; pass a Hugging Face model directory (with config.json) "
                                  "or a .gguf file")
        return p, "gguf"
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, "hf-dir"
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0], "gguf"
        raise PretrainedError(f"{p}: no config.json{' and several .gguf files' if ggufs else ''}; pass a "
                              "Hugging Face model directory or one .gguf file")
    raise PretrainedError(f"{p}: no such model directory or GGUF file; pass a Hugging Face model directory "
                          f"(with config.json), a .gguf file, or {', '.join(NAMED_MODELS)} "
                          f"(after `sqs data fetch {NAMED_MODELS[0]}`)")


def _plain(model: nn.Module) -> nn.Module:
    """`model` with its GGUF quantizer and ``quantization_config`` dropped: a plain dense model.

    Why: transformers marks a model read from GGUF as quantized (refusing to save it, and
    calling it not trainable) even when every weight was unpacked to dense floats, as here.
    What a test checks: the result saves with `save_pretrained` and reloads with the same logits.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()


@contextlib.contextmanager
def _quiet():
    """transformers' loading bars and notes off (its "Loading weights" bar, the GGUF reader's "dequantizing"
    notes, and the raw tqdm bar of its GGUF tensors that the progress-bar switch does not reach): a refusal
    that follows loading (e.g. `sqs read --token`) must stay the one line on stderr."""
    from transformers import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    cache_dir: str | os.PathLike | None = None) -> Pretrained:
    """Load a causal LM and its tokenizer from a Hugging Face directory, a .gguf file or a name.

    Refuses, in one line each: a missing path, an unsupported architecture, a GGUF file
    without the ``gguf`` extra installed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p, kind = _resolve(path, cache_dir)
    if kind == "hf-dir":
        config = AutoConfig.from_pretrained(p)
        _check_model_type(getattr(config, "model_type", None), str(p))
        with _quiet():
            if SQS_GATE in (getattr(config, "hidden_act", None), getattr(config, "hidden_activation", None)):
                # a converted model (`sqs convert`): its config names our gate, which transformers builds
                # only through sqs; AutoSQSForCausalLM loads it without a process-wide register()
                from sqs.integrations.transformers import AutoSQSForCausalLM

                model = AutoSQSForCausalLM.from_pretrained(p, dtype=dtype).eval()
            else:
                model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tokenizer = AutoTokenizer.from_pretrained(p) if has_tok else None
        return Pretrained(model, tokenizer, str(p), kind)
    arch = gguf_architecture(p)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise PretrainedError(f"{p}: GGUF architecture {arch!r} is not supported; sqs reads and converts "
                              f"{', '.join(SUPPORTED_GGUF_ARCHS)}")
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    _check_model_type(getattr(model.config, "model_type", None), str(p))
    return Pretrained(_plain(model), tokenizer, str(p), kind)


# ----------------------------------------------------------------------------- text


def tokenize_blocks(tokenizer, text: str, context: int, max_blocks: int | None = None,
                    chunk_chars: int = 1 << 20) -> torch.Tensor:
    """Consecutive, non-overlapping windows of `context` token ids from `text`, shape [n, context].

    Tokenized in chunks of about `chunk_chars` characters cut at line ends, stopping once
    `max_blocks` windows are there (so a 17 MB corpus is not tokenized for 32 windows).
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    ids: list[int] = []
    start = 0
    while start < len(text) and (max_blocks is None or len(ids) < max_blocks * context):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        start = end
    n = len(ids) // context
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise PretrainedError(f"the text gives {len(ids)} tokens, fewer than one window of {context}; "
                              "use a longer text or a shorter context")
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


def text_blocks(tokenizer, source: str | os.PathLike, split: str, context: int, max_blocks: int | None = None,
                cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Token windows [n, context] of a text source ("shakespeare", "tinystories" or a .txt path), one split.

    split: "train" or "heldout" (`sqs.data.pretrained.text_split` says how each source is divided).
    """
    if tokenizer is None:
        raise PretrainedError("this model has no tokenizer (no tokenizer files next to it); save one with the "
                              "model (tokenizer.save_pretrained(DIR)) to read text with it")
    return tokenize_blocks(tokenizer, text_split(source, split, cache_dir), context, max_blocks)


@torch.no_grad()
def lm_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of `blocks` [n, T]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            x = blocks[i: i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------- what the layers see


def body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (``model.get_decoder()``; the model itself when it has none): running it
    records what every layer sees at about 4/5 of a full forward's cost for a 49 k vocabulary."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if isinstance(dec, nn.Module) else model


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the LM head (``model.model.norm`` in the Llama family)."""
    norm = getattr(body(model), "norm", None)
    if not isinstance(norm, nn.Module):
        raise PretrainedError(f"{type(model).__name__}: no final norm (`.norm` of the decoder); sqs reads "
                              f"Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)})")
    return norm


def mlp_norm(model: nn.Module, mlp_path: str) -> nn.Module:
    """The norm whose output feeds the MLP at `mlp_path` (the block's ``post_attention_layernorm``)."""
    parent = model.get_submodule(mlp_path.rpartition(".")[0])
    norm = getattr(parent, "post_attention_layernorm", None)
    if not isinstance(norm, nn.Module):
        raise PretrainedError(f"{mlp_path}: its block has no post_attention_layernorm; sqs reads pre-norm "
                              f"Llama-family blocks ({', '.join(SUPPORTED_MODEL_TYPES)})")
    return norm


@torch.no_grad()
def record(model: nn.Module, modules: list[nn.Module], blocks: torch.Tensor, batch_size: int = 8,
           outputs: bool = False, dtype: torch.dtype = torch.float32
           ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What each of `modules` receives (and, with `outputs`, returns) when the decoder body runs on token
    windows `blocks` [n, T]: one tensor [n * T, d] per module, rows in window order, stored as `dtype`
    (bfloat16 halves the memory of a large cache: 30 layers x 32 k tokens x 576 is 1.1 GB in float32).

    Forward hooks on the modules themselves, so the inputs are exactly what their forward gets (a norm's
    output for an MLP, the last residual stream for the final norm) whatever the model's code does around
    them. The LM head is not run (`body`).
    """
    ins: list[list[torch.Tensor]] = [[] for _ in modules]
    outs: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook(i):
        def fn(mod, args, out):
            ins[i].append(args[0].detach().to(dtype).reshape(-1, args[0].shape[-1]))
            if outputs:
                outs[i].append(out.detach().to(dtype).reshape(-1, out.shape[-1]))
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        run = body(model)
        for s in range(0, len(blocks), batch_size):
            run(input_ids=blocks[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    got = [torch.cat(x) for x in ins]
    return (got, [torch.cat(x) for x in outs]) if outputs else got


__all__ = ["INSTALL_GGUF", "NAMED_MODELS", "SOURCES", "SUPPORTED_GGUF_ARCHS", "SUPPORTED_MODEL_TYPES",
           "Pretrained", "PretrainedError", "body", "final_norm", "gguf_architecture", "lm_loss", "load_pretrained",
           "mlp_norm", "record", "text_blocks", "tokenize_blocks"]
