"""Held-out evaluation of concept directions, and scoring activations against them.

Scores are per layer: ``scores: [n_layers, n]`` against ``labels: [n]`` (0/1) give one number per
layer, ``[n_layers]``. Tensors or numpy arrays are accepted; results are tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from probes.methods import METHODS, PAIRED_METHODS, REGRESSION_METHODS, Fit

__all__ = [
    "Evaluation",
    "accuracy",
    "auroc",
    "best_layer",
    "cosine_scores",
    "fit_and_evaluate",
    "projection_scores",
    "ranks",
    "spearman",
    "split",
]


@dataclass(frozen=True)
class Evaluation:
    """A method fitted on a training split of every layer and scored on the held-out split.

    ``directions: [n_layers, d_model]`` and ``thresholds: [n_layers]`` as in :class:`probes.Fit`;
    ``train_accuracy``, ``test_accuracy``, ``test_auroc``, ``test_margin`` (mean |projection − threshold|
    over the held-out split, in activation units): ``[n_layers]``; ``best_layer``: the layer with the
    highest held-out accuracy (ties: higher AUROC, then larger margin, then lower layer), except for a
    regression method given a target, whose best layer is the one whose held-out projection has the
    highest Spearman ρ with the target (ties: lower layer); ``selected_by`` names the rule
    (``test_accuracy`` or ``test_target_spearman``). ``test_target_spearman`` ``[n_layers]`` (float64) is
    that ρ whenever a finite target was given, else None; ``alpha`` ``[n_layers]`` ridge's chosen
    penalty, else None. ``train_index`` and ``test_index`` are the sample indices (into ``acts``'
    sample dim) of the two splits.
    """

    method: str
    directions: Tensor
    thresholds: Tensor
    train_accuracy: Tensor
    test_accuracy: Tensor
    test_auroc: Tensor
    test_margin: Tensor
    best_layer: int
    train_index: Tensor
    test_index: Tensor
    test_target_spearman: Tensor | None = None
    selected_by: str = "test_accuracy"
    alpha: Tensor | None = None


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


def _tensor(x: Tensor | np.ndarray) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _check_scores(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Return ``scores: [L, n]``, boolean ``labels: [n]``, and whether scores came in 1-D."""
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [n] or [n_layers, n], got shape {tuple(scores.shape)}")
    single = scores.dim() == 1
    scores = scores.unsqueeze(0) if single else scores
    if labels.dim() != 1 or labels.shape[0] != scores.shape[1]:
        raise ValueError(
            f"labels must be [n] with n = {scores.shape[1]}, got shape {tuple(labels.shape)}"
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    return scores, labels.to(scores.device).bool(), single


def split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A deterministic random split of ``range(n)``.

    Returns ``(train_idx, test_idx)``, sorted int64 tensors ``[n - n_test]`` and ``[n_test]`` with
    ``n_test = round(n * test_fraction)``; the same ``(n, test_fraction, seed)`` always gives the same split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise ValueError(f"cannot split {n} items with test_fraction={test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_test:].sort().values, order[:n_test].sort().values


def accuracy(
    scores: Tensor | np.ndarray, labels: Tensor | np.ndarray, threshold: float | Tensor = 0.0
) -> Tensor:
    """Fraction of samples classified right, predicting 1 where ``score > threshold``.

    ``scores: [n_layers, n]`` (or ``[n]``), ``labels: [n]`` (0/1), ``threshold``: a number or
    ``[n_layers]``. Returns ``[n_layers]`` (or a 0-d tensor), float32.
    """
    scores, labels, single = _check_scores(_tensor(scores), _tensor(labels))
    threshold = torch.as_tensor(threshold, dtype=torch.float64)
    if threshold.dim() == 1:
        if threshold.shape[0] != scores.shape[0]:
            raise ValueError(f"threshold must be a number or [n_layers={scores.shape[0]}]")
        threshold = threshold[:, None]
    right = (scores.double() > threshold) == labels
    result = right.float().mean(1)
    return result[0] if single else result


def auroc(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> Tensor:
    """Exact area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    ``scores: [n_layers, n]`` (or ``[n]``), ``labels: [n]`` (0/1, both present). Returns
    ``[n_layers]`` (or a 0-d tensor), float64. Equal to the Mann-Whitney U statistic over
    ``n_pos * n_neg``, computed by binary search in the sorted negative scores: ``O(n log n)``.
    """
    scores, labels, single = _check_scores(_tensor(scores), _tensor(labels))
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs both positive and negative labels")
    scores = scores.double()
    negatives = scores[:, ~labels].sort(dim=1).values.contiguous()
    positives = scores[:, labels].contiguous()
    below = torch.searchsorted(negatives, positives, side="left")  # negatives strictly lower
    not_above = torch.searchsorted(negatives, positives, side="right")  # negatives lower or equal
    wins = (below + not_above).sum(1).double() / 2
    result = wins / (n_pos * n_neg)
    return result[0] if single else result


def best_layer(acc: Tensor | np.ndarray, auroc: Tensor | np.ndarray, margin: Tensor | np.ndarray | None = None) -> int:
    """The layer with the highest held-out accuracy; ties go to the higher AUROC, then to the larger
    margin (mean |logit| on the held-out split), then to the lower layer.

    ``acc``, ``auroc``, ``margin``: ``[n_layers]`` (no margin: zeros). Returns a row index.
    """
    acc, auc = _tensor(acc).tolist(), _tensor(auroc).tolist()
    gap = [0.0] * len(acc) if margin is None else _tensor(margin).tolist()
    if not acc or not len(acc) == len(auc) == len(gap):
        raise ValueError(f"acc, auroc and margin must be non-empty [n_layers]; got {len(acc)}, {len(auc)} and {len(gap)}")
    return min(range(len(acc)), key=lambda layer: (-acc[layer], -auc[layer], -gap[layer], layer))


def projection_scores(acts: Tensor | np.ndarray, direction: Tensor | np.ndarray) -> Tensor:
    """Projection of activations on unit directions: ``x · direction / |direction|``.

    ``direction: [n_layers, d_model]`` with ``acts: [..., n_layers, d_model]`` returns
    ``[..., n_layers]`` (each layer against its own direction); ``direction: [d_model]`` with
    ``acts: [..., d_model]`` returns ``[...]``. E.g. ``[n, rounds, L, d]`` and ``[L, d]`` give
    ``[n, rounds, L]``. Computed in float32 (float64 if either input is float64).
    """
    acts, direction = _tensor(acts), _tensor(direction)
    dtype = torch.promote_types(torch.promote_types(acts.dtype, direction.dtype), torch.float32)
    acts, direction = acts.to(dtype), direction.to(dtype)
    if acts.shape[-direction.dim():] != direction.shape:
        raise ValueError(
            f"acts {tuple(acts.shape)} must end in the direction's shape {tuple(direction.shape)}"
        )
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    if direction.dim() == 1:
        return acts @ unit
    return torch.einsum("...ld,ld->...l", acts, unit)


def cosine_scores(acts: Tensor | np.ndarray, direction: Tensor | np.ndarray) -> Tensor:
    """Cosine similarity between activations and directions: ``x · u / (|x| |u|)``.

    Same shapes as :func:`projection_scores`: ``[..., n_layers, d_model]`` with
    ``[n_layers, d_model]`` gives ``[..., n_layers]``; ``[..., d_model]`` with ``[d_model]`` gives
    ``[...]``. A zero activation vector scores 0.
    """
    acts = _tensor(acts)
    projection = projection_scores(acts, direction)
    norm = acts.to(projection.dtype).norm(dim=-1)
    return projection / norm.clamp_min(torch.finfo(projection.dtype).tiny)


def _pairs_split(pairs: Tensor, labels: Tensor, n: int, test_fraction: float, seed: int):
    """Split pair indices; return (train_pos, train_neg, train_idx, test_idx) as sample indices."""
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [n_pairs, 2] (positive index, negative index), got {tuple(pairs.shape)}")
    pairs = pairs.long()
    if bool(((pairs < 0) | (pairs >= n)).any()):
        raise ValueError(f"pairs index samples outside 0..{n - 1}")
    if pairs.unique().numel() != pairs.numel():
        raise ValueError("a sample appears in more than one pair; it could land on both sides of the split")
    if not bool((labels[pairs[:, 0]] == 1).all() and (labels[pairs[:, 1]] == 0).all()):
        raise ValueError("every pair must be (index of a label-1 sample, index of a label-0 sample)")
    train_pairs, test_pairs = split(pairs.shape[0], test_fraction, seed)
    train, test = pairs[train_pairs], pairs[test_pairs]
    return train[:, 0], train[:, 1], train.reshape(-1).sort().values, test.reshape(-1).sort().values


def fit_and_evaluate(
    method: str | Callable[..., Fit],
    acts: Tensor,
    labels: Tensor,
    pairs: Tensor | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    target: Tensor | np.ndarray | None = None,
    **options,
) -> Evaluation:
    """Fit ``method`` on a training split of every layer and score it on the held-out split.

    ``acts: [n_layers, n, d_model]`` (or ``[n, d_model]``, one layer), ``labels: [n]`` (0/1).
    ``pairs: [n_pairs, 2]`` optionally pairs samples as (label-1 index, label-0 index); when given,
    the split is drawn over pairs so both members of a pair land on the same side, the method sees
    ``pos[i]`` paired with ``neg[i]``, and samples outside every pair are not used. The paired
    methods (``pca``, ``ccs``) require ``pairs``. Without pairs the split is stratified by label.
    ``target: [n]`` optionally gives each sample a continuous ground truth (the organism's exact
    log-odds): a regression method (``ridge``) is fitted to it instead of the label and its best
    layer is chosen by the held-out Spearman ρ with it; every method's held-out ρ with it is reported.
    ``options`` go to the method (e.g. ``l2=`` for logreg, ``seed=`` for ccs).

    Returns an :class:`Evaluation` whose per-layer arrays are ``[n_layers]`` and
    ``directions: [n_layers, d_model]``.
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        name, fit_fn = method, METHODS[method]
    else:
        fit_fn = method
        name = next((k for k, v in METHODS.items() if v is method), getattr(method, "__name__", "custom"))
    acts = _tensor(acts)
    labels = _tensor(labels).long().to(acts.device)
    if acts.dim() == 2:
        acts = acts.unsqueeze(0)
    if acts.dim() != 3 or labels.shape != (acts.shape[1],):
        raise ValueError(
            f"acts must be [n_layers, n, d_model] and labels [n]; got {tuple(acts.shape)} and {tuple(labels.shape)}"
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    n = acts.shape[1]

    if pairs is not None:
        train_pos, train_neg, train_idx, test_idx = _pairs_split(
            _tensor(pairs), labels, n, test_fraction, seed
        )
    elif name in PAIRED_METHODS:
        raise ValueError(f"method {name!r} needs pairs (pos[i] paired with neg[i]); pass pairs=")
    else:
        parts = []
        for value in (1, 0):
            members = (labels == value).nonzero().squeeze(1)
            if len(members) < 2:
                raise ValueError(f"need at least two samples with label {value}, got {len(members)}")
            tr, te = split(len(members), test_fraction, seed)
            parts.append((members[tr], members[te]))
        train_pos, train_neg = parts[0][0], parts[1][0]
        train_idx = torch.cat([parts[0][0], parts[1][0]]).sort().values
        test_idx = torch.cat([parts[0][1], parts[1][1]]).sort().values

    if target is not None:
        target = _tensor(target).double().cpu()
        if target.shape != (n,):
            raise ValueError(f"target must be [n] with n = {n}, got shape {tuple(target.shape)}")
        if not bool(torch.isfinite(target).all()):
            target = None  # e.g. the organism's pairs, whose texts have no single posterior
    if name in REGRESSION_METHODS and target is not None:
        options = {"target": torch.cat([target[train_pos.cpu()], target[train_neg.cpu()]]), **options}
    fit = fit_fn(acts[:, train_pos], acts[:, train_neg], **options)
    with torch.no_grad():
        projection = torch.einsum("lnd,ld->ln", acts.float(), fit.direction)
        margin = projection - fit.threshold[:, None]
        train_acc = accuracy(margin[:, train_idx], labels[train_idx])
        test_acc = accuracy(margin[:, test_idx], labels[test_idx])
        test_auc = auroc(projection[:, test_idx], labels[test_idx])
        test_margin = margin[:, test_idx].abs().mean(1)
    rho, selected_by, best = None, "test_accuracy", best_layer(test_acc, test_auc, test_margin)
    if target is not None:
        held_out = projection[:, test_idx].double().cpu().numpy()
        rho = torch.tensor([spearman(row, target[test_idx.cpu()].numpy()) for row in held_out], dtype=torch.float64)
        if name in REGRESSION_METHODS:
            selected_by = "test_target_spearman"
            best = int(np.argmax(np.nan_to_num(rho.numpy(), nan=-2.0)))  # ties: the first (lowest) layer
    return Evaluation(
        method=name,
        directions=fit.direction,
        thresholds=fit.threshold,
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        test_auroc=test_auc,
        test_margin=test_margin,
        best_layer=best,
        train_index=train_idx,
        test_index=test_idx,
        test_target_spearman=rho,
        selected_by=selected_by,
        alpha=fit.alpha,
    )
