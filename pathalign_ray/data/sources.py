"""Real images read into `LabeledImages`, from files already on disk (nothing is downloaded).

Three readers: a folder per class, a MedMNIST .npz file, and a small real
histology smoke set cut from an image bundled with scikit-image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pathalign_ray.data.labeled import LabeledImages
from pathalign_ray.images import decode_image, normalise_array

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

# Label order of BloodMNIST, from MedMNIST v2 `medmnist/info.py`, INFO["bloodmnist"]["label"]
# (github.com/MedMNIST/MedMNIST): 0 basophil ... 3 "immature granulocytes (myelocytes,
# metamyelocytes and promyelocytes)" ... 7 platelet.
MEDMNIST_CLASS_NAMES = {
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature_granulocyte",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
}
MEDMNIST_SPLITS = ("train", "val", "test")

# ihc_patches: a patch is "dab_positive" when its mean DAB optical density
# (skimage.color.rgb2hed channel 2) is at least DAB_POSITIVE, "dab_negative" when it
# is at most DAB_NEGATIVE; patches in between are ambiguous and skipped.  On 64 px
# patches about a quarter of positions are negative and half positive.
DAB_NEGATIVE = 0.03
DAB_POSITIVE = 0.06


def read_image_folder(root: str | Path, size: int, classes: Sequence[str] | None = None) -> LabeledImages:
    """Read ROOT/<class name>/<image files>, one subfolder per class.

    Classes are the subfolder names in sorted order, or `classes` in the given
    order, in which case every subfolder must be one of them and each of them
    must have a subfolder.  Image files are those with an extension in
    IMAGE_EXTENSIONS (any case), read in sorted order and not recursively;
    other files and hidden entries (".name", e.g. macOS "._x.png") are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    folders = {path.name: path for path in sorted(root.iterdir()) if path.is_dir() and not path.name.startswith(".")}
    if not folders:
        raise ValueError(f"{root} has no class subfolders (expected ROOT/<class name>/<images>)")
    class_names = tuple(sorted(folders)) if classes is None else _check_classes(root, folders, classes)
    images, labels = [], []
    for label, class_name in enumerate(class_names):
        files = _image_files(folders[class_name])
        images += [decode_image(path.read_bytes(), size, str(path)) for path in files]
        labels += [label] * len(files)
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64), class_names)


