"""The simulated pathologist: Gamma(image, declared_class) -> plausible or not, by the paper's checklist.

A pathologist judges a synthetic image against its DECLARED cell type with six criteria (`CRITERIA`):
cell size, nucleus shape, chromatin, cytoplasm colour, granules, inclusions. This module measures
those features from the pixels alone -- never from a generator's per-image metadata, so it judges any
image, procedural or diffusion-made -- and compares them with the declared type's clinical ranges
(`checklist.SPECS`), widened by tolerances. Its knowledge of the stain is the
May-Grünwald-Giemsa palette of the checklist (`checklist.cytoplasm_rgb`, the chromatin colours).
Pure numpy/scipy: no torch, no Ray, no I/O.

Measurement (`measure`) works at the image's own size (>= 16 px); pixel-count thresholds are stated at
64 px and scale with size**2. Measuring natively beat upsampling 32 px images to 64 first: smaller
biases in cell size and N:C, and half the cost. It must read diffusion-made images too: speckle,
ragged outlines, a halo of smear around the cell, red cells touching it, a darker or tinted smear.

- white balance: the smear colour (median of the frame-border pixels within 20 luminance levels of
  the border's 90th percentile, after the median filter below) is scaled to the procedural smear's,
  less its +-4 levels of tint per channel (those are the smear's, not the light's).
- segmentation works on a median-filtered copy (separable 3x3 median: speckle off, edges kept);
  features are read from the raw pixels, spots against the filtered copy.
- cell: stained pixels (sum |RGB - background| > 30) form 4-connected components; the one holding most
  dark pixels (Y < 120) within 0.35 frame widths of the centre is the first guess (with no dark pixel
  there, the one at the centre: a cell without a nucleus), its cytoplasm next to the nucleus gives the
  cell's contrast. The outline is drawn at 0.4 of that contrast (30-90): half
  covered edge pixels in, a halo of smear out (diameter bias < 0.006, sd 0.006 frame widths at
  32-128 px). Where an opening by half the inscribed radius cuts off > 5 % (a red cell or smear
  touching the cell through a neck), the opened cell is kept; what lies beyond 1.25 inscribed radii
  + 1 px of the innermost point is cut off; holes are filled (vacuoles). None, or one touching a
  quarter of the frame border or covering 80 % of the frame: no cell found. Diameter: of the disc of
  the mask's area.
- nucleus: non-magenta pixels darker than a threshold half-way between nucleus and cytoplasm
  luminance (both first estimated with Y < 120), in components of >= 12 px (at 64 px), >= 1.5 % of the
  cell and >= 30 % of the largest, holes (nucleoli) filled; under 4 % of the cell in all, no nucleus
  (clumped granules): lobes and N:C 0, its shape, place and chromatin NaN. The half-way threshold puts the outline where a soft edge is
  half covered (unbiased N:C) and leaves the 35 %-opacity lobe filaments out: lobes = components (all
  correct at 32-128 px). Primary granules lying on the nucleus stay in it; magenta Auer rods do not.
  Shape: axis ratio (second moments) and solidity (area / convex hull of the pixel centres grown by
  half a pixel, after an opening that removes granules stuck to the outline). Offset: its centroid
  off the cell's, in cell radii (drawn offsets read back within +0.04; a nucleus half out of the
  cytoplasm reads >= 0.43 at 32-64 px: the cell mask then holds both).
- chromatin: each core pixel's optical density (255 - RGB) is fitted as
  stain x (open + darkness x (dense - open)); stain strength only scales optical density, so the
  median darkness (0 fine .. 1 pyknotic) is stain-free; texture = its inter-quartile range. Error sd
  0.06 at 64 px, 0.1 at 32 px: a nucleus holds only a few chromatin clumps. Edge width = (cytoplasm
  - nucleus luminance) / the steepest luminance gradient on the outline: ~1.5 px sharp, > 3 blurred.
- cytoplasm tone (0 deep blue .. 0.55 lilac .. 1 orange-pink): the palette tone whose optical-density
  direction matches the median plain cytoplasm pixel (2 px off the nucleus and the cell edge, no
  spots). Orange granules are unmixed (the tone whose plane with the granule colour leaves least
  residual); a rim too thin for plain pixels (a lymphocyte at 32 px) is read from its blends with
  the background: each pixel's tone seen from the background colour, the median of the densest
  0.2-wide window of them (the rim's own colour, not the nucleus edge or a touching red cell).
  Error sd 0.02-0.04.
- granules, as fractions of the plain-cytoplasm zone: dark (below the nucleus threshold, in pieces
  smaller than a lobe: primary), fine (spots 8 levels darker than the median-filtered image, or 20
  redder in R - B: secondary granules are darker on lilac, redder on blue; against the median, a
  shading or a thin dark outline is no spot), orange (R - B > 90, B < 115, G > B: eosinophilic).
- inclusions: Auer rod = the longest 8-connected magenta streak (R > B + 25 more than the cytoplasm,
  G < B, R > 140, Y < 140) in the plain-cytoplasm zone (a touching red cell is no rod) with axis
  ratio >= 3, in cell radii; vacuoles = spots brighter than the median-filtered image by 20 and by 8
  times the cell's grain (robust sd of raw - median-filtered: a lone bright pixel of a generated
  image is grain), nearer the background colour than the cytoplasm's, counted; searched in the cell
  grown by a pixel into stained pixels (a vacuole at the edge of a thin rim is a notch in the
  outline), off the nucleus and that edge.

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
Procedural images with added uniform pixel noise still pass at +-7 grey levels (98 %), most at +-10
to +-15 (70-83 %), few at +-25 (8-35 %): grain reads as chromatin texture, granules and vacuoles (as
it would for a too-grainy micrograph). On 128 samples of the 32 px pretrained diffusion model, 2 have
no cell found (pure speckle) and 17 are plausible; the verdicts agree with a reading by eye on 77 %
(81 % of the 99 read with some confidence; the rules are the stricter reader: 26 of the eye's 39
plausible fail, on size, N:C or nucleus shape just out of range, or a misread rim), and reject 99 %
of them against a wrong declared class; 32 of them are tests/data/diffusion_samples_32px.npz.
`SimulatedExpert` adds per-expert strictness and deterministic verdict flips (disagreement).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from pathalign_ray import checklist
from pathalign_ray.checklist import (
    CRITERIA,
    NUCLEUS_DENSE_RGB,
    NUCLEUS_OPEN_RGB,
    SMEAR_RGB,
    CellTypeSpec,
    cytoplasm_rgb,
)

MIN_SIZE = 16  # px, the smallest image side measured

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

# ---------------------------------------------------------------- measurement constants

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity
_SQUARE = np.ones((3, 3), bool)  # 8-connectivity
_SMEAR = np.array(SMEAR_RGB, np.float32)  # the procedural smear: the stain's white point
_MIN_SMEAR_LUMINANCE = 150.0  # a darker frame border is no smear: no white balance
_SMEAR_TINT = 6.0  # RGB levels: the procedural smear's own tint (+-4) is no change of light
_FOREGROUND_DISTANCE = 30.0  # sum |RGB - background| above which a pixel is stained
_CENTRAL = 0.35  # frame widths from the centre: where the cell's nucleus is looked for
_CELL_CONTRAST = 0.4  # the cell's outline: this fraction of its cytoplasm's distance from the smear
_CELL_THRESHOLD_MAX = 90.0  # (at most this distance: the outline of a deep blue rim stays outside its blends)
_OPEN_KEEP = 0.95  # the cell opened by half its inscribed radius replaces it where that cut off > 5 %
_CAP = 1.25  # the cell lies within this many inscribed radii (+ 1 px) of its innermost point
_VACUOLE_GRAIN = 8.0  # a vacuole stands out of the cell's grain (robust sd) this many times (and >= 20)
_NUCLEUS_LUMINANCE = 120.0  # first-pass nucleus threshold, refined per image
_CENTRE = 0.1  # frame widths: with no dark pixel near the centre, the stained component here is the cell
_MIN_NC = 0.04  # a "nucleus" under this fraction of the cell is none: drawn >= 0.14
_MIN_LOBE = 0.015  # and so is a piece under this fraction (a clump of granules): a lobe is drawn >= ~0.035
_REFERENCE_SIZE = 64  # px; pixel-count thresholds are stated at this size and scale with size**2
_MIN_PLAIN_PIXELS = 12  # fewer plain cytoplasm pixels: read the tone from the rim's blends
_NUCLEUS_OPEN_OD = 255.0 - np.array(NUCLEUS_OPEN_RGB, np.float64)  # optical density of fine chromatin
_NUCLEUS_DENSE_OD = 255.0 - np.array(NUCLEUS_DENSE_RGB, np.float64)  # and of condensed chromatin
_CHROMATIN_BASIS = np.linalg.pinv(np.stack([_NUCLEUS_OPEN_OD, _NUCLEUS_DENSE_OD - _NUCLEUS_OPEN_OD], axis=1))
_TONES = np.linspace(0.0, 1.0, 101)
_TONE_RGB = np.array([cytoplasm_rgb(t) for t in _TONES], np.float64)


@dataclass(frozen=True)
class Measurements:
    """The checklist features of one image, measured from its pixels (NaN where not measurable)."""

    found_cell: bool
    cell_diameter: float = math.nan  # cell diameter / frame width
    nc_ratio: float = math.nan  # nucleus area / cell area; 0 no nucleus
    nucleus_offset: float = math.nan  # nucleus centroid off the cell's / cell radius
    lobes: int = 0  # nucleus components; 0 no nucleus
    solidity: float = math.nan  # nucleus area / its convex hull's area
    axis_ratio: float = math.nan  # nucleus long / short axis
    chromatin: float = math.nan  # stain-free darkness: 0 fine and open .. 1 pyknotic
    chromatin_texture: float = math.nan  # inter-quartile range of the per-pixel darkness
    edge_width: float = math.nan  # px, nucleus-cytoplasm transition
    cytoplasm_tone: float = math.nan  # 0 deep blue .. 0.55 lilac .. 1 orange-pink
    blue_minus_red: float = math.nan  # of the plain cytoplasm, RGB levels
    dark_granules: float = 0.0  # fractions of the cytoplasm: primary granules
    fine_granules: float = 0.0  # secondary granules
    orange_granules: float = 0.0  # eosinophilic granules
    rod_length: float = 0.0  # the longest Auer rod / cell radius; 0 none
    vacuoles: int = 0  # count


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


# ---------------------------------------------------------------- measuring


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 4-neighbourhood (cheaper than scipy's on small images)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 4-neighbourhood; outside the image counts as background."""
    out = mask & ~_dilate(~mask)
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not reach the image border filled
    (as scipy's binary_fill_holes, by one labelling instead of iterated dilations)."""
    labels, count = ndi.label(~mask, _CROSS)
    hole = np.ones(count + 1, bool)
    hole[0] = hole[labels[0]] = hole[labels[-1]] = hole[labels[:, 0]] = hole[labels[:, -1]] = False
    return mask | hole[labels]


def _median3(rgb: np.ndarray) -> np.ndarray:
    """Separable 3x3 median (of 3 along rows, then along columns) per channel, edges replicated: takes
    speckle off a generated image for segmentation while keeping edges where they are."""

    def middle(a, b, c):
        return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))

    padded = np.pad(rgb, ((0, 0), (1, 1), (0, 0)), mode="edge")
    rows = middle(padded[:, :-2], padded[:, 1:-1], padded[:, 2:])
    padded = np.pad(rows, ((1, 1), (0, 0), (0, 0)), mode="edge")
    return middle(padded[:-2], padded[1:-1], padded[2:])


