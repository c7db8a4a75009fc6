"""What an evaluation reads: real splits, sample folders, and a run's feedback store and round table.

A model to evaluate is given as a path:
- an exported model folder (unet/config.json, as jobs/pretrain.py writes RUN_DIR/model): the
  evaluation samples it into REPORT/samples/NAME first;
- a sample folder (manifest.parquet, as jobs/sample.py writes): its images are evaluated as they are.

Its run directory (RUN_DIR/model -> RUN_DIR; RUN_DIR/samples/X -> RUN_DIR) may hold:
- RUN_DIR/feedback/: the experts' verdicts (feedback.FeedbackStore); those on the very images
  evaluated (same sample_id and image SHA-256) give the experts' plausibility;
- RUN_DIR/rounds.jsonl: one JSON object per line per feedback round, e.g.
      {"round": 0, "plausibility": 0.41, "reward_mean": 0.38}
  "round" (int >= 0) is required; "plausibility" (share judged plausible that round) and
  "reward_mean" (mean reward-model score of that round's samples) are optional numbers; other
  fields are kept in metrics.json and otherwise ignored. A line that does not parse is skipped
  with a note.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pathalign_ray.data.shards import SCHEMA, split_files
from pathalign_ray.experts.feedback import FeedbackStore

MODEL = "model"
SAMPLES = "samples"
REAL = "real"
ROUNDS_FILE = "rounds.jsonl"


@dataclass
class ImageSet:
    """Encoded images with a class each: labels index the real data set's class names."""

    name: str
    kind: str  # MODEL (sampled by the evaluation), SAMPLES (a sample folder) or REAL
    path: Path  # the folder the images were read from
    png: list[bytes]
    labels: np.ndarray  # (N,) int64
    sample_ids: list[str]
    info: dict = field(default_factory=dict)  # model_id, model_step, source model folder

    def __len__(self) -> int:
        return len(self.png)

    def sha256(self) -> list[str]:
        return [hashlib.sha256(data).hexdigest() for data in self.png]


def model_kind(path: str | Path) -> str:
    """MODEL for an exported model folder, SAMPLES for a sample folder; ValueError naming the path otherwise."""
    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        return MODEL
    if (path / "manifest.parquet").is_file():
        return SAMPLES
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    raise ValueError(
        f"{path} is neither an exported model folder (unet/config.json) nor a sample folder (manifest.parquet)"
    )


def model_names(paths: list[str]) -> list[str]:
    """Short unique names: RUN for RUN/model, RUN-X for RUN/samples/X, else the folder's name."""
    reserved = {"real_train", "real_test", "train_on_real"}  # the report's own columns
    names = []
    for raw in paths:
        path = Path(raw).resolve()
        if path.name == "model":
            name = path.parent.name
        elif path.parent.name == "samples":
            name = f"{path.parent.parent.name}-{path.name}"
        else:
            name = path.name
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"
        unique, number = name, 2
        while unique in names or unique in reserved:
            unique, number = f"{name}-{number}", number + 1
        names.append(unique)
    return names


def run_dir_of(path: str | Path) -> Path:
    """RUN_DIR/model and RUN_DIR/samples/X -> RUN_DIR; any other folder -> its parent."""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name == "samples" else path.parent


def read_real_split(dataset_dir: str | Path, split: str, class_names: list[str]) -> ImageSet:
    """One split of a data set as PNG bytes and labels (decoding happens where the features are made)."""
    png, labels, ids = [], [], []
    for path in split_files(dataset_dir, split):
        table = pq.read_table(path, schema=SCHEMA, columns=["id", "image", "label"])
        png += table.column("image").to_pylist()
        labels += table.column("label").to_pylist()
        ids += table.column("id").to_pylist()
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{dataset_dir}/{split}: labels outside [0, {len(class_names)})")
    return ImageSet(f"real_{split}", REAL, Path(dataset_dir), png, labels, ids)


def read_sample_folder(path: str | Path, name: str, class_names: list[str], kind: str = SAMPLES) -> ImageSet:
    """A sample folder's images with their declared classes; a class the data set lacks is a ValueError."""
    from pathalign_ray.generator.sampling import read_manifest  # heavy: sampling imports ray, torch and diffusers

    path = Path(path)
    rows = read_manifest(path).to_pylist()
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({row["declared_class"] for row in rows} - set(index))
    if unknown:
        raise ValueError(f"{path}: declared classes {unknown} are not among the data set's classes {class_names}")
    png = [(path / row["path"]).read_bytes() for row in rows]
    labels = np.asarray([index[row["declared_class"]] for row in rows], dtype=np.int64)
    info = {key: rows[0][key] for key in ("model_id", "model_step", "ddim_steps") if rows and key in rows[0]}
    return ImageSet(name, kind, path, png, labels, [row["sample_id"] for row in rows], info)


def read_rounds(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """(rows of RUN_DIR/rounds.jsonl sorted by round, notes on skipped lines); ([], []) if there is none."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.is_file():
        return [], []
    rows, notes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("round"), bool) or not isinstance(row.get("round"), int):
                raise ValueError('needs an integer "round"')
            for key in ("plausibility", "reward_mean"):
                value = row.get(key)
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
                ):
                    raise ValueError(f"{key} must be a number, got {value!r}")
        except ValueError as error:
            notes.append(f"{path}:{number} skipped ({error})")
            continue
        rows.append(row)
    return sorted(rows, key=lambda row: row["round"]), notes


def read_feedback(run_dir: str | Path, images: ImageSet) -> tuple[list[dict], list[dict]] | None:
    """(consensus rows on these very images, latest verdict rows of the whole store) from RUN_DIR/feedback,
    or None when the run has no feedback store. A verdict counts for an image only when both its
    sample_id and its image SHA-256 match."""
    directory = Path(run_dir) / "feedback"
    if not directory.is_dir():
        return None
    store = FeedbackStore(directory)
    wanted = dict(zip(images.sample_ids, images.sha256()))
    consensus = [row for row in store.consensus().to_pylist() if wanted.get(row["sample_id"]) == row["image_sha256"]]
    return consensus, store.latest().select(["round", "verdict"]).to_pylist()
