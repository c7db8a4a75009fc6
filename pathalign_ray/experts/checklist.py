"""The clinical checklist: the six criteria a cell image is judged by, and each cell type's ranges.

A pathologist judges an image against its declared cell type by six criteria (`CRITERIA`): cell
size, nucleus shape, chromatin, cytoplasm colour, granules, inclusions. Each type's clinical ranges
(`SPECS`, bone-marrow May-Grünwald-Giemsa cytology):

=========================== ========= ============== ========= ========= ========= ====================== ==============
type                        size      nucleus        N:C       chromatin cytoplasm granules (density)     inclusions (p)
=========================== ========= ============== ========= ========= ========= ====================== ==============
myeloblast                  0.66-0.80 round, oval    0.62-0.78 0.00-0.20 0.00-0.15 none                   auer_rod 0.10
promyelocyte                0.78-0.92 round, oval    0.40-0.55 0.15-0.35 0.10-0.28 primary 0.12-0.25      -
myelocyte                   0.66-0.80 round, oval    0.28-0.40 0.35-0.55 0.42-0.56 secondary 0.15-0.30    -
metamyelocyte               0.62-0.74 indented       0.28-0.40 0.50-0.70 0.55-0.70 secondary 0.15-0.30    -
band_neutrophil             0.60-0.72 band           0.22-0.32 0.60-0.78 0.62-0.76 secondary 0.12-0.25    -
segmented_neutrophil        0.60-0.72 lobed 3-5      0.24-0.32 0.70-0.85 0.65-0.80 secondary 0.12-0.25    -
lymphocyte                  0.46-0.56 round          0.68-0.82 0.70-0.85 0.00-0.20 none                   -
orthochromatic_erythroblast 0.44-0.54 round          0.14-0.26 0.92-1.00 0.88-1.00 none                   -
eosinophil                  0.66-0.78 lobed 2        0.24-0.32 0.65-0.80 0.55-0.70 eosinophilic 0.45-0.65 -
monocyte                    0.78-0.90 indented, oval 0.36-0.50 0.30-0.50 0.25-0.40 none                   vacuoles 0.35
=========================== ========= ============== ========= ========= ========= ====================== ==============

size: cell diameter / frame width. N:C: nucleus area / cell area. chromatin: 0 fine and open,
~0.8 coarse and clumped, >= 0.9 pyknotic (dark and homogeneous). cytoplasm: a tone from 0 (deep
basophilic blue) through grey-blue (0.3), lilac (0.55) and pink (0.75) to orange-pink (1.0,
haemoglobinised), mapped to RGB by `cytoplasm_rgb()`. granules: fraction of the cytoplasm covered.

Chromatin and cytoplasm tone are stated on the stain's palette (the colours below): the generator
(`data/procedural.py`) paints with it and the simulated pathologist (`pathologist.py`) reads it back.
The generator draws each image's features from these ranges, the pathologist judges against them,
and the feedback store, the reward model and the evaluation name failures by `CRITERIA`.

Pure Python: no numpy, no Ray.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

CRITERIA: tuple[str, ...] = ("cell_size", "nucleus_shape", "chromatin", "cytoplasm_colour", "granules", "inclusions")

CELL_TYPES: tuple[str, ...] = (
    "myeloblast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "band_neutrophil",
    "segmented_neutrophil",
    "lymphocyte",
    "orthochromatic_erythroblast",
    "eosinophil",
    "monocyte",
)
NUCLEUS_SHAPES = ("round", "oval", "indented", "band", "lobed")
GRANULE_KINDS = ("none", "primary", "secondary", "eosinophilic")
INCLUSION_KINDS = ("auer_rod", "vacuoles")


@dataclass(frozen=True)
class CellTypeSpec:
    """Clinical ranges of one cell type. Every (lo, hi) range is drawn uniformly, ends included."""

    cell_size: tuple[float, float]  # cell diameter / frame width
    nucleus_shapes: tuple[str, ...]  # one drawn uniformly
    nc_ratio: tuple[float, float]  # nucleus area / cell area
    chromatin: tuple[float, float]  # 0 fine/open, ~0.8 clumped, >= 0.9 pyknotic
    cytoplasm_tone: tuple[float, float]  # 0 deep basophilic blue .. 1 orange-pink, see cytoplasm_rgb()
    nucleus_offset: tuple[float, float] = (0.0, 0.1)  # nucleus centre off the cell centre / cell radius
    lobes: tuple[int, int] = (1, 1)  # lobe count range; above 1 only for "lobed"
    granules: str = "none"  # one of GRANULE_KINDS
    granule_density: tuple[float, float] = (0.0, 0.0)  # fraction of the cytoplasm covered by granules
    inclusions: tuple[tuple[str, float], ...] = ()  # (kind, probability per cell)

    def __post_init__(self) -> None:
        if not set(self.nucleus_shapes) <= set(NUCLEUS_SHAPES):
            raise ValueError(f"unknown nucleus shape in {self.nucleus_shapes}")
        if (self.lobes[1] > 1) != ("lobed" in self.nucleus_shapes):
            raise ValueError("lobes > 1 go with the 'lobed' shape and only with it")
        if self.granules not in GRANULE_KINDS or not {k for k, _ in self.inclusions} <= set(INCLUSION_KINDS):
            raise ValueError(f"unknown granule or inclusion kind: {self.granules}, {self.inclusions}")


SPECS: dict[str, CellTypeSpec] = {
    "myeloblast": CellTypeSpec(
        cell_size=(0.66, 0.80),  # 12-20 um
        nucleus_shapes=("round", "oval"),
        nc_ratio=(0.62, 0.78),  # high N:C, a thin rim of cytoplasm
        chromatin=(0.0, 0.2),  # fine, open chromatin with nucleoli
        cytoplasm_tone=(0.0, 0.15),  # deep basophilic blue (free ribosomes)
        inclusions=(("auer_rod", 0.1),),  # Auer rods: fused azurophilic granules, seen in AML blasts
    ),
    "promyelocyte": CellTypeSpec(
        cell_size=(0.78, 0.92),  # the largest granulocyte precursor, 15-25 um
        nucleus_shapes=("round", "oval"),
        nc_ratio=(0.40, 0.55),
        chromatin=(0.15, 0.35),  # slightly coarser than the blast, nucleoli fading
        cytoplasm_tone=(0.10, 0.28),  # basophilic
        nucleus_offset=(0.08, 0.22),  # eccentric nucleus
        granules="primary",
        granule_density=(0.12, 0.25),  # coarse azurophilic (primary) granules
    ),
    "myelocyte": CellTypeSpec(
        cell_size=(0.66, 0.80),  # 12-18 um
        nucleus_shapes=("round", "oval"),
        nc_ratio=(0.28, 0.40),  # low N:C, abundant cytoplasm
        chromatin=(0.35, 0.55),  # condensing, no nucleoli
        cytoplasm_tone=(0.42, 0.56),  # lilac: basophilia fading, specific granules appear
        nucleus_offset=(0.15, 0.30),  # eccentric
        granules="secondary",
        granule_density=(0.15, 0.30),  # fine specific (secondary) granules
    ),
    "metamyelocyte": CellTypeSpec(
        cell_size=(0.62, 0.74),  # 10-15 um
        nucleus_shapes=("indented",),  # kidney-shaped, indentation < half the nuclear width
        nc_ratio=(0.28, 0.40),
        chromatin=(0.50, 0.70),
        cytoplasm_tone=(0.55, 0.70),
        granules="secondary",
        granule_density=(0.15, 0.30),
    ),
    "band_neutrophil": CellTypeSpec(
        cell_size=(0.60, 0.72),  # 10-14 um
        nucleus_shapes=("band",),  # C/U-shaped band of even width, no segmentation
        nc_ratio=(0.22, 0.32),
        chromatin=(0.60, 0.78),
        cytoplasm_tone=(0.62, 0.76),
        granules="secondary",
        granule_density=(0.12, 0.25),
    ),
    "segmented_neutrophil": CellTypeSpec(
        cell_size=(0.60, 0.72),  # 10-14 um
        nucleus_shapes=("lobed",),
        lobes=(3, 5),  # 3-5 lobes joined by thin filaments (> 5 is hypersegmentation)
        nc_ratio=(0.24, 0.32),
        nucleus_offset=(0.0, 0.05),  # the lobes already reach towards the membrane
        chromatin=(0.70, 0.85),  # coarse, clumped
        cytoplasm_tone=(0.65, 0.80),  # pale pink-lilac
        granules="secondary",
        granule_density=(0.12, 0.25),
    ),
    "lymphocyte": CellTypeSpec(
        cell_size=(0.46, 0.56),  # small, 7-10 um: about a red cell
        nucleus_shapes=("round",),
        nc_ratio=(0.68, 0.82),  # nucleus nearly fills the cell
        chromatin=(0.70, 0.85),  # dense, clumped
        cytoplasm_tone=(0.0, 0.20),  # scant sky-blue to deep blue rim
        nucleus_offset=(0.0, 0.06),
    ),
    "orthochromatic_erythroblast": CellTypeSpec(
        cell_size=(0.44, 0.54),  # 8-12 um
        nucleus_shapes=("round",),
        nc_ratio=(0.14, 0.26),  # small nucleus about to be extruded
        chromatin=(0.92, 1.0),  # pyknotic: dark and homogeneous
        cytoplasm_tone=(0.88, 1.0),  # orange-pink: haemoglobinised, like a red cell
        nucleus_offset=(0.0, 0.3),
    ),
    "eosinophil": CellTypeSpec(
        cell_size=(0.66, 0.78),  # 12-17 um
        nucleus_shapes=("lobed",),
        lobes=(2, 2),  # bilobed, "spectacles"
        nc_ratio=(0.24, 0.32),
        nucleus_offset=(0.0, 0.05),
        chromatin=(0.65, 0.80),
        cytoplasm_tone=(0.55, 0.70),
        granules="eosinophilic",
        granule_density=(0.45, 0.65),  # packed with large orange-red granules
    ),
    "monocyte": CellTypeSpec(
        cell_size=(0.78, 0.90),  # the largest normal blood cell, 15-22 um
        nucleus_shapes=("indented", "oval"),  # folded, kidney or horseshoe
        nc_ratio=(0.36, 0.50),
        chromatin=(0.30, 0.50),  # lacy, finer than a lymphocyte's
        cytoplasm_tone=(0.25, 0.40),  # grey-blue, "ground glass"
        inclusions=(("vacuoles", 0.35),),  # cytoplasmic vacuoles are common in monocytes
    ),
}


def spec(cell_type: str, what: str = "cell type") -> CellTypeSpec:
    """SPECS[cell_type]; an unknown name raises ValueError naming it as `what`, with the known types."""
    if cell_type not in SPECS:
        raise ValueError(f"unknown {what} {cell_type!r}; known: {', '.join(CELL_TYPES)}")
    return SPECS[cell_type]


# ---------------------------------------------------------------- the stain's palette (RGB)

SMEAR_RGB = (236, 226, 228)  # the pale pinkish-grey smear around the cells: the stain's white point
NUCLEUS_OPEN_RGB = (105, 62, 150)  # chromatin 0: fine, open, reddish purple
NUCLEUS_DENSE_RGB = (50, 26, 80)  # chromatin 1: condensed
CYTOPLASM_TONE_RGB = (  # (tone, RGB) knots of the cytoplasm palette, interpolated linearly
    (0.0, (115, 145, 215)),  # deep basophilic blue
    (0.3, (150, 160, 195)),  # grey-blue
    (0.55, (190, 165, 205)),  # lilac
    (0.75, (215, 175, 200)),  # pink-lilac
    (1.0, (230, 150, 135)),  # orange-pink
)


def cytoplasm_rgb(tone: float) -> list[int]:
    """Cytoplasm colour of a tone in [0, 1] (0 deep basophilic blue .. 1 orange-pink), as 3 ints."""
    tone = min(max(tone, 0.0), 1.0)
    knots = CYTOPLASM_TONE_RGB
    (lo, lo_rgb), (hi, hi_rgb) = next(pair for pair in itertools.pairwise(knots) if tone <= pair[1][0])
    weight = (tone - lo) / (hi - lo)
    return [int(round(a + weight * (b - a))) for a, b in zip(lo_rgb, hi_rgb)]
