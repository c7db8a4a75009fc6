"""Procedural bone-marrow cytology: single May-Grünwald-Giemsa stained cells whose clinical rules are known.

A stand-in for the paper's private bone-marrow aspirate images. Each image holds one nucleated
cell, centred with a small random offset, on a pale pinkish-grey smear with a few red cells
around it (never overlapping it). Each cell type draws the six checklist features from its own
ranges (`checklist.SPECS`, tabulated in pathalign_ray/checklist.py).

The colours are chosen so that a program can measure the features back from pixels (luminance
Y = 0.299 R + 0.587 G + 0.114 B, at 64 px):

- background: Y ~ 230, nearly grey;
- cytoplasm: Y ~ 130-200; its mean colour follows the tone (B - R > 0 blue, < 0 pink/orange);
- nucleus: Y < ~110, purple (B > G); darker and more textured with chromatin, uniformly very dark
  when pyknotic; blasts show faint paler nucleoli (fill holes in a nucleus mask);
- lobes of a lobed nucleus are >= 2 px apart and joined only by faint filaments (35 % opacity,
  Y > 120), so a mask Y < 120 counts them as connected components;
- granules: primary dark magenta spots of a few pixels (over the nucleus too), secondary lilac
  1-pixel dust, eosinophilic orange spots (R - B > 120), all within the cell;
- inclusions: an Auer rod is a thin magenta rod in the cytoplasm, vacuoles are pale round holes;
- red cells: pink-red discs (R - G ~ 90 at the rim) with a paler centre, never touching the
  nucleated cell, so the cell is the connected non-background region around the nucleus (an
  orthochromatic erythroblast's cytoplasm has a red cell's colour).

Pure numpy and deterministic: the image of (class, index j) depends only on (seed, class name, j).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import numpy as np

from pathalign_ray import checklist
from pathalign_ray.checklist import (
    CELL_TYPES,
    CRITERIA,
    NUCLEUS_DENSE_RGB,
    NUCLEUS_OPEN_RGB,
    SMEAR_RGB,
    SPECS,
    cytoplasm_rgb,
)
from pathalign_ray.data.labeled import LabeledImages

DEFAULT_CELL_TYPES: tuple[str, ...] = CELL_TYPES[:8]  # pretraining; the last two are the "new concept" types

MIN_SIZE = 16


# Shape parameters shared by all types (arc shapes: a thick circular arc, see _arc_sd).
_OVAL_ASPECT = (1.15, 1.4)  # long / short axis
_INDENTED_ARC = {"half_angle": (0.65, 1.0), "thickness": (0.6, 0.8)}  # radians; half-width / arc radius
_BAND_ARC = {"half_angle": (1.7, 2.2), "thickness": (0.22, 0.32)}
_LOBE_GAP = 0.11  # gap between neighbouring lobes / cell radius: >= 2 px at 64 px
_LOBE_WIDTH = (0.72, 0.88)  # lobe half-width / radius of a round lobe of the same area
_LOBE_SPAN = (0.8 * np.pi, 1.2 * np.pi)  # angle the chain of lobes spans on its ring (widened to fit the cell)
_LOBE_SCALE = (0.7, 1.3)  # relative lobe length
_LOBE_SHIFT = (-0.04, 0.04)  # lobe offset off the ring / cell radius, for an irregular chain

# Colours (RGB), shaped (3, 1, 1) to broadcast over channel-first images; stained colours are
# scaled in optical density by the per-image "stain" feature.
def _rgb(red: float, green: float, blue: float) -> np.ndarray:
    return np.array([red, green, blue], np.float32).reshape(3, 1, 1)


_BACKGROUND = _rgb(*SMEAR_RGB)
_RED_CELL = _rgb(214, 122, 134)
_RED_CELL_PALLOR = _rgb(232, 188, 192)  # the pale centre of a biconcave disc
_NUCLEUS_OPEN = _rgb(*NUCLEUS_OPEN_RGB)  # fine chromatin: reddish purple
_NUCLEUS_DENSE = _rgb(*NUCLEUS_DENSE_RGB)  # condensed chromatin
_NUCLEOLUS = _rgb(120, 92, 168)
_GRANULE_STYLE = {  # kind: (RGB, opacity, radius / frame width)
    "primary": (_rgb(108, 32, 98), 0.85, 0.016),
    "secondary": (_rgb(170, 110, 168), 0.55, 0.007),
    "eosinophilic": (_rgb(232, 118, 58), 0.9, 0.022),
}
_AUER_ROD = _rgb(186, 52, 104)
_VACUOLE = _rgb(234, 228, 236)
_STAIN = (0.88, 1.12)  # optical-density scale of all stains, per image
_FILAMENT_OPACITY = 0.35  # below the nucleus threshold, so lobes stay separate components


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _draw_nucleus_geometry(shape: str, lobes: int, rng: np.random.Generator) -> dict:
    """Shape-specific parameters; the nucleus size comes from nc_ratio."""
    if shape == "oval":
        return {"aspect": _uniform(rng, _OVAL_ASPECT)}
    if shape in ("indented", "band"):
        arc = _INDENTED_ARC if shape == "indented" else _BAND_ARC
        return {"half_angle": _uniform(rng, arc["half_angle"]), "thickness": _uniform(rng, arc["thickness"])}
    if shape == "lobed":
        return {
            "lobe_width": _uniform(rng, _LOBE_WIDTH),
            "span": _uniform(rng, _LOBE_SPAN),
            "lobe_scales": [_uniform(rng, _LOBE_SCALE) for _ in range(lobes)],
            "lobe_shifts": [_uniform(rng, _LOBE_SHIFT) for _ in range(lobes)],
        }
    return {}


def draw_features(cell_type: str, rng: np.random.Generator) -> dict:
    """Draw one cell's checklist features (and its geometry) from the type's clinical ranges.

    Returns a JSON-serialisable dict: cell_type, cell_size, nucleus_shape, lobes, nc_ratio, chromatin,
    cytoplasm_tone, cytoplasm_rgb, granules, granule_density, inclusions, and the geometry
    center (cell centre off the frame centre, / frame width), orientation (radians),
    nucleus_offset (/ cell radius, along orientation), nucleus_geometry (shape parameters), stain.
    """
    spec = checklist.spec(cell_type)
    shape = spec.nucleus_shapes[int(rng.integers(len(spec.nucleus_shapes)))]
    lobes = int(rng.integers(spec.lobes[0], spec.lobes[1] + 1))
    cell_size = _uniform(rng, spec.cell_size)
    max_shift = min(0.04, 0.5 - cell_size / 2 - 0.02)  # keep the whole cell in the frame
    tone = _uniform(rng, spec.cytoplasm_tone)
    return {
        "cell_type": cell_type,
        "cell_size": cell_size,
        "nucleus_shape": shape,
        "lobes": lobes,
        "nc_ratio": _uniform(rng, spec.nc_ratio),
        "chromatin": _uniform(rng, spec.chromatin),
        "cytoplasm_tone": tone,
        "cytoplasm_rgb": cytoplasm_rgb(tone),
        "granules": spec.granules,
        "granule_density": _uniform(rng, spec.granule_density),
        "inclusions": [kind for kind, p in spec.inclusions if rng.random() < p],
        "center": [_uniform(rng, (-max_shift, max_shift)) for _ in range(2)],
        "orientation": _uniform(rng, (0.0, 2 * np.pi)),
        "nucleus_offset": _uniform(rng, spec.nucleus_offset),
        "nucleus_geometry": _draw_nucleus_geometry(shape, lobes, rng),
        "stain": _uniform(rng, _STAIN),
    }


# ---------------------------------------------------------------- rendering helpers
# Images are built channel-first, (3, H, W) float32, so per-pixel maps broadcast over channels
# cheaply; distances are in pixels. Scalars enter as Python floats or float32 (a float64 numpy
# scalar would promote whole arrays to float64), and np.hypot is avoided (~3x slower than _norm).


def _norm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the pixel centres, (size, size) float32 each."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)


@lru_cache(maxsize=16)
def _smoothing_matrix(size: int, nodes: int) -> np.ndarray:
    """(size, nodes) Gaussian interpolation from nodes grid points to size pixels, scaled so that
    S @ U @ S.T, U uniform in [-0.5, 0.5), has an expected standard deviation of 0.5."""
    pixel = (np.arange(size) + 0.5) / size
    node = (np.arange(nodes) + 0.5) / nodes
    weights = np.exp(-0.5 * ((pixel[:, None] - node[None, :]) * nodes / 0.7) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    row_energy = (weights**2).sum(axis=1)
    std = np.sqrt(np.mean(np.outer(row_energy, row_energy)) / 12)
    return (weights / np.sqrt(2 * std)).astype(np.float32)


def _smooth_noise(shape: tuple[int, int], size: int, nodes: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean noise of the given shape, blobs ~size/nodes px wide, mostly within [-1, 1].

    Random values on a coarse grid over a size x size frame, interpolated by two small matrix
    products (far cheaper than filtering a full-size noise image); the top-left shape of it.
    """
    smoothing = _smoothing_matrix(size, nodes)
    return smoothing[: shape[0]] @ (rng.random((nodes, nodes), dtype=np.float32) - 0.5) @ smoothing[: shape[1]].T


