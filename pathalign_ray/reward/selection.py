"""Active selection: show the experts the samples the reward model is least sure about.

Uncertainty sampling (Lewis and Gale 1994): a verdict on an image the reward model already scores
near 0 or 1 teaches it little; one near 0.5 teaches it most. `most_uncertain` is pure numpy.
"""

from __future__ import annotations

import numpy as np


def most_uncertain(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k scores closest to 0.5, most uncertain first; equal distances keep index order.

    scores (N,) P(plausible) in [0, 1]. k larger than N gives all N indices.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return np.argsort(np.abs(scores - 0.5), kind="stable")[: int(k)].astype(np.int64)
