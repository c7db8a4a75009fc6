"""Soft-edged drawing on channel-first float images: the primitives the procedural cells are painted with.

Images are built channel-first, (3, H, W) float32, so per-pixel maps broadcast over channels
cheaply; distances are in pixels. Shapes are given by signed distances (px, negative inside) and
turned into anti-aliased coverage maps in [0, 1], which `paint` alpha-composites. Scalars enter as
Python floats or float32 (a float64 numpy scalar would promote whole arrays to float64), and np.hypot
is avoided (~3x slower than `norm`). Pure numpy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def rgb(red: float, green: float, blue: float) -> np.ndarray:
    """A colour (RGB) shaped (3, 1, 1), to broadcast over channel-first images."""
    return np.array([red, green, blue], np.float32).reshape(3, 1, 1)


def norm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise length of (x, y)."""
    return np.sqrt(x * x + y * y)


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def smooth_noise(shape: tuple[int, int], size: int, nodes: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean noise of the given shape, blobs ~size/nodes px wide, mostly within [-1, 1].

    Random values on a coarse grid over a size x size frame, interpolated by two small matrix
    products (far cheaper than filtering a full-size noise image); the top-left shape of it.
    """
    smoothing = _smoothing_matrix(size, nodes)
    return smoothing[: shape[0]] @ (rng.random((nodes, nodes), dtype=np.float32) - 0.5) @ smoothing[: shape[1]].T


@lru_cache(maxsize=32)
def disc_stamp(radius_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) and anti-aliased coverage of a disc; at least the centre pixel."""
    reach = int(np.ceil(radius_px))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    weight = np.clip(max(radius_px, 0.5) + 0.5 - np.sqrt(dy**2 + dx**2), 0.0, 1.0).astype(np.float32)
    keep = weight > 0.05
    return dy[keep], dx[keep], weight[keep]


def stamp_discs(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, radius_px: float) -> np.ndarray:
    """float32 coverage map of the given shape, of discs of radius_px centred at the pixels (ys, xs)."""
    dy, dx, weight = disc_stamp(round(radius_px, 2))
    rows = (ys.astype(np.intp)[:, None] + dy).ravel()
    cols = (xs.astype(np.intp)[:, None] + dx).ravel()
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    mask = np.zeros(shape, np.float32)
    mask[rows[keep], cols[keep]] = np.broadcast_to(weight, (len(ys), len(weight))).ravel()[keep]
    return mask


def coverage(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """Soft-edged coverage in [0, 1] of a shape from its signed distance (px, negative inside)."""
    return np.clip(0.5 - signed_distance / softness, 0.0, 1.0)


def paint(image: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-composite colour ((3, 1, 1) or (3, H, W)) with coverage (H, W) over image (3, H, W) in place."""
    image += coverage * (colour - image)


def stained(colour: np.ndarray, stain: float) -> np.ndarray:
    """Scale a stain colour's optical density (approximated as 255 - value) by stain."""
    return 255.0 - (255.0 - colour) * stain


def arc_sd(
    x: np.ndarray, y: np.ndarray, radius: float | np.ndarray, half_angle: float | np.ndarray, half_width: float
) -> np.ndarray:
    """Signed distance to a thick circular arc (round caps) centred at the origin, symmetric about +x.

    radius and half_angle may be arrays broadcasting against x, for several arcs at once.
    """
    radius, half_angle, half_width = (np.float32(a) for a in (radius, half_angle, half_width))
    r = norm(x, y)
    within_span = x >= r * np.cos(half_angle)
    end_x, end_y = radius * np.cos(half_angle), radius * np.sin(half_angle)
    to_end = norm(x - end_x, np.abs(y) - end_y)
    return np.where(within_span, np.abs(r - radius), to_end) - half_width


def rotate(x: np.ndarray, y: np.ndarray, angle: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x, y) seen in axes turned by angle (radians)."""
    angle = np.float32(angle)
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, c * y - s * x


def pixel_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise on 8 levels in [-3.5, 3.5], from random bytes (cheaper than drawing floats)."""
    levels = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8) & 7
    return (levels - np.float32(3.5)).reshape(shape)
