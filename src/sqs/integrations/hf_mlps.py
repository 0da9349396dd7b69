"""Find every gated MLP of a Hugging Face model, by its structure.

A gated MLP computes ``down(act(gate(x)) * up(x))``. Hugging Face models store it in
three layouts, all handled here:

* ``split``: three linear layers, ``gate_proj``, ``up_proj``, ``down_proj`` (Llama and most others);
* ``packed``: one linear layer whose output is ``[gate | up]`` (Phi-3's ``gate_up_proj``,
  GraniteMoeShared's ``input_linear``), then the down projection;
* ``experts``: an MoE expert bank, 3-D parameters ``gate_up_proj`` (experts, 2 I, d) laid out
  ``[gate | up]`` per expert and ``down_proj`` (experts, d, I), with transformers' expert
  dispatch (``@use_experts_implementation``) calling ``_apply_gate`` on the packed output.

How a module is recognised (`find_gated_mlps`):

1. Its class is in the dispatch table `FAMILIES` (by ``model_type``; each entry tested against
   the supported transformers versions): the layout is known. Its attributes are still checked.
2. Otherwise its attributes fit one of the layouts: then a probe runs the class's own forward on
   three random rows and compares it with the layout's formula, so a module that merely *has*
   gate/up/down projections but computes something else is never taken for a gated MLP. An
   expert bank is recognised when its ``_apply_gate`` is transformers' default, which is exactly
   ``act(gate) * up``.
3. Anything else that looks like an MLP (class name ending in MLP/Experts, or typical projection
   names) is refused, with the reason: never a silent no-op, never a silent wrong gate.

Multimodal models: when the config has sub-models besides the text one (a vision or audio
tower), only the language model (``model.get_decoder()``) is searched; the towers are listed
as left alone.

This is the structural view issue 21 (converting a pretrained SwiGLU model to SQS by annealing
the gate) builds on: `GatedMLP` gives the module path, the layout, the gate/up/down tensors and
the activation, and `GatedMLP.set_act` swaps the activation in place.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from sqs.nn import SQS

try:
    from transformers.integrations import moe as _hf_moe
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sqs.integrations.hf_mlps needs the `transformers` package; install it with: "
                      "pip install 'sqs[hf]'") from e

SPLIT, PACKED, EXPERTS = "split", "packed", "experts"
#: Config entries a family may build its MLP activation from.
ACT_KEYS = ("hidden_act", "hidden_activation")


@dataclass(frozen=True)
class Layout:
    """Attribute names of one gated-MLP layout. ``packed`` holds ``[gate | up]`` (or ``[up | gate]``
    when ``gate_first`` is False) for the packed and expert layouts; ``gate``/``up`` for split."""

    kind: str
    down: str
    act: str
    gate: str | None = None
    up: str | None = None
    packed: str | None = None
    gate_first: bool = True


LLAMA_LAYOUT = Layout(SPLIT, down="down_proj", act="act_fn", gate="gate_proj", up="up_proj")
PHI3_LAYOUT = Layout(PACKED, down="down_proj", act="activation_fn", packed="gate_up_proj")
GRANITE_SHARED_LAYOUT = Layout(PACKED, down="output_linear", act="activation", packed="input_linear")
EXPERTS_LAYOUT = Layout(EXPERTS, down="down_proj", act="act_fn", packed="gate_up_proj")


@dataclass(frozen=True)
class Family:
    """One model family: where its classes live, which of them are gated MLPs, and which config
    entry builds their activation."""

    module: str                                # transformers.models.<module>.modeling_<module>
    classes: tuple[tuple[str, Layout], ...]    # (class name, layout)
    act_key: str = "hidden_act"
    model_types: tuple[str, ...] = ()          # config.model_type values (default: the family's name)


def _llama_like(module: str, cls: str, **kw) -> Family:
    return Family(module, ((cls, LLAMA_LAYOUT),), **kw)


#: The dispatch table: model_type -> family. Every entry has a per-family test in tests/test_hf.py
#: (logits and gradients against the library's own forward with SQS as its activation).
FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama", "LlamaMLP"),
    "mistral": _llama_like("mistral", "MistralMLP"),
    "qwen2": _llama_like("qwen2", "Qwen2MLP"),
    "qwen3": _llama_like("qwen3", "Qwen3MLP"),
    "qwen2_moe": Family("qwen2_moe", (("Qwen2MoeMLP", LLAMA_LAYOUT), ("Qwen2MoeExperts", EXPERTS_LAYOUT))),
    "qwen3_moe": Family("qwen3_moe", (("Qwen3MoeMLP", LLAMA_LAYOUT), ("Qwen3MoeExperts", EXPERTS_LAYOUT))),
    "mixtral": Family("mixtral", (("MixtralExperts", EXPERTS_LAYOUT),)),
    "gemma": _llama_like("gemma", "GemmaMLP"),
    "gemma2": _llama_like("gemma2", "Gemma2MLP", act_key="hidden_activation"),
    "gemma3": _llama_like("gemma3", "Gemma3MLP", act_key="hidden_activation", model_types=("gemma3_text", "gemma3")),
    "phi3": Family("phi3", (("Phi3MLP", PHI3_LAYOUT),)),
    "olmo": _llama_like("olmo", "OlmoMLP"),
    "olmo2": _llama_like("olmo2", "Olmo2MLP"),
    "granite": _llama_like("granite", "GraniteMLP"),
    "granitemoe": Family("granitemoe", (("GraniteMoeExperts", EXPERTS_LAYOUT),)),
    "smollm3": _llama_like("smollm3", "SmolLM3MLP"),
}


@functools.lru_cache(maxsize=None)
def known_classes() -> dict[type, tuple[str, Layout, str]]:
    """class -> (family, layout, config key) for the table's classes the installed transformers has."""
    out = {}
    for name, fam in FAMILIES.items():
        try:
            mod = importlib.import_module(f"transformers.models.{fam.module}.modeling_{fam.module}")
        except ImportError:
            continue
        for cls_name, layout in fam.classes:
            cls = getattr(mod, cls_name, None)
            if cls is not None:
                out[cls] = (name, layout, fam.act_key)
    return out


