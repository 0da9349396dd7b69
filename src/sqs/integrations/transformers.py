"""SQS in Hugging Face transformers' gated MLPs, with the fused kernel.

A Llama-style MLP computes ``down(act(gate(x)) * up(x))``. Setting ``act`` to
`sqs.nn.SQS` gives the SQS-GLU but evaluates the product unfused (the gate's
output and the product each take a pass over memory, and autograd keeps them).
This module makes those MLPs call the fused op instead, ``down(sqs_glu(up(x),
gate(x)))`` (in training with up and gate in one matmul feeding the packed op,
`sqs.ops.sqs_glu_packed`), with the same parameters and state-dict keys
(Liger-Kernel's idea, for the SQS gate):

    from sqs.integrations.transformers import register, apply_sqs, to_sqs
    register()                                   # hidden_act="sqs" builds fused SQS models
    model = LlamaForCausalLM(LlamaConfig(hidden_act="sqs", sqs={"c": 0.01, "lam": 0.5, "p": 1.0}))
    apply_sqs(model)                             # fuse an SQS model built some other way
    to_sqs(model)                                # SwiGLU/GELU model -> SQS (warns: needs fine-tuning)

How the parameters travel: transformers builds activations from a name alone
(``ACT2FN[config.hidden_act]``), so c, lambda and p cannot reach the activation that
way. `register` therefore patches the supported MLP classes (as Liger patches the
modeling modules): their ``__init__`` reads ``config.sqs`` and writes the full dict
back, so `save_pretrained` stores it and `from_pretrained` rebuilds the same gate;
their ``forward`` takes the fused path whenever the activation is an `SQS` module and
runs the library's own forward otherwise (other gates are untouched).

Without `register` (or with transformers older than the range below), building a
model whose config says ``hidden_act="sqs"`` fails inside transformers with
``KeyError: 'sqs'``; the fix is ``from sqs.integrations.transformers import register;
register()`` before building or loading the model. A name reaching an MLP class this
module does not patch fails at the first forward with a message listing the supported
classes, rather than silently ignoring ``config.sqs``.

Under an outer ``torch.compile`` the patched forward writes the gate as one autograd
Function (`sqs.functional.sqs`) times ``up(x)``, so Inductor fuses it into the
surrounding graph; the op's own compiled kernels would otherwise break that graph.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import activations as _hf_activations
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sqs.integrations.transformers needs the `transformers` package; "
                      "install it with: pip install 'sqs[hf]'") from e
from packaging.version import InvalidVersion, Version

from sqs.functional import DEFAULT_C, DEFAULT_LAM, DEFAULT_P, check_sqs_params
from sqs.nn import SQS
from sqs.ops import sqs_glu, sqs_glu_packed

#: The name used in ``config.hidden_act``.
SQS_NAME = "sqs"
#: transformers versions whose gated-MLP classes this module was written against: [MIN, MAX).
MIN_TRANSFORMERS, MAX_TRANSFORMERS = "5.0", "6.0"
#: The version the tests ran on.
TESTED_TRANSFORMERS = "5.24.0"

_PARAM_KEYS = ("c", "lam", "p")


@dataclass(frozen=True)
class Family:
    """Where a model family's gated MLP lives and how it is laid out."""

    module: str          # transformers.models.<module>.modeling_<module>
    mlp: str             # the MLP class name
    act: str             # the attribute holding the activation module
    packed: bool = False  # one gate_up_proj = [gate | up] (Phi-3) instead of gate_proj and up_proj


