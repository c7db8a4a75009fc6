"""The simulated pathologist: golden numbers for the measurement primitives, true- and wrong-class
verdicts on procedural cells, one feature pushed out of range at a time, deliberately broken images,
garbage, images made by the diffusion model (read by eye), simulated experts."""

import functools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from pathalign_ray.data.procedural import (
    BROKEN_KINDS,
    CELL_TYPES,
    DEFAULT_CELL_TYPES,
    cytoplasm_rgb,
    draw_features,
    generate,
    render_broken,
    render_cell,
)
from pathalign_ray.experts import pathologist
from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.pathologist import (
    Measurements,
    SimulatedExpert,
    judge,
    judge_batch,
    judge_measurements,
    measure,
)

PER_TYPE = 40
BACKGROUND = (236, 226, 228)
OPEN_CHROMATIN = (105, 62, 150)
DENSE_CHROMATIN = (50, 26, 80)


@functools.lru_cache(maxsize=2)
def _measured(size: int) -> tuple[np.ndarray, list[Measurements]]:
    """(labels, measurements) of PER_TYPE procedural cells of each of the ten types, measured once."""
    data = generate(PER_TYPE, size, seed=2024, classes=CELL_TYPES)
    return data.labels, [measure(image) for image in data.images]


def _plausible_matrix(labels, measurements) -> np.ndarray:
    """(true, declared) fraction of images judged plausible."""
    matrix = np.zeros((len(CELL_TYPES), len(CELL_TYPES)))
    for label, m in zip(labels, measurements):
        for k, declared in enumerate(CELL_TYPES):
            matrix[label, k] += judge_measurements(m, declared).plausible
    return matrix / PER_TYPE


# ---------------------------------------------------------------- golden numbers on drawn arrays


def _canvas(size: int = 64) -> np.ndarray:
    return np.broadcast_to(np.array(BACKGROUND, np.uint8), (size, size, 3)).copy()


def _disc(image: np.ndarray, cy: float, cx: float, radius: float, colour, aspect: float = 1.0) -> np.ndarray:
    """Paint a hard-edged disc (an ellipse, long axis along x, if aspect > 1); return its mask."""
    y, x = np.mgrid[: image.shape[0], : image.shape[1]] + 0.5
    mask = ((x - cx) / math.sqrt(aspect)) ** 2 + ((y - cy) * math.sqrt(aspect)) ** 2 <= radius**2
    image[mask] = colour
    return mask


def _drawn_cell(nucleus_colour=DENSE_CHROMATIN, cytoplasm=None, nucleus_radius=10.0, aspect=1.0):
    image = _canvas()
    cell = _disc(image, 32, 32, 20, cytoplasm or cytoplasm_rgb(0.3))
    nucleus = _disc(image, 32, 32, nucleus_radius, nucleus_colour, aspect)
    return image, cell, nucleus


def test_disc_gives_its_diameter_and_nc_ratio():
    image, cell, nucleus = _drawn_cell()
    m = measure(image)
    assert m.found_cell and m.lobes == 1
    assert m.cell_diameter == pytest.approx(40 / 64, abs=0.01)  # 2 x radius 20 px / 64 px
    assert m.nc_ratio == pytest.approx(nucleus.sum() / cell.sum(), abs=0.02)  # (10/20)^2 = 0.25
    assert m.axis_ratio == pytest.approx(1.0, abs=0.03) and m.solidity > 0.95
    # a hard step: central differences give it a slope of contrast / 2 across, contrast / sqrt(2) on a diagonal
    assert m.edge_width == pytest.approx(math.sqrt(2), abs=0.1)


def test_ellipse_gives_its_axis_ratio():
    image, _, _ = _drawn_cell(aspect=1.44)
    assert measure(image).axis_ratio == pytest.approx(1.44, abs=0.08)


