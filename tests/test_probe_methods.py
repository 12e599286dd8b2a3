"""Probe methods and their evaluation, on synthetic activations with a known planted direction."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from probes import (
    METHODS,
    accuracy,
    auroc,
    best_layer,
    ccs,
    cosine_scores,
    diffmean,
    fit_and_evaluate,
    logreg,
    projection_scores,
    ridge,
    sklearn_c,
    split,
)
from probes.methods import RIDGE_ALPHAS

# Small problems: one thread (torch and BLAS) avoids thread start-up and contention costs.
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


FAST_CCS = dict(n_restarts=4, epochs=300, lr=1e-2)


def _options(name: str) -> dict:
    return FAST_CCS if name == "ccs" else {}


def _unit_rows(generator: torch.Generator, n_rows: int, d: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n_rows, d, generator=generator), dim=1)


def _paired(n_layers=3, n=2000, d=8, delta=1.0, noise=0.1, seed=0):
    """Contrast pairs differing along one planted direction per layer: x ± delta·u + noise.

    Returns pos, neg: [n_layers, n, d] and the planted directions u: [n_layers, d].
    """
    g = torch.Generator().manual_seed(seed)
    u = _unit_rows(g, n_layers, d)
    base = torch.randn(n_layers, n, d, generator=g) + 3.0
    pos = base + delta * u[:, None] + noise * torch.randn(n_layers, n, d, generator=g)
    neg = base - delta * u[:, None] + noise * torch.randn(n_layers, n, d, generator=g)
    return pos, neg, u


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# ------------------------------------------------------------------------------ planted directions


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_recovers_the_planted_direction_of_every_layer(name):
    pos, neg, u = _paired()
    fit = METHODS[name](pos, neg, **_options(name))
    assert fit.direction.shape == (3, 8) and fit.threshold.shape == (3,)
    assert torch.allclose(fit.direction.norm(dim=1), torch.ones(3), atol=1e-5)
    cos = _cosine(fit.direction, u)
    assert (cos >= 0.99).all(), f"{name}: cosine with the planted direction {cos.tolist()}"


@pytest.mark.parametrize("name", ["diffmean", "logreg", "ridge"])
def test_unpaired_methods_recover_the_direction_from_unbalanced_classes(name):
    g = torch.Generator().manual_seed(1)
    u = _unit_rows(g, 4, 16)
    offset = 5 * torch.randn(4, 1, 16, generator=g)
    pos = offset + torch.randn(4, 1500, 16, generator=g) + 1.5 * u[:, None]
    neg = offset + torch.randn(4, 900, 16, generator=g) - 1.5 * u[:, None]
    fit = METHODS[name](pos, neg)
    assert (_cosine(fit.direction, u) >= 0.99).all()


def test_ccs_swap_sides_matters_for_concept_pairs_and_burns_style_pairs():
    # Concept pairs (the concept always on the pos side): per-side centring removes the concept
    # unless the sides are swapped at random.
    pos, neg, u = _paired()
    assert (_cosine(ccs(pos, neg, swap_sides=True, **FAST_CCS).direction, u) >= 0.99).all()
    assert (_cosine(ccs(pos, neg, swap_sides=False, **FAST_CCS).direction, u).abs() < 0.5).all()
    # Burns-style pairs (fixed "yes"/"no" phrasing offset v, latent truth s varies): keep the sides.
    g = torch.Generator().manual_seed(2)
    v = _unit_rows(g, 3, 8)
    truth = (torch.rand(2000, generator=g) < 0.5).float()[None, :, None] * 2 - 1
    base = (pos + neg) / 2
    yes = base + truth * u[:, None] + 4 * v[:, None]
    no = base - truth * u[:, None] - 4 * v[:, None]
    assert (_cosine(ccs(yes, no, swap_sides=False, **FAST_CCS).direction, u).abs() >= 0.99).all()
    assert (_cosine(ccs(yes, no, swap_sides=True, **FAST_CCS).direction, u).abs() < 0.9).all()


def test_ccs_is_deterministic_given_a_seed():
    pos, neg, _ = _paired(n_layers=2, n=300)
    a, b = ccs(pos, neg, seed=3, **FAST_CCS), ccs(pos, neg, seed=3, **FAST_CCS)
    assert torch.equal(a.direction, b.direction) and torch.equal(a.threshold, b.threshold)


# ------------------------------------------------------------------------- logreg against sklearn


def _noisy_layers(n_layers=4, n=1000, d=32, seed=0):
    """Labelled activations where a linear probe reaches ~0.8 held-out accuracy.

    Features have a spread spectrum, a large mean, and a few massive dimensions, like a residual
    stream. Returns acts: [n_layers, n, d], labels: [n].
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.45).long()
    u = _unit_rows(g, n_layers, d)
    scales = torch.logspace(-0.5, 0.5, d)
    acts = torch.randn(n_layers, n, d, generator=g) * scales
    acts = acts @ torch.linalg.qr(torch.randn(n_layers, d, d, generator=g)).Q
    acts = acts + (labels[None, :, None] * 2 - 1) * 0.9 * u[:, None] + 4.0
    acts[:, :, :2] = acts[:, :, :2] * 20 + 50
    return acts, labels