def _background(rgb: np.ndarray) -> np.ndarray:
    """The smear colour: median of the frame-border pixels within 20 luminance levels of the border's
    90th percentile (the lightest tenth is smear in any image with some smear in its border)."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    luma = ring @ _LUMA
    return np.median(ring[luma >= np.percentile(luma, 90) - 20], axis=0)


def _pick(mask: np.ndarray, seeds: np.ndarray, fill: bool = True) -> np.ndarray | None:
    """The 4-connected component of mask holding most seed pixels, holes filled; None if none holds any."""
    labels, count = ndi.label(mask, _CROSS)
    counts = np.bincount(labels[seeds], minlength=count + 1)
    counts[0] = 0
    if counts.max() == 0:
        return None
    component = labels == int(np.argmax(counts))
    return _fill_holes(component) if fill else component


def _depth(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest pixel outside it (or outside the image)."""
    return ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def _open_by_half_radius(mask: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The mask opened by a disc of half its inscribed radius: cuts off what hangs on by a neck narrower
    than that radius (a touching red cell, a smear halo), and leaves a round cell as it is."""
    radius = 0.5 * depth.max()
    return (ndi.distance_transform_edt(~(depth > radius)) <= radius) & mask


def _find_cell(smooth: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The cell mask of a median-filtered image, holes filled; None if none fits. See the module doc."""
    size = smooth.shape[0]
    drop = background - smooth  # optical-density-like: what the stain takes away from the smear
    distance = np.abs(drop).sum(axis=-1)
    stained = distance > _FOREGROUND_DISTANCE
    yy, xx = np.mgrid[:size, :size] + 0.5 - size / 2
    seeds = (smooth @ _LUMA < _NUCLEUS_LUMINANCE) & (yy * yy + xx * xx < (_CENTRAL * size) ** 2)
    if not seeds.any():  # no nucleus: the cell (a fragment of cytoplasm) is what lies at the centre
        seeds = stained & (yy * yy + xx * xx < (_CENTRE * size) ** 2)
    cell = _pick(stained, seeds, fill=False)
    if cell is None:
        return None
    cytoplasm = _dilate(_dilate(cell & seeds)) & cell & ~seeds
    contrast = float(np.median(distance[cytoplasm])) if cytoplasm.any() else 0.0
    threshold = np.clip(_CELL_CONTRAST * contrast, _FOREGROUND_DISTANCE, _CELL_THRESHOLD_MAX)
    cell = _pick(stained & (distance > threshold), seeds)
    if cell is None:
        return None
    depth = _depth(cell)
    opened = _pick(_open_by_half_radius(cell, depth), seeds)
    if opened is not None and opened.sum() < _OPEN_KEEP * cell.sum():
        cell, depth = opened, _depth(opened)
    cy, cx = np.unravel_index(np.argmax(depth), depth.shape)
    cap = (yy + size / 2 - 0.5 - cy) ** 2 + (xx + size / 2 - 0.5 - cx) ** 2 <= (_CAP * depth[cy, cx] + 1) ** 2
    if (cell & ~cap).any():
        cell = _pick(cell & cap, seeds)
        if cell is None:
            return None
    border = np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]]).mean()
    if border > 0.25 or cell.mean() > 0.8 or cell.sum() < 0.01 * size * size:
        return None
    return cell