def test_two_separate_discs_are_two_lobes_and_a_c_shape_is_not_solid():
    image = _canvas()
    _disc(image, 32, 32, 20, cytoplasm_rgb(0.7))
    _disc(image, 32, 24, 5, DENSE_CHROMATIN)
    _disc(image, 32, 40, 5, DENSE_CHROMATIN)
    assert measure(image).lobes == 2

    image = _canvas()
    _disc(image, 32, 32, 20, cytoplasm_rgb(0.7))
    ring = _disc(image, 32, 32, 13, DENSE_CHROMATIN) & ~_disc(image, 32, 32, 9, cytoplasm_rgb(0.7))
    image[:, 32:][ring[:, 32:]] = cytoplasm_rgb(0.7)  # keep the left half of the ring: a C
    m = measure(image)
    assert m.lobes == 1 and m.solidity < 0.7


def test_chromatin_reads_open_and_dense_stain_free():
    for colour, expected in ((OPEN_CHROMATIN, 0.0), (DENSE_CHROMATIN, 1.0)):
        for stain in (0.88, 1.0, 1.12):  # optical density scaled by the stain strength
            stained = tuple(min(max(int(round(255 - (255 - c) * stain)), 0), 255) for c in colour)
            image, _, _ = _drawn_cell(nucleus_colour=stained)
            assert measure(image).chromatin == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("tone", [0.0, 0.3, 0.55, 0.75, 1.0])
def test_cytoplasm_tone_reads_the_palette(tone):
    image, _, _ = _drawn_cell(cytoplasm=cytoplasm_rgb(tone))
    m = measure(image)
    assert m.cytoplasm_tone == pytest.approx(tone, abs=0.03)
    assert (m.blue_minus_red > 50) == (tone < 0.2) and (m.blue_minus_red < 0) == (tone > 0.6)


def _zone(image: np.ndarray) -> int:
    """Pixels of the plain-cytoplasm zone of a _drawn_cell image (2 px off the nucleus and cell edges)."""
    cell = np.abs(image.astype(int) - BACKGROUND).sum(-1) > 30
    nucleus = image.astype(float) @ [0.299, 0.587, 0.114] < 100
    return int((ndi.binary_erosion(cell, iterations=2) & ~ndi.binary_dilation(nucleus, iterations=2)).sum())


def test_granule_and_inclusion_spots_are_counted():
    image, _, _ = _drawn_cell(cytoplasm=cytoplasm_rgb(0.55))
    clean = measure(image)
    assert (clean.dark_granules, clean.fine_granules, clean.orange_granules, clean.vacuoles) == (0, 0, 0, 0)
    assert clean.rod_length == 0
    spots = [(y, x) for y in range(16, 49, 4) for x in range(16, 49, 4) if 12 < math.hypot(y - 32, x - 32) < 17]
    for y, x in spots:
        image[y, x] = (232, 118, 58)  # eosinophilic orange
    assert measure(image).orange_granules == pytest.approx(len(spots) / _zone(image))  # 32 spots / 604 px
    image, _, _ = _drawn_cell(cytoplasm=cytoplasm_rgb(0.55))
    image[16, 26] = image[48, 38] = (236, 228, 236)  # two vacuoles
    image[45, 20:30] = (186, 52, 104)  # an Auer rod, 10 px long
    m = measure(image)
    assert m.vacuoles == 2 and m.rod_length == pytest.approx(10 / 20, abs=0.1)  # / cell radius


def test_margins_count_tolerances_inside_the_widened_range():
    inside = pathologist._inside
    assert inside(0.5, (0.4, 0.6), "cell_diameter", 1.0) == pytest.approx(0.1 / 0.04 + 1)
    assert inside(0.64, (0.4, 0.6), "cell_diameter", 1.0) == pytest.approx(0.0)  # on the widened edge
    assert inside(0.64, (0.4, 0.6), "cell_diameter", 0.5) < 0  # a stricter reader: half the tolerance
    assert inside(math.nan, (0.4, 0.6), "cell_diameter", 1.0) == -math.inf


# ---------------------------------------------------------------- procedural cells, true and wrong class


@pytest.mark.parametrize("size", [64, 32])
def test_true_class_is_plausible(size):
    labels, measurements = _measured(size)
    rates = np.diag(_plausible_matrix(labels, measurements))
    floor = 0.95 if size >= 64 else 0.90
    assert all(m.found_cell for m in measurements)
    assert rates.min() >= floor, dict(zip(CELL_TYPES, rates.round(3)))


