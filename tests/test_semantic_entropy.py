"""Every semantic-entropy estimator on a constructed set of samples and clusters, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench.engine.uncertainty import (
    cluster_answers,
    normalised_exact_match,
    semantic_entropy,
    semantic_entropy_discrete,
    semantic_entropy_weighted,
    study_cluster_uncertainty,
)

# five samples: "Paris" ×3 (one with different case and punctuation), "Lyon" ×2
ANSWERS = ["Paris", "paris.", "Lyon", " PARIS ", "lyon"]
MEAN_LL = np.log([0.5, 0.3, 0.1, 0.4, 0.2])  # mean-token log-likelihood of each sample


def test_clusters_by_normalised_exact_match():
    np.testing.assert_array_equal(cluster_answers(ANSWERS), [0, 0, 1, 0, 1])
    assert normalised_exact_match("The answer.", "the  answer") and not normalised_exact_match("yes", "no")
    # a pluggable equivalence: first letter only
    np.testing.assert_array_equal(cluster_answers(["ab", "ac", "b"], lambda a, b: a[0] == b[0]), [0, 0, 1])


def test_discrete_estimate():
    ids = cluster_answers(ANSWERS)
    want = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert semantic_entropy_discrete(ids) == pytest.approx(want)
    assert semantic_entropy(ANSWERS) == pytest.approx(want)
    assert semantic_entropy_discrete([0, 0, 0]) == 0.0
    assert semantic_entropy_discrete([0, 1, 2, 3]) == pytest.approx(math.log(4))


def test_probability_weighted_estimate():
    ids = cluster_answers(ANSWERS)
    # cluster masses: Paris 0.5 + 0.3 + 0.4 = 1.2, Lyon 0.1 + 0.2 = 0.3; normalised over the samples: 0.8, 0.2
    want = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert semantic_entropy_weighted(ids, MEAN_LL) == pytest.approx(want)
    # equal likelihoods give the discrete estimate
    assert semantic_entropy_weighted(ids, np.zeros(5)) == pytest.approx(semantic_entropy_discrete(ids))
    # invariant to a shift of every log-likelihood
    assert semantic_entropy_weighted(ids, MEAN_LL - 40) == pytest.approx(want)


def test_the_studys_estimator_is_a_mean_of_cluster_nlls_not_an_entropy():
    ids = cluster_answers(ANSWERS)
    nll = -MEAN_LL
    want = (np.mean(nll[[0, 1, 3]]) + np.mean(nll[[2, 4]])) / 2
    assert study_cluster_uncertainty(ids, nll) == pytest.approx(want)
    # one cluster: the entropies are 0, the study's figure is not
    assert semantic_entropy_discrete([0, 0]) == 0.0 and study_cluster_uncertainty([0, 0], [1.0, 3.0]) == pytest.approx(2.0)
