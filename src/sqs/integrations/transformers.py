"""SQS in Hugging Face transformers models: every gated MLP, the fused kernel, safe loading.

A gated MLP computes ``down(act(gate(x)) * up(x))``. With ``act`` an `sqs.nn.SQS` module that
is the SQS-GLU, unfused. This module finds every such MLP by its structure (`find_gated_mlps`:
a dispatch table of tested families, then a probe-verified structural fallback; MoE expert banks
and shared experts included) and makes it run the fused op, per model instance:

    from sqs.integrations.transformers import AutoSQSForCausalLM, apply_sqs, to_sqs, register

    model = AutoSQSForCausalLM.from_pretrained(path)   # a saved SQS model, fused, in one call
    report = apply_sqs(model)                          # fuse an SQS model built some other way; says what it did
    report = to_sqs(swiglu_model)                      # swap a SwiGLU/GELU model's gate to SQS (then fine-tune)
    apply_sqs(model, fused_linear_cross_entropy=True)  # also the LM head + loss without the full logits
    register()                                         # opt-in: LlamaConfig(hidden_act="sqs", sqs={...}) builds SQS

No process-wide side effects unless asked:

* `apply_sqs`, `to_sqs` and `AutoSQSForCausalLM` change the one model they are given: they bind
  the fused forward on each MLP instance (other models of the same class are untouched) and,
  when the config must change (to_sqs, new c/lam/p), give the model its own copy of its config
  first, so a config object shared with another model is never rewritten.
* `register()` is the opt-in for configs that name the gate: it lets ``hidden_act="sqs"`` build
  (``hidden_activation`` for Gemma 2/3), and converts each model whose config names sqs right
  after it is built (one wrapper on ``PreTrainedModel.post_init``; a model whose config does not
  name sqs is untouched). `apply_sqs_to_class` patches named MLP classes (Liger-Kernel's way).
  `unregister` undoes both.

How c, lambda, p travel: ``config.sqs = {"c": ..., "lam": ..., "p": ..., "load_with": ...}``
beside ``hidden_act="sqs"``; `save_pretrained` writes it, loading reads it. transformers builds
activations from the name alone, so the name maps to a placeholder (`SQSFromName`) that sqs
replaces with ``SQS(**config.sqs)`` after the model is built; a placeholder that somehow runs
raises instead of computing a default gate.

Loading a saved SQS model without sqs: transformers looks the name up in its activation table
and, where the name is missing, raises a bare ``KeyError: 'sqs'``. Importing this module adds
the name with a placeholder whose construction raises `SQSNotRegisteredError`, naming
`register()` and `AutoSQSForCausalLM`. Without any import of sqs nothing of ours can run (a
config.json cannot make transformers execute code short of ``trust_remote_code``), so the
saved ``config.sqs`` carries a ``load_with`` line saying how to load the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch import nn

try:
    import transformers
    from transformers import activations as _hf_activations
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.modeling_utils import PreTrainedModel
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sqs.integrations.transformers needs the `transformers` package; "
                      "install it with: pip install 'sqs[hf]'") from e
from packaging.version import InvalidVersion, Version

from sqs.functional import DEFAULT_C, DEFAULT_LAM, DEFAULT_P, check_sqs_params
from sqs.integrations import hf_fused, hf_loss
from sqs.integrations.hf_mlps import (
    ACT_KEYS,
    EXPERTS,
    FAMILIES,
    GatedMLP,
    GatedWeights,
    Layout,
    NotAGatedMLP,
    find_gated_mlps,
    known_classes,
    language_model,
    scan_mlps,
    supported_families,
)
from sqs.integrations.hf_loss import FusedLossRefused, causal_lm_loss
from sqs.nn import SQS

#: The name used in ``config.hidden_act`` (``hidden_activation`` for Gemma 2/3).
SQS_NAME = "sqs"
#: transformers versions whose gated-MLP classes this module was written against: [MIN, MAX).
MIN_TRANSFORMERS, MAX_TRANSFORMERS = "5.0", "6.0"
#: The version the tests ran on.
TESTED_TRANSFORMERS = "5.25.0"
#: Written into ``config.sqs`` so a reader of config.json who lacks sqs learns how to load the model.
LOAD_WITH = ("pip install 'sqs[hf]'; then sqs.integrations.transformers.AutoSQSForCausalLM.from_pretrained(path), "
             "or call sqs.integrations.transformers.register() before loading")

_PARAM_KEYS = ("c", "lam", "p")


class SQSNotRegisteredError(RuntimeError):
    """A config names the sqs gate, but nothing told transformers how to build it."""


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a transformers version outside the supported range, naming it and the fix.

    Why refuse rather than try: the patch replaces gated MLPs' forward; if a future release
    changed that forward, patching it could silently compute something else.
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


def sqs_params(config: Any) -> dict[str, float]:
    """c, lam, p from ``config.sqs`` (missing keys: the paper's defaults), validated."""
    given = getattr(config, "sqs", None) or {}
    if not isinstance(given, dict):
        raise TypeError(f"config.sqs must be a dict with keys c, lam, p; got {type(given).__name__}")
    unknown = sorted(set(given) - set(_PARAM_KEYS) - {"load_with"})
    if unknown:
        raise ValueError(f"config.sqs: unknown key(s) {unknown}; valid keys: c, lam, p")
    out = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P, **{k: float(given[k]) for k in _PARAM_KEYS if k in given}}
    check_sqs_params(**out)
    return out


