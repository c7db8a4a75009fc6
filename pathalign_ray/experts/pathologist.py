"""The simulated pathologist: Gamma(image, declared_class) -> plausible or not, by the paper's checklist.

A pathologist judges a synthetic image against its DECLARED cell type with six criteria
(`checklist.CRITERIA`): cell size, nucleus shape, chromatin, cytoplasm colour, granules, inclusions.
`judge` measures those features from the pixels alone (`measure`, cell_measurement.py, on the masks
of cell_segmentation.py), so it judges any image, procedural or diffusion-made, and compares them
with the declared type's clinical ranges (`checklist.SPECS`), widened by tolerances.
Pure numpy/scipy: no torch, no Ray, no I/O.

Rules (`judge_measurements`): each criterion holds checks "value within [lo, hi]", the range taken
from the declared type's SPECS entry or from the small tables below (`_SHAPES`, `_GRANULES`), widened
by a tolerance per quantity (`_TOLERANCES`). A check's margin, in tolerance units, is
min(value - lo, hi - value) / tolerance + 1 / strictness; a criterion passes when its least margin is
>= 0, and an image is plausible when all six pass.

- cell_size: diameter in range.
- nucleus_shape: lobe count, N:C and offset (up to the type's most eccentric) in range, and one of the
  type's nucleus shapes fits. The nucleus's place in the cell is part of its description (central,
  eccentric); one outside the cytoplasm fails here, as two nuclei (lobes) or none do.
- chromatin: darkness in range (no upper bound for a pyknotic type: nothing is too dark to be
  pyknotic); homogeneous (low texture) if pyknotic; a readable pattern (texture <= 0.5: clumps, not
  grain) and a sharp nucleus edge (a grainy or blurred nucleus shows no chromatin pattern to judge).
- cytoplasm_colour: tone in range.
- granules: the spot fractions of the type's granule kind.
- inclusions: no Auer rod and no vacuole, unless the type may show them (SPECS inclusions).

No cell found: implausible, and all six criteria fail, since none of them can be checked.
`SimulatedExpert` adds per-expert strictness and deterministic verdict flips (disagreement).

How well it judges (procedural cells, broken images, pixel noise, the diffusion model's samples
against a reading by eye; tests/data/diffusion_samples_32px.npz holds 32 of those samples):
BENCHMARKS.md, "Simulated pathologist", and docs/experiments.md, "The simulated pathologist".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pathalign_ray.experts import checklist
from pathalign_ray.experts.cell_measurement import Measurements, measure
from pathalign_ray.experts.checklist import CRITERIA, CellTypeSpec

# ---------------------------------------------------------------- the rules

# How far outside a type's range a measurement may lie and still pass, at strictness 1; about 2-4
# times the measurement's own error at 32 px (the error sd is given where it matters).
_TOLERANCES = {
    "cell_diameter": 0.04,  # frame widths; error sd 0.007
    "nc_ratio": 0.06,  # error sd 0.02; nuclei that reach the cell edge read low
    "nucleus_offset": 0.1,  # cell radii; drawn offsets read back within +0.04 at 32-64 px
    "lobes": 0.5,  # count: exact at strictness 1, +-1 lobe below strictness 0.5
    "axis_ratio": 0.1,  # long / short axis
    "solidity": 0.05,
    "chromatin": 0.2,  # error sd up to 0.1: the chromatin clumps are few per nucleus
    "chromatin_texture": 0.05,
    "edge_width": 0.5,  # px
    "cytoplasm_tone": 0.1,  # error sd 0.04 at most (a one-pixel lymphocyte rim at 32 px)
    "dark_granules": 0.02,  # fraction of the cytoplasm
    "fine_granules": 0.02,
    "orange_granules": 0.02,
    "rod_length": 0.1,  # cell radii
    "vacuoles": 0.5,  # count
}

_SHAPES = {  # nucleus shape: ranges of its descriptors (lobe count and N:C come from SPECS)
    "round": {"axis_ratio": (1.0, 1.15), "solidity": (0.93, 1.0)},
    "oval": {"axis_ratio": (1.1, 1.45), "solidity": (0.93, 1.0)},
    "indented": {"axis_ratio": (1.55, 1.95), "solidity": (0.85, 0.96)},  # kidney: elongated, one notch
    "band": {"solidity": (0.42, 0.68)},  # a C or U of even width
    "lobed": {},  # lobes joined by filaments: the lobe count says it all
}

_GRANULES = {  # granule kind: ranges of spot fractions of the cytoplasm (measured 0 where absent)
    "none": {"dark_granules": (0.0, 0.01), "fine_granules": (0.0, 0.01), "orange_granules": (0.0, 0.01)},
    "primary": {"dark_granules": (0.04, 1.0), "orange_granules": (0.0, 0.01)},
    "secondary": {"dark_granules": (0.0, 0.01), "fine_granules": (0.05, 1.0), "orange_granules": (0.0, 0.01)},
    "eosinophilic": {"dark_granules": (0.0, 0.01), "orange_granules": (0.1, 1.0)},
}

_PYKNOTIC = 0.9  # chromatin ranges from here up are pyknotic: dark and homogeneous
_PYKNOTIC_TEXTURE = (0.0, 0.2)  # inter-quartile range of chromatin darkness
_READABLE_TEXTURE = (0.0, 0.5)  # chromatin darkness IQR: clumps up to 0.49 drawn at 32-64 px; beyond, grain
_SHARP_EDGE = (0.0, 2.5)  # px, nucleus edge width: 1.0-2.3 drawn sharp at 32-128 px
_NO_INCLUSION = {"auer_rod": ("rod_length", (0.0, 0.0)), "vacuoles": ("vacuoles", (0.0, 0.0))}


@dataclass(frozen=True)
class Verdict:
    """A verdict on one image against its declared class.

    failed: the criteria that fail, in CRITERIA order. margins: per criterion, the least margin of
    its checks in tolerance units (>= 0 passes); -inf where it could not be checked.
    """

    declared_class: str
    plausible: bool
    failed: tuple[str, ...]
    measurements: Measurements
    margins: dict[str, float] = field(default_factory=dict)
    flipped: bool = False  # a SimulatedExpert turned this verdict over


# ---------------------------------------------------------------- judging


def _inside(value: float, bounds: tuple[float, float], quantity: str, leniency: float) -> float:
    """Margin of value inside bounds widened by `leniency` tolerances, in tolerance units (>= 0 passes)."""
    if value is None or math.isnan(value):
        return -math.inf
    low, high = bounds
    return min(value - low, high - value) / _TOLERANCES[quantity] + leniency


def _all_inside(m: Measurements, ranges: Mapping[str, tuple[float, float]], leniency: float) -> float:
    return min((_inside(getattr(m, q), bounds, q, leniency) for q, bounds in ranges.items()), default=math.inf)


def _cell_size(m: Measurements, spec: CellTypeSpec, leniency: float) -> float:
    return _inside(m.cell_diameter, spec.cell_size, "cell_diameter", leniency)


def _nucleus_shape(m: Measurements, spec: CellTypeSpec, leniency: float) -> float:
    best_shape = max(_all_inside(m, _SHAPES[shape], leniency) for shape in spec.nucleus_shapes)
    counts = {"lobes": spec.lobes, "nc_ratio": spec.nc_ratio, "nucleus_offset": (0.0, spec.nucleus_offset[1])}
    return min(best_shape, _all_inside(m, counts, leniency))


def _chromatin_pattern(m: Measurements, spec: CellTypeSpec, leniency: float) -> float:
    ranges = {"chromatin": spec.chromatin, "edge_width": _SHARP_EDGE, "chromatin_texture": _READABLE_TEXTURE}
    if spec.chromatin[0] >= _PYKNOTIC:  # nothing is too dark to be pyknotic
        ranges["chromatin"] = (spec.chromatin[0], math.inf)
        ranges["chromatin_texture"] = _PYKNOTIC_TEXTURE
    return _all_inside(m, ranges, leniency)


def _cytoplasm_colour(m: Measurements, spec: CellTypeSpec, leniency: float) -> float:
    return _inside(m.cytoplasm_tone, spec.cytoplasm_tone, "cytoplasm_tone", leniency)


def _granules(m: Measurements, spec: CellTypeSpec, leniency: float) -> float:
    return _all_inside(m, _GRANULES[spec.granules], leniency)


def _inclusions(m: Measurements, spec: CellTypeSpec, leniency: float) -> float:
    allowed = {kind for kind, _ in spec.inclusions}
    ranges = dict(q_bounds for kind, q_bounds in _NO_INCLUSION.items() if kind not in allowed)
    return _all_inside(m, ranges, leniency)


_RULES = {
    "cell_size": _cell_size,
    "nucleus_shape": _nucleus_shape,
    "chromatin": _chromatin_pattern,
    "cytoplasm_colour": _cytoplasm_colour,
    "granules": _granules,
    "inclusions": _inclusions,
}


def _spec(declared_class: str) -> CellTypeSpec:
    return checklist.spec(declared_class, "declared class")


def _strictness_per_criterion(strictness: float | Mapping[str, float]) -> dict[str, float]:
    """{criterion: strictness}: a number for all six, or a mapping (missing criteria at 1.0)."""
    given = dict(strictness) if isinstance(strictness, Mapping) else dict.fromkeys(CRITERIA, strictness)
    unknown = set(given) - set(CRITERIA)
    if unknown:
        raise ValueError(f"unknown criteria in strictness: {sorted(unknown)}; known: {', '.join(CRITERIA)}")
    per_criterion = {criterion: float(given.get(criterion, 1.0)) for criterion in CRITERIA}
    if not all(0 < value < math.inf for value in per_criterion.values()):
        raise ValueError(f"strictness must be positive and finite, got {per_criterion}")
    return per_criterion


def judge_measurements(
    measurements: Measurements, declared_class: str, strictness: float | Mapping[str, float] = 1.0
) -> Verdict:
    """The verdict on measured features against the declared class.

    strictness scales each criterion's tolerances by 1 / strictness (1 the reference, > 1 stricter,
    < 1 more lenient): one number for all criteria or {criterion: number}.
    """
    spec = _spec(declared_class)
    per_criterion = _strictness_per_criterion(strictness)
    if not measurements.found_cell:
        return Verdict(declared_class, False, CRITERIA, measurements, dict.fromkeys(CRITERIA, -math.inf))
    margins = {c: _RULES[c](measurements, spec, 1.0 / per_criterion[c]) for c in CRITERIA}
    failed = tuple(c for c in CRITERIA if margins[c] < 0)
    return Verdict(declared_class, not failed, failed, measurements, margins)


def judge(image: np.ndarray, declared_class: str, strictness: float | Mapping[str, float] = 1.0) -> Verdict:
    """Gamma(image, declared_class): measure one (H, W, 3) uint8 image and judge it against the class."""
    _spec(declared_class)
    return judge_measurements(measure(image), declared_class, strictness)


def judge_batch(
    images: np.ndarray, declared_classes: Sequence[str], strictness: float | Mapping[str, float] = 1.0
) -> list[Verdict]:
    """Verdicts on (N, H, W, 3) uint8 images, one declared class each."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {getattr(images, 'shape', type(images))}")
    if len(images) != len(declared_classes):
        raise ValueError(f"{len(images)} images but {len(declared_classes)} declared classes")
    for declared_class in set(declared_classes):
        _spec(declared_class)
    return [judge(image, c, strictness) for image, c in zip(images, declared_classes)]