#: Families whose MLP forward is exactly down(act(gate(x)) * up(x)) (or Phi-3's packed form).
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaMLP", "act_fn"),
    "mistral": Family("mistral", "MistralMLP", "act_fn"),
    "qwen2": Family("qwen2", "Qwen2MLP", "act_fn"),
    "qwen3": Family("qwen3", "Qwen3MLP", "act_fn"),
    "gemma": Family("gemma", "GemmaMLP", "act_fn"),
    "granite": Family("granite", "GraniteMLP", "act_fn"),
    "olmo": Family("olmo", "OlmoMLP", "act_fn"),
    "phi3": Family("phi3", "Phi3MLP", "activation_fn", packed=True),
}


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a transformers version outside the supported range, naming it and the fix.

    Why refuse rather than try: the patch replaces the MLP classes' forward; if a future
    release changed that forward, patching it would silently compute something else.
    """
    found = version or transformers.__version__
    try:
        ok = Version(MIN_TRANSFORMERS) <= Version(found) < Version(MAX_TRANSFORMERS)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(
            f"sqs.integrations.transformers supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS} "
            f"(tested with {TESTED_TRANSFORMERS}); found {found}. Its gated-MLP classes may differ there, so sqs "
            f"will not patch them; install a supported version: pip install 'transformers>={MIN_TRANSFORMERS},"
            f"<{MAX_TRANSFORMERS}'")


@functools.lru_cache(maxsize=None)
def _mlp_classes() -> dict[type, Family]:
    """The supported MLP classes the installed transformers has (older ones lack some families)."""
    out = {}
    for fam in FAMILIES.values():
        try:
            mod = importlib.import_module(f"transformers.models.{fam.module}.modeling_{fam.module}")
        except ImportError:
            continue
        cls = getattr(mod, fam.mlp, None)
        if cls is not None:
            out[cls] = fam
    return out


def supported_mlp_classes() -> list[str]:
    """Names of the MLP classes `apply_sqs` can patch in the installed transformers."""
    return [c.__name__ for c in _mlp_classes()]


def sqs_params(config: Any) -> dict[str, float]:
    """c, lam, p from ``config.sqs`` (missing keys: the paper's defaults), validated."""
    given = getattr(config, "sqs", None) or {}
    if not isinstance(given, dict):
        raise TypeError(f"config.sqs must be a dict with keys c, lam, p; got {type(given).__name__}")
    unknown = sorted(set(given) - set(_PARAM_KEYS))
    if unknown:
        raise ValueError(f"config.sqs: unknown key(s) {unknown}; valid keys: c, lam, p")
    out = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P, **{k: float(v) for k, v in given.items()}}
    check_sqs_params(**out)
    return out


class SQSFromName(nn.Module):
    """What ``ACT2FN["sqs"]`` builds: a placeholder the patched MLP classes replace.

    The name alone cannot carry c, lam, p; a module built from it outside a patched MLP
    would use defaults while ``config.sqs`` says otherwise, so it refuses to run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "sqs: hidden_act='sqs' reached a module that sqs.integrations.transformers does not patch, so "
            f"config.sqs (c, lam, p) cannot reach it; supported MLP classes: {', '.join(supported_mlp_classes())}")


def _gated(w: torch.Tensor, v: torch.Tensor, act: SQS) -> torch.Tensor:
    """w * sqs(v) with the fused op (which, under an outer torch.compile, hands Inductor the plain math)."""
    return sqs_glu(w, v, act.c, act.lam, act.p)


def _gated_packed(x: torch.Tensor, act: SQS) -> torch.Tensor:
    """`_gated` for x = [w | v] straight out of one projection."""
    return sqs_glu_packed(x, act.c, act.lam, act.p)


def _plain_linear(*mods: nn.Module) -> bool:
    # Exactly nn.Linear: a LoRA, quantised or otherwise wrapped layer must run its own forward.
    return all(type(m) is nn.Linear for m in mods)


def _pack_rows(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor,
               b_first: torch.Tensor | None, b_second: torch.Tensor | None) -> torch.Tensor:
    """x @ [W1; W2].T (+ [b1; b2]): both branches from one matmul, output laid out [first | second]."""
    bias = None if b_first is None else torch.cat([b_first, b_second])
    return F.linear(x, torch.cat([w_first, w_second]), bias)


def _sqs_mlp(self, x: torch.Tensor, fam: Family, act: SQS) -> torch.Tensor:
    """down(sqs_glu(up(x), gate(x))), with up and gate in one matmul when that is cheaper.

    Why pack: one matmul yields [up | gate] = [w | v], the packed op reads it in place and
    returns its gradient in one piece, and backward then needs one matmul for x's gradient
    instead of two and a sum. The price is a copy of the two weight matrices per call,
    small against the activations once there are at least as many tokens as input
    features (training); with fewer (decoding one token) the two matmuls run as they are.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if fam.packed:
        proj = self.gate_up_proj
        if rows >= x.shape[-1] and _plain_linear(proj):  # Phi-3 packs [gate | up]: swap to [up | gate]
            h = proj.out_features // 2
            b = proj.bias
            return self.down_proj(_gated_packed(_pack_rows(
                x, proj.weight[h:], proj.weight[:h], None if b is None else b[h:], None if b is None else b[:h]), act))
        v, w = proj(x).chunk(2, dim=-1)
        return self.down_proj(_gated(w, v, act))
    up, gate = self.up_proj, self.gate_proj
    if rows >= x.shape[-1] and _plain_linear(up, gate):
        return self.down_proj(_gated_packed(_pack_rows(x, up.weight, gate.weight, up.bias, gate.bias), act))
    return self.down_proj(_gated(up(x), gate(x), act))