def config_block(params: dict[str, float]) -> dict[str, Any]:
    """What ``config.sqs`` holds: the full parameters (so a later change of defaults cannot change a saved model)
    and how to load the model."""
    return {**{k: float(params[k]) for k in _PARAM_KEYS}, "load_with": LOAD_WITH}


# --- the name in transformers' activation table --------------------------------------------------------------

_BUILDING = contextvars.ContextVar("sqs_building", default=False)
_state: dict[str, Any] = {"registered": False, "post_init": None, "name_users": set()}
_class_patches: dict[type, dict[str, Any]] = {}


def _name_buildable() -> bool:
    return bool(_state["registered"] or _state["name_users"] or _BUILDING.get())


@contextlib.contextmanager
def _building() -> Iterator[None]:
    """Let ``hidden_act="sqs"`` build placeholders inside this block (sqs replaces them right after)."""
    token = _BUILDING.set(True)
    try:
        yield
    finally:
        _BUILDING.reset(token)


class SQSFromName(nn.Module):
    """What ``ACT2FN["sqs"]`` builds: a placeholder that sqs replaces with ``SQS(**config.sqs)``.

    The name alone cannot carry c, lam, p, so a placeholder never computes: built while sqs is
    not set up to replace it, it raises `SQSNotRegisteredError`; left in place and run, it raises.
    """

    def __init__(self) -> None:
        if not _name_buildable():
            raise SQSNotRegisteredError(
                "this model's config names the SQS gate (hidden_act='sqs' or hidden_activation='sqs'), which "
                "transformers can build only through sqs: call sqs.integrations.transformers.register() before "
                "building or loading the model, or load it with "
                "sqs.integrations.transformers.AutoSQSForCausalLM.from_pretrained(path)")
        super().__init__()

    def forward(self, x):
        raise RuntimeError(
            "sqs: an activation built from the name 'sqs' was never given its c, lam, p (its MLP is not one sqs "
            f"recognised as a gated MLP, or apply_sqs was not run); call apply_sqs(model) after building or loading "
            f"(families: {', '.join(supported_families())}, or any down(act(gate(x)) * up(x)) module)")


def _install_name() -> None:
    """Map "sqs" to the placeholder in transformers' table (ACT2FN is a copy of ACT2CLS, not a view)."""
    for table in (_hf_activations.ACT2CLS, _hf_activations.ACT2FN):
        if SQS_NAME not in table:
            table[SQS_NAME] = SQSFromName


