"""The procedural cytology set: determinism, the API contract, the clinical ranges, and that the
features can be measured back from pixels with simple colour thresholds."""

import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, binary_fill_holes
from skimage.measure import label

from pathalign_ray.data.procedural import (
    CELL_TYPES,
    DEFAULT_CELL_TYPES,
    cytoplasm_rgb,
    draw_features,
    generate,
    render_cell,
)
from pathalign_ray.experts import checklist
from pathalign_ray.experts.checklist import SPECS

BACKGROUND = np.array([236, 226, 228])
NUCLEUS_LUMINANCE = 120  # the nucleus is darker, cytoplasm and lobe filaments are lighter


def _luminance(images: np.ndarray) -> np.ndarray:
    return images.astype(float) @ np.array([0.299, 0.587, 0.114])


def _cell_mask(image: np.ndarray) -> np.ndarray:
    """The connected non-background region at the frame centre, holes filled."""
    foreground = np.abs(image.astype(float) - BACKGROUND).sum(axis=-1) > 30
    components = label(foreground)
    centre = components[image.shape[0] // 2, image.shape[1] // 2]
    return binary_fill_holes(components == centre)


def _measure(image: np.ndarray) -> dict:
    cell = _cell_mask(image)
    nucleus = cell & (_luminance(image) < NUCLEUS_LUMINANCE)
    cytoplasm = cell & ~nucleus
    rgb = image[cytoplasm].astype(float).mean(axis=0)
    return {
        "cell_area": cell.sum(),
        "nc_ratio": nucleus.sum() / cell.sum(),
        "cytoplasm_blue_minus_red": rgb[2] - rgb[0],
        "nucleus_luminance": _luminance(image)[nucleus].mean(),
    }


def _lobe_count(image: np.ndarray) -> int:
    components = label(_luminance(image) < NUCLEUS_LUMINANCE)
    areas = np.bincount(components.ravel())[1:]
    return int((areas >= 6).sum())


def test_class_vocabulary():
    assert CELL_TYPES[0] == "myeloblast" and CELL_TYPES[-2:] == ("eosinophil", "monocyte")
    assert len(CELL_TYPES) == 10 and DEFAULT_CELL_TYPES == CELL_TYPES[:8]
    assert tuple(SPECS) == CELL_TYPES


def test_same_seed_same_images_other_seed_other_images():
    first, again, other = (generate(2, 32, seed, DEFAULT_CELL_TYPES[:3]) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first.images, again.images)
    assert first.features == again.features
    assert not np.array_equal(first.images, other.images)


def test_image_does_not_depend_on_n_per_class_or_other_classes():
    everything = generate(3, 32, 5, DEFAULT_CELL_TYPES)
    two = generate(2, 32, 5, ("lymphocyte", "myeloblast"))
    lymphocytes = everything.images[everything.labels == DEFAULT_CELL_TYPES.index("lymphocyte")]
    myeloblasts = everything.images[everything.labels == 0]
    np.testing.assert_array_equal(two.images[two.labels == 0], lymphocytes[:2])
    np.testing.assert_array_equal(two.images[two.labels == 1], myeloblasts[:2])
    assert two.class_names == ("lymphocyte", "myeloblast")


@pytest.mark.parametrize("size", [16, 32, 45, 64, 128])
def test_shapes_and_dtypes(size):
    data = generate(2, size, 0, CELL_TYPES)
    assert data.images.shape == (2 * len(CELL_TYPES), size, size, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and list(data.labels) == [i for i in range(len(CELL_TYPES)) for _ in range(2)]
    assert data.class_names == CELL_TYPES and len(data.features) == len(data.images)
    assert data.images.std() > 10  # not blank


def test_unknown_class_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown cell type 'plasma_cell'.*myeloblast.*monocyte"):
        generate(1, 32, 0, ("lymphocyte", "plasma_cell"))
    with pytest.raises(ValueError, match="plasma_cell"):
        draw_features("plasma_cell", np.random.default_rng(0))


@pytest.mark.parametrize("n_per_class, size, seed", [(0, 32, 0), (-1, 32, 0), (1, 15, 0), (1, 32, -1)])
def test_bad_counts_sizes_and_seeds_are_rejected(n_per_class, size, seed):
    with pytest.raises(ValueError):
        generate(n_per_class, size, seed)


def test_repeated_classes_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        generate(1, 32, 0, ("lymphocyte", "myeloblast", "lymphocyte"))


def test_render_cell_rejects_tiny_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size"):
        render_cell(draw_features("myeloblast", rng), 8, rng)


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_drawn_features_lie_in_the_clinical_ranges(cell_type):
    spec, rng = SPECS[cell_type], np.random.default_rng(1)
    for _ in range(300):
        features = draw_features(cell_type, rng)
        json.dumps(features)
        assert features["cell_type"] == cell_type
        assert _within(features["cell_size"], spec.cell_size)
        assert features["nucleus_shape"] in spec.nucleus_shapes
        assert _within(features["lobes"], spec.lobes)
        assert _within(features["nc_ratio"], spec.nc_ratio)
        assert _within(features["chromatin"], spec.chromatin)
        assert _within(features["cytoplasm_tone"], spec.cytoplasm_tone)
        assert features["cytoplasm_rgb"] == cytoplasm_rgb(features["cytoplasm_tone"])
        assert features["granules"] == spec.granules
        assert _within(features["granule_density"], spec.granule_density)
        assert _within(features["nucleus_offset"], spec.nucleus_offset)
        assert max(map(abs, features["center"])) + features["cell_size"] / 2 < 0.5  # the cell stays in the frame


def test_inclusions_only_where_plausible_at_their_rates():
    rng = np.random.default_rng(2)
    for cell_type, spec in SPECS.items():
        drawn = [draw_features(cell_type, rng)["inclusions"] for _ in range(1000)]
        allowed = dict(spec.inclusions)
        assert {kind for kinds in drawn for kind in kinds} <= set(allowed)
        for kind, probability in allowed.items():
            rate = np.mean([kind in kinds for kinds in drawn])
            assert abs(rate - probability) < 0.05, (cell_type, kind, rate)


def test_cytoplasm_palette_runs_from_blue_to_orange_pink():
    blue, pink, orange = cytoplasm_rgb(0.0), cytoplasm_rgb(0.75), cytoplasm_rgb(1.0)
    assert blue[2] - blue[0] > 80 and pink[0] > pink[2] and orange[0] - orange[2] > 80
    assert cytoplasm_rgb(-1.0) == blue and cytoplasm_rgb(2.0) == orange


def test_docstring_table_matches_specs():
    lines = [line for line in checklist.__doc__.splitlines() if line.split()]
    rows = {line.split()[0]: line for line in lines if line.split()[0] in SPECS}
    for cell_type, spec in SPECS.items():
        for bounds in (spec.cell_size, spec.nc_ratio, spec.chromatin, spec.cytoplasm_tone):
            assert f"{bounds[0]:.2f}-{bounds[1]:.2f}" in rows[cell_type], cell_type


PER_TYPE = 24


@pytest.fixture(scope="module")
def sample():
    return generate(PER_TYPE, 64, 3, CELL_TYPES)


@pytest.fixture(scope="module")
def measured(sample):
    """Per type, the measurements of its PER_TYPE images at 64 px."""
    return {name: [_measure(image) for image in sample.images[sample.labels == i]] for i, name in enumerate(CELL_TYPES)}


def _mean(measured: dict, cell_type: str, key: str) -> float:
    return float(np.mean([m[key] for m in measured[cell_type]]))


def test_nucleus_to_cytoplasm_ratio_is_measurable(sample, measured):
    assert _mean(measured, "lymphocyte", "nc_ratio") > 2 * _mean(measured, "segmented_neutrophil", "nc_ratio")
    for i, name in enumerate(CELL_TYPES):
        if name == "promyelocyte":  # its dark primary granules pass the nucleus threshold
            continue
        drawn = [f["nc_ratio"] for f in sample.features[i * PER_TYPE : (i + 1) * PER_TYPE]]
        np.testing.assert_allclose([m["nc_ratio"] for m in measured[name]], drawn, atol=0.06, err_msg=name)


def test_cytoplasm_colour_is_measurable(measured):
    assert _mean(measured, "myeloblast", "cytoplasm_blue_minus_red") > 50
    assert _mean(measured, "segmented_neutrophil", "cytoplasm_blue_minus_red") < 0
    assert _mean(measured, "orthochromatic_erythroblast", "cytoplasm_blue_minus_red") < -30


def test_chromatin_darkness_is_measurable(measured):
    fine = _mean(measured, "myeloblast", "nucleus_luminance")
    assert fine > _mean(measured, "segmented_neutrophil", "nucleus_luminance") + 15
    assert fine > _mean(measured, "orthochromatic_erythroblast", "nucleus_luminance") + 25


def test_cell_size_is_measurable_and_red_cells_stay_apart(sample, measured):
    """The region around the nucleus is the cell alone: its area matches the drawn size, so no red
    cell touches it."""
    for i, name in enumerate(CELL_TYPES):
        drawn = [np.pi * (f["cell_size"] * 32) ** 2 for f in sample.features[i * PER_TYPE : (i + 1) * PER_TYPE]]
        areas = [m["cell_area"] for m in measured[name]]
        np.testing.assert_allclose(areas, drawn, rtol=0.15, err_msg=name)
    assert _mean(measured, "promyelocyte", "cell_area") > 2 * _mean(measured, "lymphocyte", "cell_area")


@pytest.mark.parametrize("cell_type", ["segmented_neutrophil", "eosinophil"])
def test_lobes_are_separate_components_at_64_px(cell_type):
    data = generate(40, 64, 4, (cell_type,))
    counts = np.array([_lobe_count(image) for image in data.images])
    drawn = np.array([f["lobes"] for f in data.features])
    assert np.mean(counts >= 2) >= 0.95
    assert np.mean(counts == drawn) >= 0.85


@pytest.mark.parametrize("cell_type", ["myeloblast", "lymphocyte", "orthochromatic_erythroblast", "monocyte"])
def test_round_nuclei_are_one_component(cell_type):
    data = generate(20, 64, 4, (cell_type,))
    assert np.mean([_lobe_count(image) == 1 for image in data.images]) >= 0.8


def _cytoplasm_core(image: np.ndarray) -> np.ndarray:
    """Cytoplasm at least 2 px away from the cell edge and from the nucleus."""
    cell = _cell_mask(image)
    nucleus = cell & (_luminance(image) < NUCLEUS_LUMINANCE)
    return binary_erosion(cell, iterations=2) & ~binary_dilation(nucleus, iterations=2)


def _granule_measures(image: np.ndarray) -> dict:
    cell, luminance = _cell_mask(image), _luminance(image)
    core = _cytoplasm_core(image)
    dark_areas = np.bincount(label(cell & (luminance < NUCLEUS_LUMINANCE)).ravel())[1:]
    rgb = image[cell].astype(int)
    return {
        "speckle": np.mean(np.abs(luminance[core] - np.median(luminance[core])) > 12) if core.sum() >= 20 else 0.0,
        "small_dark_spots": int(((dark_areas >= 1) & (dark_areas <= 12)).sum()),
        "orange": np.mean(rgb[:, 0] - rgb[:, 2] > 120),
    }


def test_granules_are_measurable(sample):
    by_type = {name: sample.images[sample.labels == i] for i, name in enumerate(CELL_TYPES)}
    granules = {name: [_granule_measures(image) for image in images] for name, images in by_type.items()}

    def mean(name: str, key: str) -> float:
        return float(np.mean([g[key] for g in granules[name]]))

    for name in ("myelocyte", "metamyelocyte", "band_neutrophil", "segmented_neutrophil"):  # fine secondary dust
        assert mean(name, "speckle") > 0.08, name
    for name in ("myeloblast", "monocyte"):  # agranular
        assert mean(name, "speckle") < 0.03, name
    assert mean("promyelocyte", "small_dark_spots") > 8 and mean("myeloblast", "small_dark_spots") < 1
    assert mean("eosinophil", "orange") > 0.1
    assert all(mean(name, "orange") == 0 for name in CELL_TYPES if name != "eosinophil")


def _with_and_without(cell_type: str, inclusion: str, count: int) -> tuple[list, list]:
    data = generate(count, 64, 6, (cell_type,))
    present = [inclusion in f["inclusions"] for f in data.features]
    return [im for im, p in zip(data.images, present) if p], [im for im, p in zip(data.images, present) if not p]


def _magenta_pixels(image: np.ndarray) -> int:
    """Auer-rod coloured pixels in the cell: much redder than green, and redder than blue."""
    red, green, blue = (image[..., channel].astype(int) for channel in range(3))
    return int(((red - green > 70) & (red > blue) & _cell_mask(image)).sum())


def _pale_pixels(image: np.ndarray) -> int:
    """Vacuole coloured pixels: near-background luminance inside the cytoplasm."""
    return int((_cytoplasm_core(image) & (_luminance(image) > 195)).sum())


def test_inclusions_are_measurable():
    with_rod, without_rod = _with_and_without("myeloblast", "auer_rod", 60)
    assert with_rod and all(_magenta_pixels(image) >= 3 for image in with_rod)
    assert all(_magenta_pixels(image) == 0 for image in without_rod)
    with_vacuoles, without_vacuoles = _with_and_without("monocyte", "vacuoles", 30)
    assert with_vacuoles and np.mean([_pale_pixels(image) > 0 for image in with_vacuoles]) >= 0.8
    assert all(_pale_pixels(image) == 0 for image in without_vacuoles)


def test_artefacts_replace_a_share_of_each_class_and_leave_the_clean_images_as_they_were():
    from pathalign_ray.data.procedural import BROKEN_KINDS
    from pathalign_ray.experts.pathologist import judge

    classes = ("myelocyte", "segmented_neutrophil")
    clean = generate(40, 32, 3, classes)
    mixed = generate(40, 32, 3, classes, artefact_fraction=0.25)
    kinds = [(f or {}).get("artefact") for f in mixed.features]
    for class_index, cell_type in enumerate(classes):
        own = [k for k, y in zip(kinds, mixed.labels) if y == class_index]
        assert 0.1 <= np.mean([k is not None for k in own]) <= 0.45
        assert {k for k in own if k} <= {k for k, (_, types) in BROKEN_KINDS.items() if cell_type in types}
    is_artefact = np.array([k is not None for k in kinds])
    assert np.array_equal(mixed.images[~is_artefact], clean.images[~is_artefact])
    assert not np.array_equal(mixed.images[is_artefact], clean.images[is_artefact])
    verdicts = [judge(mixed.images[i], classes[mixed.labels[i]]) for i in np.flatnonzero(is_artefact)]
    assert not any(v.plausible for v in verdicts)
    assert np.array_equal(generate(40, 32, 3, classes, artefact_fraction=0.25).images, mixed.images)
    with pytest.raises(ValueError, match="artefact_fraction"):
        generate(4, 32, 3, classes, artefact_fraction=1.0)


def test_a_data_set_with_artefacts_is_procedural_only():
    from pathalign_ray.data.make import MakeDatasetConfig

    with pytest.raises(ValueError, match="artefact_fraction is drawn for source 'procedural'"):
        MakeDatasetConfig(source="folder", path="x", artefact_fraction=0.1)