def _make_forward(fam: Family, original: Callable) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = getattr(self, fam.act)
        if not isinstance(act, SQS) or not getattr(self, "_sqs_fused", True):
            return original(self, x)
        return _sqs_mlp(self, x, fam, act)

    forward.__doc__ = f"down(sqs_glu(up(x), gate(x))) when `{fam.act}` is SQS, else the original forward."
    return forward


def _make_init(fam: Family, original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        if getattr(config, "hidden_act", None) == SQS_NAME:
            params = sqs_params(config)
            config.sqs = params  # the full dict, so save_pretrained records the defaults too
            setattr(self, fam.act, SQS(**params))

    return __init__


_originals: dict[type, tuple[Callable, Callable]] = {}


def _resolve_family(family: str | type) -> tuple[Family, type]:
    classes = _mlp_classes()
    if isinstance(family, type):
        if family not in classes:
            raise ValueError(f"apply_sqs_to_class: {family.__name__} is not a gated MLP class sqs knows; "
                             f"supported: {', '.join(supported_mlp_classes())}")
        return classes[family], family
    fam = FAMILIES.get(str(family).lower())
    cls = next((c for c, f in classes.items() if f == fam), None)
    if cls is None:
        raise ValueError(f"apply_sqs_to_class: unknown or unavailable family {family!r}; available in this "
                         f"transformers: {', '.join(f for f in FAMILIES if FAMILIES[f] in classes.values())}")
    return fam, cls


def apply_sqs_to_class(family: str | type) -> type:
    """Patch one family's MLP class before models are built (e.g. ``"llama"`` or ``LlamaMLP``).

    After this, a model of that family built with ``hidden_act="sqs"`` reads c, lam, p from
    ``config.sqs`` and runs the fused op; other activations run the original forward.
    Idempotent; `unregister` undoes it.
    """
    check_transformers_version()
    fam, cls = _resolve_family(family)
    if cls not in _originals:
        _originals[cls] = (cls.__init__, cls.forward)
        cls.__init__ = _make_init(fam, cls.__init__)
        cls.forward = _make_forward(fam, cls.forward)
    return cls


def register() -> None:
    """Add ``"sqs"`` to transformers' activation table and patch every supported MLP class.

    Call once before building or loading a model whose config says ``hidden_act="sqs"``.
    Idempotent.
    """
    check_transformers_version()
    _hf_activations.ACT2CLS[SQS_NAME] = SQSFromName
    _hf_activations.ACT2FN[SQS_NAME] = SQSFromName  # ACT2FN is a copy of ACT2CLS, not a view
    for cls in _mlp_classes():
        apply_sqs_to_class(cls)


def unregister() -> None:
    """Undo `register` and every `apply_sqs_to_class` (models already built keep their SQS modules)."""
    _hf_activations.ACT2CLS.pop(SQS_NAME, None)
    _hf_activations.ACT2FN.pop(SQS_NAME, None)
    for cls, (init, fwd) in list(_originals.items()):
        cls.__init__, cls.forward = init, fwd
        del _originals[cls]


def is_registered() -> bool:
    return SQS_NAME in _hf_activations.ACT2FN


def _looks_like_mlp(mod: nn.Module) -> bool:
    return type(mod).__name__.endswith("MLP") or any(hasattr(mod, a) for a in ("gate_proj", "up_proj", "gate_up_proj"))


def _find_mlps(model: nn.Module, caller: str) -> list[tuple[str, nn.Module, Family]]:
    """Every supported gated MLP in `model`; an MLP of another class is refused by name."""
    classes = _mlp_classes()
    found = []
    for name, mod in model.named_modules():
        fam = classes.get(type(mod))
        if fam is not None:
            found.append((name, mod, fam))
        elif _looks_like_mlp(mod):
            raise ValueError(f"{caller}: {type(mod).__name__} (at {name or 'the root'}) is not a gated MLP "
                             f"sqs.integrations.transformers knows; supported: {', '.join(supported_mlp_classes())}")
    if not found:
        raise ValueError(f"{caller}: no gated MLP in {type(model).__name__}; supported MLP classes: "
                         f"{', '.join(supported_mlp_classes())}")
    return found


def _choose_params(model: nn.Module, mlps: list, given: dict[str, float | None], caller: str) -> dict[str, float]:
    """Explicit arguments, else the MLPs' own SQS modules, else config.sqs, else the paper's defaults."""
    current = {(a.c, a.lam, a.p) for _, m, f in mlps if isinstance(a := getattr(m, f.act), SQS)}
    if len(current) > 1:
        raise ValueError(f"{caller}: the MLPs use different SQS parameters {sorted(current)}; pass c, lam, p "
                         "explicitly to set one value for all")
    if current:
        base = dict(zip(_PARAM_KEYS, current.pop()))
    elif getattr(getattr(model, "config", None), "hidden_act", None) == SQS_NAME:
        base = sqs_params(model.config)
    else:
        base = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P}
    out = {k: float(v) if v is not None else base[k] for k, v in given.items()}
    check_sqs_params(**out)
    return out