_install_name()


# --- configs ---------------------------------------------------------------------------------------------

def _language_configs(model: nn.Module) -> list[Any]:
    """The config objects that describe the language model's MLPs (one, or the decoder's and the root's text_config)."""
    _, scope = language_model(model)
    out = []
    for cfg in (getattr(scope, "config", None), getattr(getattr(model, "config", None), "text_config", None)
                if scope is not model else None):
        if isinstance(cfg, PreTrainedConfig) and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def _asks_for_sqs(config: Any) -> list[str]:
    return [k for k in ACT_KEYS if getattr(config, k, None) == SQS_NAME]


def _says(config: Any, keys: set[str], params: dict[str, float]) -> bool:
    """True when `config` already records exactly this gate under `keys`."""
    block = getattr(config, "sqs", None)
    return (all(getattr(config, k, None) == SQS_NAME for k in keys) and isinstance(block, dict)
            and block == config_block(params))


def _own_configs(model: nn.Module) -> None:
    """Give `model` its own copies of every config object its modules hold, sub-configs and sharing kept.

    Why: ``LlamaForCausalLM(cfg)`` keeps `cfg` itself, so two models built from one config share
    it; rewriting it would make the other model save as something it does not compute.
    """
    configs: dict[int, Any] = {}
    for m in model.modules():
        c = m.__dict__.get("config")
        if isinstance(c, PreTrainedConfig):
            configs.setdefault(id(c), c)
    memo: dict[int, Any] = {}
    new = {i: copy.deepcopy(c, memo) for i, c in configs.items()}  # one memo: a shared sub-config stays shared
    for m in model.modules():
        c = m.__dict__.get("config")
        if c is not None and id(c) in new:
            m.__dict__["config"] = new[id(c)]


# --- parameters ------------------------------------------------------------------------------------------

def _choose_params(model: nn.Module, mlps: list[GatedMLP], given: dict[str, float | None],
                   caller: str) -> dict[str, float]:
    """Explicit arguments, else the MLPs' own SQS modules, else config.sqs, else the paper's defaults."""
    current = {(g.act.c, g.act.lam, g.act.p) for g in mlps if isinstance(g.act, SQS)}
    if len(current) > 1:
        raise ValueError(f"{caller}: the MLPs use different SQS parameters {sorted(current)}; pass c, lam, p "
                         "explicitly to set one value for all")
    if current:
        base = dict(zip(_PARAM_KEYS, current.pop()))
    else:
        asking = [c for c in _language_configs(model) if _asks_for_sqs(c)]
        base = sqs_params(asking[0]) if asking else {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P}
    out = {k: float(v) if v is not None else base[k] for k, v in given.items()}
    check_sqs_params(**out)
    return out


# --- the report ------------------------------------------------------------------------------------------

@dataclass
class PatchedMLP:
    path: str
    cls: str
    family: str           # the dispatch table's family, or "structure" (recognised by structure, probe-verified)
    layout: str           # split / packed / experts
    gate_before: str      # the activation class before the patch
    fused: bool           # the fused forward (or expert gate) is bound on this instance


