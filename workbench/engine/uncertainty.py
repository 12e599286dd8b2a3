"""Per-round uncertainty: token entropy, option confidence, calibration, semantic entropy (DESIGN §6).

All functions are pure; the torch ones take logits and return tensors, the calibration ones take
NumPy arrays. Entropies are in nats. torch is imported inside the two functions that take tensors,
so the NumPy ones (what :mod:`workbench.analysis.summary` and ``workbench info`` use) never load it.
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


def normalised_exact_match(a: str, b: str) -> bool:
    """The default equivalence of sampled answers: equal after lower-casing, collapsing whitespace and
    stripping surrounding punctuation."""
    norm = lambda t: " ".join(t.lower().split()).strip(" .,;:!?\"'")  # noqa: E731
    return norm(a) == norm(b)


def cluster_answers(answers: Sequence[str], equivalent: Callable[[str, str], bool] = normalised_exact_match) -> np.ndarray:
    """Cluster ids ``[k]`` (0, 1, … in order of first appearance) of k sampled answers: each answer joins
    the first cluster whose representative (its first member) it is ``equivalent`` to."""
    return _first_member_clusters(len(answers), lambda i, r: equivalent(answers[i], answers[r]))


def cluster_by_equivalence(equivalent: np.ndarray) -> np.ndarray:
    """:func:`cluster_answers` from decisions already made: ``equivalent`` ``[k, k]`` bool (entry i, j:
    answer i is equivalent to answer j) → cluster ids ``[k]``. Answer i joins the first cluster whose
    first member r has ``equivalent[i, r]``; only those entries are read."""
    equivalent = np.asarray(equivalent, dtype=bool)
    if equivalent.ndim != 2 or equivalent.shape[0] != equivalent.shape[1]:
        raise ValueError(f"equivalence decisions must be a square [k, k] matrix, not {equivalent.shape}")
    return _first_member_clusters(equivalent.shape[0], lambda i, r: bool(equivalent[i, r]))


def _first_member_clusters(k: int, same: Callable[[int, int], bool]) -> np.ndarray:
    representatives: list[int] = []
    ids = []
    for i in range(k):
        for c, r in enumerate(representatives):
            if same(i, r):
                ids.append(c)
                break
        else:
            ids.append(len(representatives))
            representatives.append(i)
    return np.asarray(ids, dtype=np.int64)


def semantic_entropy_discrete(cluster_ids: Sequence[int] | np.ndarray) -> float:
    """Discrete semantic entropy (Kuhn et al.; Farquhar et al.'s "discrete"): −Σ p(C) log p(C) with
    p(C) = the fraction of the k samples in cluster C. Nats."""
    counts = np.bincount(np.asarray(cluster_ids, dtype=np.int64))
    return float(distribution_entropy(counts[counts > 0] / counts.sum()))


def semantic_entropy_weighted(cluster_ids: Sequence[int] | np.ndarray, mean_log_likelihood: Sequence[float] | np.ndarray) -> float:
    """Probability-weighted semantic entropy: a cluster's log-probability is the logsumexp of its members'
    mean-token log-likelihoods, normalised over all k samples (log p(C) = lse_C − lse_all); entropy
    −Σ p(C) log p(C). Nats."""
    ids = np.asarray(cluster_ids, dtype=np.int64)
    ll = np.asarray(mean_log_likelihood, dtype=np.float64)
    total = np.logaddexp.reduce(ll)
    log_p = np.array([np.logaddexp.reduce(ll[ids == c]) - total for c in np.unique(ids)])
    return float(-(np.exp(log_p) * log_p).sum())


def study_cluster_uncertainty(cluster_ids: Sequence[int] | np.ndarray, mean_nll: Sequence[float] | np.ndarray) -> float:
    """The study's own estimator, labelled as such: the mean over clusters of the mean NLL of each
    cluster's members. Not an entropy (it does not weigh clusters by their probability); kept because
    the study's semantic-entropy numbers were computed with it."""
    ids = np.asarray(cluster_ids, dtype=np.int64)
    nll = np.asarray(mean_nll, dtype=np.float64)
    return float(np.mean([nll[ids == c].mean() for c in np.unique(ids)]))


def semantic_entropy(answers: Sequence[str], equivalent: Callable[[str, str], bool] = normalised_exact_match) -> float:
    """Discrete semantic entropy (Kuhn et al., 2023) of k sampled answers, clustered by ``equivalent``:
    :func:`semantic_entropy_discrete` of :func:`cluster_answers`."""
    return semantic_entropy_discrete(cluster_answers(answers, equivalent)) if len(answers) else 0.0


def rank_calibration_error(uncertainty: np.ndarray, correctness: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Rank-calibration error (Huang et al. 2024, arXiv 2404.03163): how far an uncertainty measure's
    ranking is from the ranking of expected correctness. A measure is rank-calibrated when lower
    uncertainty means higher expected correctness, E[A | U = u] decreasing in u; RCE is
    E_U |P(reg(U') ≥ reg(U)) − P(U' ≤ U)| with reg the regression of correctness on uncertainty.

    The plug-in estimator of the reference code (``shuoli90/Rank-Calibration``,
    ``metrics/calibration.py`` ``plugin_RCE_est`` with its defaults: p = 1, ``num_bins`` equal-mass
    bins, no kernel): sort by uncertainty (ties in the sort's stable order); the uncertainty CDF of the
    i-th is i/(n − 1); reg is the mean correctness of its bin (bin edges ``round(linspace(0, n, B + 1))``);
    the inverse CDF of reg is (#{j: reg_j ≥ reg_i} − 1)/(n − 1), de-tied within a bin by subtracting
    (size − 1)/(2(n − 1)); RCE is the mean absolute difference of the two.

    ``uncertainty``, ``correctness`` ``[..., n]`` (correctness in [0, 1], higher is better; rows
    computed independently, for a bootstrap) → ``[...]`` float64. NaN when n < 2. Non-finite entries
    are not dropped here (the caller drops them)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    a = np.asarray(correctness, dtype=np.float64)
    shape, n = u.shape[:-1], u.shape[-1]
    if n < 2:
        return np.full(shape, np.nan)
    u, a = u.reshape(-1, n), a.reshape(-1, n)
    order = np.argsort(u, axis=1, kind="stable")
    a_sorted = np.take_along_axis(a, order, axis=1)
    edges = [round(float(e)) for e in np.linspace(0, n, n_bins + 1)]  # Python's round, as the reference's
    bins = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    sizes = np.array([hi - lo for lo, hi in bins], dtype=np.float64)  # [b]
    reg = np.stack([a_sorted[:, lo:hi].mean(1) for lo, hi in bins], 1)  # [m, b]
    at_least = (reg[:, None, :] >= reg[:, :, None]) @ sizes  # [m, b]: #{j: reg_j ≥ reg of bin}
    detied = (at_least - 1) / (n - 1) - (sizes - 1) / (2 * (n - 1))  # [m, b]
    cdf = np.arange(n) / (n - 1)
    total = np.zeros(len(u))
    for column, (lo, hi) in enumerate(bins):
        total += np.abs(detied[:, column : column + 1] - cdf[lo:hi]).sum(1)
    return (total / n).reshape(shape)
