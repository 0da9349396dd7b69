"""Weight-based interpretability: eigendecompose 1-layer GLU classifiers (Sec. 4.1).

    from sqs.interp import decompose, surrogate_logits, fidelity, cosine_per_rank
    dec = decompose(model)            # Bilinear: exact; SQS: first-order reading

Pure analysis over models, weight tensors and data tensors: nothing here reads run
directories or trains (the Sec. 4.1 experiment is `sqs.experiments.spectra`).
`sqs.interp.plots` draws the figures (matplotlib).
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