def _nucleus(cell: np.ndarray, luma: np.ndarray, threshold: float, magenta: np.ndarray, scale: float):
    """(nucleus mask, lobe count): the components of non-magenta pixels darker than threshold that are
    at least 12 px (at 64 px), 1.5 % of the cell and 30 % of the largest, holes (nucleoli) filled.

    Auer rods are magenta; primary granules (R ~ B) are not, so those lying over the nucleus stay part
    of it (a chain of them cannot cut it in two) and those in the cytoplasm are too small to count.
    """
    labels, count = ndi.label(cell & (luma < threshold) & ~magenta, _CROSS)
    if count == 0:
        return None, 0
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.nonzero(areas >= max(12.0 * scale, _MIN_LOBE * cell.sum(), 0.3 * areas.max()))[0] + 1
    if len(keep) == 0:  # dark specks only
        return None, 0
    return _fill_holes(np.isin(labels, keep)), len(keep)


def _elongation(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float]:
    """(length, long / short axis ratio) of a pixel set, from its second moments; length is that of
    a uniform bar with the same variance along its long axis (a row of n pixels: n)."""
    if len(ys) < 2:
        return float(len(ys)), 1.0
    cov = np.cov(np.stack([ys, xs]).astype(float)) + np.eye(2) / 12  # + a unit pixel's own variance
    small, large = np.linalg.eigvalsh(cov)
    return math.sqrt(12.0 * large), math.sqrt(large / small)


