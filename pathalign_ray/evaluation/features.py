"""Feature spaces for fidelity and diversity: the cached domain encoder, and InceptionV3 from a local file.

`features_and_verdicts` makes what the evaluation and the Tune probe need of each image: its
features in each space and the simulated pathologist's verdict.

The domain encoder (`classifier.CellClassifier` trained on the real training split) is cached per
data set in DATASET/.cache/:

    domain_encoder.safetensors   the weights (safetensors: loading never unpickles anything)
    domain_encoder.json          {"key", "config", "class_names", "image_size", "seed", "test_metrics", ...}

The key is the SHA-256 of dataset.json's bytes, the classifier config, the seed and CACHE_VERSION:
a changed data set (dataset.json lists its counts, shards and seed) or recipe trains a new encoder,
which replaces the old files. InceptionV3 (the FID network of torch-fidelity, through torchmetrics)
is used only from a weights file the user names; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pathalign_ray.config import config_to_dict
from pathalign_ray.evaluation.classifier import CellClassifier, ClassifierConfig, extract_features
from pathalign_ray.experts.checklist import CRITERIA

CACHE_DIR = ".cache"
ENCODER_WEIGHTS = "domain_encoder.safetensors"
ENCODER_INFO = "domain_encoder.json"
CACHE_VERSION = 1  # bump when the architecture or the training recipe changes meaning
INCEPTION_FEATURES = 2048  # torch-fidelity's pool3 features


def encoder_cache_key(dataset_dir: str | Path, config: ClassifierConfig, seed: int) -> str:
    """SHA-256 hex of dataset.json's bytes, the classifier config, the seed and CACHE_VERSION."""
    recipe = json.dumps({"config": config_to_dict(config), "seed": seed, "version": CACHE_VERSION}, sort_keys=True)
    digest = hashlib.sha256((Path(dataset_dir) / "dataset.json").read_bytes())
    digest.update(recipe.encode())
    return digest.hexdigest()


def load_cached_encoder(dataset_dir: str | Path, key: str) -> tuple[CellClassifier, dict] | None:
    """The cached encoder of a data set if its key matches, else None (missing, stale or unreadable)."""
    cache = Path(dataset_dir) / CACHE_DIR
    try:
        info = json.loads((cache / ENCODER_INFO).read_text())
        if info.get("key") != key:
            return None
        model = CellClassifier(tuple(info["config"]["channels"]), len(info["class_names"]))
        model.load_state_dict(load_file(str(cache / ENCODER_WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return model.eval(), info


def save_encoder(model: CellClassifier, info: dict, dataset_dir: str | Path) -> Path | None:
    """Write the encoder into DATASET/.cache (weights first, then the JSON, each by rename), or None if the
    data set's folder is read-only: the evaluation then goes on without a cache."""
    cache = Path(dataset_dir) / CACHE_DIR
    try:
        cache.mkdir(exist_ok=True)
        for name, write in (
            (ENCODER_WEIGHTS, lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p)),
            (ENCODER_INFO, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n")),
        ):
            tmp = cache / f".{name}.{os.getpid()}.tmp"
            write(str(tmp))
            tmp.chmod(0o644)  # readable by whoever reads the data set
            os.replace(tmp, cache / name)
    except OSError:
        return None
    return cache


def encoder_from_state(channels: tuple[int, ...], num_classes: int, state: dict[str, torch.Tensor]) -> CellClassifier:
    model = CellClassifier(tuple(channels), num_classes)
    model.load_state_dict(state)
    return model.eval()


def check_inception_available(weights: str) -> None:
    """Fail before any work if the InceptionV3 space is asked for but cannot run."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"inception_weights={weights!r}: no such file (the weights are never downloaded)")
    try:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ModuleNotFoundError:
        _TORCH_FIDELITY_AVAILABLE = False
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "inception_weights is set but torchmetrics' image extra is not installed: pip install -e '.[fid]' "
            "(or leave inception_weights empty to skip the InceptionV3 space)"
        )


def load_inception(weights: str) -> torch.nn.Module:
    """torchmetrics' InceptionV3 (torch-fidelity's FID network, pool3 features) from a local weights file,
    e.g. weights-inception-2015-12-05-6726825d.pth. It takes (B, 3, H, W) uint8 and resizes to 299 itself."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)], feature_extractor_weights_path=weights
    )


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 2048) float32 InceptionV3 pool3 features."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        out.append(model(batch).reshape(len(batch), -1).float())
    return torch.cat(out).numpy() if out else np.zeros((0, INCEPTION_FEATURES), np.float32)


def features_and_verdicts(
    images: np.ndarray,
    declared_classes,
    judged: np.ndarray,
    encoder: CellClassifier,
    inception: torch.nn.Module | None,
    strictness: float,
) -> dict[str, np.ndarray]:
    """images (N, S, S, 3) uint8 with their declared classes (N,) -> {"domain": (N, D), "inception"?: (N, 2048),
    "plausible": (N,), "found_cell": (N,), "failed": (N, 6) in CRITERIA order}; the simulated pathologist judges
    the rows where judged (N,) is true, the others stay False."""
    from pathalign_ray.experts.pathologist import judge  # heavy: pathologist imports scipy

    out = {"domain": extract_features(encoder, images)}
    if inception is not None:
        out["inception"] = inception_features(inception, images)
    plausible, found_cell = np.zeros(len(images), bool), np.zeros(len(images), bool)
    failed = np.zeros((len(images), len(CRITERIA)), bool)
    for i in np.flatnonzero(judged):
        verdict = judge(images[i], str(declared_classes[i]), strictness)
        plausible[i], found_cell[i] = verdict.plausible, verdict.measurements.found_cell
        failed[i] = [c in verdict.failed for c in CRITERIA]
    return {**out, "plausible": plausible, "found_cell": found_cell, "failed": failed}
