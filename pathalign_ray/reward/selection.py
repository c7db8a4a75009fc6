"""Active selection: show the experts the samples the reward model is least sure about.

Uncertainty sampling (Lewis and Gale 1994): a verdict on an image the reward model already scores
near 0 or 1 teaches it little; one near 0.5 teaches it most. `most_uncertain` is pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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


@torch.no_grad()
def score_images(model, images: np.ndarray, declared_classes: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """P(plausible) of (N, H, W, 3) uint8 images as their declared classes: (N,) float64.

    `model` is a RewardModel (load_reward_model); images of another size than its
    config.image_size are resized as every image entering the project is (images.normalise_array).
    """
    from pathalign_ray.images import normalise_array, to_model_range

    if len(images) != len(declared_classes):
        raise ValueError(f"{len(images)} images but {len(declared_classes)} declared classes")
    size = model.config.image_size
    if len(images) and images.shape[1] != size:
        images = np.stack([normalise_array(image, size) for image in images])
    class_ids = model.class_ids(list(declared_classes))
    model.eval()
    scores = [
        model.score(torch.from_numpy(to_model_range(images[i : i + batch_size])), class_ids[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(scores).double().numpy() if scores else np.zeros(0)