@pytest.mark.parametrize("size", [64, 32])
def test_wrong_class_is_implausible(size):
    labels, measurements = _measured(size)
    matrix = _plausible_matrix(labels, measurements)
    wrong = matrix[~np.eye(len(CELL_TYPES), dtype=bool)]
    assert 1 - wrong.mean() >= 0.95, matrix.round(2)
    assert 1 - wrong.max() >= 0.85, matrix.round(2)  # the closest pairs, e.g. band vs metamyelocyte


@pytest.mark.parametrize(
    "true_class, declared, expected_failures",
    [
        ("lymphocyte", "segmented_neutrophil", {"nucleus_shape", "cytoplasm_colour"}),
        ("segmented_neutrophil", "band_neutrophil", {"nucleus_shape"}),
        ("myelocyte", "metamyelocyte", {"nucleus_shape"}),
        ("eosinophil", "segmented_neutrophil", {"nucleus_shape", "granules"}),
        ("orthochromatic_erythroblast", "lymphocyte", {"nucleus_shape", "cytoplasm_colour"}),
        ("promyelocyte", "myeloblast", {"nucleus_shape", "granules"}),
        ("monocyte", "myeloblast", {"nucleus_shape", "cytoplasm_colour"}),
    ],
)
def test_wrong_class_fails_the_criteria_that_tell_them_apart(true_class, declared, expected_failures):
    data = generate(10, 64, seed=7, classes=(true_class,))
    for verdict in judge_batch(data.images, [declared] * len(data)):
        assert expected_failures <= set(verdict.failed), verdict


def test_verdict_does_not_depend_on_orientation():
    data = generate(4, 64, seed=3, classes=CELL_TYPES)
    for image, label in zip(data.images, data.labels):
        verdicts = [judge(np.ascontiguousarray(np.rot90(image, k)), CELL_TYPES[label]) for k in range(4)]
        assert len({v.failed for v in verdicts}) == 1


# ---------------------------------------------------------------- one feature out of range


def _wider_cell(features):
    features["cell_size"] = 0.8  # a lymphocyte 1.6 times too wide (2.5 times the area)


def _set(**changes):
    def change(features):
        features.update(changes)

    return change


OUT_OF_RANGE = {
    "round nucleus on a segmented neutrophil": (
        "segmented_neutrophil",
        _set(nucleus_shape="round", lobes=1, nucleus_geometry={}),
        "nucleus_shape",
    ),
    "pink cytoplasm on a myeloblast": (
        "myeloblast",
        _set(cytoplasm_tone=0.75, cytoplasm_rgb=cytoplasm_rgb(0.75)),
        "cytoplasm_colour",
    ),
    "lymphocyte far too big": ("lymphocyte", _wider_cell, "cell_size"),
    "secondary granules on a myeloblast": (
        "myeloblast",
        _set(granules="secondary", granule_density=0.2),
        "granules",
    ),
    "primary granules on a myelocyte": ("myelocyte", _set(granules="primary", granule_density=0.2), "granules"),
    "vacuoles in a lymphocyte": ("lymphocyte", _set(inclusions=["vacuoles"]), "inclusions"),
    "Auer rod in a myelocyte": ("myelocyte", _set(inclusions=["auer_rod"]), "inclusions"),
    "open chromatin in an orthochromatic erythroblast": (
        "orthochromatic_erythroblast",
        _set(chromatin=0.1),
        "chromatin",
    ),
}


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_one_feature_out_of_range_fails_that_criterion(case):
    cell_type, change, criterion = OUT_OF_RANGE[case]
    failures = []
    for j in range(20):
        rng = np.random.default_rng([11, j])
        features = draw_features(cell_type, rng)
        change(features)
        failures.append(judge(render_cell(features, 64, rng), cell_type).failed)
    hits = np.mean([criterion in failed for failed in failures])
    others = np.mean([bool(set(failed) - {criterion}) for failed in failures])
    assert hits >= 0.9 and others <= 0.1, failures


# ---------------------------------------------------------------- deliberately broken images

