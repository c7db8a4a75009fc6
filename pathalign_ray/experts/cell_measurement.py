"""Measure a cell image's checklist features from its pixels: the measurement half of the simulated pathologist.

`measure` reads cell size, nucleus shape, N:C, chromatin, cytoplasm tone, granules and inclusions
from the pixels alone -- never from a generator's per-image metadata, so it reads any image,
procedural or diffusion-made. Its knowledge of the stain is the checklist's palette
(`checklist.cytoplasm_rgb`, the open and dense chromatin colours). It works at the image's own size
(>= 16 px); pixel-count thresholds are stated at 64 px and scale with size**2. Measuring natively
beat upsampling 32 px images to 64 first: smaller biases in cell size and N:C, and half the cost.

- white balance: the smear colour (`cell_segmentation.smear_colour`, on the median-filtered copy) is
  scaled to the procedural smear's, less its +-4 levels of tint per channel (those are the smear's,
  not the light's).
- the cell and its nucleus are segmented on a median-filtered copy (cell_segmentation.py); features
  are read from the raw pixels, spots against the filtered copy. Diameter: of the disc of the cell
  mask's area. No nucleus: lobes and N:C 0, its shape, place and chromatin NaN.
- nucleus shape: axis ratio (second moments) and solidity (area / convex hull of the pixel centres
  grown by half a pixel, after an opening that removes granules stuck to the outline). Offset: its
  centroid off the cell's, in cell radii (drawn offsets read back within +0.04; a nucleus half out
  of the cytoplasm reads >= 0.43 at 32-64 px: the cell mask then holds both).
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

Pure numpy/scipy: no torch, no Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from pathalign_ray.experts.cell_segmentation import (
    CROSS,
    FOREGROUND_DISTANCE,
    LUMA,
    Nucleus,
    dilate,
    erode,
    fill_holes,
    find_cell,
    median3,
    no_nucleus,
    segment_nucleus,
    smear_colour,
)
from pathalign_ray.experts.checklist import NUCLEUS_DENSE_RGB, NUCLEUS_OPEN_RGB, SMEAR_RGB, cytoplasm_rgb

MIN_SIZE = 16  # px, the smallest image side measured
_SQUARE = np.ones((3, 3), bool)  # 8-connectivity
_SMEAR = np.array(SMEAR_RGB, np.float32)  # the procedural smear: the stain's white point
_MIN_SMEAR_LUMINANCE = 150.0  # a darker frame border is no smear: no white balance
_SMEAR_TINT = 6.0  # RGB levels: the procedural smear's own tint (+-4) is no change of light
_VACUOLE_GRAIN = 8.0  # a vacuole stands out of the cell's grain (robust sd) this many times (and >= 20)
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


# ---------------------------------------------------------------- measuring


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
        opened = erode(opened)
    for _ in range(steps):
        opened = dilate(opened)
    ys, xs = np.nonzero(opened if opened.sum() >= 0.8 * mask.sum() else mask)
    try:
        hull = ConvexHull(np.c_[ys, xs].astype(float))
    except (QhullError, ValueError):  # a line or a dot
        return 1.0
    return len(ys) / (hull.volume + hull.area / 2 + math.pi / 4)


def _chromatin(rgb: np.ndarray, nucleus: np.ndarray) -> tuple[float, float]:
    """(median darkness, its inter-quartile range) of the nucleus core, stain-free."""
    core = erode(nucleus)
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
    cytoplasm_luma = float(cytoplasm_rgb @ LUMA)
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
class _Cytoplasm:
    ring: np.ndarray  # cytoplasm off the nucleus edge
    inner: np.ndarray  # 2 px off the nucleus and the cell edge: where spots are counted
    colour: np.ndarray  # median RGB of its spot-free pixels
    dark: np.ndarray  # primary granules
    fine: np.ndarray  # secondary granules
    orange: np.ndarray  # eosinophilic granules
    pale: np.ndarray  # vacuoles
    rods: np.ndarray  # Auer rods: streaks redder than the cytoplasm


def _cytoplasm(rgb, luma, smooth, cell, stained, nucleus: Nucleus, magenta, background, scale) -> _Cytoplasm:
    """The cytoplasm's zones, colour and spots. stained: the cell grown by a pixel into stained pixels
    (a vacuole at a thin rim's edge is a notch in the outline, a hole in this)."""
    r, b = rgb[..., 0], rgb[..., 2]
    smooth_luma = smooth @ LUMA
    ring = cell & ~dilate(nucleus.mask)
    inner = cell & ~dilate(dilate(nucleus.mask)) & erode(erode(cell))  # 2 px off both edges
    near_rod = dilate(magenta)
    orange = inner & (r - b > 90) & (b < 115) & (rgb[..., 1] > b)
    dark = cell & ~nucleus.mask & (luma < nucleus.threshold) & ~near_rod
    labels, count = ndi.label(dark, CROSS)  # a piece the size of a lobe is nucleus, not a granule
    dark &= inner & (np.bincount(labels.ravel(), minlength=count + 1)[labels] <= max(12.0 * scale, 3.0))
    reference = inner & ~dark & ~orange
    if not reference.any():  # a thin rim: its pixels off the nucleus and the cell edge by one
        reference = ring & erode(cell) & (luma >= nucleus.threshold)
    colour = np.median(rgb[reference], axis=0) if reference.any() else background
    grain = 1.4826 * float(np.median(np.abs(luma - smooth_luma)[cell]))  # sd of what the median took off
    pale = (  # spots brighter than around them, nearer the background colour than the cytoplasm's
        stained
        & ~dilate(nucleus.mask)
        & erode(stained)
        & (luma - smooth_luma > max(20.0, _VACUOLE_GRAIN * grain))
        & (np.abs(rgb - background).sum(axis=-1) < np.abs(rgb - colour).sum(axis=-1))
    )
    spots = _fine_spots(luma, r - b, smooth_luma, smooth[..., 0] - smooth[..., 2], colour)
    fine = inner & spots & ~dark & ~orange & ~near_rod & ~dilate(pale)
    rods = inner & magenta & (r - b > colour[0] - colour[2] + 25)  # off the edge: not a touching red cell
    return _Cytoplasm(ring, inner, colour, dark, fine, orange, pale, rods)


def _cytoplasm_tone(rgb: np.ndarray, cytoplasm: _Cytoplasm, background: np.ndarray) -> tuple[float, float]:
    """(tone, median B - R) of the plain cytoplasm; see _tone."""
    c = cytoplasm
    plain = c.inner & ~c.dark & ~c.fine & ~c.pale & ~dilate(c.rods)
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


def _edge_width(luma: np.ndarray, cell: np.ndarray, nucleus: Nucleus) -> float:
    """(cytoplasm - nucleus luminance) / the steepest gradient on the nucleus outline, px."""
    gy, gx = np.gradient(luma)
    outline = dilate(nucleus.mask & ~erode(nucleus.mask)) & cell
    steepest = float(np.percentile(np.sqrt(gx * gx + gy * gy)[outline], 90))
    return (nucleus.cytoplasm_luma - nucleus.luma) / max(steepest, 1e-6)


def measure(image: np.ndarray) -> Measurements:
    """Measure the checklist features of one (H, W, 3) uint8 RGB image (square, >= 16 px)."""
    _check_image(image)
    rgb = image.astype(np.float32)
    size = rgb.shape[0]
    smooth = median3(rgb)  # for segmentation; features are read from the raw pixels
    background = smear_colour(smooth)
    if background @ LUMA > _MIN_SMEAR_LUMINANCE:  # white balance: the smear as the procedural one, +- its tint
        gain = (_SMEAR + np.clip(background - _SMEAR, -_SMEAR_TINT, _SMEAR_TINT)) / background
        rgb, smooth, background = np.minimum(rgb * gain, 255.0), np.minimum(smooth * gain, 255.0), background * gain
    cell = find_cell(smooth, background)
    if cell is None:
        return Measurements(found_cell=False)
    ys, xs = np.nonzero(cell)  # from here on, work in the cell's bounding box and a 2 px margin
    window = slice(max(ys.min() - 2, 0), ys.max() + 3), slice(max(xs.min() - 2, 0), xs.max() + 3)
    rgb, smooth, cell = rgb[window], smooth[window], cell[window]
    luma = rgb @ LUMA
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    magenta = (r > b) & (g < b) & (r > 140) & (luma < 140)  # Auer rods, lobe filaments; not primary granules
    scale = (size / _REFERENCE_SIZE) ** 2
    nucleus = segment_nucleus(cell, luma, magenta, scale) or no_nucleus(cell, luma)
    stained = fill_holes(cell | (dilate(cell) & (np.abs(smooth - background).sum(axis=-1) > FOREGROUND_DISTANCE)))
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
        vacuoles=int(ndi.label(cytoplasm.pale, CROSS)[1]),
    )
