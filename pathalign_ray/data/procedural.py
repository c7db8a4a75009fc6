"""Procedural bone-marrow cytology: single May-Grünwald-Giemsa stained cells whose clinical rules are known.

A stand-in for the paper's private bone-marrow aspirate images. Each image holds one nucleated
cell, centred with a small random offset, on a pale pinkish-grey smear with a few red cells
around it (never overlapping it). Each cell type draws the six checklist features from its own
ranges (`checklist.SPECS`, tabulated in pathalign_ray/experts/checklist.py).

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

`generate` makes the data set: pure numpy and deterministic, the image of (class, index j) depends
only on (seed, class name, j). One cell is drawn and painted by data/cells.py. `render_broken` makes
deliberately broken images (`BROKEN_KINDS`), for testing a judge.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from pathalign_ray.data import raster
from pathalign_ray.data.cells import (
    MIN_SIZE,
    Frame,
    cell_frame,
    draw_features,
    nucleus_distances,
    paint_cell,
    paint_red_cells,
    render_cell,
    smear_image,
)
from pathalign_ray.data.labeled import LabeledImages
from pathalign_ray.experts import checklist
from pathalign_ray.experts.checklist import CELL_TYPES, CRITERIA, SPECS, cytoplasm_rgb

DEFAULT_CELL_TYPES: tuple[str, ...] = CELL_TYPES[:8]  # pretraining; the last two are the "new concept" types


# ---------------------------------------------------------------- the data set


def _image_rng(seed: int, cell_type: str, index: int) -> np.random.Generator:
    """The rng of image `index` of a class: depends on nothing else, so sets nest and subsets agree."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(cell_type.encode()), index]))


def generate(
    n_per_class: int,
    size: int,
    seed: int,
    classes: Sequence[str] = DEFAULT_CELL_TYPES,
    artefact_fraction: float = 0.0,
) -> LabeledImages:
    """n_per_class images of each class in `classes`, size x size px, labels indexing `classes`.

    Deterministic: the image of (class, j) depends only on (seed, class name, j), not on
    n_per_class nor on the other classes requested. artefact_fraction > 0 replaces about that share
    of each class's images with an artefact labelled as the class, as real smears hold broken cells:
    a broken image (`render_broken`, a kind drawn for that type, never blank or noise) whose feature
    record is {"cell_type", "artefact": kind}; the other images stay what they are without artefacts.
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
    if not 0.0 <= artefact_fraction < 1.0:
        raise ValueError(f"artefact_fraction must be in [0, 1), got {artefact_fraction}")
    images = np.empty((len(classes) * n_per_class, size, size, 3), np.uint8)
    features = []
    for label, cell_type in enumerate(classes):
        for j in range(n_per_class):
            artefact = _artefact_kind(seed, cell_type, j, artefact_fraction)
            rng = _image_rng(seed, cell_type, j)
            if artefact:
                images[label * n_per_class + j] = render_broken(artefact, cell_type, size, rng)
                features.append({"cell_type": cell_type, "artefact": artefact})
                continue
            drawn = draw_features(cell_type, rng)
            images[label * n_per_class + j] = render_cell(drawn, size, rng)
            features.append(drawn)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), n_per_class)
    return LabeledImages(images, labels, classes, features)


def _artefact_kind(seed: int, cell_type: str, index: int, fraction: float) -> str | None:
    """The broken kind image (class, index) is drawn as, or None: its own rng, so the clean images
    of a set with artefacts are those of the set without."""
    if fraction <= 0:
        return None
    rng = _image_rng(seed, f"artefact:{cell_type}", index)
    if rng.random() >= fraction:
        return None
    kinds = [kind for kind, (_, types) in BROKEN_KINDS.items() if cell_type in types]
    return str(rng.choice(kinds))


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


def _full_frame(features: dict, size: int) -> Frame:
    """A frame whose window is the whole image: broken parts may reach beyond the cell's own window."""
    frame = cell_frame(features, size)
    return Frame(size, 0, 0, size, size, frame.left + frame.cx, frame.top + frame.cy, frame.radius, frame.softness)


def _two_nuclei_sd(features: dict, frame: Frame) -> np.ndarray:
    """Signed distance to two round nuclei side by side along the orientation, _NUCLEUS_GAP apart,
    sharing the type's N:C while that fits in 0.85 cell radii either side of the centre."""
    gap = max(_NUCLEUS_GAP, 2.5 / frame.radius)  # / cell radius
    area = min(features["nc_ratio"] / 2, ((0.85 - gap / 2) / 2) ** 2)  # each, / cell area
    radius = math.sqrt(area)
    halves = [
        {
            **features,
            "nucleus_shape": "round",
            "nucleus_geometry": {},
            "nc_ratio": area,
            "nucleus_offset": radius + gap / 2,
            "orientation": features["orientation"] + turn,
        }
        for turn in (0.0, math.pi)
    ]
    return np.minimum(*(nucleus_distances(half, frame)[0] for half in halves))


def _push_nucleus_out(features: dict, rng: np.random.Generator) -> dict:
    """Features with the nucleus moved out along its orientation until a _PROTRUSION of its width lies
    beyond the cell outline, and the cell moved back by half that, to keep both in frame."""
    nucleus_radius = math.sqrt(features["nc_ratio"])  # / cell radius, of a round nucleus of that area
    beyond = 2 * nucleus_radius * float(rng.uniform(*_PROTRUSION))
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
    image = smear_image(size, rng)
    paint_red_cells(image, replace(frame, radius=frame.radius * red_cell_radius), rng)
    if kind != "blank":
        paint_cell(image, features, frame, rng, nucleus_sd, contained)
    image += raster.pixel_noise(image.shape, rng)
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))