def family_of_class(cls: type) -> tuple[str, Layout, str] | None:
    return known_classes().get(cls)


def supported_families() -> list[str]:
    """The dispatch table's families the installed transformers has."""
    return sorted({f for f, _, _ in known_classes().values()})


class GatedWeights(NamedTuple):
    """Detached views of a gated MLP's weights (they share storage with the parameters).

    Shapes: gate and up (I, d), down (d, I); for an expert bank a leading experts axis,
    (E, I, d) and (E, d, I). Biases are None where the layers have none.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class GatedMLP:
    """One gated MLP found in a model: ``down(act(gate(x)) * up(x))``."""

    path: str                 # module path in the model, e.g. "model.layers.0.mlp"
    module: nn.Module
    layout: Layout
    family: str | None        # the dispatch table's family, or None when recognised by structure (probe-verified)
    config_key: str | None    # the config entry that builds its activation, when known

    @property
    def act(self) -> nn.Module:
        return getattr(self.module, self.layout.act)

    def set_act(self, act: nn.Module) -> None:
        """Replace the activation module (the gate) in place; weights and forward stay."""
        setattr(self.module, self.layout.act, act)

    @property
    def kind(self) -> str:
        return self.layout.kind

    def weights(self) -> GatedWeights:
        """gate, up, down as detached views, whatever the layout (see `GatedWeights` for shapes)."""
        m, lay = self.module, self.layout
        down = getattr(m, lay.down)
        if lay.kind == SPLIT:
            g, u = getattr(m, lay.gate), getattr(m, lay.up)
            return GatedWeights(g.weight.detach(), u.weight.detach(), down.weight.detach(), _bias(g), _bias(u),
                                _bias(down))
        packed = getattr(m, lay.packed)
        if lay.kind == EXPERTS:  # nn.Parameter (E, 2I, d) and (E, d, I)
            first, second = packed.detach().chunk(2, dim=-2)
            gate, up = (first, second) if lay.gate_first else (second, first)
            return GatedWeights(gate, up, down.detach())
        first, second = packed.weight.detach().chunk(2, dim=0)
        gate, up = (first, second) if lay.gate_first else (second, first)
        b = _bias(packed)
        gb, ub = (None, None) if b is None else (b.chunk(2) if lay.gate_first else b.chunk(2)[::-1])
        return GatedWeights(gate, up, down.weight.detach(), gb, ub, _bias(down))


def _bias(lin: nn.Module) -> torch.Tensor | None:
    b = getattr(lin, "bias", None)
    return None if b is None else b.detach()


@dataclass
class MLPScan:
    """What `scan_mlps` found: gated MLPs, modules refused (path, reason), subtrees left alone (path, reason)."""

    found: list[GatedMLP] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)


class NotAGatedMLP(ValueError):
    """A module that looks like an MLP is not one sqs can treat as down(act(gate(x)) * up(x))."""


# --- what counts as "looks like an MLP" -------------------------------------------------------------------

_MLP_NAME_ENDINGS = ("MLP", "Mlp", "Experts", "FeedForward", "FFN", "Ffn")
_MLP_ATTRS = ("gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "wi", "wi_0", "w1", "dense_h_to_4h",
              "input_linear")
_ACT_ATTRS = ("act_fn", "activation_fn", "activation", "act")


def looks_like_mlp(mod: nn.Module) -> bool:
    return type(mod).__name__.endswith(_MLP_NAME_ENDINGS) or any(hasattr(mod, a) for a in _MLP_ATTRS)


def _linear(mod: nn.Module, name: str | None) -> nn.Module | None:
    """The projection `name` of `mod`: an nn.Linear, or a module standing in for one (a LoRA or quantised
    wrapper with in_features/out_features), which the fused path then calls as a module."""
    m = getattr(mod, name, None) if name else None
    if isinstance(m, nn.Linear):
        return m
    if isinstance(m, nn.Module) and isinstance(getattr(m, "in_features", None), int) and isinstance(
            getattr(m, "out_features", None), int):
        return m
    return None


def _shape(lin: nn.Module) -> tuple[int, int]:
    return lin.out_features, lin.in_features


def _act_attr(mod: nn.Module) -> str | None:
    names = [a for a in _ACT_ATTRS if isinstance(getattr(mod, a, None), nn.Module)]
    return names[0] if len(names) == 1 else None


# --- checks of a layout's attributes ----------------------------------------------------------------------

def _check_layout(mod: nn.Module, lay: Layout) -> str | None:
    """None when `mod` has `lay`'s attributes with consistent shapes, else what is wrong."""
    if not isinstance(getattr(mod, lay.act, None), nn.Module):
        return f"no activation module `{lay.act}`"
    if lay.kind == EXPERTS:
        return _check_experts(mod, lay)
    down = _linear(mod, lay.down)
    if down is None:
        return f"no nn.Linear `{lay.down}`"
    if lay.kind == SPLIT:
        g, u = _linear(mod, lay.gate), _linear(mod, lay.up)
        if g is None or u is None:
            return f"no nn.Linear `{lay.gate}` and `{lay.up}`"
        if not (_shape(g) == _shape(u) and down.in_features == g.out_features and down.out_features == g.in_features):
            return f"shapes do not chain: {lay.gate} {_shape(g)}, {lay.up} {_shape(u)}, {lay.down} {_shape(down)}"
        return None
    p = _linear(mod, lay.packed)
    if p is None:
        return f"no nn.Linear `{lay.packed}`"
    if p.out_features != 2 * down.in_features or down.out_features != p.in_features:
        return f"shapes do not chain: {lay.packed} {_shape(p)}, {lay.down} {_shape(down)}"
    return None


