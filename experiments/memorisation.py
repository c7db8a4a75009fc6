"""Does a longer-pretrained generator copy its training images? Nearest training image, generated against real.

    .venv/bin/python experiments/memorisation.py DATASET SAMPLE_FOLDER [SAMPLE_FOLDER ...]

For every image, the root-mean-square pixel distance (0-1 range) to its nearest image in DATASET's
train split: for DATASET's test split (real images the generator never saw: the reference) and for
the PNGs of each sample folder (a `sample` or evaluation output, `images/*.png`). A generator that
copies its training images puts many samples closer to a training image than real test images come:
`share_below_test_q10` is the fraction of samples nearer than the test split's 10th percentile (10%
for a generator as novel as new real images, near 100% for one that copies).

Writes bench/results/memorisation.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_common import write_result

from pathalign_ray.data.shards import read_dataset
from pathalign_ray.images import decode_images


def nearest_distances(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) RMS pixel distance of each of images (N, S, S, 3) uint8 to its nearest in reference (M, S, S, 3)."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    r = reference.reshape(len(reference), -1).astype(np.float64) / 255
    squared = (x**2).sum(1)[:, None] - 2 * x @ r.T + (r**2).sum(1)[None]
    return np.sqrt(squared.clip(0).min(1) / x.shape[1])


def summary(distances: np.ndarray, test_q10: float) -> dict:
    return {
        "n": len(distances),
        "median": float(np.median(distances)),
        "q10": float(np.quantile(distances, 0.1)),
        "share_below_test_q10": float((distances < test_q10).mean()),
    }


def main(dataset: str, folders: list[str]) -> None:
    train, test = read_dataset(dataset, "train"), read_dataset(dataset, "test")
    size = train.images.shape[1]
    test_distances = nearest_distances(test.images, train.images)
    test_q10 = float(np.quantile(test_distances, 0.1))
    rows = {"real test split": summary(test_distances, test_q10)}
    for folder in folders:
        paths = sorted(Path(folder, "images").glob("*.png"))
        if not paths:
            sys.exit(f"no images in {Path(folder, 'images')}")
        images = decode_images([p.read_bytes() for p in paths], size, folder)
        rows[folder] = summary(nearest_distances(images, train.images), test_q10)
    for name, row in rows.items():
        print(f"{name}: {row}")
    write_result("memorisation", {"dataset": dataset, "train_images": len(train.images), "rows": rows})


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
