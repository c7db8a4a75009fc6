"""A small CNN cell-type classifier: the domain encoder's feature space and the utility score's classifier.

One architecture and one training recipe serve both (so "train on synthetic, test on real" and the
train-on-real baseline differ only in their training images):
- the DOMAIN ENCODER is this classifier trained on a data set's real training split; its
  penultimate layer (global average pool of the last conv stage, `features`) is the feature space
  of the fidelity and diversity metrics, in place of InceptionV3's ImageNet features, which know
  nothing of blood cells;
- the UTILITY classifier is trained on a model's synthetic images with their declared classes and
  tested on real held-out images.

Training is deterministic per seed at a fixed thread count (`ClassifierConfig.threads`, set by the
caller's process): the initial weights, the batches and the augmentation all come from the seed.
GroupNorm, not BatchNorm, so a feature never depends on the other images in its batch.
Pure torch + numpy: no Ray, no I/O.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pathalign_ray.config import NonNegativeFloat, PositiveFloat, PositiveInt, config_dataclass
from pathalign_ray.training import lr_schedule


@config_dataclass
class ClassifierConfig:
    # conv channels per stage (at least one), each stage halving the side; the last is the feature width
    channels: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (16, 32, 64)
    steps: PositiveInt = 200  # optimizer steps, whatever the set size, so every training set gets the same budget
    batch_size: PositiveInt = 64  # images per step
    lr: PositiveFloat = 3e-3  # AdamW peak learning rate, cosine-decayed to 0 over `steps`
    weight_decay: NonNegativeFloat = 1e-4  # AdamW
    augment: bool = True  # random flips and quarter turns: a cell's type does not depend on its orientation
    # torch threads of the process that trains; fixed, so a seed gives the same weights anywhere
    threads: PositiveInt = 1


class CellClassifier(nn.Module):
    """forward(images (B, 3, H, W) in [-1, 1]) -> (B, K) logits; features(images) -> (B, channels[-1])."""

    def __init__(self, channels: tuple[int, ...], num_classes: int):
        super().__init__()
        layers, in_channels = [], 3
        for out_channels in channels:
            groups = min(8, out_channels)
            while out_channels % groups:
                groups -= 1
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.GroupNorm(groups, out_channels),
                nn.SiLU(),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, stride=2),
                nn.GroupNorm(groups, out_channels),
                nn.SiLU(),
            ]
            in_channels = out_channels
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(in_channels, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (B, 3, S, S) image turned by a random quarter turn and flipped or not: the 8 symmetries of a square."""
    turns = torch.randint(0, 4, (len(images),), generator=generator)
    flips = torch.randint(0, 2, (len(images),), generator=generator).bool()
    out = torch.where(flips[:, None, None, None], images.flip(-1), images)
    for k in (1, 2, 3):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    return out


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, config: ClassifierConfig, seed: int
) -> tuple[CellClassifier, list[float]]:
    """Train a CellClassifier on (N, S, S, 3) uint8 images with (N,) labels in [0, num_classes).

    Cross-entropy, AdamW, cosine learning rate, `config.steps` steps of `config.batch_size` images
    drawn epoch by epoch in a seeded order. Returns (the model in eval mode, the loss per step).
    The caller sets the thread count (`torch.set_num_threads(config.threads)`).
    """
    labels = np.array(labels, dtype=np.int64)  # a copy: arrays from Ray's object store are read-only
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need N >= 1 images with one label each, got {len(images)} images, {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CellClassifier(tuple(config.channels), num_classes)
    x, y = to_input(images), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = lr_schedule(optimizer, config.steps, "cosine")
    order, losses = torch.empty(0, dtype=torch.int64), []
    model.train()
    for _ in range(config.steps):
        while len(order) < config.batch_size:
            order = torch.cat([order, torch.randperm(len(x), generator=generator)])
        batch, order = order[: config.batch_size], order[config.batch_size :]
        inputs = augment(x[batch], generator) if config.augment else x[batch]
        loss = nn.functional.cross_entropy(model(inputs), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def predict_proba(model: CellClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, K) float64 class probabilities."""
    model.eval()
    out = [
        torch.softmax(model(to_input(images[i : i + batch_size])).double(), dim=1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features))


@torch.no_grad()
def extract_features(model: CellClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, D) float32 penultimate-layer features."""
    model.eval()
    out = [model.features(to_input(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.in_features), np.float32)
