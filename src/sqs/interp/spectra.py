"""Weight spectra: read a 1-layer GLU classifier's features from its weights.

The model (`sqs.models.image.ImageClassifier`, one layer, no residual, no norm):

    x        = E img                                   E: (d, 784) embedding
    logit_a  = sum_i (H P)_ai (w_i . x) * gate(v_i . x) H: (C, d) head, P: (d, h)

For the identity gate (the bilinear MLP) every logit is a quadratic form

    logit_a  = x^T B_a x,     B_a = sum_i (H P)_ai w_i v_i^T        (1)

and only the symmetric part of B_a counts (x^T A x = 0 for antisymmetric A), so
B_a := (B_a + B_a^T) / 2 and `eigh` gives

    B_a = sum_k eigval_ak q_ak q_ak^T,   logit_a = sum_k eigval_ak (q_ak . x)^2          (2)

The q_ak live in the d-dim embedding space; as functions of the image,
q_ak . x = (E^T q_ak) . img, so u_ak = E^T q_ak is the eigenvector read in pixel
space (the 28x28 picture). (2) holds exactly with the raw u_ak; for display we
also keep u_ak / |u_ak|. Note that the u_ak are not orthogonal in pixel space
unless E has orthonormal rows; eigenvalues are those of B_a in embedding space.

For SQS the gate is sqs(v) ~ v for c << |v| << 1/lam, so (1) read with the gate
treated as identity is a *first-order* reading, not an identity: `fidelity`
measures how much of the model it reproduces. `decompose(model, reading=...)` also
offers readings fitted on training images that account for the gate and stay one
quadratic form per class (`sqs.interp.readings`): "gain" (per-unit gains), "affine"
(per-unit a_i + b_i v: a form in z = [x; 1], `Decomposition.homogeneous`) and "fit"
(least squares to the model's logits); `rank_readings` picks the most faithful one on
held-out images. The fitted readings read every gate; the first-order one is refused
for ReLU/GELU/SiLU (their gate is not ~ v) unless `force=True`. Models with more than
one layer are refused here: `sqs.interp.image_stack` reads them layer by layer.

Conventions: eigenvalues per class sorted by |eigval| descending; eigenvectors are
stored as rows (`eigenvectors[a, k]` is q_ak); each eigenvector's sign is fixed
so that its largest-magnitude pixel (in pixel space) is positive; the quadratic
form and |cosine| do not depend on that sign. All analysis runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sqs.functional import DEFAULT_C, DEFAULT_LAM, canonical_gate
from sqs.interp.layer_readings import GLUWeights, LayerReading, read_layer
from sqs.interp.readings import DEFAULT_RIDGE, READINGS, check_reading, homogeneous, r2

EXACT_READING = "exact (bilinear)"
FIRST_ORDER_READING = "first-order (gate treated as identity)"
GAIN_READING = "gain (gate treated as a per-unit gain fitted on training images)"
AFFINE_READING = "affine (gate treated as a_i + b_i v per unit, fitted on training images; one form in [x; 1])"
FIT_READING = "least-squares (quadratic form fitted to the model's logits on training images)"
#: Reading name -> (label of `Decomposition.reading` for a non-exact gate, short name for titles).
READING_LABELS = {"first-order": (FIRST_ORDER_READING, "first-order reading"),
                  "gain": (GAIN_READING, "gain reading"),
                  "affine": (AFFINE_READING, "affine reading"),
                  "fit": (FIT_READING, "least-squares reading")}
UNSUPPORTED_GATES = ("relu", "gelu", "swiglu")
DEFAULT_KS = (1, 2, 5, 10, None)  # None = all eigenvectors


class UnsupportedGate(ValueError):
    """The gate has no quadratic-form reading (ReLU, GELU, SiLU); pass force=True to read it anyway."""


class NotQuadratic(ValueError):
    """The model's logits are not a quadratic form of its embedded input (more than one layer)."""


# --------------------------------------------------------------------------- the math


