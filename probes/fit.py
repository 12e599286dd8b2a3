"""Fitting a probe on every layer of a model from a contrast set: activations → directions → file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from probes.activations import text_activations
from probes.contrast import ContrastSet, describe
from probes.evaluate import Evaluation, fit_and_evaluate, projection_scores
from probes.methods import PAIRED_METHODS
from probes.probe_file import save_probe


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``[n]`` values, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return (sums / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two ``[n]`` arrays (Pearson of average ranks)."""
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def fit_probe(
    model: Any,
    contrast: ContrastSet,
    method: str,
    hook: str,
    layers: list[int],
    position: str = "last",
    test_fraction: float = 0.25,
    seed: int = 0,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Evaluation, dict[str, np.ndarray]]:
    """Fit ``method`` on the contrast's activations at ``hook``/``position`` for every layer.

    Returns the held-out :class:`Evaluation` and the arrays of a probe file (``layers``,
    ``directions`` ``[L, d_model]``, per-layer accuracies and AUROC, and, when the contrast has a
    continuous target, the held-out Spearman correlation of the projection with it).
    """
    acts = text_activations(model, contrast.token_ids, hook, layers, position, batch_size, on_batch)  # [L, n, d]
    labels = torch.from_numpy(contrast.labels)
    pairs = torch.from_numpy(contrast.pairs) if contrast.pairs is not None and method in PAIRED_METHODS else None
    ev = fit_and_evaluate(method, acts, labels, pairs=pairs, test_fraction=test_fraction, seed=seed)
    arrays = {
        "layers": np.asarray(layers, dtype=np.int64),
        "directions": ev.directions.numpy().astype(np.float32),
        "thresholds": ev.thresholds.numpy().astype(np.float32),
        "train_accuracy": ev.train_accuracy.numpy(),
        "test_accuracy": ev.test_accuracy.numpy(),
        "test_auroc": ev.test_auroc.numpy(),
        "test_margin": ev.test_margin.numpy(),
    }
    if contrast.target is not None and np.isfinite(contrast.target).all():
        test = ev.test_index.numpy()
        scores = projection_scores(acts[:, test].permute(1, 0, 2), ev.directions).numpy()  # [n_test, L]
        arrays["test_target_spearman"] = np.array([spearman(scores[:, j], contrast.target[test]) for j in range(len(layers))])
    return ev, arrays


def probe_metadata(model: Any, contrast: ContrastSet, method: str, hook: str, position: str, test_fraction: float, seed: int, best_layer: int) -> dict[str, Any]:
    """The root attributes of a probe file (what `track` checks before using it)."""
    return {
        "model_name": model.name, "model_path": model.path, "model_revision": model.revision,
        "d_model": model.d_model, "n_layers": model.n_layers, "hook": hook, "position": position,
        "method": method, "contrast": describe(contrast), "test_fraction": test_fraction, "seed": seed,
        "best_layer": best_layer,
    }


def save_fitted(path: Path, model: Any, contrast: ContrastSet, method: str, hook: str, position: str,
                test_fraction: float, seed: int, ev: Evaluation, arrays: dict[str, np.ndarray]) -> Path:
    """Write the probe file of a fit; ``best_layer`` is stored as a model layer index."""
    best = int(arrays["layers"][ev.best_layer])
    return save_probe(path, probe_metadata(model, contrast, method, hook, position, test_fraction, seed, best), arrays)
