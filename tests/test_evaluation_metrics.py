"""Golden-number tests of the evaluation's pure metrics: values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pathalign_ray.evaluation.metrics import (
    classification_metrics,
    confusion_counts,
    feature_statistics,
    fidelity_and_diversity,
    frechet_distance,
    frechet_distance_of,
    precision_recall_density_coverage,
    wilson_interval,
)
from pathalign_ray.evaluation.plausibility import plausibility_per_round, rate, summarize_consensus, summarize_verdicts
from pathalign_ray.experts.checklist import CRITERIA

# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_one_dimension_by_hand():
    # (0 - 3)^2 + 4 + 1 - 2 sqrt(4 * 1) = 9 + 5 - 4
    assert frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(
        10.0
    )


def test_frechet_distance_diagonal_by_hand():
    # |(1, 2)|^2 = 5; traces 1 + 4 + 9 + 1 = 15; Tr sqrt(diag(9, 4)) = 3 + 2 = 5: 5 + 15 - 10
    value = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([9.0, 1.0]))
    assert value == pytest.approx(10.0)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * sqrtm(sigma1 @ sigma2).real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 8)), rng.normal(1.0, 2.0, size=(40, 8))
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_of(x, y) == pytest.approx(frechet_distance_of(y, x), rel=1e-9)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(2)
    value = frechet_distance_of(rng.normal(size=(5, 20)), rng.normal(size=(6, 20)))
    assert math.isfinite(value) and value > 0


def test_feature_statistics_uses_n_minus_one():
    mu, sigma = feature_statistics(np.array([[0.0], [2.0]]))
    assert mu == pytest.approx([1.0]) and sigma == pytest.approx(np.array([[2.0]]))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


# ---------------------------------------------------------------- precision, recall, density, coverage

# Real points on a line and their k-NN radii (k = 1): -10: 10, 0: 1, 1: 1, 3: 2, 6: 1, 7: 1.
# Fake points 0.5, 4, 10 and theirs (k = 1): 3.5, 3.5, 6.
REAL = np.array([[-10.0], [0.0], [1.0], [3.0], [6.0], [7.0]])
FAKE = np.array([[0.5], [4.0], [10.0]])


def test_prdc_by_hand_k1():
    values = precision_recall_density_coverage(REAL, FAKE, k=1)
    # precision: 0.5 lies in the balls of 0 and 1, 4 in the ball of 3, 10 in none -> 2/3
    # recall: every real point but -10 lies within 3.5 of 0.5 or 4 -> 5/6
    # density: balls holding 0.5: 2, holding 4: 1, holding 10: 0 -> 3 / (3 * 1) = 1
    # coverage: nearest fake inside the ball for 0 (0.5 < 1), 1 (0.5 < 1), 3 (1 < 2); not -10, 6, 7 -> 1/2
    assert values == pytest.approx({"precision": 2 / 3, "recall": 5 / 6, "density": 1.0, "coverage": 0.5})


def test_prdc_by_hand_k2():
    fake = np.concatenate([FAKE, [[100.0]]])  # prdc needs k + 2 points per set
    values = precision_recall_density_coverage(REAL, fake, k=2)
    # radii (2nd neighbour), real: -10: 11, 0: 3, 1: 2, 3: 3, 6: 3, 7: 4; fake: 0.5: 9.5, 4: 6, 10: 9.5, 100: 96
    # precision: 0.5 in ball 0, 4 in ball 3, 10 in ball 7 (3 < 4), 100 in none -> 3/4
    # recall: -10 is 10.5 from 0.5 (> 9.5) and 110 from 100 (> 96); the rest are covered -> 5/6
    # density: 0.5 in balls -10, 0, 1, 3 (4); 4 in 3, 6, 7 (3); 10 in 7 (1); 100 in none -> 8 / (4 * 2) = 1
    # coverage: every real point has a fake inside its ball (-10: 10.5 < 11) -> 1
    assert values == pytest.approx({"precision": 0.75, "recall": 5 / 6, "density": 1.0, "coverage": 1.0})


def test_prdc_of_a_set_with_itself_is_one():
    points = np.random.default_rng(3).normal(size=(200, 16)).astype(np.float32)
    values = precision_recall_density_coverage(points, points, k=5)
    assert values["precision"] == 1.0 and values["recall"] == 1.0 and values["coverage"] == 1.0
    assert values["density"] == pytest.approx(1.0, abs=1e-9)


def test_prdc_is_nan_when_a_set_is_too_small_and_checks_shapes():
    values = precision_recall_density_coverage(REAL, FAKE, k=2)  # 3 fake points: prdc needs k + 2
    assert all(math.isnan(v) for v in values.values())
    with pytest.raises(ValueError, match="k must be"):
        precision_recall_density_coverage(REAL, FAKE, k=0)
    with pytest.raises(ValueError, match="(N, D)"):
        precision_recall_density_coverage(REAL, np.zeros((4, 2)), k=1)


def test_fidelity_and_diversity_is_the_distance_and_prdc_with_nan_below_two_points():
    distance, diversity = fidelity_and_diversity(REAL, FAKE, k=1)
    assert distance == frechet_distance_of(REAL, FAKE)
    assert diversity == precision_recall_density_coverage(REAL, FAKE, k=1)
    distance, diversity = fidelity_and_diversity(REAL, FAKE[:1], k=1)
    assert math.isnan(distance) and all(math.isnan(v) for v in diversity.values())


# ---------------------------------------------------------------- classifier scores


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]]
    )
    values = classification_metrics(labels, probabilities)
    # predictions 0 1 1 1 2 0: 4 of 6 right; recalls 1/2, 1, 1/2; F1 1/2, 4/5, 2/3
    # one-vs-rest AUC: class 0 7/8, class 1 7/8, class 2 1 (pairs won of 8)
    assert values == pytest.approx(
        {
            "accuracy": 4 / 6,
            "balanced_accuracy": 2 / 3,
            "macro_f1": (0.5 + 0.8 + 2 / 3) / 3,
            "macro_auc": (7 / 8 + 7 / 8 + 1) / 3,
        }
    )


def test_classification_metrics_auc_skips_classes_missing_from_labels():
    values = classification_metrics(np.array([0, 0, 1]), np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]]))
    assert values["macro_auc"] == pytest.approx(1.0)  # classes 0 and 1 only; class 2 has no images
    assert math.isnan(classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]))["macro_auc"])


# ---------------------------------------------------------------- Wilson intervals


@pytest.mark.parametrize(
    "successes, n, confidence, expected",
    [
        (8, 10, 0.95, (0.49016, 0.94332)),  # centre 0.99208 / 1.38416, half 1.41602 * sqrt(0.025604)
        (0, 10, 0.95, (0.0, 0.27753)),
        (10, 10, 0.95, (0.72247, 1.0)),
        (1, 2, 0.95, (0.09453, 0.90547)),
        (50, 100, 0.99, (0.37528, 0.62472)),  # z = 2.5758: half 2.41553 * 0.051632
    ],
)
def test_wilson_interval_by_hand(successes, n, confidence, expected):
    assert wilson_interval(successes, n, confidence) == pytest.approx(expected, abs=2e-5)


def test_wilson_interval_edges():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


# ---------------------------------------------------------------- plausibility summaries


def test_summarize_verdicts_counts_per_class_and_criterion():
    failed = np.zeros((4, len(CRITERIA)), bool)
    failed[1, CRITERIA.index("granules")] = True
    failed[3, :] = True  # no cell: every criterion fails
    summary = summarize_verdicts(
        ["a", "a", "b", "b"], np.array([1, 0, 1, 0], bool), failed, np.array([1, 1, 1, 0], bool), ["a", "b", "c"]
    )
    assert summary["plausible"] == rate(2, 4, 0.95)
    assert summary["per_class"]["a"]["rate"] == 0.5 and "c" not in summary["per_class"]
    assert (
        summary["failure_rate"]["granules"]["successes"] == 2 and summary["failure_rate"]["cell_size"]["successes"] == 1
    )
    assert summary["failure_rate_per_class"]["a"]["granules"]["rate"] == 0.5
    assert summary["no_cell"]["successes"] == 1


def test_summarize_consensus_leaves_ties_out():
    rows = [
        {"declared_class": "a", "verdict": "plausible", "failed_criteria": [], "n_votes": 3},
        {"declared_class": "a", "verdict": "implausible", "failed_criteria": ["granules"], "n_votes": 3},
        {"declared_class": "b", "verdict": None, "failed_criteria": ["chromatin"], "n_votes": 2},
    ]
    summary = summarize_consensus(rows, ["a", "b"])
    assert summary["plausible"]["successes"] == 1 and summary["plausible"]["n"] == 2
    assert summary["ties"] == 1 and summary["samples"] == 3 and summary["votes"] == 8
    assert "b" not in summary["per_class"]
    assert (
        summary["failure_rate"]["granules"]["successes"] == 1 and summary["failure_rate"]["chromatin"]["successes"] == 0
    )


def test_plausibility_per_round():
    rows = [
        {"round": 1, "verdict": "plausible"},
        {"round": 0, "verdict": "implausible"},
        {"round": 1, "verdict": "implausible"},
    ]
    assert [(r["round"], r["successes"], r["n"]) for r in plausibility_per_round(rows)] == [(0, 0, 1), (1, 1, 2)]


def test_mean_interval_of_three_seeds_by_hand():
    from pathalign_ray.evaluation.metrics import mean_interval

    mean, low, high = mean_interval([0.5, 0.6, 0.7])  # sd 0.1, t(0.975, 2) = 4.3027
    assert mean == pytest.approx(0.6) and high - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    assert mean - low == pytest.approx(high - mean)
    mean, low, high = mean_interval([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)


def test_confusion_counts_rows_are_true_classes_columns_predictions():
    labels = np.array([0, 0, 1, 2, 2])
    probabilities = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.1, 0.9, 0], [0.5, 0.2, 0.3], [0, 0.1, 0.9]])
    assert confusion_counts(labels, probabilities) == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
