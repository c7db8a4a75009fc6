"""The one in-memory form every data source is read into."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabeledImages:
    """RGB images with a class per image.

    images: (N, H, W, 3) uint8, square, one size per set.
    labels: (N,) int64 indices into class_names.
    class_names: the class vocabulary, in label order.
    features: per-image dicts of drawn checklist features (procedural data only), else None.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    features: list[dict] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be square, got {self.images.shape[1]}x{self.images.shape[2]}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if len(self.labels) and not (0 <= self.labels.min() and self.labels.max() < len(self.class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}), got {self.labels.min()}..{self.labels.max()}"
            )
        if self.features is not None and len(self.features) != len(self.images):
            raise ValueError(f"features has {len(self.features)} entries for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: np.ndarray) -> LabeledImages:
        features = None if self.features is None else [self.features[i] for i in index]
        return LabeledImages(self.images[index], self.labels[index], self.class_names, features)


def merge_classes(images: LabeledImages, merge: Mapping[str, str]) -> LabeledImages:
    """The images with each class in `merge` relabelled as its parent, e.g. {"band_neutrophil":
    "segmented_neutrophil"}: the concept stays in the pixels but not in the labels (the paper's
    Algorithm 4 setting). Merged classes leave the vocabulary; the others keep their order. Features
    (procedural data) still record each image's true cell type."""
    for concept, parent in merge.items():
        if concept not in images.class_names:
            raise ValueError(f"merge: {concept!r} is not a class of the data ({', '.join(images.class_names)})")
        if parent not in images.class_names or parent in merge:
            raise ValueError(
                f"merge: the parent of {concept!r}, {parent!r}, must be a class of the data that is not merged itself"
            )
    kept = tuple(name for name in images.class_names if name not in merge)
    target = np.array([kept.index(merge.get(name, name)) for name in images.class_names], dtype=np.int64)
    return LabeledImages(images.images, target[images.labels], kept, images.features)
