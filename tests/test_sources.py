"""pathalign_ray.data.sources: image folders, MedMNIST .npz files and the IHC smoke set."""

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from pathalign_ray.data.sources import (
    DAB_NEGATIVE,
    DAB_POSITIVE,
    MEDMNIST_CLASS_NAMES,
    ihc_patches,
    read_image_folder,
    read_medmnist_npz,
)
from pathalign_ray.images import ImageError


def _save(path, seed=0, side=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "cells"
    _save(root / "neutrophil" / "b.png", 1)
    _save(root / "neutrophil" / "A.JPG", 2)
    _save(root / "neutrophil" / "c.TIFF", 3)
    _save(root / "blast" / "x.bmp", 4)
    (root / "blast" / "notes.txt").write_text("not an image")
    (root / "blast" / "._x.png").write_bytes(b"macOS resource fork")
    (root / ".hidden").mkdir()
    return root


def test_image_folder_reads_sorted_classes_and_files(folder):
    data = read_image_folder(folder, 8)
    assert data.class_names == ("blast", "neutrophil")
    assert data.images.shape == (4, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 1, 1, 1]


def test_image_folder_keeps_pixels_at_native_size(folder):
    pixels = _save(folder / "blast" / "y.png", 9)
    data = read_image_folder(folder, 20)
    assert np.array_equal(data.images[1], pixels)  # blast/x.bmp, blast/y.png


def test_image_folder_follows_given_class_order(folder):
    data = read_image_folder(folder, 8, classes=["neutrophil", "blast"])
    assert data.class_names == ("neutrophil", "blast")
    assert data.labels.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "classes, message",
    [
        (["neutrophil"], r"subfolders \['blast'\] that are not among classes"),
        (["neutrophil", "blast", "monocyte"], r"no subfolder for classes \['monocyte'\]"),
        (["blast", "blast", "neutrophil"], "duplicates"),
    ],
)
def test_image_folder_classes_must_match_folders(folder, classes, message):
    with pytest.raises(ValueError, match=message):
        read_image_folder(folder, 8, classes=classes)


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_image_folder(tmp_path / "nowhere", 8)
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        read_image_folder(tmp_path / "flat", 8)
    (folder / "monocyte").mkdir()
    (folder / "monocyte" / "readme.md").write_text("")
    with pytest.raises(ValueError, match="class folder .*monocyte has no image files"):
        read_image_folder(folder, 8)


def test_image_folder_names_the_undecodable_file(folder):
    good = (folder / "neutrophil" / "b.png").read_bytes()
    (folder / "neutrophil" / "broken.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match=r"neutrophil/broken.png: truncated"):
        read_image_folder(folder, 8)


def _npz(path, n=6, classes=8, grey=False, **override):
    rng = np.random.default_rng(0)
    shape = (n, 28, 28) if grey else (n, 28, 28, 3)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return arrays


def test_medmnist_bloodmnist_names_and_splits(tmp_path):
    arrays = _npz(tmp_path / "bloodmnist.npz", n=10)
    train = read_medmnist_npz(tmp_path / "bloodmnist.npz", 28)
    assert train.class_names == MEDMNIST_CLASS_NAMES["bloodmnist"]
    assert train.class_names[3] == "immature_granulocyte" and len(train.class_names) == 8
    assert np.array_equal(train.images, arrays["train_images"])
    assert train.labels.tolist() == arrays["train_labels"].ravel().tolist()
    everything = read_medmnist_npz(tmp_path / "bloodmnist.npz", 16, split="all")
    assert everything.images.shape == (30, 16, 16, 3)
    assert np.array_equal(everything.labels[20:], arrays["test_labels"].ravel())


def test_medmnist_grey_unknown_set_and_explicit_names(tmp_path):
    path = tmp_path / "pneumoniamnist_64.npz"
    arrays = _npz(path, classes=2, grey=True)
    data = read_medmnist_npz(path, 28, split="val")
    assert data.class_names == ("class_0", "class_1")
    assert np.array_equal(data.images[..., 1], arrays["val_images"])
    named = read_medmnist_npz(path, 28, split="test", class_names=["normal", "pneumonia"])
    assert named.class_names == ("normal", "pneumonia")


def test_medmnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_medmnist_npz(tmp_path / "missing.npz", 28)
    _npz(tmp_path / "a.npz", val_images=None, val_labels=None)
    with pytest.raises(ValueError, match=r"lacks keys \['val_images', 'val_labels'\]"):
        read_medmnist_npz(tmp_path / "a.npz", 28, split="all")
    assert len(read_medmnist_npz(tmp_path / "a.npz", 28, split="train")) == 6  # other splits still read
    _npz(tmp_path / "bloodmnist_b.npz", test_labels=np.full((6, 1), 8))
    with pytest.raises(ValueError, match=r"test_labels\[0\] = 8 is outside \[0, 8\)"):
        read_medmnist_npz(tmp_path / "bloodmnist_b.npz", 28, split="test")
    _npz(tmp_path / "chest.npz", train_labels=np.zeros((6, 14), np.uint8))
    with pytest.raises(ValueError, match="single-label"):
        read_medmnist_npz(tmp_path / "chest.npz", 28)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not a readable .npz"):
        read_medmnist_npz(tmp_path / "junk.npz", 28)
    with pytest.raises(ValueError, match="split must be one of"):
        read_medmnist_npz(tmp_path / "a.npz", 28, split="validation")


def test_ihc_patches_deterministic_and_balanced():
    first, again, other = ihc_patches(16, 12, seed=3), ihc_patches(16, 12, seed=3), ihc_patches(16, 12, seed=4)
    assert first.class_names == ("dab_negative", "dab_positive")
    assert first.images.shape == (24, 16, 16, 3)
    assert np.bincount(first.labels).tolist() == [12, 12]
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert not np.array_equal(first.images, other.images)


def test_ihc_patch_labels_follow_the_dab_rule():
    data = ihc_patches(32, 10, seed=0, patch=32)  # patch == size: pixels are the source's own
    mean_dab = rgb2hed(data.images)[..., 2].mean(axis=(1, 2))
    assert (mean_dab[data.labels == 0] <= DAB_NEGATIVE + 1e-9).all()
    assert (mean_dab[data.labels == 1] >= DAB_POSITIVE - 1e-9).all()


def test_ihc_patches_refuses_impossible_requests():
    with pytest.raises(ValueError, match="only .* distinct 500 px"):
        ihc_patches(16, 1000, seed=0, patch=500)
    with pytest.raises(ValueError, match="patch must lie in"):
        ihc_patches(16, 1, seed=0, patch=600)
