"""Concept directions: fitting methods, held-out evaluation, and scoring activations against them.

A method is a plain function from positive and negative activations to a direction:
``METHODS[name](pos, neg) -> Fit`` with ``pos: [n_layers, n_pos, d_model]`` (or ``[n, d_model]``).

The names below load on first use (they need torch), so ``import probes.cli`` or
``probes.probe_file`` — what ``workbench --help`` and ``probe show`` touch — stays torch-free.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Evaluation": "probes.evaluate",
    "accuracy": "probes.evaluate",
    "auroc": "probes.evaluate",
    "best_layer": "probes.evaluate",
    "cosine_scores": "probes.evaluate",
    "fit_and_evaluate": "probes.evaluate",
    "projection_scores": "probes.evaluate",
    "spearman": "probes.evaluate",
    "split": "probes.evaluate",
    "METHODS": "probes.methods",
    "PAIRED_METHODS": "probes.methods",
    "REGRESSION_METHODS": "probes.methods",
    "Fit": "probes.methods",
    "ccs": "probes.methods",
    "diffmean": "probes.methods",
    "logreg": "probes.methods",
    "pca": "probes.methods",
    "ridge": "probes.methods",
    "sklearn_c": "probes.methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