@lru_cache(maxsize=32)
def _disc_stamp(radius_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) and anti-aliased coverage of a disc; at least the centre pixel."""
    reach = int(np.ceil(radius_px))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    weight = np.clip(max(radius_px, 0.5) + 0.5 - np.sqrt(dy**2 + dx**2), 0.0, 1.0).astype(np.float32)
    keep = weight > 0.05
    return dy[keep], dx[keep], weight[keep]


def _stamp_discs(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, radius_px: float) -> np.ndarray:
    """float32 coverage map of the given shape, of discs of radius_px centred at the pixels (ys, xs)."""
    dy, dx, weight = _disc_stamp(round(radius_px, 2))
    rows = (ys.astype(np.intp)[:, None] + dy).ravel()
    cols = (xs.astype(np.intp)[:, None] + dx).ravel()
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    mask = np.zeros(shape, np.float32)
    mask[rows[keep], cols[keep]] = np.broadcast_to(weight, (len(ys), len(weight))).ravel()[keep]
    return mask


def _coverage(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """Soft-edged coverage in [0, 1] of a shape from its signed distance (px, negative inside)."""
    return np.clip(0.5 - signed_distance / softness, 0.0, 1.0)


def _paint(image: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-composite colour ((3, 1, 1) or (3, H, W)) with coverage (H, W) over image (3, H, W) in place."""
    image += coverage * (colour - image)