def _check_experts(mod: nn.Module, lay: Layout) -> str | None:
    """An expert bank sqs can fuse: packed [gate | up] experts dispatched by transformers (which calls
    ``_apply_gate`` on the packed output), with the default gate (act(gate) * up) and no biases."""
    gu, down = getattr(mod, lay.packed, None), getattr(mod, lay.down, None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3):
        return f"no 3-D parameters `{lay.packed}` and `{lay.down}`"
    if not (getattr(mod, "has_gate", False) and getattr(mod, "is_concatenated", False)):
        return "not a gated, concatenated [gate | up] expert bank (has_gate / is_concatenated)"
    if getattr(mod, "is_transposed", False) or getattr(mod, "has_bias", False):
        return "a transposed or biased expert bank (not supported)"
    gate_fn = getattr(type(mod), "_apply_gate", None)
    if getattr(gate_fn, "_sqs_replaces", gate_fn) is not _hf_moe._default_apply_gate:
        return f"{type(mod).__name__}._apply_gate is not transformers' act(gate) * up"
    e, two_i, d = gu.shape
    if two_i % 2 or down.shape != (e, d, two_i // 2):
        return f"shapes do not chain: {lay.packed} {tuple(gu.shape)}, {lay.down} {tuple(down.shape)}"
    return None


# --- the probe for modules recognised by structure alone ---------------------------------------------------

def library_forward(mod: nn.Module) -> Callable:
    """The class's own forward (the one before any sqs class patch)."""
    fwd = type(mod).forward
    return getattr(fwd, "_sqs_replaces", fwd)


def formula(mod: nn.Module, lay: Layout, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) from the layout's parts (split and packed layouts)."""
    down = getattr(mod, lay.down)
    if lay.kind == SPLIT:
        return down(act(getattr(mod, lay.gate)(x)) * getattr(mod, lay.up)(x))
    first, second = getattr(mod, lay.packed)(x).chunk(2, dim=-1)
    gate, up = (first, second) if lay.gate_first else (second, first)
    return down(act(gate) * up)


def probe(mod: nn.Module, lay: Layout) -> bool | None:
    """Does the class's forward compute `formula` on three random rows? None when it cannot be told
    (weights not materialised yet, or all outputs zero).

    Both sides run with the same stand-in activation (an SQS gate: nonlinear and odd, so a swapped
    gate and up, or a missing product, shows), whatever the module holds; only the structure is tested.
    """
    params = list(mod.parameters())
    if not params or any(p.is_meta for p in params):
        return None
    w = params[0]
    d_in = getattr(mod, lay.gate or lay.packed).in_features
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, d_in, generator=gen).to(device=w.device, dtype=w.dtype)
    saved_act = getattr(mod, lay.act)
    modes = [(m, m.training) for m in mod.modules()]
    try:
        setattr(mod, lay.act, SQS(c=0.1, lam=0.5, p=1.0))
        mod.eval()
        with torch.no_grad():
            want = library_forward(mod)(mod, x)
            got = formula(mod, lay, x, getattr(mod, lay.act))
    except Exception:  # a forward that needs other arguments is not a plain gated MLP
        return False
    finally:
        setattr(mod, lay.act, saved_act)
        for m, training in modes:
            m.training = training
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return False
    if not bool(got.abs().amax() > 0):
        return None
    tol = 1e-5 if want.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.allclose(want.float(), got.float(), rtol=tol, atol=tol * float(got.abs().amax())))


