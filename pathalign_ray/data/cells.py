"""One procedural cell: its checklist features drawn from its type's ranges, and its picture painted layer by layer.

`draw_features` draws what the checklist describes (size, nucleus shape, N:C, chromatin, cytoplasm
tone, granules, inclusions) from `checklist.SPECS`, plus the geometry it leaves open (position,
orientation, nucleus offset and shape parameters, stain strength). `render_cell` paints them over
a smear with red cells around the cell: the cell's outline, cytoplasm, lobe filaments, granules,
inclusions, nucleus and nucleoli, each layer drawn in the window of the image that holds the cell
(`Frame`) with the primitives of `raster`. What the layers look like, so that they can be measured
back, is in data/procedural.py's docstring. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pathalign_ray.data import raster
from pathalign_ray.experts import checklist
from pathalign_ray.experts.checklist import NUCLEUS_DENSE_RGB, NUCLEUS_OPEN_RGB, SMEAR_RGB, cytoplasm_rgb

MIN_SIZE = 16  # px, the smallest image side drawn

# Shape parameters shared by all types (arc shapes: a thick circular arc, see raster.arc_sd).
_OVAL_ASPECT = (1.15, 1.4)  # long / short axis
_INDENTED_ARC = {"half_angle": (0.65, 1.0), "thickness": (0.6, 0.8)}  # radians; half-width / arc radius
_BAND_ARC = {"half_angle": (1.7, 2.2), "thickness": (0.22, 0.32)}
_LOBE_GAP = 0.11  # gap between neighbouring lobes / cell radius: >= 2 px at 64 px
_LOBE_WIDTH = (0.72, 0.88)  # lobe half-width / radius of a round lobe of the same area
_LOBE_SPAN = (0.8 * np.pi, 1.2 * np.pi)  # angle the chain of lobes spans on its ring (widened to fit the cell)
_LOBE_SCALE = (0.7, 1.3)  # relative lobe length
_LOBE_SHIFT = (-0.04, 0.04)  # lobe offset off the ring / cell radius, for an irregular chain

# Colours, (3, 1, 1) RGB; stained colours are scaled in optical density by the per-image "stain" feature.
_BACKGROUND = raster.rgb(*SMEAR_RGB)
_RED_CELL = raster.rgb(214, 122, 134)
_RED_CELL_PALLOR = raster.rgb(232, 188, 192)  # the pale centre of a biconcave disc
_NUCLEUS_OPEN = raster.rgb(*NUCLEUS_OPEN_RGB)  # fine chromatin: reddish purple
_NUCLEUS_DENSE = raster.rgb(*NUCLEUS_DENSE_RGB)  # condensed chromatin
_NUCLEOLUS = raster.rgb(120, 92, 168)
_GRANULE_STYLE = {  # kind: (RGB, opacity, radius / frame width)
    "primary": (raster.rgb(108, 32, 98), 0.85, 0.016),
    "secondary": (raster.rgb(170, 110, 168), 0.55, 0.007),
    "eosinophilic": (raster.rgb(232, 118, 58), 0.9, 0.022),
}
_AUER_ROD = raster.rgb(186, 52, 104)
_VACUOLE = raster.rgb(234, 228, 236)
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


# ---------------------------------------------------------------- the layers of one cell


@dataclass(frozen=True)
class Frame:
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
        x, y = raster.grid(self.size)
        return x[: self.height, : self.width], y[: self.height, : self.width]


def cell_frame(features: dict, size: int) -> Frame:
    """The window that holds the cell, with a margin for the outline wobble and the soft edge."""
    radius = features["cell_size"] * size / 2
    centre_x, centre_y = ((0.5 + offset) * size for offset in features["center"])
    reach = 1.1 * radius + 2.0
    top, left = (max(0, int(centre - reach)) for centre in (centre_y, centre_x))
    bottom, right = (min(size, int(np.ceil(centre + reach))) for centre in (centre_y, centre_x))
    softness = 0.6 + size / 160
    return Frame(size, top, left, bottom - top, right - left, centre_x - left, centre_y - top, radius, softness)


def smear_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """The empty smear, (3, size, size) float32: its colour with a tint of up to +-4 levels per channel."""
    tint = raster.rgb(*rng.uniform(-4, 4, 3))
    return np.broadcast_to(_BACKGROUND + tint, (3, size, size)).copy()


def paint_red_cells(image: np.ndarray, frame: Frame, rng: np.random.Generator) -> None:
    """Paint 1-4 red cells around (never over) the nucleated cell, partly cut by the frame."""
    count = int(rng.integers(1, 5))
    radii = frame.size * rng.uniform(0.16, 0.21, count)
    angles = rng.uniform(0, 2 * np.pi, count)
    distances = frame.radius * 1.12 + radii + frame.size * rng.uniform(0.03, 0.12, count)
    for radius, angle, distance in zip(radii.tolist(), angles.tolist(), distances.tolist()):
        cx, cy = frame.left + frame.cx + distance * math.cos(angle), frame.top + frame.cy + distance * math.sin(angle)
        _red_cell(image, cx, cy, radius, frame)


def _red_cell(image: np.ndarray, cx: float, cy: float, radius: float, frame: Frame) -> None:
    """One biconcave disc, drawn in its bounding box only: pink-red with a pale centre."""
    top, left = (max(0, int(centre - radius - 2)) for centre in (cy, cx))
    bottom, right = (min(frame.size, int(np.ceil(centre + radius + 2))) for centre in (cy, cx))
    if bottom <= top or right <= left:
        return
    x, y = raster.grid(frame.size)
    relative = raster.norm(x[top:bottom, left:right] - cx, y[top:bottom, left:right] - cy) / radius
    pallor = np.clip(1.6 - 2.2 * relative, 0.0, 1.0)  # central pallor, about a third of the diameter
    colour = _RED_CELL + pallor * (_RED_CELL_PALLOR - _RED_CELL)
    raster.paint(image[:, top:bottom, left:right], raster.coverage((relative - 1.0) * radius, frame.softness), colour)


def _cell_sd(frame: Frame, rng: np.random.Generator) -> np.ndarray:
    """Signed distance to the cell outline: a disc whose radius wobbles with smooth low-frequency noise."""
    x, y = frame.grid()
    wobble = 0.03 * raster.smooth_noise(frame.shape, frame.size, 4, rng)
    return raster.norm(x - frame.cx, y - frame.cy) - frame.radius * (1.0 + wobble)


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


def _lobed_sd(u: np.ndarray, v: np.ndarray, geometry: dict, area: float, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances to the lobes and to the thin filament joining them (a band pinched into
    segments); u, v are coordinates in the nucleus frame, origin at the nucleus centroid."""
    layout = _lobe_layout(geometry, area, frame.radius)
    x = u + layout.shift
    along, across = raster.rotate(x, v, _per_piece(layout.centres))
    rings = layout.ring + frame.radius * _per_piece(geometry["lobe_shifts"])
    lobes = raster.arc_sd(along, across, rings, _per_piece(layout.half_angles), layout.half_width).min(axis=0)
    filament = raster.arc_sd(x, v, layout.ring, float(np.abs(layout.centres).max()), max(0.6, 0.035 * frame.radius))
    return lobes, filament