BROKEN_PER_KIND = 20  # the full counts (240 per kind and size) are bench/pathologist_accuracy.py's


def _broken_verdicts(kind: str, size: int) -> list:
    cell_types = BROKEN_KINDS[kind][1] or CELL_TYPES
    verdicts = []
    for j in range(BROKEN_PER_KIND):
        cell_type = cell_types[j % len(cell_types)]
        verdicts.append(judge(render_broken(kind, cell_type, size, np.random.default_rng([13, size, j])), cell_type))
    return verdicts


@pytest.mark.parametrize("kind", BROKEN_KINDS)
@pytest.mark.parametrize("size", [32, 64])
def test_broken_images_are_implausible_for_the_right_criterion(kind, size):
    expected = set(BROKEN_KINDS[kind][0])
    verdicts = _broken_verdicts(kind, size)
    assert not any(v.plausible for v in verdicts), [v.declared_class for v in verdicts if v.plausible]
    named = np.mean([expected <= set(v.failed) for v in verdicts])
    assert named >= 0.9, [v.failed for v in verdicts]


@pytest.mark.parametrize("size", [32, 64])
def test_broken_images_are_read_for_what_they_are(size):
    """Not merely rejected: two nuclei read as two pieces, a missing nucleus as none in a cell that is
    found and sized, a nucleus half out of the cell as far off its centre; blank fields hold no cell."""
    two = [v.measurements for v in _broken_verdicts("two_nuclei", size)]
    assert np.mean([m.lobes == 2 for m in two]) >= 0.9, [m.lobes for m in two]
    missing = [v for v in _broken_verdicts("no_nucleus", size)]
    assert all(v.measurements.found_cell and v.measurements.lobes == 0 for v in missing)
    assert np.mean(["cell_size" not in v.failed for v in missing]) >= 0.9
    assert all(math.isnan(v.measurements.chromatin) for v in missing)
    outside = [v.measurements for v in _broken_verdicts("nucleus_outside", size)]
    beyond = [m.nucleus_offset > 0.4 for m in outside]  # the most eccentric type's 0.3, + its tolerance
    assert np.mean(beyond) >= 0.9, [round(m.nucleus_offset, 2) for m in outside]
    assert not any(v.measurements.found_cell for v in _broken_verdicts("blank", size))


def test_broken_images_are_deterministic_and_checked():
    first, again = (render_broken("two_nuclei", "myelocyte", 32, np.random.default_rng(5)) for _ in range(2))
    assert np.array_equal(first, again) and first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert all(set(criteria) <= set(CRITERIA) for criteria, _ in BROKEN_KINDS.values())
    assert "orthochromatic_erythroblast" not in BROKEN_KINDS["nucleus_outside"][1]  # it extrudes its nucleus
    with pytest.raises(ValueError, match="unknown broken kind 'torn'"):
        render_broken("torn", "myelocyte", 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="two_nuclei is drawn for"):
        render_broken("two_nuclei", "eosinophil", 32, np.random.default_rng(0))  # bilobed: two pieces are right


def test_measured_nucleus_offset_follows_the_drawn_one():
    image = _canvas()
    _disc(image, 32, 32, 20, cytoplasm_rgb(0.5))
    _disc(image, 32, 38, 8, DENSE_CHROMATIN)  # 6 px off the centre of a 20 px radius cell: 0.3
    assert measure(image).nucleus_offset == pytest.approx(0.3, abs=0.02)


# ---------------------------------------------------------------- garbage


@pytest.mark.parametrize("kind", ["noise", "blank", "black", "white"])
@pytest.mark.parametrize("size", [32, 64])
def test_garbage_is_implausible_with_every_criterion_failed(kind, size):
    image = {
        "noise": np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8),
        "blank": np.broadcast_to(np.array(BACKGROUND, np.uint8), (size, size, 3)).copy(),
        "black": np.zeros((size, size, 3), np.uint8),
        "white": np.full((size, size, 3), 255, np.uint8),
    }[kind]
    verdict = judge(image, "myeloblast")
    assert not verdict.measurements.found_cell
    assert not verdict.plausible and verdict.failed == CRITERIA
    assert all(margin == -math.inf for margin in verdict.margins.values())