def _structural_layouts(mod: nn.Module) -> list[Layout]:
    """Layouts whose attributes `mod` has (candidates, not yet verified)."""
    act = _act_attr(mod)
    if act is None:
        return []
    out = []
    if _linear(mod, "gate_proj") and _linear(mod, "up_proj") and _linear(mod, "down_proj"):
        out.append(Layout(SPLIT, down="down_proj", act=act, gate="gate_proj", up="up_proj"))
    for packed, down in (("gate_up_proj", "down_proj"), ("input_linear", "output_linear")):
        if _linear(mod, packed) and _linear(mod, down):
            out += [Layout(PACKED, down=down, act=act, packed=packed),
                    Layout(PACKED, down=down, act=act, packed=packed, gate_first=False)]
    if isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter) and act == "act_fn":
        out.append(EXPERTS_LAYOUT)
    return out


def recognise(mod: nn.Module) -> tuple[Layout, str | None, str | None] | str:
    """(layout, family, config key) for a gated MLP, or the reason it is not one."""
    known = family_of_class(type(mod))
    if known is not None:
        fam, lay, key = known
        problem = _check_layout(mod, lay)
        return (lay, fam, key) if problem is None else f"{type(mod).__name__} ({fam}): {problem}"
    candidates = [lay for lay in _structural_layouts(mod) if _check_layout(mod, lay) is None]
    if not candidates:
        return f"{type(mod).__name__} is not a gated MLP (no gate, up and down projections with an activation)"
    unverifiable = False
    for lay in candidates:
        if lay.kind == EXPERTS:
            return lay, None, None  # _check_experts pinned _apply_gate to transformers' act(gate) * up
        ok = probe(mod, lay)
        if ok:
            return lay, None, None
        unverifiable |= ok is None
    if unverifiable:
        return (f"{type(mod).__name__} has gate/up/down projections, but its weights are not loaded yet, so sqs "
                "cannot check that it computes down(act(gate(x)) * up(x)); call apply_sqs(model) after loading")
    return (f"{type(mod).__name__} has gate/up/down projections, but its forward does not compute "
            "down(act(gate(x)) * up(x)) (checked on random inputs)")