def test_logreg_matches_sklearn_held_out_accuracy_per_layer():
    acts, labels = _noisy_layers()
    train, test = split(acts.shape[1], 0.3, seed=0)
    y_train, y_test = labels[train], labels[test]
    l2 = 1e-2
    fit = logreg(acts[:, train][:, y_train == 1], acts[:, train][:, y_train == 0], l2=l2)
    ours = accuracy(projection_scores(acts[:, test].transpose(0, 1), fit.direction).T, y_test, fit.threshold)
    for layer in range(acts.shape[0]):
        x_train = acts[layer, train].double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(C=sklearn_c(l2, len(train)), max_iter=10_000)
            clf.fit(x_train, y_train.numpy())
        theirs = clf.score(acts[layer, test].double().numpy(), y_test.numpy())
        assert 0.7 <= theirs <= 0.9, f"layer {layer}: the dataset should be hard, sklearn got {theirs}"
        assert abs(float(ours[layer]) - theirs) <= 0.01, f"layer {layer}: {float(ours[layer])} vs {theirs}"
        w = torch.as_tensor(clf.coef_[0]).float()
        assert float(_cosine(fit.direction[layer], w)) >= 0.99


@pytest.mark.parametrize("d_model", [40, 200])  # d < n (primal preconditioner) and d > n (Woodbury)
def test_logreg_solves_sklearns_problem(d_model):
    g = torch.Generator().manual_seed(4)
    pos = torch.randn(2, 60, d_model, generator=g)
    neg = torch.randn(2, 40, d_model, generator=g) * 1.5
    pos[:, :, :4] += 1.0
    pos[:, :, 7] *= 20
    l2 = 1e-2
    fit = logreg(pos, neg, l2=l2, tol=1e-6)
    for layer in range(2):
        x = torch.cat([pos[layer], neg[layer]]).double().numpy()
        y = np.r_[np.ones(60), np.zeros(40)]
        clf = LogisticRegression(C=sklearn_c(l2, 100), tol=1e-10, max_iter=100_000).fit(x, y)
        norm = np.linalg.norm(clf.coef_[0])
        assert float(_cosine(fit.direction[layer], torch.as_tensor(clf.coef_[0]).float())) >= 0.9999
        assert abs(float(fit.threshold[layer]) + clf.intercept_[0] / norm) < 1e-2


def test_logreg_rejects_a_non_positive_penalty_and_warns_when_not_converged():
    pos, neg, _ = _paired(n_layers=1, n=20)
    with pytest.raises(ValueError, match="l2"):
        logreg(pos, neg, l2=0.0)
    with pytest.warns(UserWarning, match="did not converge"):
        logreg(pos, neg, max_iter=1)


# --------------------------------------------------------------------------------- ridge


