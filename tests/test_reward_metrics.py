"""Reward metrics: golden values computed by hand, and agreement with scikit-learn on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pathalign_ray.reward.metrics import (
    accuracy,
    balanced_accuracy,
    classification_report,
    expected_calibration_error,
    roc_auc,
)


def test_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5) (0.9>0.1) (0.4<0.5) (0.4>0.1) -> 3/4
    assert roc_auc([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5=0.5) (0.5>0.2) -> 1.5/2
    assert roc_auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert roc_auc([0.3, 0.3, 0.3], [1, 0, 1]) == pytest.approx(0.5)
    assert roc_auc([0.1, 0.9], [True, False]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.9], [1, 1])) and math.isnan(roc_auc([], []))


def test_an_undefined_auc_says_why():
    from pathalign_ray.reward.metrics import auc_text

    assert auc_text(0.91234, 10, 4) == "0.912"
    assert auc_text(math.nan, 10, 0) == "n/a: no plausible sample held out"
    assert auc_text(math.nan, 10, 10) == "n/a: no implausible sample held out"
    assert auc_text(math.nan, 0, 0) == "n/a: nothing held out"
    assert auc_text(None, 10, 0) == "n/a: no plausible sample held out"  # NaN as JSON writes it


def test_accuracy_and_balanced_accuracy_by_hand():
    scores, labels = [0.9, 0.6, 0.5, 0.2, 0.1], [1, 0, 0, 0, 0]
    # predicted plausible at >= 0.5: 1, 1, 1, 0, 0 -> right: 1, 0, 0, 1, 1
    assert accuracy(scores, labels) == pytest.approx(3 / 5)
    assert balanced_accuracy(scores, labels) == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert accuracy(scores, labels, threshold=0.95) == pytest.approx(4 / 5)
    assert balanced_accuracy([0.9, 0.1], [1, 1]) == pytest.approx(0.5), "one class present: its recall"
    assert math.isnan(accuracy([], [])) and math.isnan(balanced_accuracy([], []))


def test_ece_by_hand():
    # 4 bins: (0, .25] holds 0.1, 0.25 (edge: right-closed); (.5, .75] holds 0.7; (.75, 1] holds 1.0
    scores = [0.1, 0.25, 0.7, 1.0]
    labels = [0, 1, 1, 1]
    # bin 1: |0.5 - 0.175| * 2/4; bin 3: |1 - 0.7| * 1/4; bin 4: |1 - 1| * 1/4
    expected = 0.325 * 2 / 4 + 0.3 / 4
    assert expected_calibration_error(scores, labels, bins=4) == pytest.approx(expected)
    assert expected_calibration_error([0.0, 1.0], [0, 1], bins=10) == 0.0
    assert expected_calibration_error([0.3], [0.3], bins=3) == pytest.approx(0.0), "soft labels"
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        expected_calibration_error([1.2], [1])


def test_labels_must_be_binary_and_match():
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0.1, 0.2], [0.5, 1])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        accuracy([0.1, 0.2], [0, 1, 1])


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_on_random_data(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 200
    labels = rng.random(n) < 0.3
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    scores[::7] = np.round(scores[::7], 1)  # plenty of ties
    assert roc_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    predicted = scores >= 0.5
    assert accuracy(scores, labels) == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
    expected = sklearn_metrics.balanced_accuracy_score(labels, predicted)
    assert balanced_accuracy(scores, labels) == pytest.approx(expected)


def test_ece_agrees_with_sklearn_calibration_curve():
    calibration = pytest.importorskip("sklearn.calibration")
    rng = np.random.default_rng(7)
    scores = rng.random(500)
    labels = rng.random(500) < scores**2
    prob_true, prob_pred = calibration.calibration_curve(labels, scores, n_bins=8, strategy="uniform")
    counts = np.histogram(scores, bins=np.linspace(0, 1, 9))[0]
    counts = counts[counts > 0]
    expected = float(np.sum(counts / 500 * np.abs(prob_true - prob_pred)))
    assert expected_calibration_error(scores, labels, bins=8) == pytest.approx(expected)


def test_report_overall_and_per_class():
    scores = np.array([0.9, 0.2, 0.8, 0.6, 0.3])
    labels = np.array([1, 0, 1, 0, 0])
    classes = ["b", "b", "a", "a", "a"]
    report = classification_report(scores, labels, classes, bins=5)
    assert report["n"] == 5 and report["n_plausible"] == 2
    assert report["auc"] == pytest.approx(roc_auc(scores, labels))
    assert list(report["per_class"]) == ["a", "b"]
    a = report["per_class"]["a"]
    assert a["n"] == 3 and a["auc"] == pytest.approx(1.0) and a["accuracy"] == pytest.approx(2 / 3)
    assert a["brier"] == pytest.approx(((0.8 - 1) ** 2 + 0.6**2 + 0.3**2) / 3)
    assert report["per_class"]["b"]["accuracy"] == 1.0
    empty = classification_report(np.zeros(0), np.zeros(0), [])
    assert empty["n"] == 0 and math.isnan(empty["auc"]) and empty["per_class"] == {}