def _solidity(mask: np.ndarray, size: int) -> float:
    """Area / convex-hull area of the mask opened by one pixel (granules stuck to the outline are no
    notches); the hull is that of the pixel centres grown by half a pixel (a disc scores ~0.97-0.99)."""
    steps = max(1, round(size / _REFERENCE_SIZE))  # a primary granule's radius: 1 px up to 64 px, 2 at 96-128
    opened = mask
    for _ in range(steps):
        opened = _erode(opened)
    for _ in range(steps):
        opened = _dilate(opened)
    ys, xs = np.nonzero(opened if opened.sum() >= 0.8 * mask.sum() else mask)
    try:
        hull = ConvexHull(np.c_[ys, xs].astype(float))
    except (QhullError, ValueError):  # a line or a dot
        return 1.0
    return len(ys) / (hull.volume + hull.area / 2 + math.pi / 4)


def _chromatin(rgb: np.ndarray, nucleus: np.ndarray) -> tuple[float, float]:
    """(median darkness, its inter-quartile range) of the nucleus core, stain-free."""
    core = _erode(nucleus)
    if core.sum() < 4:
        core = nucleus
    stain, stained_darkness = _CHROMATIN_BASIS @ (255.0 - rgb[core]).T  # (2, n)
    darkness = stained_darkness / np.maximum(stain, 1e-3)
    q25, q50, q75 = np.percentile(darkness, [25, 50, 75])
    return float(q50), float(q75 - q25)