# --- scope: the language model of a multimodal model -------------------------------------------------------

def _is_composite(config: Any) -> bool:
    return config is not None and getattr(config, "text_config", None) is not None and any(
        getattr(config, k, None) is not None for k in ("vision_config", "audio_config", "speech_config"))


def language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the part whose MLPs sqs patches: the decoder of a multimodal model, else the model."""
    if _is_composite(getattr(model, "config", None)) and hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        for name, m in model.named_modules():
            if m is dec:
                return name, m
    return "", model


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _config_key(act: nn.Module, config: Any) -> str | None:
    """Which config entry built `act` (for a module recognised by structure), when exactly one fits."""
    from transformers.activations import ACT2CLS

    hits = []
    for key in ACT_KEYS:
        name = getattr(config, key, None) if config is not None else None
        cls = ACT2CLS.get(name) if isinstance(name, str) else None
        cls = cls[0] if isinstance(cls, tuple) else cls
        if (cls is not None and isinstance(act, cls)) or (name == "sqs" and isinstance(act, SQS)):
            hits.append(key)
    return hits[0] if len(hits) == 1 else None


def scan_mlps(model: nn.Module) -> MLPScan:
    """Every gated MLP of the model's language part, the MLP-like modules refused, and what was left alone."""
    scope_path, scope = language_model(model)
    out = MLPScan()
    if scope is not model:
        towers = {}
        for name, m in model.named_modules():
            if name == scope_path or name.startswith(scope_path + ".") or not looks_like_mlp(m):
                continue
            top = name.split(".")
            common = scope_path.split(".")
            i = next((k for k, (a, b) in enumerate(zip(top, common)) if a != b), len(common))
            towers.setdefault(".".join(top[:i + 1]), set()).add(type(m).__name__)
        out.left_alone += [(t, f"not the language model (multimodal: {', '.join(sorted(c))} left as they are)")
                           for t, c in towers.items()]
    config = getattr(scope, "config", None) or getattr(model, "config", None)
    taken: list[str] = []
    for name, m in scope.named_modules():
        path = _join(scope_path, name)
        if any(path.startswith(t + ".") for t in taken):
            continue
        if not (looks_like_mlp(m) or family_of_class(type(m)) or _structural_layouts(m)):
            continue
        got = recognise(m)
        if isinstance(got, str):
            if looks_like_mlp(m):
                out.refused.append((path or "(the model)", got))
            continue
        lay, fam, key = got
        out.found.append(GatedMLP(path, m, lay, fam, key or _config_key(getattr(m, lay.act), config)))
        taken.append(path)
    return out


def find_gated_mlps(model: nn.Module, strict: bool = True) -> list[GatedMLP]:
    """Every gated MLP of the model (its language model, for a multimodal one), in module order.

    strict=True raises `NotAGatedMLP` naming the first MLP-like module that is not a gated MLP sqs
    can treat (e.g. GPT-2's fc/gelu MLP), or when there is none at all; strict=False returns what
    it found and skips the rest.
    """
    scan = scan_mlps(model)
    if strict:
        if scan.refused:
            path, why = scan.refused[0]
            raise NotAGatedMLP(f"{why} (at {path}); sqs handles gated MLPs down(act(gate(x)) * up(x)) of the "
                               f"families {', '.join(supported_families())} and any module with that structure")
        if not scan.found:
            raise NotAGatedMLP(f"no gated MLP in {type(model).__name__}; sqs handles down(act(gate(x)) * up(x)) "
                               f"MLPs (families: {', '.join(supported_families())})")
    return scan.found


__all__ = ["EXPERTS", "FAMILIES", "PACKED", "SPLIT", "Family", "GatedMLP", "GatedWeights", "Layout", "MLPScan",
           "NotAGatedMLP", "find_gated_mlps", "known_classes", "language_model", "looks_like_mlp", "recognise",
           "scan_mlps", "supported_families"]
