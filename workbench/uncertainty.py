"""Per-round uncertainty: token entropy, option confidence, calibration, semantic entropy (DESIGN §6).

All functions are pure; the torch ones take logits and return tensors, the calibration ones take
NumPy arrays. Entropies are in nats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # torch loads only when a torch function runs: analysis and `info` stay light
    import torch


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position.

    logits ``[..., vocab]`` → ``[...]`` (float32, computed in float32 whatever the model dtype).
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def option_confidence(mean_nll: torch.Tensor) -> torch.Tensor:
    """The study's "logit confidence": s(o) = exp(−mean NLL of o's tokens), normalised over options.

    mean_nll ``[..., n_options]`` → p̂ ``[..., n_options]`` summing to 1 (a softmax of −mean NLL).
    """
    import torch

    return torch.softmax(-mean_nll.float(), dim=-1)


def distribution_entropy(p: np.ndarray | torch.Tensor, axis: int = -1) -> np.ndarray:
    """Entropy of discrete distributions along ``axis`` (0·log 0 = 0). ``[..., k]`` → ``[...]``."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10, span: str = "unit"
) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins.

    ``span="unit"`` bins [0, 1] (the usual ECE); ``span="range"`` bins [min, max] of the observed
    confidences (the study's variant). confidence, correct ``[n]`` → a float (NaN when n = 0).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    keep = np.isfinite(confidence)
    confidence, correct = confidence[keep], correct[keep]
    if confidence.size == 0:
        return float("nan")
    lo, hi = (0.0, 1.0) if span == "unit" else (float(confidence.min()), float(confidence.max()))
    if span not in ("unit", "range"):
        raise ValueError(f"span must be 'unit' or 'range', not {span!r}")
    if hi <= lo:
        return float(abs(confidence.mean() - correct.mean()))
    bins = np.clip(((confidence - lo) / (hi - lo) * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            ece += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(ece)


def semantic_entropy(answers: Sequence[str], equivalent: Callable[[str, str], bool]) -> float:
    """Semantic entropy (Kuhn et al., 2023) of k sampled answers: −Σ p(C) log p(C) over clusters.

    Answers are clustered greedily: each joins the first cluster whose representative it is
    ``equivalent`` to. p(C) is the fraction of samples in C.
    """
    representatives: list[str] = []
    counts: list[int] = []
    for a in answers:
        for i, r in enumerate(representatives):
            if equivalent(a, r):
                counts[i] += 1
                break
        else:
            representatives.append(a)
            counts.append(1)
    p = np.asarray(counts, dtype=np.float64) / max(1, len(answers))
    return float(distribution_entropy(p))
