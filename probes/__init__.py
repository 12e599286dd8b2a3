"""Concept directions: fitting methods, held-out evaluation, and scoring activations against them.

A method is a plain function from positive and negative activations to a direction:
``METHODS[name](pos, neg) -> Fit`` with ``pos: [n_layers, n_pos, d_model]`` (or ``[n, d_model]``).
"""

from probes.evaluate import (
    Evaluation,
    accuracy,
    auroc,
    best_layer,
    cosine_scores,
    fit_and_evaluate,
    projection_scores,
    split,
)
from probes.methods import METHODS, PAIRED_METHODS, Fit, ccs, diffmean, logreg, pca, sklearn_c

__all__ = [
    "METHODS",
    "PAIRED_METHODS",
    "Evaluation",
    "Fit",
    "accuracy",
    "auroc",
    "best_layer",
    "ccs",
    "cosine_scores",
    "diffmean",
    "fit_and_evaluate",
    "logreg",
    "pca",
    "projection_scores",
    "sklearn_c",
    "split",
]
