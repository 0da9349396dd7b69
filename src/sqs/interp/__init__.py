"""Weight-based interpretability: eigendecompose 1-layer GLU classifiers (Sec. 4.1).

    from sqs.interp import decompose, surrogate_logits, fidelity, cosine_per_rank
    dec = decompose(model)            # Bilinear: exact; SQS: first-order reading
    dec = decompose(model, reading="gain", fit_images=train_images)   # or "fit"
    best = rank_readings(model, train_images, test_images, test_labels)["best"]
    agreement_summary(pairings(decs_sqs, decs_bilinear), k=10)        # fair eigenvector agreement
"""

from sqs.interp.agreement import (  # noqa: F401
    SIDES,
    agreement,
    agreement_summary,
    form_cosine,
    pairings,
    side_indices,
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


def write_report(run_dirs, out_dir, dataset=None, **kwargs):
    """See `sqs.interp.report.write_report` (imported lazily: it pulls in matplotlib)."""
    from sqs.interp.report import write_report as _w

    return _w(run_dirs, out_dir, dataset, **kwargs)