def _tone(pixels: np.ndarray, origin, contaminant: np.ndarray | None = None) -> float:
    """Cytoplasm tone whose colour direction, seen from origin (RGB), best explains pixels (n, 3) RGB.

    Origin white (255): the direction of the median pixel's optical density, which stain only scales.
    Origin the background (a rim of blends with it): the direction of the summed pixels, where faint
    blends weigh little. With contaminant (RGB of granules mixed into the pixels), the tone whose
    plane (tone, contaminant) leaves the least residual.
    """
    od = origin - pixels.astype(np.float64)
    palette = origin - _TONE_RGB
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    if contaminant is None:
        centre = np.median(od, axis=0) if np.isscalar(origin) else od.sum(axis=0)
        return float(_TONES[np.argmax(palette @ (centre / max(np.linalg.norm(centre), 1e-6)))])
    e1 = origin - np.asarray(contaminant, np.float64)
    e1 /= max(np.linalg.norm(e1), 1e-6)
    e2 = palette - np.outer(palette @ e1, e1)
    e2 /= np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-6)
    residual = (od * od).sum(axis=1, keepdims=True) - (od @ e1)[:, None] ** 2 - (od @ e2.T) ** 2
    return float(_TONES[np.argmin(residual.sum(axis=0))])


def _rim_tone(pixels: np.ndarray, background: np.ndarray) -> float:
    """Tone of a rim too thin for plain pixels, from its blends with the background: each pixel's tone
    (its direction from the background colour), the median of the densest 0.2-wide window of tones;
    the rim's own blue or pink, not the nucleus edge or a red cell that touches it."""
    od = background - pixels.astype(np.float64)
    palette = background - _TONE_RGB
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    best = np.argmax(od @ palette.T, axis=1)  # per pixel: index into _TONES (the cosine's scale is moot)
    starts = np.arange(0, len(_TONES) - 20, 5)
    inside = (best >= starts[:, None]) & (best <= starts[:, None] + 20)  # (windows, pixels)
    return float(np.median(_TONES[best[inside[np.argmax(inside.sum(axis=1))]]]))


