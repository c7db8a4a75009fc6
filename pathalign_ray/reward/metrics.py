"""How well a reward model predicts expert verdicts: AUC, accuracy, balanced accuracy, calibration.

Pure numpy, no torch, no Ray. `scores` are P(plausible) in [0, 1]; `labels` are the verdicts,
1 plausible and 0 implausible (bool or 0/1 numbers). A metric that a set cannot define (AUC with one
class only, anything on an empty set) is NaN, never an exception, so a small held-out split still
reports the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) float64 scores and (N,) bool labels; a shape mismatch or a non-binary label is a ValueError."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    raw = np.asarray(labels).reshape(-1)
    if scores.shape != raw.shape:
        raise ValueError(f"{scores.shape[0]} scores but {raw.shape[0]} labels")
    if raw.size and not np.isin(raw, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 (implausible/plausible), got values {np.unique(raw)[:5].tolist()}")
    return scores, raw.astype(bool)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of (N,) values, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random plausible > score of a random implausible), ties 1/2.

    Mann-Whitney U over average ranks, so tied scores count one half (as sklearn's roc_auc_score).
    NaN when either class is missing.
    """
    scores, labels = _check(scores, labels)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(_average_ranks(scores)[labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auc_text(auc: float | None, n: int, n_plausible: int) -> str:
    """An AUC for people: "0.912", or why it is undefined ("n/a: no plausible sample held out"); None
    (a NaN read back from JSON) counts as undefined."""
    if auc is not None and not math.isnan(auc):
        return f"{auc:.3f}"
    if n == 0:
        return "n/a: nothing held out"
    return f"n/a: no {'plausible' if n_plausible == 0 else 'implausible'} sample held out"


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Share of verdicts predicted right, predicting plausible where score >= threshold; NaN if empty."""
    scores, labels = _check(scores, labels)
    if not len(labels):
        return math.nan
    return float(np.mean((scores >= threshold) == labels))


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of the recall on plausible and the recall on implausible verdicts (score >= threshold: plausible).

    With one class present, its recall alone (as sklearn's balanced_accuracy_score); NaN if empty.
    """
    scores, labels = _check(scores, labels)
    predicted = scores >= threshold
    recalls = [float(np.mean(predicted[labels == v] == v)) for v in (False, True) if (labels == v).any()]
    return float(np.mean(recalls)) if recalls else math.nan


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017) over `bins` equal-width bins of [0, 1].

    ECE = sum_b (n_b / N) * |mean label in b - mean score in b|. Bins are right-closed,
    (k/bins, (k+1)/bins], with 0 in the first (as sklearn's calibration_curve). Labels may be soft
    (in [0, 1]): a bin's mean label is then the mean target. NaN if empty.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(labels, dtype=np.float64).reshape(-1)
    if scores.shape != targets.shape:
        raise ValueError(f"{scores.shape[0]} scores but {targets.shape[0]} labels")
    if not len(scores):
        return math.nan
    if scores.min() < 0 or scores.max() > 1 or targets.min() < 0 or targets.max() > 1:
        raise ValueError("scores and labels must lie in [0, 1]")
    which = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], scores, side="left")
    counts = np.bincount(which, minlength=bins)
    score_sums = np.bincount(which, weights=scores, minlength=bins)
    target_sums = np.bincount(which, weights=targets, minlength=bins)
    # sum_b (n_b / N) |target_sum_b / n_b - score_sum_b / n_b| = sum_b |target_sum_b - score_sum_b| / N
    return float(np.abs(target_sums - score_sums)[counts > 0].sum() / len(scores))


def _summary(scores: np.ndarray, labels: np.ndarray, threshold: float, bins: int) -> dict:
    return {
        "n": int(len(labels)),
        "n_plausible": int(labels.sum()),
        "auc": roc_auc(scores, labels),
        "accuracy": accuracy(scores, labels, threshold),
        "balanced_accuracy": balanced_accuracy(scores, labels, threshold),
        "ece": expected_calibration_error(scores, labels, bins) if len(labels) else math.nan,
        "brier": float(np.mean((scores - labels) ** 2)) if len(labels) else math.nan,
        "mean_score": float(np.mean(scores)) if len(labels) else math.nan,
    }


def classification_report(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[str], threshold: float = 0.5, bins: int = 10
) -> dict:
    """Every metric above, overall and per declared class.

    scores (N,) in [0, 1]; labels (N,) 0/1; classes (N,) the declared class of each row.
    Returns {"n", "n_plausible", "auc", "accuracy", "balanced_accuracy", "ece", "brier", "mean_score",
    "per_class": {class: the same keys}}, classes in sorted order; brier is the mean squared error
    of the scores (the paper's MSE loss).
    """
    scores, labels = _check(scores, labels)
    classes = np.asarray(classes, dtype=object).reshape(-1)
    if classes.shape != labels.shape:
        raise ValueError(f"{len(classes)} classes but {len(labels)} labels")
    report = _summary(scores, labels, threshold, bins)
    report["per_class"] = {
        str(name): _summary(scores[classes == name], labels[classes == name], threshold, bins)
        for name in sorted(set(classes.tolist()))
    }
    return report