def _stained(rgb: np.ndarray, stain: float) -> np.ndarray:
    """Scale a stain colour's optical density (approximated as 255 - value) by stain."""
    return 255.0 - (255.0 - rgb) * stain


def _arc_sd(
    x: np.ndarray, y: np.ndarray, radius: float | np.ndarray, half_angle: float | np.ndarray, half_width: float
) -> np.ndarray:
    """Signed distance to a thick circular arc (round caps) centred at the origin, symmetric about +x.

    radius and half_angle may be arrays broadcasting against x, for several arcs at once.
    """
    radius, half_angle, half_width = (np.float32(a) for a in (radius, half_angle, half_width))
    r = _norm(x, y)
    within_span = x >= r * np.cos(half_angle)
    end_x, end_y = radius * np.cos(half_angle), radius * np.sin(half_angle)
    to_end = _norm(x - end_x, np.abs(y) - end_y)
    return np.where(within_span, np.abs(r - radius), to_end) - half_width


def _rotate(x: np.ndarray, y: np.ndarray, angle: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x, y) seen in axes turned by angle (radians)."""
    angle = np.float32(angle)
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, c * y - s * x


# ---------------------------------------------------------------- the layers of one cell


@dataclass(frozen=True)
class _Frame:
    """Where the cell lies: a window of the image that holds it, and its centre in window pixels.

    Every layer of the cell is drawn in the window only: a fraction of the frame for all but the
    largest cells.
    """

    size: int  # image side
    top: int  # window, image pixels
    left: int
    height: int
    width: int
    cx: float  # cell centre, window pixels
    cy: float
    radius: float  # cell radius, px
    softness: float  # edge width, px

    @property
    def window(self) -> tuple[slice, slice, slice]:
        """Index of the window in a (3, H, W) image."""
        return slice(None), slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """x and y of the window's pixel centres, window pixels."""
        x, y = _grid(self.size)
        return x[: self.height, : self.width], y[: self.height, : self.width]