def _fine_spots(luma, red_minus_blue, smooth_luma, smooth_red_minus_blue, cytoplasm_rgb) -> np.ndarray:
    """Pixels of small spots darker or redder than their median-filtered surroundings, and than the
    cytoplasm (secondary granules: darker on lilac and pink, where their hue is the cytoplasm's; redder
    on blue, where their luminance is the cytoplasm's). Against the median, not a grey closing: a
    smooth shading or a thin dark outline is no spot."""
    cytoplasm_luma = float(cytoplasm_rgb @ _LUMA)
    darker = (smooth_luma - luma > 8) & (luma < cytoplasm_luma - 5)
    redness = float(cytoplasm_rgb[0] - cytoplasm_rgb[2])
    redder = (red_minus_blue - smooth_red_minus_blue > 20) & (red_minus_blue > redness + 15)
    return darker | (redder & (luma < cytoplasm_luma + 8))  # not the pale edge of a vacuole


def _rod_length(streaks: np.ndarray, radius: float) -> float:
    """The longest elongated streak (axis ratio >= 3, >= 3 px, 8-connected) / cell radius; 0 if none."""
    labels, _ = ndi.label(streaks, _SQUARE)
    longest = 0.0
    for k, window in enumerate(ndi.find_objects(labels)):
        ys, xs = np.nonzero(labels[window] == k + 1)
        if len(ys) >= 3:
            length, ratio = _elongation(ys, xs)
            if ratio >= 3:
                longest = max(longest, length / radius)
    return longest


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image))
        raise ValueError(f"image must be (H, W, 3) uint8, got {shape} {dtype}")
    if image.shape[0] != image.shape[1] or image.shape[0] < MIN_SIZE:
        raise ValueError(f"image must be square and at least {MIN_SIZE} px, got {image.shape[0]}x{image.shape[1]}")


@dataclass(frozen=True)
class _Nucleus:
    mask: np.ndarray
    lobes: int
    threshold: float  # luminance half-way between nucleus and cytoplasm
    luma: float  # median luminance of the nucleus
    cytoplasm_luma: float  # and of the cytoplasm around it


def _segment_nucleus(cell: np.ndarray, luma: np.ndarray, magenta: np.ndarray, scale: float) -> _Nucleus | None:
    """Two passes: Y < 120 gives the nucleus and cytoplasm luminance, half-way between them the outline."""
    rough, _ = _nucleus(cell, luma, _NUCLEUS_LUMINANCE, magenta, scale)
    if rough is None:
        return None
    rim = cell & ~_dilate(rough)
    nucleus_luma = float(np.median(luma[rough]))
    cytoplasm_luma = float(np.median(luma[rim])) if rim.any() else _NUCLEUS_LUMINANCE
    threshold = (nucleus_luma + max(cytoplasm_luma, nucleus_luma)) / 2
    mask, lobes = _nucleus(cell, luma, threshold, magenta, scale)
    if mask is None:
        mask, lobes = rough, 1
    if mask.sum() < _MIN_NC * cell.sum():
        return None
    return _Nucleus(mask, lobes, threshold, nucleus_luma, cytoplasm_luma)


def _no_nucleus(cell: np.ndarray, luma: np.ndarray) -> _Nucleus:
    """The nucleus of a cell that has none: an empty mask, dark granules still below the first-pass threshold."""
    return _Nucleus(np.zeros_like(cell), 0, _NUCLEUS_LUMINANCE, math.nan, float(np.median(luma[cell])))


