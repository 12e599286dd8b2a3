"""Fitting a probe on every layer of a model from a contrast set: activations → directions → file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from probes.activations import text_activations
from probes.contrast import ContrastSet, describe
from probes.evaluate import Evaluation, fit_and_evaluate
from probes.methods import PAIRED_METHODS, REGRESSION_METHODS
from probes.probe_file import save_probe


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
    continuous target, the held-out Spearman correlation of the projection with it; for ``ridge``
    also ``alpha`` ``[L]``, the penalty chosen per layer). A regression method is fitted to that
    target (see :func:`probes.evaluate.fit_and_evaluate`).
    """
    acts = text_activations(model, contrast.token_ids, hook, layers, position, batch_size, on_batch, contrast.images)  # [L, n, d]
    labels = torch.from_numpy(contrast.labels)
    pairs = torch.from_numpy(contrast.pairs) if contrast.pairs is not None and method in PAIRED_METHODS else None
    ev = fit_and_evaluate(method, acts, labels, pairs=pairs, test_fraction=test_fraction, seed=seed, target=contrast.target)
    arrays = {
        "layers": np.asarray(layers, dtype=np.int64),
        "directions": ev.directions.numpy().astype(np.float32),
        "thresholds": ev.thresholds.numpy().astype(np.float32),
        "train_accuracy": ev.train_accuracy.numpy(),
        "test_accuracy": ev.test_accuracy.numpy(),
        "test_auroc": ev.test_auroc.numpy(),
        "test_margin": ev.test_margin.numpy(),
    }
    if ev.test_target_spearman is not None:
        arrays["test_target_spearman"] = ev.test_target_spearman.numpy()
    if ev.alpha is not None:
        arrays["alpha"] = ev.alpha.double().cpu().numpy()
    return ev, arrays


def probe_metadata(model: Any, contrast: ContrastSet, method: str, hook: str, position: str, test_fraction: float, seed: int, best_layer: int,
                   selected_by: str = "test_accuracy") -> dict[str, Any]:
    """The root attributes of a probe file (what `track` checks before using it)."""
    fitted_to = "label"
    if method in REGRESSION_METHODS and contrast.target is not None and np.isfinite(contrast.target).all():
        fitted_to = "target"
    return {
        "best_layer_by": selected_by, "fitted_to": fitted_to,
        "model_name": model.name, "model_path": model.path, "model_revision": model.revision,
        "d_model": model.d_model, "n_layers": model.n_layers, "hook": hook, "position": position,
        "method": method, "contrast": describe(contrast), "test_fraction": test_fraction, "seed": seed,
        "best_layer": best_layer,
        "adapter_sha256": (getattr(model, "adapter", None) or {}).get("sha256", ""),  # a merged LoRA adapter (--adapter), "" without
    }


def save_fitted(path: Path, model: Any, contrast: ContrastSet, method: str, hook: str, position: str,
                test_fraction: float, seed: int, ev: Evaluation, arrays: dict[str, np.ndarray]) -> Path:
    """Write the probe file of a fit; ``best_layer`` is stored as a model layer index."""
    best = int(arrays["layers"][ev.best_layer])
    return save_probe(path, probe_metadata(model, contrast, method, hook, position, test_fraction, seed, best, ev.selected_by), arrays)