def test_heavily_blurred_cells_are_implausible():
    data = generate(3, 64, seed=5, classes=CELL_TYPES)
    blurred = ndi.gaussian_filter(data.images.astype(float), (0, 2.0, 2.0, 0)).round().astype(np.uint8)
    verdicts = judge_batch(blurred, [CELL_TYPES[label] for label in data.labels])
    assert not any(v.plausible for v in verdicts)
    assert all("chromatin" in v.failed for v in verdicts)  # no chromatin pattern left to judge


# ---------------------------------------------------------------- what diffusion-made images bring

DIFFUSION_SAMPLES = Path(__file__).parent / "data" / "diffusion_samples_32px.npz"


def test_a_touching_red_cell_is_not_part_of_the_cell():
    image = _canvas()
    _disc(image, 32, 30, 14, cytoplasm_rgb(0.3))
    nucleus = _disc(image, 32, 30, 8, DENSE_CHROMATIN)
    _disc(image, 32, 51, 8, (214, 122, 134))  # overlaps the cell by a pixel
    m = measure(image)
    assert m.cell_diameter == pytest.approx(28 / 64, abs=1.5 / 64)  # with the red cell: 32 px
    assert m.nc_ratio == pytest.approx(nucleus.sum() / (math.pi * 14**2), abs=0.02)


def test_verdict_does_not_depend_on_the_light():
    data = generate(4, 32, seed=3, classes=CELL_TYPES)
    declared = [CELL_TYPES[label] for label in data.labels]
    dimmed = (data.images * np.array([0.9, 0.88, 0.9])).round().astype(np.uint8)  # a darker, greener lamp
    before, after = judge_batch(data.images, declared), judge_batch(dimmed, declared)
    assert [v.failed for v in after] == [v.failed for v in before]


@pytest.fixture(scope="module")
def diffusion_samples() -> tuple[dict, list[Measurements]]:
    """32 samples of the 32 px pretrained diffusion model, 4 per declared class, with a reading by eye
    (see the file's provenance), and their measurements."""
    data = dict(np.load(DIFFUSION_SAMPLES))
    return data, [measure(image) for image in data["images"]]


def test_a_cell_is_found_in_diffusion_samples(diffusion_samples):
    data, measurements = diffusion_samples
    missing = [str(i) for i, m in zip(data["sample_ids"], measurements) if not m.found_cell]
    assert len(missing) <= 0.1 * len(measurements), missing  # measured: 1 of 32, a sample of pure speckle


def test_verdicts_on_diffusion_samples_agree_with_a_reading_by_eye(diffusion_samples):
    data, measurements = diffusion_samples
    plausible = np.array([judge_measurements(m, c).plausible for m, c in zip(measurements, data["declared_classes"])])
    eye = data["eye_plausible"]
    assert 0 < plausible.sum() < len(plausible)  # neither all in nor all out
    assert np.mean(plausible == eye) >= 0.75, np.c_[data["sample_ids"], eye, plausible]  # measured 26 / 32
    assert np.mean(plausible[~eye]) <= 0.1  # measured 0 of 21: what the eye rejects, the rules reject


def test_wrong_declared_class_on_diffusion_samples_is_implausible(diffusion_samples):
    data, measurements = diffusion_samples
    wrong = [
        judge_measurements(m, declared).plausible
        for m, true_class in zip(measurements, data["declared_classes"])
        for declared in DEFAULT_CELL_TYPES
        if declared != true_class
    ]
    assert 1 - np.mean(wrong) >= 0.95  # measured 0.987


# ---------------------------------------------------------------- API contract


def test_unknown_class_and_bad_input_are_rejected():
    image, _, _ = _drawn_cell()
    with pytest.raises(ValueError, match="'neutrophil'.*myeloblast, promyelocyte"):
        judge(image, "neutrophil")
    with pytest.raises(ValueError, match="2 images but 1 declared"):
        judge_batch(np.stack([image, image]), ["myeloblast"])
    with pytest.raises(ValueError, match="uint8"):
        measure(image.astype(np.float32))
    with pytest.raises(ValueError, match="square"):
        measure(image[:, :40])