@dataclass
class SQSReport:
    """What `apply_sqs` / `to_sqs` did to one model."""

    model: nn.Module = field(repr=False)
    params: dict[str, float]
    patched: list[PatchedMLP]
    left_alone: list[tuple[str, str]]
    config: str
    fused_loss: bool
    notes: list[str] = field(default_factory=list)

    @property
    def changed_gates(self) -> list[str]:
        """Activation classes replaced by SQS (empty for an SQS model)."""
        return sorted({f"{m.cls}.{m.gate_before}" for m in self.patched
                       if m.gate_before not in ("SQS", "SQSFromName")})

    def __str__(self) -> str:
        fused = sum(m.fused for m in self.patched)
        lines = [f"sqs: {len(self.patched)} gated MLPs set to SQS(c={self.params['c']}, lam={self.params['lam']}, "
                 f"p={self.params['p']}), {fused} with the fused forward; fused loss: "
                 f"{'on' if self.fused_loss else 'off'}; config: {self.config}"]
        groups: dict[tuple, list[str]] = {}
        for m in self.patched:
            groups.setdefault((m.cls, m.family, m.layout, m.gate_before, m.fused), []).append(m.path)
        for (cls, fam, lay, before, f), paths in groups.items():
            where = paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]} ({len(paths)})"
            lines.append(f"  {cls} [{fam}, {lay}] {before} -> SQS{' (fused)' if f else ''}: {where}")
        lines += [f"  left alone: {p}: {why}" for p, why in self.left_alone]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- patching one model ----------------------------------------------------------------------------------

def _refuse_scan(model: nn.Module, scan, caller: str) -> None:
    if scan.refused:
        path, why = scan.refused[0]
        more = f" (and {len(scan.refused) - 1} more)" if len(scan.refused) > 1 else ""
        raise NotAGatedMLP(f"{caller}: {why} (at {path}){more}; sqs patches gated MLPs down(act(gate(x)) * up(x)) "
                           f"(families: {', '.join(supported_families())}, or that structure)")
    if not scan.found:
        raise NotAGatedMLP(f"{caller}: no gated MLP in {type(model).__name__}; sqs patches down(act(gate(x)) * up(x)) "
                           f"MLPs (families: {', '.join(supported_families())})")
    for g in scan.found:
        who = hf_fused.foreign_forward(g.module)
        if who is not None:
            raise ValueError(f"{caller}: the forward of {type(g.module).__name__} at {g.path} was replaced by {who} "
                             "(a tracer or offload hook); apply sqs first, then wrap the model")


def _gate_mismatch_hint(model: nn.Module, g: GatedMLP) -> str:
    """For a Gemma-2-like config that names sqs under a key its MLPs do not read."""
    for cfg in _language_configs(model):
        asked = _asks_for_sqs(cfg)
        if asked and g.config_key and g.config_key not in asked:
            return (f" (the config says {asked[0]}='sqs', but {type(g.module).__name__} builds its gate from "
                    f"{g.config_key}={getattr(cfg, g.config_key)!r}; set {g.config_key}='sqs')")
    return ""


def _patch(model: nn.Module, *, fused: bool, given: dict, allow_new_gate: bool, fused_loss: bool,
           caller: str) -> SQSReport:
    check_transformers_version()
    if fused_loss:
        hf_loss.check_head(model)
    scan = scan_mlps(model)
    _refuse_scan(model, scan, caller)
    other = [g for g in scan.found if not isinstance(g.act, (SQS, SQSFromName))]
    if other and not allow_new_gate:
        g = other[0]
        raise ValueError(
            f"{caller}: {type(g.module).__name__} at {g.path} gates with {type(g.act).__name__}, not SQS"
            f"{_gate_mismatch_hint(model, g)}; apply_sqs keeps the model's function and only fuses an SQS model's "
            "MLPs. To turn a SwiGLU/GELU model into an SQS one, use to_sqs(model)")
    params = _choose_params(model, scan.found, given, caller)
    notes = []
    if params["c"] < 0:
        notes.append(f"c = {params['c']} < 0: the other reading of the shift, (v + |c| sgn v) / (1 + lam |v|^p)")
    keys = {g.config_key for g in scan.found if g.config_key}
    if any(g.config_key is None for g in scan.found):
        notes.append("some MLPs were recognised by structure and sqs cannot tell which config entry builds their "
                     "gate; a saved copy will not rebuild SQS for them (apply_sqs after loading)")
    configs = _language_configs(model)
    if keys and not all(_says(c, keys, params) for c in configs):
        _own_configs(model)
        configs = _language_configs(model)
        for cfg in configs:
            for k in keys:
                setattr(cfg, k, SQS_NAME)
            cfg.sqs = config_block(params)
        config_note = (f"{', '.join(sorted(k + '=' + repr(SQS_NAME) for k in keys))} and sqs written to the "
                       "model's own copy of its config")
    else:
        config_note = "already says so, unchanged"
    patched = []
    for g in scan.found:
        before = type(g.act).__name__
        g.set_act(SQS(**params))
        if fused:
            hf_fused.bind(g)
        else:
            hf_fused.unbind(g.module)
        patched.append(PatchedMLP(g.path, type(g.module).__name__, g.family or "structure", g.layout.kind, before,
                                  hf_fused.is_bound(g.module)))
    eager = [g.path for g in scan.found if g.layout.kind == EXPERTS and fused
             and getattr(getattr(g.module, "config", None), "_experts_implementation", None) == "eager"]
    if eager:
        notes.append(f"experts_implementation='eager' computes act(gate) * up itself: SQS runs unfused in {len(eager)} "
                     "expert banks (grouped_mm or batched_mm use the fused gate)")
    if fused_loss:
        hf_loss.bind_fused_loss(model)
    else:
        hf_loss.unbind_fused_loss(model)
    return SQSReport(model, params, patched, list(scan.left_alone), config_note, hf_loss.has_fused_loss(model), notes)


