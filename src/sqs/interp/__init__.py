"""Weight-based interpretability: GLU layers of every gate read as quadratic forms.

    from sqs.interp import decompose, surrogate_logits, fidelity, cosine_per_rank
    dec = decompose(model)            # 1-layer Bilinear: exact; SQS: first-order reading
    dec = decompose(model, reading="affine", fit_images=train_images)   # or "gain", "fit"
    best = rank_readings(model, train_images, test_images, test_labels)["best"]
    agreement_summary(pairings(decs_sqs, decs_bilinear), k=10)        # fair eigenvector agreement

    # the reading protocol, any gate, any depth (sqs.interp.image_stack, sqs.interp.compare):
    res = read_model(model, train_images, test_images, test_labels)  # res["best"], res["fidelity"][...]
    cmp = compare_models(model_a, model_b, train_images, test_images, test_labels)  # best reading of each

Modules: `readings` (the math of a reading: per-unit gate fits, forms in [x; 1], least squares),
`layer_readings` (one GLU layer read in any gate), `image_stack` (image classifiers of any depth),
`compare` (two models, each through its most faithful reading), `spectra` (1-layer decompositions
in pixel space), `agreement` (fair eigenvector matching), `lm_quadratic` (decoder GLU layers).

Pure analysis over models, weight tensors and data tensors: nothing here reads run
directories or trains (the Sec. 4.1 experiment is `sqs.experiments.weight_spectra`).
`sqs.interp.plots` draws the figures (matplotlib).
"""

from sqs.interp.agreement import (  # noqa: F401
    SIDES,
    agreement,
    profiles,
    agreement_summary,
    form_cosine,
    pairings,
    side_indices,
    summarise,
    vector_agreement,
)
from sqs.interp.readings import (  # noqa: F401
    FIRST_ORDER_SLOPE,
    READINGS,
    first_order_slope,
    fit_quadratic_forms,
    homogeneous,
    homogeneous_forms,
    interaction_matrices,
    quadratic_form,
    r2,
    unit_affine,
    unit_gains,
    unit_reading,
    unit_weights,
)
from sqs.interp.layer_readings import (  # noqa: F401
    GLUWeights,
    LayerReading,
    best_reading,
    layer_fidelity,
    output_scores,
    read_layer,
    read_layers,
)

from sqs.interp.spectra import (  # noqa: F401
    DEFAULT_KS,
    EXACT_READING,
    FIRST_ORDER_READING,
    FIT_READING,
    GAIN_READING,
    AFFINE_READING,
    Decomposition,
    NotQuadratic,
    UnsupportedGate,
    contributions,
    cosine_best_match,
    cosine_per_rank,
    decompose,
    eig_sorted,
    fidelity,
    forms_decomposition,
    model_logits,
    pair_cosines,
    rank_readings,
    reading_matrices,
    surrogate_logits,
    surrogate_terms,
    to_homogeneous,
)
from sqs.interp.image_stack import (  # noqa: F401
    StackTrace,
    class_forms,
    decomposition,
    read_model,
    read_stack,
    stack_fidelity,
    stack_layers,
    surrogate_trace,
    trace,
)
from sqs.interp.compare import compare_models, compare_read, stack_agreement, summary_brief  # noqa: F401

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
    lm_reading_fidelity,
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