def _patch(model: nn.Module, fused: bool, given: dict, allow_new_gate: bool, caller: str) -> list[str]:
    """Set every MLP's gate to SQS(params), fused or not; return the gates that changed function."""
    check_transformers_version()
    register()  # the patched classes carry the fused forward; the model will save as hidden_act="sqs"
    mlps = _find_mlps(model, caller)
    changed = [f"{type(m).__name__}.{f.act}={type(getattr(m, f.act)).__name__}" for _, m, f in mlps
               if not isinstance(getattr(m, f.act), (SQS, SQSFromName))]
    if changed and not allow_new_gate:
        name, mod, fam = next((n, m, f) for n, m, f in mlps if not isinstance(getattr(m, f.act), (SQS, SQSFromName)))
        raise ValueError(
            f"{caller}: {type(mod).__name__} at {name} gates with {type(getattr(mod, fam.act)).__name__}, not SQS; "
            "apply_sqs keeps the model's function and only fuses an SQS model's MLPs. To turn a SwiGLU/GELU "
            "model into an SQS one, use to_sqs(model)")
    params = _choose_params(model, mlps, given, caller)
    configs = {id(model.config): model.config} if hasattr(model, "config") else {}
    for _, mod, fam in mlps:
        setattr(mod, fam.act, SQS(**params))
        mod._sqs_fused = bool(fused)
        if getattr(mod, "config", None) is not None:
            configs[id(mod.config)] = mod.config
    for cfg in configs.values():  # saves as what it now computes
        cfg.hidden_act = SQS_NAME
        cfg.sqs = dict(params)
    return sorted(set(changed))


def apply_sqs(model: nn.Module, *, fused: bool = True, c: float | None = None, lam: float | None = None,
              p: float | None = None) -> nn.Module:
    """Make every gated MLP of an SQS model compute down(sqs_glu(up(x), gate(x))), in place.

    Parameters and state-dict keys stay as they are; only the forward changes. c, lam, p
    default to the model's own (its SQS modules, else ``config.sqs``, else the paper's
    c=0.01, lam=0.5, p=1); given values set every MLP and the config. ``fused=False`` keeps
    SQS but runs the library's unfused forward (the reference the fused path is tested
    against). Refuses an MLP class it does not know, and an MLP whose gate is not SQS
    (that would change the function: use `to_sqs`). Returns the model.
    """
    _patch(model, fused, {"c": c, "lam": lam, "p": p}, allow_new_gate=False, caller="apply_sqs")
    return model


def to_sqs(model: nn.Module, *, fused: bool = True, c: float | None = None, lam: float | None = None,
           p: float | None = None) -> nn.Module:
    """Turn a SwiGLU/GELU-gated model into an SQS one for continued training, in place.

    Same weights; each MLP's gate becomes SQS(c, lam, p) (the fused path unless
    ``fused=False``) and the config says ``hidden_act="sqs"``, so `save_pretrained` writes
    an SQS model. The function changes, so a warning says it needs fine-tuning.
    """
    changed = _patch(model, fused, {"c": c, "lam": lam, "p": p}, allow_new_gate=True, caller="to_sqs")
    if changed:
        warnings.warn(f"to_sqs: the MLP gates changed ({', '.join(changed)} -> SQS), so the model computes a "
                      "different function until it is fine-tuned", UserWarning, stacklevel=2)
    return model


__all__ = ["FAMILIES", "MAX_TRANSFORMERS", "MIN_TRANSFORMERS", "SQS_NAME", "TESTED_TRANSFORMERS", "SQSFromName",
           "apply_sqs", "apply_sqs_to_class", "check_transformers_version", "is_registered", "register",
           "sqs_params", "supported_mlp_classes", "to_sqs", "unregister"]