def apply_sqs(model: nn.Module, *, fused: bool = True, c: float | None = None, lam: float | None = None,
              p: float | None = None, fused_linear_cross_entropy: bool = False) -> SQSReport:
    """Make every gated MLP of an SQS model compute down(sqs_glu(up(x), gate(x))), on this model only.

    Parameters and state-dict keys stay as they are; the fused forward is bound on each MLP
    instance. c, lam, p default to the model's own (its SQS modules, else ``config.sqs``, else the
    paper's c=0.01, lam=0.5, p=1); given values set every MLP and (on the model's own copy) the
    config. ``fused=False`` keeps SQS but runs the library's unfused forward (the reference the
    fused path is tested against). ``fused_linear_cross_entropy=True`` also computes the training
    loss from the head's input without the full logits (`hf_loss`). Refuses an MLP-like module
    that is not a gated MLP, and an MLP whose gate is not SQS (that would change the function:
    use `to_sqs`). A multimodal model's vision/audio towers are left alone. Returns a report.
    """
    return _patch(model, fused=fused, given={"c": c, "lam": lam, "p": p}, allow_new_gate=False,
                  fused_loss=fused_linear_cross_entropy, caller="apply_sqs")


def to_sqs(model: nn.Module, *, fused: bool = True, c: float | None = None, lam: float | None = None,
           p: float | None = None, fused_linear_cross_entropy: bool = False) -> SQSReport:
    """Turn a SwiGLU/GELU-gated model into an SQS one for continued training, on this model only.

    Same weights; each MLP's gate becomes SQS(c, lam, p) (fused unless ``fused=False``) and the
    model's own copy of its config names sqs, so `save_pretrained` writes an SQS model. The
    function changes, so a warning says it needs fine-tuning. Returns a report.
    """
    report = _patch(model, fused=fused, given={"c": c, "lam": lam, "p": p}, allow_new_gate=True,
                    fused_loss=fused_linear_cross_entropy, caller="to_sqs")
    if report.changed_gates:
        warnings.warn(f"to_sqs: the MLP gates changed ({', '.join(report.changed_gates)} -> SQS), so the model "
                      "computes a different function until it is fine-tuned", UserWarning, stacklevel=2)
    return report


# --- opt-in, process-wide: register() and apply_sqs_to_class() ----------------------------------------------