@dataclass(frozen=True)
class _Cytoplasm:
    ring: np.ndarray  # cytoplasm off the nucleus edge
    inner: np.ndarray  # 2 px off the nucleus and the cell edge: where spots are counted
    colour: np.ndarray  # median RGB of its spot-free pixels
    dark: np.ndarray  # primary granules
    fine: np.ndarray  # secondary granules
    orange: np.ndarray  # eosinophilic granules
    pale: np.ndarray  # vacuoles
    rods: np.ndarray  # Auer rods: streaks redder than the cytoplasm


def _cytoplasm(rgb, luma, smooth, cell, stained, nucleus: _Nucleus, magenta, background, scale) -> _Cytoplasm:
    """The cytoplasm's zones, colour and spots. stained: the cell grown by a pixel into stained pixels
    (a vacuole at a thin rim's edge is a notch in the outline, a hole in this)."""
    r, b = rgb[..., 0], rgb[..., 2]
    smooth_luma = smooth @ _LUMA
    ring = cell & ~_dilate(nucleus.mask)
    inner = cell & ~_dilate(_dilate(nucleus.mask)) & _erode(_erode(cell))  # 2 px off both edges
    near_rod = _dilate(magenta)
    orange = inner & (r - b > 90) & (b < 115) & (rgb[..., 1] > b)
    dark = cell & ~nucleus.mask & (luma < nucleus.threshold) & ~near_rod
    labels, count = ndi.label(dark, _CROSS)  # a piece the size of a lobe is nucleus, not a granule
    dark &= inner & (np.bincount(labels.ravel(), minlength=count + 1)[labels] <= max(12.0 * scale, 3.0))
    reference = inner & ~dark & ~orange
    if not reference.any():  # a thin rim: its pixels off the nucleus and the cell edge by one
        reference = ring & _erode(cell) & (luma >= nucleus.threshold)
    colour = np.median(rgb[reference], axis=0) if reference.any() else background
    grain = 1.4826 * float(np.median(np.abs(luma - smooth_luma)[cell]))  # sd of what the median took off
    pale = (  # spots brighter than around them, nearer the background colour than the cytoplasm's
        stained
        & ~_dilate(nucleus.mask)
        & _erode(stained)
        & (luma - smooth_luma > max(20.0, _VACUOLE_GRAIN * grain))
        & (np.abs(rgb - background).sum(axis=-1) < np.abs(rgb - colour).sum(axis=-1))
    )
    spots = _fine_spots(luma, r - b, smooth_luma, smooth[..., 0] - smooth[..., 2], colour)
    fine = inner & spots & ~dark & ~orange & ~near_rod & ~_dilate(pale)
    rods = inner & magenta & (r - b > colour[0] - colour[2] + 25)  # off the edge: not a touching red cell
    return _Cytoplasm(ring, inner, colour, dark, fine, orange, pale, rods)


def _cytoplasm_tone(rgb: np.ndarray, cytoplasm: _Cytoplasm, background: np.ndarray) -> tuple[float, float]:
    """(tone, median B - R) of the plain cytoplasm; see _tone."""
    c = cytoplasm
    plain = c.inner & ~c.dark & ~c.fine & ~c.pale & ~_dilate(c.rods)
    orange = plain & c.orange
    plain &= ~c.orange
    if orange.sum() >= 3 and plain.any():  # eosinophilic granules: unmix them from the cytoplasm
        tone = _tone(rgb[plain], 255.0, np.median(rgb[orange], axis=0))
    elif plain.sum() >= _MIN_PLAIN_PIXELS:
        tone = _tone(rgb[plain], 255.0)
    elif c.ring.any():  # a rim a pixel or two wide: read it from its blends with the background
        plain = c.ring
        tone = _rim_tone(rgb[plain], background)
    else:
        return math.nan, math.nan
    return tone, float(np.median(rgb[plain][:, 2] - rgb[plain][:, 0]))