def eig_sorted(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (C, d) sorted by |eigenvalue| descending and eigenvectors as rows (C, d, d)."""
    eigvals, Q = torch.linalg.eigh(B)  # Q[a, :, k] is the k-th eigenvector
    order = eigvals.abs().argsort(dim=-1, descending=True)
    eigvals = eigvals.gather(-1, order)
    Q = Q.transpose(-1, -2).gather(-2, order[..., None].expand(*order.shape, Q.shape[-1]))
    return eigvals, Q


# --------------------------------------------------------------------------- decomposition


@dataclass
class Decomposition:
    eigenvalues: torch.Tensor  # (C, r), sorted by |eigenvalue| descending per class
    eigenvectors: torch.Tensor  # (C, r, r), rows q_ak in embedding space (r = d, or d + 1 when homogeneous)
    pixel_raw: torch.Tensor  # (C, r, n_in), u_ak = E^T q_ak (exact: q.x = u.img)
    pixel: torch.Tensor  # (C, r, n_in), u_ak / |u_ak|, for display and cosines
    embed: torch.Tensor  # (r, n_in) E, to embed images (homogeneous: [[E, 0], [0, 1]] on [img; 1])
    B: torch.Tensor  # (C, r, r) symmetrised interaction matrices
    gate: str
    exact: bool
    reading: str
    gate_kwargs: dict = field(default_factory=dict)
    method: str = "first-order"  # the reading's name, one of sqs.interp.readings.READINGS
    homogeneous: bool = False  # forms in z = [x; 1]: the last coordinate is the constant 1

    @property
    def n_classes(self) -> int:
        return self.eigenvalues.shape[0]

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[1]

    @property
    def n_pixels(self) -> int:
        return self.embed.shape[1] - int(self.homogeneous)

    @property
    def pictures(self) -> torch.Tensor:
        """(C, r, n_pixels) unit pixel-space eigenvectors without the constant coordinate: what a figure shows."""
        return self.pixel[..., :self.n_pixels]

    @property
    def label(self) -> str:
        """Short name for titles: e.g. "Bilinear (exact)" or "SQS (first-order reading)"."""
        name = {"bilinear": "Bilinear", "sqs": "SQS", "swiglu": "SwiGLU", "gelu": "GELU", "relu": "ReLU"}.get(
            self.gate, self.gate.upper())
        return f"{name} ({'exact' if self.exact else READING_LABELS[self.method][1]})"

    def embed_images(self, img: torch.Tensor) -> torch.Tensor:
        """Images (N, n_pixels) or (n_pixels,) -> embedded x = E img (homogeneous: [E img; 1]) in float64."""
        img = torch.as_tensor(img).to(torch.float64).reshape(-1, self.n_pixels)
        return (homogeneous(img) if self.homogeneous else img) @ self.embed.T

    def to_dict(self, top: int = 10) -> dict:
        """JSON-friendly summary (eigenvalues, their share of sum |eigenvalue|)."""
        absl = self.eigenvalues.abs()
        share = absl / absl.sum(-1, keepdim=True)
        return {
            "gate": self.gate, "gate_kwargs": self.gate_kwargs, "exact": self.exact, "reading": self.reading,
            **({} if self.method == "first-order" else {"method": self.method}),
            **({"homogeneous": True} if self.homogeneous else {}),
            "n_classes": self.n_classes, "rank": self.rank,
            "eigenvalues_top": self.eigenvalues[:, :top].tolist(),
            "abs_share_top": share[:, :top].tolist(),
            "n_positive": (self.eigenvalues > 0).sum(-1).tolist(),
        }


def homogeneous_embed(E: torch.Tensor) -> torch.Tensor:
    """[[E, 0], [0, 1]] (d+1, n+1): maps [img; 1] to [E img; 1], so a form in [x; 1] reads pixels plus a constant."""
    d, n = E.shape
    Eh = E.new_zeros(d + 1, n + 1)
    Eh[:d, :n] = E
    Eh[d, n] = 1.0
    return Eh


def forms_decomposition(B: torch.Tensor, embed: torch.Tensor, gate: str, exact: bool, reading: str,
                        gate_kwargs: dict | None = None, method: str = "first-order",
                        homogeneous: bool = False) -> Decomposition:
    """The `Decomposition` of per-class forms B (C, r, r) over x = E img (homogeneous: over [x; 1], with
    B (C, d+1, d+1) and `embed` the plain E (d, n_pixels)). Eigenvalues in |eigenvalue| order; each
    eigenvector's sign fixed so its largest-magnitude pixel-space entry is positive."""
    E = embed.detach().to(torch.float64).cpu()
    if homogeneous:
        E = homogeneous_embed(E)
    B = B.to(torch.float64)
    if B.shape[-1] != E.shape[0]:
        raise ValueError(f"forms_decomposition: forms of size {B.shape[-1]} but an embedding of {E.shape[0]} rows"
                         + (" (homogeneous forms are (d+1) x (d+1))" if homogeneous else ""))
    eigvals, Q = eig_sorted(B)  # (C, r), (C, r, r)
    U = torch.einsum("akd,dp->akp", Q, E)  # pixel space: u_ak = E^T q_ak
    idx = U.abs().argmax(-1, keepdim=True)  # fix each eigenvector's sign: largest-magnitude pixel positive
    sign = torch.sign(U.gather(-1, idx))
    sign[sign == 0] = 1.0
    Q, U = Q * sign, U * sign
    U_unit = U / U.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return Decomposition(eigenvalues=eigvals, eigenvectors=Q, pixel_raw=U, pixel=U_unit, embed=E, B=B,
                         gate=canonical_gate(gate), exact=exact, reading=reading, gate_kwargs=dict(gate_kwargs or {}),
                         method=method, homogeneous=homogeneous)


def to_homogeneous(dec: Decomposition) -> Decomposition:
    """The same reading in z = [x; 1] (B padded with a zero row and column; one more, zero, eigenvalue that
    belongs to no side), so it can be compared with an affine or fitted reading in one space."""
    if dec.homogeneous:
        return dec
    C, d = dec.B.shape[0], dec.B.shape[-1]
    B = dec.B.new_zeros(C, d + 1, d + 1)
    B[:, :d, :d] = dec.B
    return forms_decomposition(B, dec.embed, dec.gate, dec.exact, dec.reading, dec.gate_kwargs, dec.method,
                               homogeneous=True)


def _glu_layer(model):
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "embed") or not hasattr(model, "head"):
        raise TypeError("decompose: expected an ImageClassifier-like model with `embed`, `layers` and `head`")
    if len(layers) != 1:
        raise NotQuadratic(
            f"decompose: the model has {len(layers)} GLU layers; only a 1-layer model (no residual, no norm) is a "
            "quadratic form of its input. Train with n_layers = 1 (the Sec. 4.1 config), or read it layer by layer "
            "(sqs.interp.image_stack).")
    norms = getattr(model, "norms", None)
    if getattr(model, "residual", False) or (norms is not None and any(not isinstance(n, torch.nn.Identity)
                                                                       for n in norms)):
        raise NotQuadratic("decompose: the layer has a residual or a norm, so logits are not a quadratic form")
    layer = layers[0]
    if getattr(layer, "P", None) is None:
        raise NotQuadratic("decompose: the GLU has no output projection P")
    if getattr(getattr(layer, "proj", None), "bias", None) is not None or \
            getattr(getattr(layer, "out", None), "bias", None) is not None or model.head.bias is not None or \
            model.embed.bias is not None:
        raise NotQuadratic("decompose: biases make the logits a general quadratic, not a quadratic form; "
                           "train without biases (the Sec. 4.1 config)")
    return layer


