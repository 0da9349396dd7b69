"""Weight-based interpretability: eigendecompose 1-layer GLU classifiers (Sec. 4.1).

    from sqs.interp import decompose, surrogate_logits, fidelity, cosine_per_rank
    dec = decompose(model)            # Bilinear: exact; SQS: first-order reading
    dec = decompose(model, reading="gain", fit_images=train_images)   # or "fit"
    best = rank_readings(model, train_images, test_images, test_labels)["best"]
    agreement_summary(pairings(decs_sqs, decs_bilinear), k=10)        # fair eigenvector agreement

Pure analysis over models, weight tensors and data tensors: nothing here reads run
directories or trains (the Sec. 4.1 experiment is `sqs.experiments.spectra`).
`sqs.interp.plots` draws the figures (matplotlib).
"""

from sqs.interp.agreement import (  # noqa: F401
    SIDES,
    agreement,
    agreement_summary,
    form_cosine,
    pairings,
    side_indices,
    summarise,
    vector_agreement,
)
from sqs.interp.readings import READINGS, fit_quadratic_forms, unit_gains  # noqa: F401

from sqs.interp.spectra import (  # noqa: F401
    DEFAULT_KS,
    EXACT_READING,
    FIRST_ORDER_READING,
    FIT_READING,
    GAIN_READING,
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
    rank_readings,
    reading_matrices,
    surrogate_logits,
    surrogate_terms,
)

from sqs.interp.lm_quadratic import GAIN_READING as LM_GAIN_READING  # noqa: F401,E402
from sqs.interp.lm_quadratic import (  # noqa: F401,E402
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
