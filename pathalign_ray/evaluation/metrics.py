"""The paper's evaluation numbers as pure functions of arrays: fidelity, diversity, utility, plausibility CIs.

- Fidelity: the Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs trained by a two time-scale update rule...", eq. 6), computed here from means and
  covariances, in whatever feature space the caller chose (a domain encoder, InceptionV3).
- Diversity: precision, recall, density and coverage of Naeem et al. 2020 ("Reliable fidelity and
  diversity metrics for generative models"), by the authors' own `prdc` package.
- Utility: accuracy, balanced accuracy, macro F1 and macro one-vs-rest ROC AUC of a classifier's
  class probabilities on labelled images, by scikit-learn.
- Plausibility: the Wilson score interval of a binomial rate (Wilson 1927).

numpy and the standard library only at import time; `prdc` and scikit-learn are imported by the two
functions that use them. No torch, no Ray, no I/O.
"""

from __future__ import annotations

import contextlib
import io
import math
from statistics import NormalDist

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64, the covariance with N - 1 (as pytorch-fid)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), Heusel et al. 2017, eq. 6.

    Tr (sigma1 sigma2)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric
    positive semi-definite A = sigma1^(1/2) sigma2 sigma1^(1/2) (similar to sigma1 sigma2), so a
    rank-deficient covariance (fewer samples than dimensions) gives no complex parts or NaN; round-off
    below zero is clipped. Shapes: mu (D,), sigma (D, D).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_root = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    distance = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return max(distance, 0.0)  # the exact value is >= 0; round-off may dip a hair below


def frechet_distance_of(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to (N1, D) and (N2, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020 with k nearest neighbours, by the `prdc` package (the authors' code).

    real (N, D), fake (M, D). precision: share of fake points inside some real point's k-NN ball;
    recall: share of real points inside some fake point's k-NN ball; density: real balls holding a
    fake point, counted per fake point, / k (about 1 when fake matches real); coverage: share of real
    balls holding a fake point. A set against itself gives 1, 1, 1, 1 (density exactly 1 without
    tied distances). NaN everywhere when a set has fewer than k + 2 points (prdc's own limit: it
    partitions each point's distances, its own 0 included, at index k + 1).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be (N, D) and (M, D), got {real.shape} and {fake.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min(len(real), len(fake)) < k + 2:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan)
    import joblib
    from prdc import compute_prdc

    # prdc prints its set sizes and asks sklearn for 8 processes; threads are enough for one matrix.
    with contextlib.redirect_stdout(io.StringIO()), joblib.parallel_config(backend="threading"):
        values = compute_prdc(real, fake, k)
    return {name: float(value) for name, value in values.items()}


def fidelity_and_diversity(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, dict[str, float]]:
    """(Frechet distance, precision/recall/density/coverage) of fake (M, D) against real (N, D) features;
    the distance is NaN below 2 fake points, the four rates below k + 2 points in either set."""
    distance = frechet_distance_of(real, fake) if len(fake) >= 2 else math.nan
    return distance, precision_recall_density_coverage(real, fake, k)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Scores of a K-class classifier: labels (N,) in [0, K), probabilities (N, K) rows summing to 1.

    accuracy; balanced_accuracy (mean recall over the classes present in labels); macro_f1 (over the
    classes present in labels or predictions, as scikit-learn); macro_auc (one-vs-rest ROC AUC per
    class, averaged over the classes present in labels that are not all of them; NaN if none).
    The prediction is the most probable class.
    """
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) != len(labels) or not len(labels):
        raise ValueError(f"need (N,) labels and (N, K) probabilities, N >= 1; got {labels.shape} {probabilities.shape}")
    predictions = probabilities.argmax(axis=1)
    aucs = [
        roc_auc_score(labels == c, probabilities[:, c])
        for c in range(probabilities.shape[1])
        if 0 < np.sum(labels == c) < len(labels)
    ]
    with warnings.catch_warnings():  # "a single label was found": expected on a one-class set, and handled
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(labels, predictions))
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else math.nan,
    }


def confusion_counts(labels: np.ndarray, probabilities: np.ndarray) -> list[list[int]]:
    """(K, K) counts of a K-class classifier's predictions (the most probable class): row = true class,
    column = predicted, so row c's diagonal share is class c's recall."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(probabilities).argmax(axis=1)
    num_classes = np.asarray(probabilities).shape[1]
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts.tolist()


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of independent runs (e.g. seeds); NaN bounds for one."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate successes / n (Wilson 1927).

    With z the two-sided normal quantile of `confidence` and p = successes / n:
        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    It stays inside [0, 1] and is sensible at p = 0 or 1 and small n. (NaN, NaN) when n = 0.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p, z2 = successes / n, z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))  # round-off never leaves p outside