def nucleus_distances(features: dict, frame: Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed distance to the nucleus and, for lobed nuclei, to the joining filament."""
    x, y = frame.grid()
    angle = features["orientation"]
    offset = features["nucleus_offset"] * frame.radius
    u, v = raster.rotate(x - (frame.cx + offset * math.cos(angle)), y - (frame.cy + offset * math.sin(angle)), angle)
    area = features["nc_ratio"] * math.pi * frame.radius**2
    shape, geometry = features["nucleus_shape"], features["nucleus_geometry"]
    if shape == "lobed":
        return _lobed_sd(u, v, geometry, area, frame)
    if shape in ("indented", "band"):
        half_angle, thickness = geometry["half_angle"], geometry["thickness"]
        radius = math.sqrt(area / (4 * half_angle * thickness + math.pi * thickness**2))  # area of a thick arc
        centroid = radius * math.sin(half_angle) / half_angle
        return raster.arc_sd(u + centroid, v, radius, half_angle, thickness * radius), None
    radius = math.sqrt(area / math.pi)
    aspect = math.sqrt(geometry.get("aspect", 1.0))
    return raster.norm(u / aspect, v * aspect) - radius, None


def _chromatin_colour(chromatin: float, stain: float, frame: Frame, rng: np.random.Generator) -> np.ndarray:
    """(3, h, w) nucleus colour: darker and more clumped with chromatin, homogeneous when pyknotic."""
    pyknosis = min(max((chromatin - 0.85) / 0.1, 0.0), 1.0)
    contrast = 0.06 + 0.5 * chromatin * (1.0 - pyknosis)
    clumps = raster.smooth_noise(frame.shape, frame.size, max(4, frame.size // 4), rng)
    darkness = np.clip(chromatin + contrast * clumps, 0.0, 1.0)
    open_colour, dense_colour = raster.stained(_NUCLEUS_OPEN, stain), raster.stained(_NUCLEUS_DENSE, stain)
    return open_colour + darkness * (dense_colour - open_colour)


def _spots_within(region: np.ndarray, count: int, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of `count` disc spots centred on random pixels fully inside region (a coverage map)."""
    inside_y, inside_x = np.nonzero(region > 0.99)
    if len(inside_y) == 0:
        return np.zeros_like(region)
    pick = rng.integers(len(inside_y), size=count)
    return raster.stamp_discs(region.shape, inside_y[pick], inside_x[pick], radius_px)


def _nucleoli(nucleus: np.ndarray, chromatin: float, frame: Frame, rng: np.random.Generator) -> np.ndarray:
    """Coverage of 1-2 pale nucleoli inside a nucleus with open chromatin (blasts)."""
    visibility = 0.6 * max(1.0 - chromatin / 0.3, 0.0)
    return visibility * _spots_within(nucleus, int(rng.integers(1, 3)), 0.08 * frame.radius, rng)


def _spots_in_cell(frame: Frame, count: int, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of `count` disc spots placed uniformly within the cell's disc."""
    r = frame.radius * np.sqrt(rng.random(count))
    t = rng.uniform(0, 2 * np.pi, count)
    return raster.stamp_discs(frame.shape, frame.cy + r * np.sin(t), frame.cx + r * np.cos(t), radius_px)


def _granules(image: np.ndarray, features: dict, region: np.ndarray, frame: Frame, rng: np.random.Generator) -> None:
    """Granule spots over region (coverage), covering about granule_density of it."""
    colour, opacity, radius = _GRANULE_STYLE[features["granules"]]
    radius_px = max(0.5, radius * frame.size)
    spot_area = float(raster.disc_stamp(round(radius_px, 2))[2].sum())
    count = int(round(features["granule_density"] * np.pi * frame.radius**2 / spot_area))
    spots = _spots_in_cell(frame, count, radius_px, rng)
    raster.paint(image, opacity * spots * region, raster.stained(colour, features["stain"]))


def _vacuoles(image: np.ndarray, cytoplasm: np.ndarray, frame: Frame, rng: np.random.Generator) -> None:
    spots = _spots_within(cytoplasm, int(rng.integers(2, 7)), max(0.7, 0.07 * frame.radius), rng)
    raster.paint(image, 0.8 * spots * cytoplasm, _VACUOLE)


def _auer_rod(image: np.ndarray, features: dict, cytoplasm: np.ndarray, frame: Frame, rng: np.random.Generator) -> None:
    """A thin magenta rod lying tangentially in the cytoplasm, opposite the nucleus offset."""
    x, y = frame.grid()
    where = features["orientation"] + np.pi + rng.uniform(-1.0, 1.0)
    distance = frame.radius * (1.0 + math.sqrt(features["nc_ratio"])) / 2
    rod_x, rod_y = frame.cx + distance * math.cos(where), frame.cy + distance * math.sin(where)
    u, v = raster.rotate(x - rod_x, y - rod_y, where + math.pi / 2)
    half_length = 0.22 * frame.radius
    rod = raster.norm(np.clip(np.abs(u) - half_length, 0, None), v) - max(0.45, 0.025 * frame.radius)
    colour = raster.stained(_AUER_ROD, features["stain"])
    raster.paint(image, 0.9 * raster.coverage(rod, frame.softness) * cytoplasm, colour)


def paint_cell(
    image: np.ndarray,
    features: dict,
    frame: Frame,
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
    cell = raster.coverage(cell_sd, frame.softness)
    nucleus_sd, filament_sd = nucleus_sd or nucleus_distances(features, frame)
    nucleus = raster.coverage(np.maximum(nucleus_sd, cell_sd + 1.0) if contained else nucleus_sd, frame.softness)
    cytoplasm = cell * (1.0 - nucleus)

    texture = 1.0 + 0.04 * raster.smooth_noise(frame.shape, frame.size, 6, rng)
    raster.paint(image, cell, raster.stained(raster.rgb(*features["cytoplasm_rgb"]), stain) * texture)
    nucleus_colour = _chromatin_colour(features["chromatin"], stain, frame, rng)
    if filament_sd is not None:  # under the granules, so that granules never darken it into a bridge
        raster.paint(image, _FILAMENT_OPACITY * raster.coverage(filament_sd, frame.softness) * cell, nucleus_colour)
    over_nucleus = features["granules"] == "primary"  # azurophilic granules overlie the nucleus too
    if features["granules"] != "none" and not over_nucleus:
        _granules(image, features, cytoplasm, frame, rng)
    if "vacuoles" in features["inclusions"]:
        _vacuoles(image, cytoplasm, frame, rng)
    if "auer_rod" in features["inclusions"]:
        _auer_rod(image, features, cytoplasm, frame, rng)

    raster.paint(image, nucleus, nucleus_colour)
    if over_nucleus:
        _granules(image, features, cell, frame, rng)
    if features["chromatin"] < 0.3:
        raster.paint(image, _nucleoli(nucleus, features["chromatin"], frame, rng), raster.stained(_NUCLEOLUS, stain))


def render_cell(features: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one cell from its features at size x size pixels: (size, size, 3) uint8 RGB.

    Drawn directly at the target size; rng adds what the features leave open (outline wobble, red
    cells, granule and vacuole positions, chromatin texture, pixel noise).
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    frame = cell_frame(features, size)
    image = smear_image(size, rng)
    paint_red_cells(image, frame, rng)
    paint_cell(image[frame.window], features, frame, rng)
    image += raster.pixel_noise(image.shape, rng)
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))