def is_exact_gate(gate: str, gate_kwargs: dict | None = None) -> bool:
    """True for the identity gate (bilinear, or sqs with c = lam = 0): every reading is then exact."""
    gate, kw = canonical_gate(gate), gate_kwargs or {}
    return gate == "bilinear" or (gate == "sqs" and kw.get("c", DEFAULT_C) == 0 and kw.get("lam", DEFAULT_LAM) == 0)


def gate_reading(gate: str, gate_kwargs: dict | None = None, force: bool = False) -> tuple[bool, str]:
    """(exact, label) of the paper's first-order reading (the gate as identity) for a gate; raises
    UnsupportedGate for relu/gelu/swiglu unless force. Their fitted readings (gain, affine, fit) need
    no force: `sqs.interp.layer_readings` reads every gate."""
    gate = canonical_gate(gate)
    if is_exact_gate(gate, gate_kwargs):
        return True, EXACT_READING
    if gate == "sqs":
        return False, FIRST_ORDER_READING
    if not force:
        raise UnsupportedGate(
            f"decompose: a {gate!r}-gated GLU has no first-order bilinear reading ({gate}(v) is not ~ v); "
            "eigenvectors of its weights would not describe the model. Read it with a fitted reading "
            "(reading='gain', 'affine' or 'fit'), or pass force=True (--force) to compute the first-order one anyway.")
    return False, f"forced ({gate} gate treated as identity; not a faithful reading)"


