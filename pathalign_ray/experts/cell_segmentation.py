"""Where the cell and its nucleus lie in an image: the segmentation half of the simulated pathologist.

Works on a median-filtered copy of the image (`median3`, a separable 3x3 median: speckle off, edges
kept), so that diffusion-made images read too: speckle, ragged outlines, a halo of smear around the
cell, red cells touching it, a darker or tinted smear. Pixel-count thresholds are stated at 64 px
and scale with size**2 (`scale`). The features are then read from the raw pixels by
cell_measurement.py.

- smear colour (`smear_colour`): median of the frame-border pixels within 20 luminance levels of the
  border's 90th percentile.
- cell (`find_cell`): stained pixels (sum |RGB - background| > 30) form 4-connected components; the
  one holding most dark pixels (Y < 120) within 0.35 frame widths of the centre is the first guess
  (with no dark pixel there, the one at the centre: a cell without a nucleus), its cytoplasm next to
  the nucleus gives the cell's contrast. The outline is drawn at 0.4 of that contrast (30-90): half
  covered edge pixels in, a halo of smear out (diameter bias < 0.006, sd 0.006 frame widths at
  32-128 px). Where an opening by half the inscribed radius cuts off > 5 % (a red cell or smear
  touching the cell through a neck), the opened cell is kept; what lies beyond 1.25 inscribed radii
  + 1 px of the innermost point is cut off; holes are filled (vacuoles). None, or one touching a
  quarter of the frame border or covering 80 % of the frame: no cell found.
- nucleus (`segment_nucleus`): non-magenta pixels darker than a threshold half-way between nucleus
  and cytoplasm luminance (both first estimated with Y < 120), in components of >= 12 px (at 64 px),
  >= 1.5 % of the cell and >= 30 % of the largest, holes (nucleoli) filled; under 4 % of the cell in
  all, no nucleus (clumped granules). The half-way threshold puts the outline where a soft edge is
  half covered (unbiased N:C) and leaves the 35 %-opacity lobe filaments out: lobes = components (all
  correct at 32-128 px). Primary granules lying on the nucleus stay in it; magenta Auer rods do not.

Pure numpy/scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # luminance Y of RGB
CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity
FOREGROUND_DISTANCE = 30.0  # sum |RGB - background| above which a pixel is stained
_CENTRAL = 0.35  # frame widths from the centre: where the cell's nucleus is looked for
_CELL_CONTRAST = 0.4  # the cell's outline: this fraction of its cytoplasm's distance from the smear
_CELL_THRESHOLD_MAX = 90.0  # (at most this distance: the outline of a deep blue rim stays outside its blends)
_OPEN_KEEP = 0.95  # the cell opened by half its inscribed radius replaces it where that cut off > 5 %
_CAP = 1.25  # the cell lies within this many inscribed radii (+ 1 px) of its innermost point
_NUCLEUS_LUMINANCE = 120.0  # first-pass nucleus threshold, refined per image
_CENTRE = 0.1  # frame widths: with no dark pixel near the centre, the stained component here is the cell
_MIN_NC = 0.04  # a "nucleus" under this fraction of the cell is none: drawn >= 0.14
_MIN_LOBE = 0.015  # and so is a piece under this fraction (a clump of granules): a lobe is drawn >= ~0.035

# ---------------------------------------------------------------- binary masks and filters


def dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 4-neighbourhood (cheaper than scipy's on small images)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 4-neighbourhood; outside the image counts as background."""
    out = mask & ~dilate(~mask)
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not reach the image border filled
    (as scipy's binary_fill_holes, by one labelling instead of iterated dilations)."""
    labels, count = ndi.label(~mask, CROSS)
    hole = np.ones(count + 1, bool)
    hole[0] = hole[labels[0]] = hole[labels[-1]] = hole[labels[:, 0]] = hole[labels[:, -1]] = False
    return mask | hole[labels]


def median3(rgb: np.ndarray) -> np.ndarray:
    """Separable 3x3 median (of 3 along rows, then along columns) per channel, edges replicated: takes
    speckle off a generated image for segmentation while keeping edges where they are."""

    def middle(a, b, c):
        return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))

    padded = np.pad(rgb, ((0, 0), (1, 1), (0, 0)), mode="edge")
    rows = middle(padded[:, :-2], padded[:, 1:-1], padded[:, 2:])
    padded = np.pad(rows, ((1, 1), (0, 0), (0, 0)), mode="edge")
    return middle(padded[:-2], padded[1:-1], padded[2:])


# ---------------------------------------------------------------- the cell