def _edge_width(luma: np.ndarray, cell: np.ndarray, nucleus: _Nucleus) -> float:
    """(cytoplasm - nucleus luminance) / the steepest gradient on the nucleus outline, px."""
    gy, gx = np.gradient(luma)
    outline = _dilate(nucleus.mask & ~_erode(nucleus.mask)) & cell
    steepest = float(np.percentile(np.sqrt(gx * gx + gy * gy)[outline], 90))
    return (nucleus.cytoplasm_luma - nucleus.luma) / max(steepest, 1e-6)


def measure(image: np.ndarray) -> Measurements:
    """Measure the checklist features of one (H, W, 3) uint8 RGB image (square, >= 16 px)."""
    _check_image(image)
    rgb = image.astype(np.float32)
    size = rgb.shape[0]
    smooth = _median3(rgb)  # for segmentation; features are read from the raw pixels
    background = _background(smooth)
    if background @ _LUMA > _MIN_SMEAR_LUMINANCE:  # white balance: the smear as the procedural one, +- its tint
        gain = (_SMEAR + np.clip(background - _SMEAR, -_SMEAR_TINT, _SMEAR_TINT)) / background
        rgb, smooth, background = np.minimum(rgb * gain, 255.0), np.minimum(smooth * gain, 255.0), background * gain
    cell = _find_cell(smooth, background)
    if cell is None:
        return Measurements(found_cell=False)
    ys, xs = np.nonzero(cell)  # from here on, work in the cell's bounding box and a 2 px margin
    window = slice(max(ys.min() - 2, 0), ys.max() + 3), slice(max(xs.min() - 2, 0), xs.max() + 3)
    rgb, smooth, cell = rgb[window], smooth[window], cell[window]
    luma = rgb @ _LUMA
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    magenta = (r > b) & (g < b) & (r > 140) & (luma < 140)  # Auer rods, lobe filaments; not primary granules
    scale = (size / _REFERENCE_SIZE) ** 2
    nucleus = _segment_nucleus(cell, luma, magenta, scale) or _no_nucleus(cell, luma)
    stained = _fill_holes(cell | (_dilate(cell) & (np.abs(smooth - background).sum(axis=-1) > _FOREGROUND_DISTANCE)))
    cytoplasm = _cytoplasm(rgb, luma, smooth, cell, stained, nucleus, magenta, background, scale)
    tone, blue_minus_red = _cytoplasm_tone(rgb, cytoplasm, background)
    radius = math.sqrt(cell.sum() / math.pi)
    zone = max(float(cytoplasm.inner.sum()), 1.0)
    if nucleus.lobes:
        chromatin, texture = _chromatin(rgb, nucleus.mask)
        offset = np.subtract(ndi.center_of_mass(nucleus.mask), ndi.center_of_mass(cell))
        shape = {
            "nucleus_offset": float(np.hypot(*offset)) / max(radius, 1.0),
            "solidity": _solidity(nucleus.mask, size),
            "axis_ratio": _elongation(*np.nonzero(nucleus.mask))[1],
            "chromatin": chromatin,
            "chromatin_texture": texture,
            "edge_width": _edge_width(luma, cell, nucleus),
        }
    else:  # no nucleus: its shape, place and chromatin are not measurable (NaN)
        shape = {}
    return Measurements(
        found_cell=True,
        cell_diameter=2 * max(radius, 0.0) / size,
        nc_ratio=float(nucleus.mask.sum()) / (math.pi * max(radius, 1.0) ** 2),
        lobes=nucleus.lobes,
        **shape,
        cytoplasm_tone=tone,
        blue_minus_red=blue_minus_red,
        dark_granules=float(cytoplasm.dark.sum()) / zone,
        fine_granules=float(cytoplasm.fine.sum()) / zone,
        orange_granules=float(cytoplasm.orange.sum()) / zone,
        rod_length=_rod_length(cytoplasm.rods, max(radius, 1.0)),
        vacuoles=int(ndi.label(cytoplasm.pale, _CROSS)[1]),
    )


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