def reading_label(gate: str, gate_kwargs: dict | None, reading: str, force: bool = False) -> tuple[bool, str]:
    """(exact, label of `Decomposition.reading`) for a gate read with `reading`."""
    if check_reading(reading) == "first-order":
        return gate_reading(gate, gate_kwargs, force)
    if is_exact_gate(gate, gate_kwargs):
        return True, EXACT_READING
    return False, READING_LABELS[reading][0]


@torch.no_grad()
def reading_matrices(model, reading: str = "first-order", fit_images: torch.Tensor | None = None,
                     ridge: float = DEFAULT_RIDGE, fit_prior: str | None = None, chunk_size: int = 2048,
                     homogeneous: bool = False, weighted: bool = False) -> torch.Tensor:
    """The symmetric per-class forms of a reading (see `sqs.interp.readings`), float64: B (C, d, d), or
    (C, d+1, d+1) in z = [x; 1] when `homogeneous` (required by "affine").

    "first-order": the gate as identity (B_a = sym sum_i (HP)_ai w_i v_i^T); "gain": per-unit gains
    b_i; "affine": per-unit a_i + b_i v, both fitted on `fit_images`; "fit": least squares to the
    model's logits on `fit_images` (in x, or in [x; 1] when homogeneous), ridge toward the
    `fit_prior` reading ("gain", "affine", "first-order" or "none"; None: "affine" when homogeneous,
    else "gain"). `weighted`: per-unit fits weighted by (w_i . x)^2 (`readings.unit_weights`, as the
    reading protocol `sqs.interp.image_stack` fits them); off by default, so the gain reading stays
    the one earlier reports used. `fit_images` are training images (N, n_pixels); never pass the
    images you evaluate on.
    """
    check_reading(reading)
    layer = _glu_layer(model)
    if reading == "affine" and not homogeneous:
        raise ValueError("decompose: the affine reading has a linear part; it is a form in [x; 1] (homogeneous=True)")
    f64 = torch.float64
    glu = GLUWeights.of(layer).through(model.head.weight)  # outputs read through the head: P -> H P
    if reading == "first-order":
        B = read_layer(GLUWeights(glu.W, glu.V, glu.P, "bilinear"), "first-order").B  # the gate as identity
        return B if homogeneous else B[:, :-1, :-1]
    if fit_images is None:
        raise ValueError(f"decompose: the {reading!r} reading is fitted on training images; pass "
                         "fit_images=<training images (N, n_pixels)> (never the test images)")
    img = torch.as_tensor(fit_images).cpu()
    E = model.embed.weight.detach().to(f64).cpu()
    x = img.to(f64).reshape(-1, E.shape[1]) @ E.T  # embedded training inputs (N, d)
    if reading != "fit":
        B = read_layer(glu, reading, x, weighted=weighted).B
        return B if homogeneous else B[:, :-1, :-1]
    fit_prior = fit_prior or ("affine" if homogeneous else "gain")
    if fit_prior not in ("gain", "affine", "first-order", "none"):
        raise ValueError(f"decompose: fit_prior must be 'gain', 'affine', 'first-order' or 'none', got {fit_prior!r}")
    if fit_prior == "none":
        prior = LayerReading("none", x.new_zeros(glu.P.shape[0], glu.d + 1, glu.d + 1))
    elif fit_prior == "first-order":
        prior = read_layer(GLUWeights(glu.W, glu.V, glu.P, "bilinear"), "first-order")
    else:
        prior = read_layer(glu, fit_prior, x, weighted=weighted)
    z = model_logits(model, img.reshape(x.shape[0], -1))  # the model's own logits are the target
    B = read_layer(glu, "fit", x, y_fit=z, prior=prior, homogeneous_fit=homogeneous, ridge=ridge,
                   chunk_size=chunk_size).B
    return B if homogeneous else B[:, :-1, :-1]


