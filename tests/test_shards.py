"""pathalign_ray.data.shards: the Parquet dataset directory, its split, its guards and its readers."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathalign_ray.data import shards
from pathalign_ray.data.labeled import LabeledImages
from pathalign_ray.data.shards import (
    SCHEMA,
    read_dataset,
    read_dataset_info,
    read_parquet_table,
    stratified_split,
    write_dataset,
)
from pathalign_ray.images import ImageError, encode_png


def _images(counts=(5, 4, 1), side=12, with_features=True):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    features = [
        {"nucleus": {"lobes": np.int64(i % 3), "round": bool(i % 2)}, "size": np.float32(0.5 + i)}
        for i in range(len(labels))
    ]
    return LabeledImages(
        rng.integers(0, 256, (len(labels), side, side, 3), dtype=np.uint8),
        labels.astype(np.int64),
        tuple(f"type_{k}" for k in range(len(counts))),
        features if with_features else None,
    )


def _plain(features):
    return json.loads(json.dumps(features, default=lambda value: value.tolist()))


def test_round_trip_is_exact_with_features(tmp_path):
    data = _images()
    out = write_dataset(data, tmp_path / "ds", test_fraction=0.25, seed=1, source="unit test", shard_rows=3)
    train_index, test_index = stratified_split(data.labels, 3, 0.25, 1)
    for split, index in (("train", train_index), ("test", test_index)):
        back = read_dataset(out, split)
        expected = data.subset(index)
        assert np.array_equal(back.images, expected.images)
        assert back.labels.dtype == np.int64 and np.array_equal(back.labels, expected.labels)
        assert back.class_names == data.class_names
        assert back.features == _plain(expected.features)
    assert len(list((out / "train").glob("part-*.parquet"))) == 3  # 8 rows in shards of 3


def test_layout_and_info(tmp_path):
    out = write_dataset(_images(), tmp_path / "ds", test_fraction=0.25, seed=1, source="unit test")
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "dataset.json", "test", "train"]
    info = read_dataset_info(out)
    assert info["class_names"] == ["type_0", "type_1", "type_2"] and info["image_size"] == 12
    assert info["source"] == "unit test" and info["seed"] == 1
    assert info["counts"]["train"] == {"total": 8, "per_class": {"type_0": 4, "type_1": 3, "type_2": 1}}
    assert info["counts"]["test"] == {"total": 2, "per_class": {"type_0": 1, "type_1": 1, "type_2": 0}}
    assert pq.read_schema(out / "train" / "part-00000.parquet").remove_metadata() == SCHEMA
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary sibling left


def test_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [40, 10, 2, 1])
    train, test = stratified_split(labels, 4, 0.2, seed=7)
    assert np.bincount(labels[test], minlength=4).tolist() == [8, 2, 1, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    again = stratified_split(labels, 4, 0.2, seed=7)
    assert np.array_equal(test, again[1]) and np.array_equal(train, again[0])
    assert not np.array_equal(test, stratified_split(labels, 4, 0.2, seed=8)[1])
    assert len(stratified_split(labels, 4, 0.0, seed=7)[1]) == 0


def test_empty_test_split_reads_as_empty(tmp_path):
    out = write_dataset(_images(with_features=False), tmp_path / "ds", test_fraction=0.0, seed=0, source="s")
    test = read_dataset(out, "test")
    assert test.images.shape == (0, 12, 12, 3) and len(test.labels) == 0 and test.features is None
    assert read_dataset(out).features is None


def test_refuses_non_empty_dir_and_leaves_it_intact(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to write over it"):
        write_dataset(_images(), target, test_fraction=0.2, seed=0, source="s")
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert (target / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    write_dataset(_images(), tmp_path / "empty", test_fraction=0.2, seed=0, source="s")  # an empty dir is fine


def test_a_crash_leaves_no_half_dataset(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards, "contact_sheet", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(_images(), tmp_path / "ds", test_fraction=0.2, seed=0, source="s")
    assert list(tmp_path.iterdir()) == []


def test_write_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="test_fraction"):
        write_dataset(_images(), tmp_path / "a", test_fraction=1.0, seed=0, source="s")
    with pytest.raises(ValueError, match="shard_rows"):
        write_dataset(_images(), tmp_path / "a", test_fraction=0.1, seed=0, source="s", shard_rows=0)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        read_dataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a dataset"):
        read_dataset(tmp_path / "plain")
    out = write_dataset(_images(), tmp_path / "ds", test_fraction=0.2, seed=0, source="s")
    with pytest.raises(ValueError, match=r"no split 'val'; it has \['test', 'train'\]"):
        read_dataset(out, "val")
    (out / "test" / "part-00000.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        read_dataset(out, "test")


def _rewrite_shard(path, column, values):
    table = pq.read_table(path)
    field = SCHEMA.field(column)
    table = table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type))
    pq.write_table(table, path)


def test_read_names_the_bad_row(tmp_path):
    out = write_dataset(_images(), tmp_path / "ds", test_fraction=0.2, seed=0, source="s")
    shard = out / "train" / "part-00000.parquet"
    ids = pq.read_table(shard).column("id").to_pylist()
    labels = pq.read_table(shard).column("label").to_pylist()
    _rewrite_shard(shard, "label", [None] + labels[1:])
    with pytest.raises(ValueError, match=f"part-00000.parquet row id={ids[0]}: null label"):
        read_dataset(out)
    _rewrite_shard(shard, "label", labels)
    names = pq.read_table(shard).column("class_name").to_pylist()
    _rewrite_shard(shard, "class_name", names[:1] + ["martian"] + names[2:])
    with pytest.raises(ValueError, match=f"row id={ids[1]}: .*'martian' do not match class_names"):
        read_dataset(out)
    _rewrite_shard(shard, "class_name", names)
    images = pq.read_table(shard).column("image").to_pylist()
    _rewrite_shard(shard, "image", images[:2] + [images[2][:50]] + images[3:])
    with pytest.raises(ImageError, match=f"row id={ids[2]}: "):
        read_dataset(out)


def _table(path, images, labels, **columns):
    pq.write_table(pa.table({"image": images, "label": labels, **columns}), path)
    return path


def test_parquet_table_with_string_labels(tmp_path):
    pixels = _images(counts=(2, 1)).images
    path = _table(tmp_path / "t.parquet", [encode_png(p) for p in pixels], ["mono", "blast", "mono"])
    data = read_parquet_table(path, 12)
    assert data.class_names == ("blast", "mono") and data.labels.tolist() == [1, 0, 1]
    assert np.array_equal(data.images, pixels)
    named = read_parquet_table(path, 12, class_names=["mono", "blast", "baso"])
    assert named.labels.tolist() == [0, 1, 0] and named.class_names == ("mono", "blast", "baso")
    with pytest.raises(ValueError, match=r"row 1: label 'blast' is not among class_names \['mono'\]"):
        read_parquet_table(path, 12, class_names=["mono"])


def test_parquet_table_with_int_labels_and_hf_struct_column(tmp_path):
    pixels = _images(counts=(2, 2)).images
    struct = [{"bytes": encode_png(p), "path": f"{i}.png"} for i, p in enumerate(pixels)]
    path = _table(tmp_path / "t.parquet", struct, [0, 3, 1, 0], img_id=list("abcd"))
    data = read_parquet_table(path, 12)
    assert data.class_names == ("class_0", "class_1", "class_2", "class_3")
    assert np.array_equal(data.images, pixels)
    with pytest.raises(ValueError, match=r"row 1: label 3 is outside \[0, 2\)"):
        read_parquet_table(path, 12, class_names=["a", "b"])


def test_parquet_table_errors_name_row_and_column(tmp_path):
    png = encode_png(_images().images[0])
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_parquet_table(tmp_path / "nope.parquet", 12)
    path = _table(tmp_path / "a.parquet", [png, png, png], [0, None, 1])
    with pytest.raises(ValueError, match="a.parquet row 1: null label"):
        read_parquet_table(path, 12)
    path = _table(tmp_path / "b.parquet", [png, None], ["x", "y"])
    with pytest.raises(ValueError, match="b.parquet row 1: null image"):
        read_parquet_table(path, 12)
    with pytest.raises(ValueError, match=r"no columns \['pixels'\]; it has \['image', 'label'\]"):
        read_parquet_table(path, 12, image_column="pixels")
    path = _table(tmp_path / "c.parquet", [png, b"garbage"], [0, 1])
    with pytest.raises(ImageError, match="c.parquet row 1: not an image"):
        read_parquet_table(path, 12)
    path = _table(tmp_path / "d.parquet", [png], [0.5])
    with pytest.raises(ValueError, match="label column has type double"):
        read_parquet_table(path, 12)


def test_module_imports_without_ray():
    code = "import sys, pathalign_ray.data.shards; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.ray
def test_ray_dataset_decodes_to_model_range(tmp_path, ray_cluster):
    data = _images(counts=(6, 6), with_features=False)
    out = write_dataset(data, tmp_path / "ds", test_fraction=0.25, seed=0, source="s", shard_rows=4)
    rows = shards.ray_dataset(out, "train").take_all()
    expected = read_dataset(out, "train")
    images = np.stack([row["image"] for row in rows])
    assert images.dtype == np.float32 and images.shape == (len(expected), 3, 12, 12)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert sorted(row["label"] for row in rows) == sorted(expected.labels.tolist())
    assert {np.asarray(row["label"]).dtype for row in rows} == {np.dtype(np.int64)}
    decoded = {tuple(np.rint((row["image"] + 1) * 127.5).astype(np.uint8).ravel()) for row in rows}
    assert decoded == {tuple(image.transpose(2, 0, 1).ravel()) for image in expected.images}
