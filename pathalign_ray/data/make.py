"""Turning any supported source into the one on-disk data set form (parquet shards + contact sheet)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from pathalign_ray.config import FractionBelowOne, Location, config_dataclass
from pathalign_ray.data import procedural, sources
from pathalign_ray.data.labeled import LabeledImages, merge_classes

SOURCES_WITH_PATH = ("folder", "parquet", "medmnist")


@config_dataclass
class MakeDatasetConfig:
    source: Literal["procedural", "folder", "parquet", "medmnist", "ihc"] = "procedural"
    path: str = ""  # input for folder (one subfolder per class), parquet (image bytes + label) or medmnist (.npz)
    out_dir: Location = "runs/demo/data"  # a path or URI, written once; an existing non-empty one is never overwritten
    image_size: Annotated[int, Field(ge=16)] = 32  # every image is converted to RGB and resized to this side, in pixels
    n_per_class: int = 160  # procedural and ihc: images per class (the paper: 128 train + 32 held out)
    classes: tuple[str, ...] = ()  # procedural: cell types (empty: the 8 defaults); folder/parquet: expected classes
    # class -> parent: that class's images are labelled as the parent's, e.g. {band_neutrophil: segmented_neutrophil}
    # (a concept in the images that no label names: the paper's Algorithm 4, pathalign_ray.generator.concepts)
    merge: dict[str, str] = dataclasses.field(default_factory=dict)
    # procedural: about this share of each class drawn as an artefact (a broken cell labelled as the class, as real
    # smears hold): data whose likelihood alone does not give plausible samples
    artefact_fraction: FractionBelowOne = 0.0
    test_fraction: FractionBelowOne = 0.2  # held-out share of each class
    seed: int = 0  # generation and the train/test split

    def __post_init__(self) -> None:
        if self.source in SOURCES_WITH_PATH and not self.path:
            raise ValueError(f"source {self.source!r} needs path=")
        if self.artefact_fraction and self.source != "procedural":
            raise ValueError(f"artefact_fraction is drawn for source 'procedural', not {self.source!r}")


def load_source(config: MakeDatasetConfig) -> LabeledImages:
    from pathalign_ray.data import shards  # heavy: shards imports pyarrow

    classes = config.classes or None
    if config.source == "procedural":
        return procedural.generate(
            config.n_per_class,
            config.image_size,
            config.seed,
            classes or procedural.DEFAULT_CELL_TYPES,
            artefact_fraction=config.artefact_fraction,
        )
    if config.source == "folder":
        return sources.read_image_folder(config.path, config.image_size, classes=classes)
    if config.source == "parquet":
        return shards.read_parquet_table(config.path, config.image_size, class_names=classes)
    if config.source == "medmnist":
        return sources.read_medmnist_npz(config.path, config.image_size, split="all", class_names=classes)
    return sources.ihc_patches(config.image_size, config.n_per_class, config.seed)


def make_dataset(config: MakeDatasetConfig) -> str | Path:
    from pathalign_ray.data.shards import write_dataset  # heavy: shards imports pyarrow

    images = merge_classes(load_source(config), config.merge)
    source = config.source if not config.path else f"{config.source}:{config.path}"
    return write_dataset(images, config.out_dir, config.test_fraction, config.seed, source=source)