@torch.no_grad()
def decompose(model, force: bool = False, reading: str = "first-order", fit_images: torch.Tensor | None = None,
              ridge: float = DEFAULT_RIDGE, fit_prior: str | None = None, chunk_size: int = 2048,
              homogeneous: bool | None = None, weighted: bool = False) -> Decomposition:
    """Eigendecompose a 1-layer GLU classifier's per-class interaction matrices.

    `reading` picks B_a (see `reading_matrices`); the default is the paper's first-order
    reading (refused for relu/gelu/swiglu unless `force`). "gain", "affine" and "fit" need
    `fit_images` (training images only) and read every gate. `homogeneous` (default: only for
    "affine") gives forms in [x; 1] (`Decomposition.homogeneous`); `weighted` weights the per-unit
    fits as the reading protocol does (see `reading_matrices`). For an exactly quadratic model
    (bilinear gate, sqs with c = lam = 0) every reading gives the exact decomposition (to float
    tolerance), labelled exact.
    """
    check_reading(reading)
    layer = _glu_layer(model)
    homogeneous = (reading == "affine") if homogeneous is None else bool(homogeneous)
    kw = dict(getattr(layer, "gate_kwargs", {}))
    exact, label = reading_label(layer.gate, kw, reading, force=force)
    B = reading_matrices(model, reading, fit_images, ridge=ridge, fit_prior=fit_prior, chunk_size=chunk_size,
                         homogeneous=homogeneous, weighted=weighted)
    return forms_decomposition(B, model.embed.weight, layer.gate, exact, label, kw, method=reading,
                               homogeneous=homogeneous)


# --------------------------------------------------------------------------- reading inputs


def _topk(dec: Decomposition, k: int | None) -> int:
    if k is None:
        return dec.rank
    if k < 1:
        raise ValueError(f"k must be >= 1 or None (all), got {k}")
    return min(int(k), dec.rank)