def smear_colour(rgb: np.ndarray) -> np.ndarray:
    """The smear colour: median of the frame-border pixels within 20 luminance levels of the border's
    90th percentile (the lightest tenth is smear in any image with some smear in its border)."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    luma = ring @ LUMA
    return np.median(ring[luma >= np.percentile(luma, 90) - 20], axis=0)


def _pick(mask: np.ndarray, seeds: np.ndarray, fill: bool = True) -> np.ndarray | None:
    """The 4-connected component of mask holding most seed pixels, holes filled; None if none holds any."""
    labels, count = ndi.label(mask, CROSS)
    counts = np.bincount(labels[seeds], minlength=count + 1)
    counts[0] = 0
    if counts.max() == 0:
        return None
    component = labels == int(np.argmax(counts))
    return fill_holes(component) if fill else component


def _depth(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest pixel outside it (or outside the image)."""
    return ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def _open_by_half_radius(mask: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The mask opened by a disc of half its inscribed radius: cuts off what hangs on by a neck narrower
    than that radius (a touching red cell, a smear halo), and leaves a round cell as it is."""
    radius = 0.5 * depth.max()
    return (ndi.distance_transform_edt(~(depth > radius)) <= radius) & mask


def find_cell(smooth: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The cell mask of a median-filtered image, holes filled; None if none fits. See the module doc."""
    size = smooth.shape[0]
    drop = background - smooth  # optical-density-like: what the stain takes away from the smear
    distance = np.abs(drop).sum(axis=-1)
    stained = distance > FOREGROUND_DISTANCE
    yy, xx = np.mgrid[:size, :size] + 0.5 - size / 2
    seeds = (smooth @ LUMA < _NUCLEUS_LUMINANCE) & (yy * yy + xx * xx < (_CENTRAL * size) ** 2)
    if not seeds.any():  # no nucleus: the cell (a fragment of cytoplasm) is what lies at the centre
        seeds = stained & (yy * yy + xx * xx < (_CENTRE * size) ** 2)
    cell = _pick(stained, seeds, fill=False)
    if cell is None:
        return None
    cytoplasm = dilate(dilate(cell & seeds)) & cell & ~seeds
    contrast = float(np.median(distance[cytoplasm])) if cytoplasm.any() else 0.0
    threshold = np.clip(_CELL_CONTRAST * contrast, FOREGROUND_DISTANCE, _CELL_THRESHOLD_MAX)
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


# ---------------------------------------------------------------- the nucleus


@dataclass(frozen=True)
class Nucleus:
    """A cell's nucleus: its mask, its lobe count and the luminances its outline was placed by."""

    mask: np.ndarray
    lobes: int
    threshold: float  # luminance half-way between nucleus and cytoplasm
    luma: float  # median luminance of the nucleus
    cytoplasm_luma: float  # and of the cytoplasm around it


def segment_nucleus(cell: np.ndarray, luma: np.ndarray, magenta: np.ndarray, scale: float) -> Nucleus | None:
    """Two passes: Y < 120 gives the nucleus and cytoplasm luminance, half-way between them the outline."""
    rough, _ = _nucleus(cell, luma, _NUCLEUS_LUMINANCE, magenta, scale)
    if rough is None:
        return None
    rim = cell & ~dilate(rough)
    nucleus_luma = float(np.median(luma[rough]))
    cytoplasm_luma = float(np.median(luma[rim])) if rim.any() else _NUCLEUS_LUMINANCE
    threshold = (nucleus_luma + max(cytoplasm_luma, nucleus_luma)) / 2
    mask, lobes = _nucleus(cell, luma, threshold, magenta, scale)
    if mask is None:
        mask, lobes = rough, 1
    if mask.sum() < _MIN_NC * cell.sum():
        return None
    return Nucleus(mask, lobes, threshold, nucleus_luma, cytoplasm_luma)


def no_nucleus(cell: np.ndarray, luma: np.ndarray) -> Nucleus:
    """The nucleus of a cell that has none: an empty mask, dark granules still below the first-pass threshold."""
    return Nucleus(np.zeros_like(cell), 0, _NUCLEUS_LUMINANCE, math.nan, float(np.median(luma[cell])))


def _nucleus(cell: np.ndarray, luma: np.ndarray, threshold: float, magenta: np.ndarray, scale: float):
    """(nucleus mask, lobe count): the components of non-magenta pixels darker than threshold that are
    at least 12 px (at 64 px), 1.5 % of the cell and 30 % of the largest, holes (nucleoli) filled.

    Auer rods are magenta; primary granules (R ~ B) are not, so those lying over the nucleus stay part
    of it (a chain of them cannot cut it in two) and those in the cytoplasm are too small to count.
    """
    labels, count = ndi.label(cell & (luma < threshold) & ~magenta, CROSS)
    if count == 0:
        return None, 0
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.nonzero(areas >= max(12.0 * scale, _MIN_LOBE * cell.sum(), 0.3 * areas.max()))[0] + 1
    if len(keep) == 0:  # dark specks only
        return None, 0
    return fill_holes(np.isin(labels, keep)), len(keep)