def _convert_built(model: nn.Module) -> None:
    """After a model is built under register(): its placeholders become SQS(config.sqs), fused, on this instance.

    A config that names sqs under a key its MLPs do not read (Gemma 2 reads hidden_activation,
    not hidden_act) is refused here, at construction, rather than building another gate.
    """
    configs = [c for c in _language_configs(model) if _asks_for_sqs(c)]
    if not configs:
        return
    scan = scan_mlps(model)
    params = sqs_params(configs[0])
    for cfg in configs:  # the same meaning, written out in full (every model sharing it names sqs too)
        cfg.sqs = config_block(sqs_params(cfg))
    for g in scan.found:
        if isinstance(g.act, SQSFromName):
            g.set_act(SQS(**params))
        if isinstance(g.act, SQS):
            if hf_fused.foreign_forward(g.module) is None:
                hf_fused.bind(g)
            continue
        hint = _gate_mismatch_hint(model, g)
        if hint:
            raise ValueError(f"{type(configs[0]).__name__}: sqs was asked for, but {type(g.module).__name__} at "
                             f"{g.path} would gate with {type(g.act).__name__}{hint}")


def _post_init_wrapper(original: Callable) -> Callable:
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if _state["registered"]:
            _convert_built(self)
        return out

    post_init._sqs_replaces = original
    return post_init


def register() -> None:
    """Opt in, process-wide: configs naming the sqs gate build SQS models.

    After this, ``LlamaConfig(hidden_act="sqs", sqs={"c": ..., "lam": ..., "p": ...})`` (Gemma 2/3:
    ``hidden_activation="sqs"``) builds a model whose gated MLPs are SQS(c, lam, p) with the fused
    forward, and ``from_pretrained`` rebuilds a saved one. Models whose config does not name sqs
    are untouched. Idempotent; `unregister` undoes it.
    """
    check_transformers_version()
    _install_name()
    _state["registered"] = True
    if _state["post_init"] is None:
        _state["post_init"] = PreTrainedModel.post_init
        PreTrainedModel.post_init = _post_init_wrapper(PreTrainedModel.post_init)


def _family_classes(family: str | type) -> list[tuple[type, Layout, str]]:
    known = known_classes()
    if isinstance(family, type):
        if family not in known:
            raise ValueError(f"apply_sqs_to_class: {family.__name__} is not a gated MLP class sqs knows; "
                             f"supported: {', '.join(sorted(c.__name__ for c in known))}")
        _, lay, key = known[family]
        return [(family, lay, key)]
    name = str(family).lower()
    fam = FAMILIES.get(name) or next((f for f in FAMILIES.values() if name in f.model_types), None)
    out = [(cls, lay, key) for cls, (f, lay, key) in known.items() if FAMILIES[f] is fam]
    if not out:
        raise ValueError(f"apply_sqs_to_class: unknown or unavailable family {family!r}; available in this "
                         f"transformers: {', '.join(supported_families())}")
    return out


def _class_init(lay: Layout, original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        if isinstance(getattr(self, lay.act, None), SQSFromName):
            setattr(self, lay.act, SQS(**sqs_params(config)))

    __init__._sqs_replaces = original
    return __init__


def apply_sqs_to_class(family: str | type) -> list[type]:
    """Opt in, process-wide, for one family's MLP classes (e.g. ``"llama"``, ``"qwen2_moe"`` or ``LlamaMLP``).

    After this, a model of that family built with ``hidden_act="sqs"`` (Gemma 2/3:
    ``hidden_activation``) reads c, lam, p from ``config.sqs`` and runs the fused op; other
    activations run the class's own forward. Registers what it needs (the "sqs" name may then
    build). Idempotent; `unregister` undoes it. Returns the patched classes.
    """
    check_transformers_version()
    classes = _family_classes(family)
    _install_name()
    for cls, lay, _ in classes:
        if cls in _class_patches:
            continue
        saved = {"__init__": cls.__dict__.get("__init__")}
        cls.__init__ = _class_init(lay, cls.__init__)
        if lay.kind == EXPERTS:
            saved["_apply_gate"] = cls.__dict__.get("_apply_gate")
            cls._apply_gate = hf_fused.fused_apply_gate
        else:
            saved["forward"] = cls.__dict__.get("forward")
            setattr(cls, hf_fused.LAYOUT_ATTR, lay)
            cls.forward = hf_fused.class_forward(lay, cls.forward)
        _class_patches[cls] = saved
        _state["name_users"].add(cls)
    return [cls for cls, _, _ in classes]


def unregister() -> None:
    """Undo `register` and every `apply_sqs_to_class` (models already built keep what they have).

    The "sqs" name stays in transformers' table with a placeholder that refuses to build,
    naming register(): that only replaces transformers' bare KeyError.
    """
    _state["registered"] = False
    if _state["post_init"] is not None:
        PreTrainedModel.post_init = _state["post_init"]
        _state["post_init"] = None
    for cls, saved in list(_class_patches.items()):
        for name, value in saved.items():
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)
        if hf_fused.LAYOUT_ATTR in cls.__dict__:
            delattr(cls, hf_fused.LAYOUT_ATTR)
        del _class_patches[cls]
    _state["name_users"].clear()