def surrogate_terms(dec: Decomposition, x_embedded: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """eigval_ai (q_ai . x)^2 for the top-k eigenvectors: x (N, d) -> (N, C, k)."""
    k = _topk(dec, k)
    x = torch.as_tensor(x_embedded).to(torch.float64).reshape(-1, dec.rank)
    proj = torch.einsum("aid,nd->nai", dec.eigenvectors[:, :k], x)  # q_ai . x
    return dec.eigenvalues[:, :k] * proj**2


def surrogate_logits(dec: Decomposition, x_embedded: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """sum_{i<k} eigval_ai (q_ai . x)^2 per class: x (N, d) -> (N, C). k=None uses all."""
    return surrogate_terms(dec, x_embedded, k).sum(-1)


def contributions(dec: Decomposition, img: torch.Tensor) -> torch.Tensor:
    """Explanation of one input: (C, d) with [a, i] = eigval_ai (q_ai . E img)^2.

    Row a sums to the surrogate logit of class a; columns follow the |eigval| order.
    """
    x = dec.embed_images(img)
    if x.shape[0] != 1:
        raise ValueError(f"contributions: expected one image, got {x.shape[0]}")
    proj = torch.einsum("aid,d->ai", dec.eigenvectors, x[0])
    return dec.eigenvalues * proj**2


def cosine_per_rank(dec_a: Decomposition, dec_b: Decomposition, space: str = "pixel") -> torch.Tensor:
    """|cos| between the eigenvectors of equal rank, per class: (C, min(d_a, d_b)).

    Default `space="pixel"`: two separately trained models have different
    embeddings E, so their embedding-space eigenvectors live in unrelated bases;
    only the pixel-space pictures u = E^T q are comparable. `space="embedding"`
    is meaningful only for models sharing one embedding (or a model with itself).
    """
    if dec_a.n_classes != dec_b.n_classes:
        raise ValueError(f"cosine_per_rank: {dec_a.n_classes} vs {dec_b.n_classes} classes")
    r = min(dec_a.rank, dec_b.rank)
    if space == "pixel":
        a, b = dec_a.pixel[:, :r], dec_b.pixel[:, :r]
    elif space == "embedding":
        if dec_a.rank != dec_b.rank:
            raise ValueError("cosine_per_rank: embedding-space comparison needs equal d")
        a, b = dec_a.eigenvectors[:, :r], dec_b.eigenvectors[:, :r]
    else:
        raise ValueError(f"cosine_per_rank: space must be 'pixel' or 'embedding', got {space!r}")
    cos = torch.einsum("akp,akp->ak", a, b) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return cos.abs()


def cosine_best_match(dec_a: Decomposition, dec_b: Decomposition, within: int | None = None) -> torch.Tensor:
    """(C, r_a): for each eigenvector of A, the largest |cos| (pixel space) with any of B's top-`within`
    eigenvectors of the same class (all when None). A complement to `cosine_per_rank`: high here but
    low per rank means the same features with swapped ranks (near-equal |eigval|), not different ones.
    """
    b = dec_b.pixel if within is None else dec_b.pixel[:, :within]
    return torch.einsum("akp,ajp->akj", dec_a.pixel, b).abs().amax(-1)


# --------------------------------------------------------------------------- fidelity


@torch.no_grad()
def model_logits(model, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The model's own logits (float64, CPU) on images (N, n_pixels)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = [model(images[i:i + batch_size].to(dev, dtype)).to(torch.float64).cpu()
           for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def fidelity(model, dec: Decomposition, images: torch.Tensor, labels: torch.Tensor,
             ks=DEFAULT_KS) -> dict:
    """How faithfully the eigen-reading reproduces the model on (images, labels).

    - logit_r2: R^2 of the full surrogate's logits vs the model's (1 for bilinear);
    - logit_r2_scaled: the same after the best single scale factor (argmax does
      not care about scale; the first-order SQS reading overestimates |logits|);
    - model_acc, surrogate_acc, agreement (surrogate argmax == model argmax);
    - truncated[k]: accuracy / agreement / R^2 of the surrogate using the top-k
      eigenvectors per class, for k in ks ("all" for None).
    """
    labels = torch.as_tensor(labels).cpu()
    z = model_logits(model, images)
    x = dec.embed_images(images.cpu())
    model_pred = z.argmax(-1)
    out = {"n": int(labels.shape[0]), "reading": dec.reading, "exact": dec.exact,
           "model_acc": float((model_pred == labels).double().mean())}
    terms = surrogate_terms(dec, x)  # (N, C, d), computed once; top-k logits = sum of the first k terms
    truncated = {}
    for k in ks:
        s = terms[..., :_topk(dec, k)].sum(-1)
        pred = s.argmax(-1)
        key = "all" if k is None else str(k)
        truncated[key] = {"k": dec.rank if k is None else min(k, dec.rank),
                          "acc": float((pred == labels).double().mean()),
                          "agreement": float((pred == model_pred).double().mean()),
                          "logit_r2": r2(s, z)}
    s = terms.sum(-1)
    alpha = float((s * z).sum() / (s * s).sum().clamp_min(1e-300))
    out.update({"surrogate_acc": float((s.argmax(-1) == labels).double().mean()),
                "agreement": float((s.argmax(-1) == model_pred).double().mean()),
                "logit_r2": r2(s, z), "logit_r2_scaled": r2(alpha * s, z), "best_scale": alpha,
                "truncated": truncated})
    return out


def pair_cosines(decs_a: list[Decomposition] | dict, decs_b: list[Decomposition] | dict | None = None,
                 paired: bool = True, measure=cosine_per_rank) -> torch.Tensor:
    """Stack `measure(a, b)` (|cos| per rank by default; or `cosine_best_match`) over pairs: (n_pairs, C, r).

    Lists are read as {index: decomposition}; dicts keyed by seed pair models by seed.
    decs_b None: all pairs i < j within decs_a (seed-vs-seed baselines).
    paired=True: a[k] vs b[k] for every key k both have (same seed); False: every a[i] vs b[j], i != j.
    """
    a = dict(enumerate(decs_a)) if isinstance(decs_a, (list, tuple)) else dict(decs_a)
    if decs_b is None:
        pairs = [(a[i], a[j]) for i in a for j in a if i < j]
    else:
        b = dict(enumerate(decs_b)) if isinstance(decs_b, (list, tuple)) else dict(decs_b)
        if paired:
            if isinstance(decs_a, (list, tuple)) and len(a) != len(b):
                raise ValueError("pair_cosines: paired lists must have equal length")
            pairs = [(a[k], b[k]) for k in sorted(set(a) & set(b))]
        else:
            pairs = [(a[i], b[j]) for i in a for j in b if i != j]
    if not pairs:
        raise ValueError("pair_cosines: no pairs to compare (need at least two models)")
    return torch.stack([measure(x, y) for x, y in pairs])


# --------------------------------------------------------------------------- choosing a reading


def shared_row_fraction(fit_images: torch.Tensor, images: torch.Tensor) -> float:
    """Share of the rows of `images` that also occur (bit for bit) in `fit_images`."""
    def rows(t):
        a = torch.as_tensor(t).detach().cpu().to(torch.float32).reshape(t.shape[0], -1).contiguous().numpy()
        return [r.tobytes() for r in a]

    seen = set(rows(fit_images))
    ev = rows(images)
    return sum(r in seen for r in ev) / max(len(ev), 1)


@torch.no_grad()
def rank_readings(model, fit_images: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  readings=READINGS, key: str = "logit_r2", force: bool = False, **fit_kwargs) -> dict:
    """Fit each reading on `fit_images` (training), measure `fidelity` on held-out (images, labels).

    Returns {"best": name, "key": key, "order": names best first, "fidelity": {name: dict},
    "decompositions": {name: Decomposition}}. Readings are ranked by `fidelity[key]`
    ("logit_r2" by default: how much of the model's logits the reading reproduces); on a tie
    (within 1e-9) the simpler reading, earlier in `readings`, wins. Refuses held-out images
    that are mostly the fit images: fidelity must be measured on data the fit never saw.
    """
    readings = tuple(check_reading(r) for r in readings)
    if not readings:
        raise ValueError("rank_readings: no readings to rank")
    if key not in ("logit_r2", "logit_r2_scaled", "agreement", "surrogate_acc"):
        raise ValueError(f"rank_readings: key must be logit_r2, logit_r2_scaled, agreement or surrogate_acc, got {key!r}")
    if shared_row_fraction(fit_images, images) > 0.5:
        raise ValueError("rank_readings: most evaluation images are also fit images; fit on the training split "
                         "and evaluate on the test split")
    decs = {r: decompose(model, force=force, reading=r, fit_images=fit_images, **fit_kwargs) for r in readings}
    fid = {r: fidelity(model, d, images, labels) for r, d in decs.items()}
    top = max(f[key] for f in fid.values())
    best = next(r for r in readings if fid[r][key] >= top - 1e-9)
    order = sorted(readings, key=lambda r: -fid[r][key])
    return {"best": best, "key": key, "order": order, "fidelity": fid, "decompositions": decs}