def _linear_target(n_layers=3, n=400, d=12, noise=0.0, seed=0):
    """Activations with a known linear target per layer: y = x · w_l + 2 + noise (one y for all
    layers would need one w, so each layer gets its own x). Returns x [L, n, d], y [L, n], w [L, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_layers, n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64) + 5
    w = torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    y = torch.einsum("lnd,ld->ln", x, w) + 2 + noise * torch.randn(n_layers, n, generator=g, dtype=torch.float64)
    return x, y, w


def test_ridge_recovers_a_known_linear_target_exactly():
    # Hand-checkable: a noiseless y = x · w + 2 has zero leave-one-out error at the smallest penalty,
    # which the grid then picks, and its direction is w / |w| (up to that penalty: α / s² ≤ 1e-4 here).
    x, y, w = _linear_target()
    for layer in range(3):
        fit = ridge(x[layer, :150], x[layer, 150:], target=y[layer])
        assert float(fit.alpha) == pytest.approx(RIDGE_ALPHAS[0] * float(((x[layer] - x[layer].mean(0)) ** 2).sum()) / 12)
        assert torch.allclose(fit.direction.double(), w[layer] / w[layer].norm(), atol=1e-4)


@pytest.mark.parametrize("n, d", [(300, 16), (40, 64)])  # d ≤ n: the [d, d] Gram; d > n: the [n, n] one
def test_ridge_matches_sklearn_ridgecv_on_every_layer(n, d):
    from sklearn.linear_model import RidgeCV

    x, y, _ = _linear_target(n_layers=3, n=n, d=d, noise=3.0, seed=1)
    target = y[0]  # one target, three layers that explain it differently well
    fit = ridge(x[:, : n // 3], x[:, n // 3 :], target=target)
    for layer in range(3):
        grid = np.array(RIDGE_ALPHAS) * float(((x[layer] - x[layer].mean(0)) ** 2).sum()) / d
        reference = RidgeCV(alphas=grid).fit(x[layer].numpy(), target.numpy())
        assert float(fit.alpha[layer]) == pytest.approx(reference.alpha_, rel=1e-6)  # ridge works on float32 input
        coef = torch.from_numpy(reference.coef_)
        assert float(_cosine(fit.direction[layer].double(), coef / coef.norm())) > 1 - 1e-6


def test_ridge_fits_the_target_not_the_label():
    # The label is carried by dimension 1, the target by dimension 0: given the target, ridge points
    # along dimension 0 (where a classifier, or ridge on the label, points along dimension 1).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 600, 6, generator=g)
    labels = x[0, :, 1] > 0
    target = 3 * x[0, :, 0]
    pos, neg = x[:, labels], x[:, ~labels]
    with_target = ridge(pos, neg, target=torch.cat([target[labels], target[~labels]]))
    assert abs(float(with_target.direction[0, 0])) > 0.999
    assert abs(float(ridge(pos, neg).direction[0, 1])) > 0.99
    assert abs(float(logreg(pos, neg).direction[0, 1])) > 0.99


def test_ridge_rejects_a_bad_target_or_grid():
    pos, neg, _ = _paired(n=20)
    with pytest.raises(ValueError, match="target must be"):
        ridge(pos, neg, target=torch.zeros(39))
    with pytest.raises(ValueError, match="finite"):
        ridge(pos, neg, target=torch.full((40,), float("nan")))
    with pytest.raises(ValueError, match="alphas"):
        ridge(pos, neg, alphas=(0.0, 1.0))


def test_fit_and_evaluate_fits_a_regression_method_to_the_target_and_picks_its_layer_by_rank():
    # Four layers; the target is a noisy linear function of layer 2's activations only. The label is
    # its sign, which every layer separates equally badly except 2 — but layer 3 separates the label
    # well through a second feature that does not rank inside the classes.
    g = torch.Generator().manual_seed(4)
    n, d = 800, 10
    x, y, _ = _linear_target(n_layers=4, n=n, d=d, noise=1.0, seed=5)
    target = y[2] - y[2].median()
    labels = (target > 0).long()
    acts = x.float()
    acts[3, :, 0] = (labels * 2 - 1) * 5 + 0.1 * torch.randn(n, generator=g)  # a pure class feature
    result = fit_and_evaluate("ridge", acts, labels, target=target, test_fraction=0.25, seed=0)
    assert result.selected_by == "test_target_spearman" and result.best_layer == 2
    assert result.test_target_spearman.shape == (4,) and float(result.test_target_spearman[2]) > 0.95
    assert float(result.test_target_spearman[[0, 1]].abs().max()) < 0.3
    assert result.alpha is not None and result.alpha.shape == (4,)
    # a classifier on the same data picks the layer that separates the label best, and only reports ρ
    classifier = fit_and_evaluate("logreg", acts, labels, target=target, test_fraction=0.25, seed=0)
    assert classifier.selected_by == "test_accuracy" and classifier.best_layer == 3 and classifier.alpha is None
    assert classifier.test_target_spearman.shape == (4,)
    assert float(classifier.test_target_spearman[3]) < float(result.test_target_spearman[2]) - 0.1
    # a non-finite target (the organism's pairs) is no target
    no_target = fit_and_evaluate("ridge", acts, labels, target=torch.full((n,), float("nan")), test_fraction=0.25, seed=0)
    assert no_target.test_target_spearman is None and no_target.selected_by == "test_accuracy"
    with pytest.raises(ValueError, match="target must be"):
        fit_and_evaluate("ridge", acts, labels, target=target[:-1])


# ----------------------------------------------------------------------- orientation and shapes


@pytest.mark.parametrize("name", sorted(METHODS))
def test_positives_project_above_the_threshold_and_above_negatives(name):
    pos, neg, _ = _paired(n=400, delta=2.0)
    fit = METHODS[name](pos, neg, **_options(name))
    pos_proj = projection_scores(pos.transpose(0, 1), fit.direction)  # [n, L]
    neg_proj = projection_scores(neg.transpose(0, 1), fit.direction)
    assert (pos_proj.mean(0) > neg_proj.mean(0)).all()
    assert ((pos_proj > fit.threshold).float().mean(0) > 0.9).all()
    assert ((neg_proj < fit.threshold).float().mean(0) > 0.9).all()


@pytest.mark.parametrize("name", ["diffmean", "logreg", "pca", "ridge"])
def test_swapping_pos_and_neg_flips_the_direction(name):
    pos, neg, _ = _paired(n=400)
    forward, backward = METHODS[name](pos, neg), METHODS[name](neg, pos)
    assert torch.allclose(forward.direction, -backward.direction, atol=1e-3)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_single_layer_form_takes_n_by_d_and_returns_a_vector_and_a_scalar(name):
    pos, neg, u = _paired(n_layers=2, n=1000)
    single = METHODS[name](pos[1], neg[1], **_options(name))
    assert single.direction.shape == (8,) and single.threshold.shape == ()
    assert float(_cosine(single.direction, u[1])) >= 0.99
    if name != "ccs":  # ccs draws its random restarts for all layers at once
        batched = METHODS[name](pos, neg)
        assert torch.allclose(single.direction, batched.direction[1], atol=1e-4)
        assert torch.allclose(single.threshold, batched.threshold[1], atol=1e-3)


@pytest.mark.parametrize("name", ["pca", "ccs"])
def test_paired_methods_reject_unpaired_input(name):
    pos, neg, _ = _paired(n=50)
    with pytest.raises(ValueError, match="paired"):
        METHODS[name](pos, neg[:, :40])


def test_methods_reject_mismatched_shapes():
    pos, neg, _ = _paired(n=50)
    with pytest.raises(ValueError):
        diffmean(pos, neg[:, :, :4])
    with pytest.raises(ValueError):
        diffmean(pos, neg[0])


# -------------------------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_complete():
    train, test = split(100, 0.25, seed=7)
    again = split(100, 0.25, seed=7)
    other = split(100, 0.25, seed=8)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(test, other[1])
    assert len(test) == 25 and len(train) == 75
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(100))
    with pytest.raises(ValueError):
        split(10, 0.0, seed=0)


def _labelled_pairs(n_layers=3, n_pairs=300, seed=0):
    """Interleaved samples [neg, pos, neg, pos, ...] with pairs (pos index, neg index)."""
    pos, neg, u = _paired(n_layers=n_layers, n=n_pairs, seed=seed)
    acts = torch.stack([neg, pos], dim=2).reshape(n_layers, 2 * n_pairs, -1)
    labels = torch.arange(2 * n_pairs) % 2
    pairs = torch.stack([torch.arange(1, 2 * n_pairs, 2), torch.arange(0, 2 * n_pairs, 2)], 1)
    return acts, labels, pairs, u


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_and_evaluate_keeps_pairs_together(name):
    acts, labels, pairs, u = _labelled_pairs()
    result = fit_and_evaluate(name, acts, labels, pairs=pairs, test_fraction=0.3, seed=5, **_options(name))
    test = set(result.test_index.tolist())
    train = set(result.train_index.tolist())
    assert not test & train and len(test) == 2 * 90 and len(train) == 2 * 210
    for p, n in pairs.tolist():
        assert (p in test) == (n in test)
    assert result.directions.shape == (3, 8)
    assert (_cosine(result.directions, u) >= 0.95).all()
    assert (result.test_accuracy > 0.8).all() and (result.test_auroc > 0.9).all()


def test_fit_and_evaluate_needs_pairs_for_paired_methods_and_rejects_bad_pairs():
    acts, labels, pairs, _ = _labelled_pairs(n_pairs=20)
    with pytest.raises(ValueError, match="pairs"):
        fit_and_evaluate("pca", acts, labels)
    with pytest.raises(ValueError, match="pair"):
        fit_and_evaluate("pca", acts, labels, pairs=pairs.flip(1))  # (neg, pos): wrong order
    with pytest.raises(ValueError, match="more than one pair"):
        fit_and_evaluate("pca", acts, labels, pairs=torch.cat([pairs, pairs[:1]]))
    with pytest.raises(ValueError, match="unknown method"):
        fit_and_evaluate("svm", acts, labels)


def test_fit_and_evaluate_finds_the_layer_that_carries_the_concept():
    g = torch.Generator().manual_seed(6)
    n, d = 600, 16
    labels = (torch.rand(n, generator=g) < 0.5).long()
    u = _unit_rows(g, 4, d)
    strength = torch.tensor([0.1, 0.4, 1.5, 0.6])
    acts = torch.randn(4, n, d, generator=g) + (labels[None, :, None] * 2 - 1) * strength[:, None, None] * u[:, None]
    result = fit_and_evaluate(logreg, acts, labels, test_fraction=0.25, seed=0)
    assert result.method == "logreg"
    assert result.best_layer == 2
    assert result.test_accuracy.shape == result.test_auroc.shape == result.train_accuracy.shape == (4,)
    assert float(result.test_accuracy[2]) > 0.9 and float(result.test_accuracy[0]) < 0.7
    # Stratified: both splits keep the label balance.
    assert abs(labels[result.test_index].float().mean() - labels.float().mean()) < 0.02
    again = fit_and_evaluate(logreg, acts, labels, test_fraction=0.25, seed=0)
    assert torch.equal(result.test_index, again.test_index)
    assert torch.equal(result.directions, again.directions)


# ------------------------------------------------------------------------------------- metrics


def test_auroc_matches_a_hand_computation_with_ties():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # Positive vs negative pairs: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4, 0.4>0.1, 0.4=0.4 (half).
    assert float(auroc(scores, labels)) == pytest.approx(4.5 / 6)
    assert float(auroc(-scores, labels)) == pytest.approx(1.5 / 6)
    assert float(auroc(torch.zeros(5), labels)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        auroc(scores, torch.ones(5))


def test_auroc_matches_sklearn_per_layer_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=500)
    scores = np.round(rng.normal(size=(6, 500)) + labels * np.linspace(0, 2, 6)[:, None], 1)
    ours = auroc(scores, labels)
    assert ours.shape == (6,)
    for layer in range(6):
        assert float(ours[layer]) == pytest.approx(roc_auc_score(labels, scores[layer]), abs=1e-12)


def test_accuracy_per_layer_with_per_layer_thresholds():
    scores = torch.tensor([[0.2, -0.1, 0.5, -0.3], [3.0, 0.5, 2.0, 4.0]])
    labels = torch.tensor([1, 0, 1, 1])
    assert accuracy(scores, labels).tolist() == pytest.approx([0.75, 0.75])
    assert accuracy(scores, labels, torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.75, 1.0])
    assert accuracy(scores, labels, 2.5).tolist() == pytest.approx([0.25, 0.75])
    assert float(accuracy(scores[0], labels)) == pytest.approx(0.75)


def test_best_layer_breaks_ties_by_auroc_then_lower_layer():
    assert best_layer(torch.tensor([0.8, 0.9, 0.9, 0.9]), torch.tensor([0.99, 0.95, 0.97, 0.97])) == 2
    assert best_layer(np.array([0.7, 0.7]), np.array([0.8, 0.8])) == 0
    assert best_layer([0.5, 0.6, 0.55], [0.9, 0.6, 0.99]) == 1


# ------------------------------------------------------------------------------------- scoring


def test_projection_and_cosine_scores_take_any_leading_dims_with_per_layer_directions():
    g = torch.Generator().manual_seed(8)
    acts = torch.randn(5, 3, 4, 16, generator=g)  # [n, rounds, L, d]
    directions = torch.randn(4, 16, generator=g) * 3  # not unit: the helpers normalise
    proj, cos = projection_scores(acts, directions), cosine_scores(acts, directions)
    assert proj.shape == cos.shape == (5, 3, 4)
    for i, r, layer in [(0, 0, 0), (4, 2, 3), (2, 1, 1)]:
        x, u = acts[i, r, layer], directions[layer]
        assert float(proj[i, r, layer]) == pytest.approx(float(x @ u / u.norm()), rel=1e-5)
        assert float(cos[i, r, layer]) == pytest.approx(float(_cosine(x, u)), rel=1e-5)
    # One direction for every layer's [..., d] vectors.
    assert projection_scores(acts, directions[0]).shape == (5, 3, 4)
    assert torch.allclose(projection_scores(acts[:, :, 0].numpy(), directions[0]), proj[:, :, 0], atol=1e-5)
    with pytest.raises(ValueError):
        projection_scores(acts, torch.randn(3, 16))