def _frame(features: dict, size: int) -> _Frame:
    """The window that holds the cell, with a margin for the outline wobble and the soft edge."""
    radius = features["cell_size"] * size / 2
    centre_x, centre_y = ((0.5 + offset) * size for offset in features["center"])
    reach = 1.1 * radius + 2.0
    top, left = (max(0, int(centre - reach)) for centre in (centre_y, centre_x))
    bottom, right = (min(size, int(np.ceil(centre + reach))) for centre in (centre_y, centre_x))
    softness = 0.6 + size / 160
    return _Frame(size, top, left, bottom - top, right - left, centre_x - left, centre_y - top, radius, softness)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    tint = _rgb(*rng.uniform(-4, 4, 3))
    return np.broadcast_to(_BACKGROUND + tint, (3, size, size)).copy()


def _red_cells(image: np.ndarray, frame: _Frame, rng: np.random.Generator) -> None:
    """Paint 1-4 red cells around (never over) the nucleated cell, partly cut by the frame."""
    count = int(rng.integers(1, 5))
    radii = frame.size * rng.uniform(0.16, 0.21, count)
    angles = rng.uniform(0, 2 * np.pi, count)
    distances = frame.radius * 1.12 + radii + frame.size * rng.uniform(0.03, 0.12, count)
    for radius, angle, distance in zip(radii.tolist(), angles.tolist(), distances.tolist()):
        cx, cy = frame.left + frame.cx + distance * math.cos(angle), frame.top + frame.cy + distance * math.sin(angle)
        _red_cell(image, cx, cy, radius, frame)


def _red_cell(image: np.ndarray, cx: float, cy: float, radius: float, frame: _Frame) -> None:
    """One biconcave disc, drawn in its bounding box only: pink-red with a pale centre."""
    top, left = (max(0, int(centre - radius - 2)) for centre in (cy, cx))
    bottom, right = (min(frame.size, int(np.ceil(centre + radius + 2))) for centre in (cy, cx))
    if bottom <= top or right <= left:
        return
    x, y = _grid(frame.size)
    relative = _norm(x[top:bottom, left:right] - cx, y[top:bottom, left:right] - cy) / radius
    pallor = np.clip(1.6 - 2.2 * relative, 0.0, 1.0)  # central pallor, about a third of the diameter
    colour = _RED_CELL + pallor * (_RED_CELL_PALLOR - _RED_CELL)
    _paint(image[:, top:bottom, left:right], _coverage((relative - 1.0) * radius, frame.softness), colour)


def _cell_sd(frame: _Frame, rng: np.random.Generator) -> np.ndarray:
    """Signed distance to the cell outline: a disc whose radius wobbles with smooth low-frequency noise."""
    x, y = frame.grid()
    wobble = 0.03 * _smooth_noise(frame.shape, frame.size, 4, rng)
    return _norm(x - frame.cx, y - frame.cy) - frame.radius * (1.0 + wobble)