def read_medmnist_npz(
    path: str | Path, size: int, split: str = "train", class_names: Sequence[str] | None = None
) -> LabeledImages:
    """Read a MedMNIST .npz file (keys train_images, train_labels (N, 1), val_*, test_*).

    split: "train", "val", "test" or "all" (the three concatenated in that order).
    Class names: `class_names` if given; else MEDMNIST_CLASS_NAMES for a known
    data set, recognised by the file name ("bloodmnist.npz", "bloodmnist_64.npz");
    else "class_0".."class_K", K the largest label in any split of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file {path} does not exist")
    if split not in (*MEDMNIST_SPLITS, "all"):
        raise ValueError(f"split must be one of {MEDMNIST_SPLITS + ('all',)}, got {split!r}")
    splits = MEDMNIST_SPLITS if split == "all" else (split,)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error})") from None
    with npz:
        missing = [key for s in splits for key in (f"{s}_images", f"{s}_labels") if key not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks keys {missing}; it has {sorted(npz.files)}")
        labels = {s: _medmnist_labels(npz[f"{s}_labels"], path, s) for s in splits}
        names = class_names or _medmnist_names(path, npz)
        images = []
        for s in splits:
            bad = np.flatnonzero((labels[s] < 0) | (labels[s] >= len(names)))
            if len(bad):
                raise ValueError(
                    f"{path} {s}_labels[{bad[0]}] = {labels[s][bad[0]]} is outside [0, {len(names)}) "
                    f"({len(names)} class names)"
                )
            pixels = npz[f"{s}_images"]
            images += [normalise_array(image, size, f"{path} {s}_images[{i}]") for i, image in enumerate(pixels)]
    return LabeledImages(np.stack(images), np.concatenate([labels[s] for s in splits]), tuple(names))


def ihc_patches(size: int, n_per_class: int, seed: int, patch: int = 64) -> LabeledImages:
    """A real-histology smoke set: `n_per_class` patches per class from skimage.data.immunohistochemistry().

    The source is a 512x512 IHC image (haematoxylin counterstain, DAB brown for
    the marker) bundled with scikit-image.  Patches of `patch` source pixels are
    cut at random positions (deterministic per seed), labelled by their mean DAB
    density (see DAB_NEGATIVE / DAB_POSITIVE), and resized to `size`.
    Classes: ("dab_negative", "dab_positive"); images are grouped by class.
    """
    from skimage import color, data  # scikit-image is needed only for this smoke set

    source = data.immunohistochemistry()
    if not 1 <= patch <= min(source.shape[:2]):
        raise ValueError(f"patch must lie in [1, {min(source.shape[:2])}], got {patch}")
    mean_dab = _patch_means(color.rgb2hed(source)[..., 2], patch)
    rng = np.random.default_rng(seed)
    positions = np.stack(np.unravel_index(rng.permutation(mean_dab.size), mean_dab.shape), axis=1)
    density = mean_dab[positions[:, 0], positions[:, 1]]
    chosen = [positions[density <= DAB_NEGATIVE][:n_per_class], positions[density >= DAB_POSITIVE][:n_per_class]]
    for name, found in zip(("dab_negative", "dab_positive"), chosen):
        if len(found) < n_per_class:
            raise ValueError(f"only {len(found)} distinct {patch} px {name} patches exist, asked for {n_per_class}")
    images = [normalise_array(source[y : y + patch, x : x + patch], size) for y, x in np.concatenate(chosen)]
    labels = np.repeat(np.arange(2, dtype=np.int64), n_per_class)
    return LabeledImages(np.stack(images), labels, ("dab_negative", "dab_positive"))


def _check_classes(root: Path, folders: dict[str, Path], classes: Sequence[str]) -> tuple[str, ...]:
    """The given class names, after checking they match the subfolders one to one."""
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {list(classes)}")
    extra = sorted(set(folders) - set(classes))
    if extra:
        raise ValueError(f"{root} has subfolders {extra} that are not among classes {list(classes)}")
    absent = [name for name in classes if name not in folders]
    if absent:
        raise ValueError(f"{root} has no subfolder for classes {absent}")
    return tuple(classes)


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files directly inside one class folder; an error if there are none."""
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"class folder {folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _medmnist_labels(labels: np.ndarray, path: Path, split: str) -> np.ndarray:
    """(N, 1) or (N,) integer labels -> (N,) int64; multi-label files are refused."""
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise ValueError(f"{path} {split}_labels has shape {labels.shape}; only single-label (N, 1) is supported")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"{path} {split}_labels has dtype {labels.dtype}, expected integers")
    return labels.reshape(-1).astype(np.int64)


def _medmnist_names(path: Path, npz: np.lib.npyio.NpzFile) -> tuple[str, ...]:
    """Built-in names for a known MedMNIST file, else class_0..class_K over every split's labels."""
    known = MEDMNIST_CLASS_NAMES.get(path.stem.split("_")[0].lower())
    if known:
        return known
    top = max(int(npz[key].max(initial=0)) for key in npz.files if key.endswith("_labels"))
    return tuple(f"class_{k}" for k in range(top + 1))


def _patch_means(channel: np.ndarray, patch: int) -> np.ndarray:
    """(H, W) -> (H - patch + 1, W - patch + 1) mean over every patch x patch window, by a summed-area table."""
    table = np.pad(channel.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    sums = table[patch:, patch:] - table[:-patch, patch:] - table[patch:, :-patch] + table[:-patch, :-patch]
    return sums / patch**2
