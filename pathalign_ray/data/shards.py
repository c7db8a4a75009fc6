"""The one on-disk form every job reads: a directory of Parquet shards of PNG images.

Layout:
    DIR/dataset.json            class_names, image_size, counts, source, seed, shard files per split
    DIR/train/part-00000.parquet ...
    DIR/test/part-00000.parquet ...
    DIR/contact_sheet.png       up to 8 images per class, for a person to look at

Each shard has the columns of SCHEMA: id (the image's index in the written
set), image (PNG bytes), label (int32), class_name, features (JSON or null).
Every split has at least one shard, possibly with zero rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pathalign_ray import storage
from pathalign_ray.data.labeled import LabeledImages
from pathalign_ray.images import contact_sheet, decode_image, encode_png, to_model_range

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("features", pa.string()),
    ]
)
SPLITS = ("train", "test")
FORMAT = "pathalign_ray.dataset/1"


def write_dataset(
    images: LabeledImages, out_dir: str | Path, test_fraction: float, seed: int, source: str, shard_rows: int = 2048
) -> str | Path:
    """Split `images` into train/test per class and write them as a dataset directory.

    The split is stratified and deterministic per seed: each class with n >= 2
    images puts round(test_fraction * n) of them (half to even), at least 1 and at most n - 1,
    in test (a class with one image stays in train).  Within a split, rows keep
    the input order.  Features round-trip as JSON (tuples become lists, numpy
    scalars Python numbers).

    out_dir (a path or a URI) must not exist or be empty: nothing already stored is overwritten.
    Everything is written into a staging folder that replaces out_dir at the end
    (storage.output_dir), so a crash never leaves half a dataset.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    if not storage.is_empty(out_dir):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; refusing to write over it")
    split_index = dict(zip(SPLITS, stratified_split(images.labels, len(images.class_names), test_fraction, seed)))
    with storage.output_dir(out_dir) as tmp:
        shard_names = {
            split: _write_split(images, index, tmp / split, shard_rows) for split, index in split_index.items()
        }
        info = {
            "format": FORMAT,
            "class_names": list(images.class_names),
            "image_size": images.size,
            "counts": {split: _counts(images, index) for split, index in split_index.items()},
            "shards": shard_names,
            "source": source,
            "seed": int(seed),
            "test_fraction": test_fraction,
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
        contact_sheet(images.images, images.labels, images.class_names, tmp / "contact_sheet.png")
    return storage.location(out_dir)


def stratified_split(
    labels: np.ndarray, n_classes: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels -> (train indices, test indices), each sorted; the rule is in `write_dataset`."""
    rng = np.random.default_rng(seed)
    test = []
    for label in range(n_classes):
        members = np.flatnonzero(labels == label)
        n_test = int(round(test_fraction * len(members)))
        if test_fraction > 0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(rng.permutation(members)[:n_test])
    test_index = np.sort(np.concatenate(test)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), test_index), test_index


def read_dataset_info(dir: str | Path) -> dict:
    """The parsed dataset.json of a dataset directory written by `write_dataset` (a path or a URI)."""
    path = storage.join(dir, "dataset.json")
    try:
        text = storage.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        if not storage.exists(dir):
            raise FileNotFoundError(f"dataset directory {dir} does not exist") from None
        raise ValueError(f"{dir} is not a dataset (no dataset.json); write one with write_dataset") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def read_dataset(dir: str | Path, split: str = "train") -> LabeledImages:
    """Read one split of a dataset directory into memory: images (N, S, S, 3) uint8, S = image_size."""
    info = read_dataset_info(dir)
    class_names, size = tuple(info["class_names"]), info["image_size"]
    images, labels, features = [], [], []
    for path in split_files(dir, split):
        filesystem, where_on_it = storage.resolve(path)
        table = pq.read_table(where_on_it, schema=SCHEMA, filesystem=filesystem)
        for row in table.to_pylist():
            where = f"{path} row id={row['id']}"
            if row["image"] is None or row["label"] is None:
                raise ValueError(f"{where}: null {'image' if row['image'] is None else 'label'}")
            if row["class_name"] not in class_names or class_names.index(row["class_name"]) != row["label"]:
                raise ValueError(
                    f"{where}: label {row['label']} / class_name {row['class_name']!r} "
                    f"do not match class_names {list(class_names)} of dataset.json"
                )
            images.append(decode_image(row["image"], size, where))
            labels.append(row["label"])
            features.append(None if row["features"] is None else json.loads(row["features"]))
    return LabeledImages(
        np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        np.asarray(labels, dtype=np.int64),
        class_names,
        None if all(f is None for f in features) else [f or {} for f in features],
    )


def split_files(dir: str | Path, split: str) -> list[str]:
    """The shard locations (paths or URIs) of one split, as listed in dataset.json; each must exist."""
    info = read_dataset_info(dir)
    if split not in info["shards"]:
        raise ValueError(f"{dir} has no split {split!r}; it has {sorted(info['shards'])}")
    paths = [storage.join(dir, split, name) for name in info["shards"][split]]
    missing = [path for path in paths if not storage.exists(path)]
    if missing:
        raise FileNotFoundError(f"{dir}: shards listed in dataset.json are missing: {missing}")
    return paths


def read_parquet_table(
    path: str | Path,
    size: int,
    image_column: str = "image",
    label_column: str = "label",
    class_names: list[str] | tuple[str, ...] | None = None,
) -> LabeledImages:
    """Read a user's own Parquet table (a file, or a directory of files) of encoded images and labels.

    image_column: binary image bytes (any format Pillow reads), or a struct with
    a "bytes" field (the Hugging Face `datasets` Image layout).
    label_column: integers (indices into class_names, default "class_0".."class_K")
    or strings (class names, default the sorted distinct values).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parquet table {path} does not exist")
    columns = pq.read_schema(path).names if path.is_file() else pq.ParquetDataset(path).schema.names
    missing = [name for name in (image_column, label_column) if name not in columns]
    if missing:
        raise ValueError(f"{path} has no columns {missing}; it has {columns}")
    table = pq.read_table(path, columns=[image_column, label_column])
    data, raw_labels = table.column(image_column), table.column(label_column)
    if pa.types.is_struct(data.type):
        data = pc.struct_field(data, "bytes")
    if pa.types.is_dictionary(raw_labels.type):
        raw_labels = raw_labels.cast(raw_labels.type.value_type)
    nulls = np.flatnonzero(np.asarray(data.is_null()) | np.asarray(raw_labels.is_null()))
    if len(nulls):
        row = int(nulls[0])
        raise ValueError(f"{path} row {row}: null {image_column if data[row].as_py() is None else label_column}")
    names, labels = _label_indices(raw_labels, class_names, path)
    images = [decode_image(image, size, f"{path} row {row}") for row, image in enumerate(data.to_pylist())]
    return LabeledImages(np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), labels, names)


def ray_dataset(dir: str | Path, split: str = "train"):
    """A `ray.data.Dataset` over one split (a path or a URI), for distributed training (`iter_torch_batches`).

    Columns: "image" float32 (N, 3, S, S) in [-1, 1] per batch, "label" int64.
    Ray is imported here only, so the rest of this module works without it.
    """
    import ray.data

    size = read_dataset_info(dir)["image_size"]
    files = split_files(dir, split)
    filesystem = storage.resolve(files[0])[0]  # carries a URI's endpoint to the read tasks on every node
    paths = [storage.resolve(path)[1] for path in files]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(["id", "image", "label"])
    return dataset.map_batches(_decode_batch, fn_kwargs={"size": size}, batch_format="numpy")


def _decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray batch of PNG bytes -> {"image": (B, 3, S, S) float32 in [-1, 1], "label": (B,) int64}."""
    pixels = [decode_image(data, size, f"row id={row_id}") for row_id, data in zip(batch["id"], batch["image"])]
    images = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return {"image": to_model_range(images), "label": batch["label"].astype(np.int64)}


def _write_split(images: LabeledImages, index: np.ndarray, split_dir: Path, shard_rows: int) -> list[str]:
    """Write rows `index` of `images` as shards of at most shard_rows rows; returns the file names."""
    split_dir.mkdir(parents=True)
    names = []
    for number, start in enumerate(range(0, max(len(index), 1), shard_rows)):
        rows = index[start : start + shard_rows]
        table = pa.table(
            {
                "id": [f"{i:06d}" for i in rows],
                "image": [encode_png(images.images[i]) for i in rows],
                "label": images.labels[rows].astype(np.int32),
                "class_name": [images.class_names[images.labels[i]] for i in rows],
                "features": [None if images.features is None else _json(images.features[i]) for i in rows],
            },
            schema=SCHEMA,
        )
        names.append(f"part-{number:05d}.parquet")
        pq.write_table(table, split_dir / names[-1])
    return names


def _counts(images: LabeledImages, index: np.ndarray) -> dict:
    """{"total": n, "per_class": {class name: n}} for the rows `index`."""
    per_class = np.bincount(images.labels[index], minlength=len(images.class_names))
    return {"total": int(len(index)), "per_class": dict(zip(images.class_names, per_class.tolist()))}


def _json(features: dict) -> str:
    """JSON text of one features dict; numpy scalars and arrays become plain numbers and lists."""
    return json.dumps(features, sort_keys=True, default=_plain)


def _plain(value: object) -> object:
    """json.dumps fallback for numpy values; anything else is an error naming the value."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"features value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _label_indices(
    raw: pa.ChunkedArray, class_names: list[str] | tuple[str, ...] | None, path: Path
) -> tuple[tuple[str, ...], np.ndarray]:
    """An integer or string label column -> (class names, (N,) int64 indices); a bad value names its row."""
    if pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type):
        values = raw.to_pylist()
        names = tuple(class_names) if class_names is not None else tuple(sorted(set(values)))
        lookup = {name: index for index, name in enumerate(names)}
        unknown = [row for row, label in enumerate(values) if label not in lookup]
        if unknown:
            row = unknown[0]
            raise ValueError(f"{path} row {row}: label {values[row]!r} is not among class_names {list(names)}")
        return names, np.asarray([lookup[label] for label in values], dtype=np.int64)
    if not pa.types.is_integer(raw.type):
        raise ValueError(f"{path}: label column has type {raw.type}; expected integers or strings")
    labels = np.asarray(raw.to_numpy(), dtype=np.int64)
    top = int(labels.max(initial=-1))
    names = tuple(class_names) if class_names is not None else tuple(f"class_{k}" for k in range(top + 1))
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if len(bad):
        raise ValueError(f"{path} row {bad[0]}: label {labels[bad[0]]} is outside [0, {len(names)})")
    return names, labels
