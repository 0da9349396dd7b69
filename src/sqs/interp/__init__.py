"""Weight-based interpretability: eigendecompose 1-layer GLU classifiers (Sec. 4.1).

    from sqs.interp import decompose, surrogate_logits, fidelity, cosine_per_rank
    dec = decompose(model)            # Bilinear: exact; SQS: first-order reading
"""

from sqs.interp.spectra import (  # noqa: F401
    DEFAULT_KS,
    EXACT_READING,
    FIRST_ORDER_READING,
    Decomposition,
    NotQuadratic,
    UnsupportedGate,
    contributions,
    cosine_best_match,
    cosine_per_rank,
    decompose,
    eig_sorted,
    fidelity,
    interaction_matrices,
    model_logits,
    pair_cosines,
    quadratic_form,
    surrogate_logits,
    surrogate_terms,
)


def write_report(run_dirs, out_dir, dataset=None, **kwargs):
    """See `sqs.interp.report.write_report` (imported lazily: it pulls in matplotlib)."""
    from sqs.interp.report import write_report as _w

    return _w(run_dirs, out_dir, dataset, **kwargs)
from sqs.interp.lm_quadratic import (  # noqa: F401,E402
    GAIN_READING,
    LayerInputs,
    Spectrum,
    direct_contribution,
    direction_matrices,
    direction_matrix,
    direction_norms,
    eig_signed,
    glu_weights,
    layer_inputs,
    lm_fidelity,
    max_activating,
    mean_inv_rms,
    orient,
    read_tokens,
    split_windows,
    token_directions,
    token_id,
    token_inputs,
    top_promoted,
)