def test_failed_criteria_come_in_checklist_order():
    image, _, _ = _drawn_cell()
    verdict = judge(image, "eosinophil")
    assert verdict.failed == tuple(c for c in CRITERIA if c in verdict.failed) and len(verdict.failed) >= 2
    assert set(verdict.margins) == set(CRITERIA)


# ---------------------------------------------------------------- simulated experts


@pytest.fixture(scope="module")
def plausible_cell() -> Measurements:
    data = generate(1, 64, seed=1, classes=("myelocyte",))
    m = measure(data.images[0])
    assert judge_measurements(m, "myelocyte").plausible
    return m


def test_expert_is_deterministic(plausible_cell):
    expert = SimulatedExpert("dr_a", flip_rate=0.3, strictness=1.0, seed=4)
    first = [expert.judge_measurements(plausible_cell, "myelocyte", f"s{i}").plausible for i in range(200)]
    again = SimulatedExpert("dr_a", flip_rate=0.3, strictness=1.0, seed=4)
    assert first == [again.judge_measurements(plausible_cell, "myelocyte", f"s{i}").plausible for i in range(200)]
    other_seed = SimulatedExpert("dr_a", flip_rate=0.3, strictness=1.0, seed=5)
    assert first != [other_seed.judge_measurements(plausible_cell, "myelocyte", f"s{i}").plausible for i in range(200)]


@pytest.mark.parametrize("flip_rate", [0.05, 0.2])
def test_flip_rate_and_disagreement_between_experts(plausible_cell, flip_rate):
    n = 4000
    a, b = (SimulatedExpert(name, flip_rate=flip_rate, seed=0) for name in ("dr_a", "dr_b"))
    verdicts_a = [a.judge_measurements(plausible_cell, "myelocyte", f"sample-{i}") for i in range(n)]
    verdicts_b = [b.judge_measurements(plausible_cell, "myelocyte", f"sample-{i}") for i in range(n)]
    flips = np.mean([v.flipped for v in verdicts_a])
    assert abs(flips - flip_rate) < 4 * math.sqrt(flip_rate * (1 - flip_rate) / n)
    expected = 2 * flip_rate * (1 - flip_rate)  # independent flips
    disagreement = np.mean([va.plausible != vb.plausible for va, vb in zip(verdicts_a, verdicts_b)])
    assert abs(disagreement - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_flipped_verdicts_name_a_plausible_reason(plausible_cell):
    expert = SimulatedExpert("dr_a", flip_rate=1.0)
    turned_down = expert.judge_measurements(plausible_cell, "myelocyte", "x")
    assert not turned_down.plausible and turned_down.flipped
    assert turned_down.failed == (min(CRITERIA, key=turned_down.margins.get),)
    waved_through = expert.judge_measurements(plausible_cell, "lymphocyte", "x")
    assert waved_through.plausible and waved_through.failed == ()


def test_strictness_changes_the_plausible_rate():
    labels, measurements = _measured(32)

    def rate(expert, wrong):
        return np.mean(
            [
                expert.judge_measurements(m, CELL_TYPES[(label + wrong) % len(CELL_TYPES)], f"{i}").plausible
                for i, (label, m) in enumerate(zip(labels, measurements))
            ]
        )

    reference, strict, lenient = (SimulatedExpert("e", 0.0, s) for s in (1.0, 4.0, 0.2))
    assert rate(strict, 0) < rate(reference, 0) - 0.1
    assert rate(lenient, 1) > rate(reference, 1) + 0.02  # a lenient reader passes some wrong classes
    nucleus_only = SimulatedExpert("e", 0.0, {"nucleus_shape": 4.0})
    assert rate(strict, 0) <= rate(nucleus_only, 0) < rate(reference, 0)


def test_expert_rejects_bad_settings():
    with pytest.raises(ValueError, match="flip_rate"):
        SimulatedExpert("e", flip_rate=1.5)
    with pytest.raises(ValueError, match="unknown criteria"):
        SimulatedExpert("e", strictness={"colour": 2.0})
    with pytest.raises(ValueError, match="positive"):
        SimulatedExpert("e", strictness=0.0)
