"""A deterministic detector of coloured shapes, for judging generated images and clips.

Classical image processing only, no learned model, so a score means the same thing on every machine:

1. every pixel is assigned the nearest colour of ``COLORS`` or the background (Euclidean in RGB) and
   kept when it lies within ``tolerance`` of it ("pure" pixels: anti-aliased edges, blends and
   noise fall out);
2. per colour, connected components (``scipy.ndimage.label``, 8-connectivity), holes filled, those
   smaller than ``min_area`` (a fraction of the image) dropped;
3. the shape from the fill ratio of the component in its bounding box: a square fills ~1, a circle
   ~π/4, an upward triangle ~1/2;
4. the position from the centroid, on the 3×3 grid of ``POSITIONS`` (``cell_of``).

``motion_direction`` follows the centroid of the largest component through a clip's frames and
returns the dominant direction of its displacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
from scipy import ndimage

from anygen.data.shapes import BACKGROUND, COLORS, DIRECTIONS, cell_of

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES] + [BACKGROUND], dtype=np.float32)  # (9, 3); last: background
_EIGHT = np.ones((3, 3), dtype=bool)
SQUARE_FILL = 0.88  # fill ratio at or above: square
CIRCLE_FILL = 0.64  # at or above (and below SQUARE_FILL): circle; below: triangle
TRIANGLE_DROP = 0.56  # centroid this low in the bounding box (0 top, 1 bottom), or lower: triangle


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        color / shape / position: as in ``anygen.data.shapes`` (``position`` is a grid cell).
        center: centroid ``(x, y)`` as fractions of the image side.
        area: pixels of the component, as a fraction of the image.
        fill: the component's share of its bounding box.
    """

    color: str
    shape: str
    position: str
    center: tuple[float, float]
    area: float
    fill: float

    @property
    def key(self) -> tuple[str, str, str]:
        """``(color, shape, position)``, comparable with ``SceneObject.key``."""
        return (self.color, self.shape, self.position)


def to_array(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as a float32 ``(H, W, 3)`` array in ``0..255``."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {array.shape}")
    return array


def classify_pixels(image: PIL.Image.Image | np.ndarray, tolerance: float = 60.0) -> np.ndarray:
    """``(H, W)`` int: index into ``COLORS`` of every pure pixel, ``-1`` for background or impure pixels."""
    rgb = to_array(image)
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 9)
    nearest = dist.argmin(-1)
    label = np.where(dist.min(-1) <= tolerance, nearest, -1)
    label[label == len(_NAMES)] = -1  # background
    return label


def shape_of_fill(fill: float, drop: float = 0.5) -> str:
    """``"square"``, ``"circle"`` or ``"triangle"`` from a component's fill ratio of its bounding box.

    ``drop`` is the centroid's height in the box (0 top, 1 bottom): an upward triangle's sits at
    about 0.6, a circle's or a square's at 0.5, which separates small, blurred triangles from circles
    when their fill ratios overlap.
    """
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_FILL and drop < TRIANGLE_DROP else "triangle"


def detect_objects(image: PIL.Image.Image | np.ndarray, *, tolerance: float = 60.0, min_area: float = 0.01
                   ) -> list[Detection]:
    """The coloured shapes of an image, largest first.

    Args:
        image: RGB, any size (``PIL.Image`` or ``(H, W, 3)`` array in 0..255).
        tolerance: largest RGB distance from a palette colour for a pixel to count as that colour.
        min_area: smallest component kept, as a fraction of the image (a standard shape covers ~4 %).

    Returns:
        One ``Detection`` per component, sorted by decreasing area.
    """
    label = classify_pixels(image, tolerance)
    height, width = label.shape
    found: list[Detection] = []
    for index, name in enumerate(_NAMES):
        mask = label == index
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=_EIGHT)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            part = ndimage.binary_fill_holes(components[box] == k)
            area = int(part.sum())
            if area < min_area * height * width:
                continue
            ys, xs = np.nonzero(part)
            cy = (ys.mean() + box[0].start + 0.5) / height
            cx = (xs.mean() + box[1].start + 0.5) / width
            fill = area / float(part.shape[0] * part.shape[1])
            drop = (ys.mean() + 0.5) / part.shape[0]
            found.append(Detection(name, shape_of_fill(fill, drop), cell_of(cx, cy), (float(cx), float(cy)),
                                   area / float(height * width), float(fill)))
    return sorted(found, key=lambda d: -d.area)


def motion_direction(frames: Sequence[PIL.Image.Image | np.ndarray], *, min_shift: float = 0.15,
                     tolerance: float = 60.0, min_area: float = 0.01) -> str | None:
    """The direction (one of ``DIRECTIONS``) a clip's main object moves in, or ``None``.

    The largest object of the first frame gives the colour to follow; its centroid is tracked frame
    by frame (the largest component of that colour) and the displacement from the first to the last
    frame where it is found decides: the dominant axis and its sign. ``None`` when no object is
    found in two frames or it moves less than ``min_shift`` of the side.
    """
    track: list[tuple[float, float]] = []
    color: str | None = None
    for frame in frames:
        found = detect_objects(frame, tolerance=tolerance, min_area=min_area)
        if color is None and found:
            color = found[0].color
        match = [d for d in found if d.color == color]
        if match:
            track.append(match[0].center)
    if len(track) < 2:
        return None
    dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
    if max(abs(dx), abs(dy)) < min_shift:
        return None
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(name for name, d in DIRECTIONS.items() if d == step)


__all__ = ["CIRCLE_FILL", "SQUARE_FILL", "TRIANGLE_DROP", "Detection", "classify_pixels", "detect_objects",
           "motion_direction", "shape_of_fill", "to_array"]