# ---------------------------------------------------------------- simulated experts


def _unit_draw(*keys: object) -> float:
    """A uniform draw in [0, 1) that depends only on keys (blake2b: stable across runs and platforms).

    Not zlib.crc32 of the joined keys: CRC is affine, so two experts' draws on the same sample would
    differ by a constant XOR and their flips would be correlated.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class SimulatedExpert:
    """One simulated pathologist: the reference rules at its own strictness, plus random disagreement.

    strictness: one number or {criterion: number}, scaling tolerances by 1 / strictness (1.0 the
    reference, > 1 stricter, < 1 more lenient). flip_rate: probability that a verdict is turned over,
    decided by (seed, expert_id, sample_id) only, so re-judging a sample gives the same verdict. A
    flip to implausible names the criterion whose margin is least; a flip to plausible clears failed.
    """

    expert_id: str
    flip_rate: float = 0.05
    strictness: float | Mapping[str, float] = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ValueError(f"flip_rate must lie in [0, 1], got {self.flip_rate}")
        _strictness_per_criterion(self.strictness)

    def flips(self, sample_id: str) -> bool:
        return _unit_draw(self.seed, self.expert_id, sample_id) < self.flip_rate

    def judge_measurements(self, measurements: Measurements, declared_class: str, sample_id: str) -> Verdict:
        verdict = judge_measurements(measurements, declared_class, self.strictness)
        if not self.flips(sample_id):
            return verdict
        if verdict.plausible:
            closest = min(CRITERIA, key=lambda c: verdict.margins[c])
            return Verdict(declared_class, False, (closest,), measurements, verdict.margins, flipped=True)
        return Verdict(declared_class, True, (), measurements, verdict.margins, flipped=True)

    def judge(self, image: np.ndarray, declared_class: str, sample_id: str) -> Verdict:
        _spec(declared_class)
        return self.judge_measurements(measure(image), declared_class, sample_id)