def _per_piece(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """(n, 1, 1) float32, to broadcast one value per lobe against (h, w) coordinates."""
    return np.asarray(values, np.float32)[:, None, None]


@dataclass(frozen=True)
class _LobeLayout:
    """Lobes as short thick arcs on one ring (px, radians); the ring centre is at x = -shift."""

    ring: float  # ring radius
    shift: float  # ring centre to the lobes' centroid
    half_width: float  # of every lobe
    centres: np.ndarray  # (n,) angle of each lobe's middle
    half_angles: np.ndarray  # (n,) half the angle of each lobe's core (the arc between its round caps)


def _lobe_layout(geometry: dict, area: float, cell_radius: float) -> _LobeLayout:
    """Place the lobes end to end along a ring, neighbours _LOBE_GAP x cell_radius apart in straight
    lines, their areas summing to `area`; the ring shrinks (the chain curls) to stay inside the cell.

    Lobes reach at most ~0.9 cell radii from the centroid; a 5-lobe chain can curl until its two
    ends are ~0.07 cell radii apart.
    """
    scales = np.array(geometry["lobe_scales"])
    count = len(scales)
    half_width = geometry["lobe_width"] * math.sqrt(area / count / math.pi)
    cores = (area - count * math.pi * half_width**2) / (2 * half_width) * scales / scales.sum()  # core arc lengths
    gap = _LOBE_GAP * cell_radius
    chain_length = float(cores.sum()) + count * 2 * half_width + (count - 1) * gap
    ring = min(chain_length / geometry["span"], 0.8 * cell_radius - half_width)
    innermost = max(ring - _LOBE_SHIFT[1] * cell_radius, half_width + gap / 2)
    separation = 2 * math.asin((2 * half_width + gap) / (2 * innermost))  # angle between neighbouring core ends
    core_angles = cores / ring
    ends = np.cumsum(core_angles + separation) - separation
    centres = ends - core_angles / 2 - ends[-1] / 2
    shift = ring * float(np.average(np.cos(centres), weights=2 * half_width * cores + math.pi * half_width**2))
    return _LobeLayout(ring, shift, half_width, centres, core_angles / 2)


def _lobed_sd(
    u: np.ndarray, v: np.ndarray, geometry: dict, area: float, frame: _Frame
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances to the lobes and to the thin filament joining them (a band pinched into
    segments); u, v are coordinates in the nucleus frame, origin at the nucleus centroid."""
    layout = _lobe_layout(geometry, area, frame.radius)
    x = u + layout.shift
    along, across = _rotate(x, v, _per_piece(layout.centres))
    rings = layout.ring + frame.radius * _per_piece(geometry["lobe_shifts"])
    lobes = _arc_sd(along, across, rings, _per_piece(layout.half_angles), layout.half_width).min(axis=0)
    filament = _arc_sd(x, v, layout.ring, float(np.abs(layout.centres).max()), max(0.6, 0.035 * frame.radius))
    return lobes, filament


def _nucleus_sd(features: dict, frame: _Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed distance to the nucleus and, for lobed nuclei, to the joining filament."""
    x, y = frame.grid()
    angle = features["orientation"]
    offset = features["nucleus_offset"] * frame.radius
    u, v = _rotate(x - (frame.cx + offset * math.cos(angle)), y - (frame.cy + offset * math.sin(angle)), angle)
    area = features["nc_ratio"] * math.pi * frame.radius**2
    shape, geometry = features["nucleus_shape"], features["nucleus_geometry"]
    if shape == "lobed":
        return _lobed_sd(u, v, geometry, area, frame)
    if shape in ("indented", "band"):
        half_angle, thickness = geometry["half_angle"], geometry["thickness"]
        radius = math.sqrt(area / (4 * half_angle * thickness + math.pi * thickness**2))  # area of a thick arc
        centroid = radius * math.sin(half_angle) / half_angle
        return _arc_sd(u + centroid, v, radius, half_angle, thickness * radius), None
    radius = math.sqrt(area / math.pi)
    aspect = math.sqrt(geometry.get("aspect", 1.0))
    return _norm(u / aspect, v * aspect) - radius, None


def _chromatin_colour(chromatin: float, stain: float, frame: _Frame, rng: np.random.Generator) -> np.ndarray:
    """(3, h, w) nucleus colour: darker and more clumped with chromatin, homogeneous when pyknotic."""
    pyknosis = min(max((chromatin - 0.85) / 0.1, 0.0), 1.0)
    contrast = 0.06 + 0.5 * chromatin * (1.0 - pyknosis)
    clumps = _smooth_noise(frame.shape, frame.size, max(4, frame.size // 4), rng)
    darkness = np.clip(chromatin + contrast * clumps, 0.0, 1.0)
    open_colour, dense_colour = _stained(_NUCLEUS_OPEN, stain), _stained(_NUCLEUS_DENSE, stain)
    return open_colour + darkness * (dense_colour - open_colour)


def _spots_within(region: np.ndarray, count: int, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of `count` disc spots centred on random pixels fully inside region (a coverage map)."""
    inside_y, inside_x = np.nonzero(region > 0.99)
    if len(inside_y) == 0:
        return np.zeros_like(region)
    pick = rng.integers(len(inside_y), size=count)
    return _stamp_discs(region.shape, inside_y[pick], inside_x[pick], radius_px)


def _nucleoli(nucleus: np.ndarray, chromatin: float, frame: _Frame, rng: np.random.Generator) -> np.ndarray:
    """Coverage of 1-2 pale nucleoli inside a nucleus with open chromatin (blasts)."""
    visibility = 0.6 * max(1.0 - chromatin / 0.3, 0.0)
    return visibility * _spots_within(nucleus, int(rng.integers(1, 3)), 0.08 * frame.radius, rng)


def _spots_in_cell(frame: _Frame, count: int, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of `count` disc spots placed uniformly within the cell's disc."""
    r = frame.radius * np.sqrt(rng.random(count))
    t = rng.uniform(0, 2 * np.pi, count)
    return _stamp_discs(frame.shape, frame.cy + r * np.sin(t), frame.cx + r * np.cos(t), radius_px)


def _granules(image: np.ndarray, features: dict, region: np.ndarray, frame: _Frame, rng: np.random.Generator) -> None:
    """Granule spots over region (coverage), covering about granule_density of it."""
    colour, opacity, radius = _GRANULE_STYLE[features["granules"]]
    radius_px = max(0.5, radius * frame.size)
    spot_area = float(_disc_stamp(round(radius_px, 2))[2].sum())
    count = int(round(features["granule_density"] * np.pi * frame.radius**2 / spot_area))
    spots = _spots_in_cell(frame, count, radius_px, rng)
    _paint(image, opacity * spots * region, _stained(colour, features["stain"]))


def _vacuoles(image: np.ndarray, cytoplasm: np.ndarray, frame: _Frame, rng: np.random.Generator) -> None:
    spots = _spots_within(cytoplasm, int(rng.integers(2, 7)), max(0.7, 0.07 * frame.radius), rng)
    _paint(image, 0.8 * spots * cytoplasm, _VACUOLE)


def _auer_rod(
    image: np.ndarray, features: dict, cytoplasm: np.ndarray, frame: _Frame, rng: np.random.Generator
) -> None:
    """A thin magenta rod lying tangentially in the cytoplasm, opposite the nucleus offset."""
    x, y = frame.grid()
    where = features["orientation"] + np.pi + rng.uniform(-1.0, 1.0)
    distance = frame.radius * (1.0 + math.sqrt(features["nc_ratio"])) / 2
    rod_x, rod_y = frame.cx + distance * math.cos(where), frame.cy + distance * math.sin(where)
    u, v = _rotate(x - rod_x, y - rod_y, where + math.pi / 2)
    half_length = 0.22 * frame.radius
    rod = _norm(np.clip(np.abs(u) - half_length, 0, None), v) - max(0.45, 0.025 * frame.radius)
    _paint(image, 0.9 * _coverage(rod, frame.softness) * cytoplasm, _stained(_AUER_ROD, features["stain"]))


def _pixel_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise on 8 levels in [-3.5, 3.5], from random bytes (cheaper than drawing floats)."""
    levels = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8) & 7
    return (levels - np.float32(3.5)).reshape(shape)


def _paint_cell(
    image: np.ndarray,
    features: dict,
    frame: _Frame,
    rng: np.random.Generator,
    nucleus_sd: tuple[np.ndarray, np.ndarray | None] | None = None,
    contained: bool = True,
) -> None:
    """Paint the nucleated cell, layer by layer, over image: the (3, h, w) window that holds it.

    nucleus_sd: (nucleus, filament) signed distances in place of the features' own (broken images);
    contained: the nucleus is kept 1 px inside the cell outline.
    """
    stain = features["stain"]
    cell_sd = _cell_sd(frame, rng)
    cell = _coverage(cell_sd, frame.softness)
    nucleus_sd, filament_sd = nucleus_sd or _nucleus_sd(features, frame)
    nucleus = _coverage(np.maximum(nucleus_sd, cell_sd + 1.0) if contained else nucleus_sd, frame.softness)
    cytoplasm = cell * (1.0 - nucleus)

    texture = 1.0 + 0.04 * _smooth_noise(frame.shape, frame.size, 6, rng)
    _paint(image, cell, _stained(_rgb(*features["cytoplasm_rgb"]), stain) * texture)
    nucleus_colour = _chromatin_colour(features["chromatin"], stain, frame, rng)
    if filament_sd is not None:  # under the granules, so that granules never darken it into a bridge
        _paint(image, _FILAMENT_OPACITY * _coverage(filament_sd, frame.softness) * cell, nucleus_colour)
    over_nucleus = features["granules"] == "primary"  # azurophilic granules overlie the nucleus too
    if features["granules"] != "none" and not over_nucleus:
        _granules(image, features, cytoplasm, frame, rng)
    if "vacuoles" in features["inclusions"]:
        _vacuoles(image, cytoplasm, frame, rng)
    if "auer_rod" in features["inclusions"]:
        _auer_rod(image, features, cytoplasm, frame, rng)

    _paint(image, nucleus, nucleus_colour)
    if over_nucleus:
        _granules(image, features, cell, frame, rng)
    if features["chromatin"] < 0.3:
        _paint(image, _nucleoli(nucleus, features["chromatin"], frame, rng), _stained(_NUCLEOLUS, stain))


def render_cell(features: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one cell from its features at size x size pixels: (size, size, 3) uint8 RGB.

    Drawn directly at the target size; rng adds what the features leave open (outline wobble, red
    cells, granule and vacuole positions, chromatin texture, pixel noise).
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    frame = _frame(features, size)
    image = _background(size, rng)
    _red_cells(image, frame, rng)
    _paint_cell(image[frame.window], features, frame, rng)
    image += _pixel_noise(image.shape, rng)
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))


# ---------------------------------------------------------------- the data set


def _image_rng(seed: int, cell_type: str, index: int) -> np.random.Generator:
    """The rng of image `index` of a class: depends on nothing else, so sets nest and subsets agree."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(cell_type.encode()), index]))


def generate(n_per_class: int, size: int, seed: int, classes: Sequence[str] = DEFAULT_CELL_TYPES) -> LabeledImages:
    """n_per_class images of each class in `classes`, size x size px, labels indexing `classes`.

    Deterministic: the image of (class, j) depends only on (seed, class name, j), not on
    n_per_class nor on the other classes requested.
    """
    classes = tuple(classes)
    for cell_type in classes:
        checklist.spec(cell_type)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {classes}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    images = np.empty((len(classes) * n_per_class, size, size, 3), np.uint8)
    features = []
    for label, cell_type in enumerate(classes):
        for j in range(n_per_class):
            rng = _image_rng(seed, cell_type, j)
            drawn = draw_features(cell_type, rng)
            images[label * n_per_class + j] = render_cell(drawn, size, rng)
            features.append(drawn)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), n_per_class)
    return LabeledImages(images, labels, classes, features)


# ---------------------------------------------------------------- broken images

BROKEN_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (the checklist criteria a pathologist names for it, the cell types it is drawn for)
    "two_nuclei": (  # two separate round nuclei: a binucleate cell (dysplasia), for the one-nucleus types
        ("nucleus_shape",),
        tuple(name for name in CELL_TYPES if SPECS[name].lobes == (1, 1)),
    ),
    "nucleus_outside": (  # the nucleus half out of the cytoplasm: no intact cell holds it so. Not drawn for
        # the orthochromatic erythroblast, which extrudes its nucleus, nor for cells too big to show it in frame
        ("nucleus_shape",),
        ("myelocyte", "metamyelocyte", "band_neutrophil", "segmented_neutrophil", "lymphocyte", "eosinophil"),
    ),
    "wrong_cytoplasm_colour": (("cytoplasm_colour",), CELL_TYPES),  # a tone >= 0.3 off the type's range
    "no_nucleus": (("nucleus_shape", "chromatin"), CELL_TYPES),  # cytoplasm only: a fragment, not a cell
    "blank": (CRITERIA, ()),
    "noise": (CRITERIA, ()),
}  # blank: smear and red cells, no nucleated cell; noise: uniform RGB. Neither has a cell to check.
_NUCLEUS_GAP = 0.2  # two nuclei: their gap / cell radius (and >= 2.5 px)
_PROTRUSION = (0.4, 0.7)  # nucleus outside: fraction of its width beyond the cell outline
_TONE_DISTANCE = 0.3  # wrong cytoplasm colour: at least this far from the type's tone range


def _full_frame(features: dict, size: int) -> _Frame:
    """A frame whose window is the whole image: broken parts may reach beyond the cell's own window."""
    frame = _frame(features, size)
    return _Frame(size, 0, 0, size, size, frame.left + frame.cx, frame.top + frame.cy, frame.radius, frame.softness)


def _two_nuclei_sd(features: dict, frame: _Frame) -> np.ndarray:
    """Signed distance to two round nuclei side by side along the orientation, _NUCLEUS_GAP apart,
    sharing the type's N:C while that fits in 0.85 cell radii either side of the centre."""
    gap = max(_NUCLEUS_GAP, 2.5 / frame.radius)  # / cell radius
    area = min(features["nc_ratio"] / 2, ((0.85 - gap / 2) / 2) ** 2)  # each, / cell area
    radius = math.sqrt(area)
    halves = [
        {**features, "nucleus_shape": "round", "nucleus_geometry": {}, "nc_ratio": area,
         "nucleus_offset": radius + gap / 2, "orientation": features["orientation"] + turn}
        for turn in (0.0, math.pi)
    ]
    return np.minimum(*(_nucleus_sd(half, frame)[0] for half in halves))


def _push_nucleus_out(features: dict, rng: np.random.Generator) -> dict:
    """Features with the nucleus moved out along its orientation until a _PROTRUSION of its width lies
    beyond the cell outline, and the cell moved back by half that, to keep both in frame."""
    nucleus_radius = math.sqrt(features["nc_ratio"])  # / cell radius, of a round nucleus of that area
    beyond = 2 * nucleus_radius * _uniform(rng, _PROTRUSION)
    angle = features["orientation"]
    shift = beyond / 2 * features["cell_size"] / 2  # frame widths
    centre = [features["center"][0] - shift * math.cos(angle), features["center"][1] - shift * math.sin(angle)]
    return {**features, "nucleus_offset": 1.0 - nucleus_radius + beyond, "center": centre}


def _off_range_tone(tone_range: tuple[float, float], rng: np.random.Generator) -> float:
    """A cytoplasm tone in [0, 1] at least _TONE_DISTANCE from the range."""
    below = max(tone_range[0] - _TONE_DISTANCE, 0.0)
    above = max(1.0 - (tone_range[1] + _TONE_DISTANCE), 0.0)
    pick = rng.uniform(0.0, below + above)
    return pick if pick < below else tone_range[1] + _TONE_DISTANCE + (pick - below)


def render_broken(kind: str, cell_type: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A deliberately broken image of cell_type, (size, size, 3) uint8: see BROKEN_KINDS.

    The cell is drawn from the type's ranges (draw_features) and then broken in one way only, with the
    renderer's own layers; blank and noise ignore cell_type.
    """
    if kind not in BROKEN_KINDS:
        raise ValueError(f"unknown broken kind {kind!r}; known: {', '.join(BROKEN_KINDS)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    features = draw_features(cell_type, rng)
    if BROKEN_KINDS[kind][1] and cell_type not in BROKEN_KINDS[kind][1]:
        raise ValueError(f"{kind} is drawn for {', '.join(BROKEN_KINDS[kind][1])}, not {cell_type!r}")
    nucleus_sd, contained, red_cell_radius = None, True, 1.0
    if kind == "wrong_cytoplasm_colour":
        tone = _off_range_tone(SPECS[cell_type].cytoplasm_tone, rng)
        features.update(cytoplasm_tone=tone, cytoplasm_rgb=cytoplasm_rgb(tone))
    elif kind == "nucleus_outside":
        features = _push_nucleus_out(features, rng)
        contained, red_cell_radius = False, features["nucleus_offset"] + math.sqrt(features["nc_ratio"])
    frame = _full_frame(features, size)
    if kind == "two_nuclei":
        nucleus_sd = (_two_nuclei_sd(features, frame), None)
    elif kind == "no_nucleus":
        nucleus_sd = (np.full(frame.shape, np.inf, np.float32), None)
    image = _background(size, rng)
    _red_cells(image, replace(frame, radius=frame.radius * red_cell_radius), rng)
    if kind != "blank":
        _paint_cell(image, features, frame, rng, nucleus_sd, contained)
    image += _pixel_noise(image.shape, rng)
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))