def is_registered() -> bool:
    """True while `register()` is in effect."""
    return bool(_state["registered"])


def supported_mlp_classes() -> list[str]:
    """Names of the dispatch table's MLP classes in the installed transformers."""
    return sorted(c.__name__ for c in known_classes())


# --- one-call loading ------------------------------------------------------------------------------------

class AutoSQSForCausalLM:
    """``AutoModelForCausalLM`` for SQS models: load (or build), then `apply_sqs`, in one call.

    Needs no `register()` and leaves no process-wide patch behind. ``convert=True`` loads a
    SwiGLU/GELU model and converts it with `to_sqs` instead (for continued training).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoSQSForCausalLM is built with AutoSQSForCausalLM.from_pretrained(path) or "
                        "AutoSQSForCausalLM.from_config(config)")

    @staticmethod
    def _finish(model: nn.Module, convert: bool, **opts) -> nn.Module:
        (to_sqs if convert else apply_sqs)(model, **opts)
        return model

    @classmethod
    def from_pretrained(cls, path: Any, *args, c: float | None = None, lam: float | None = None,
                        p: float | None = None, fused: bool = True, fused_linear_cross_entropy: bool = False,
                        convert: bool = False, **kwargs) -> nn.Module:
        """``AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)``, then `apply_sqs` (or `to_sqs`)."""
        check_transformers_version()
        with _building():
            model = transformers.AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)
        return cls._finish(model, convert, c=c, lam=lam, p=p, fused=fused,
                           fused_linear_cross_entropy=fused_linear_cross_entropy)

    @classmethod
    def from_config(cls, config: Any, *, c: float | None = None, lam: float | None = None, p: float | None = None,
                    fused: bool = True, fused_linear_cross_entropy: bool = False, convert: bool = False,
                    **kwargs) -> nn.Module:
        """``AutoModelForCausalLM.from_config(config, **kwargs)`` (random weights), then `apply_sqs` (or `to_sqs`)."""
        check_transformers_version()
        with _building():
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        return cls._finish(model, convert, c=c, lam=lam, p=p, fused=fused,
                           fused_linear_cross_entropy=fused_linear_cross_entropy)


__all__ = ["FAMILIES", "LOAD_WITH", "MAX_TRANSFORMERS", "MIN_TRANSFORMERS", "SQS_NAME", "TESTED_TRANSFORMERS",
           "AutoSQSForCausalLM", "FusedLossRefused", "GatedMLP", "GatedWeights", "NotAGatedMLP", "PatchedMLP",
           "SQSFromName", "SQSNotRegisteredError", "SQSReport", "apply_sqs", "apply_sqs_to_class",
           "causal_lm_loss", "check_transformers_version", "config_block", "find_gated_mlps", "is_registered",
           "register", "sqs_params", "supported_families", "supported_mlp_classes", "to_sqs", "unregister"]
