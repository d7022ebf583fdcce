"""The foreground box of the coarse-to-fine GLNet (docs/MODEL.md section 9), as pure functions.

A box is (x0, y0, x1, y1) in pixels of the full image, x1 and y1 exclusive.
The paper asks for a box around the foreground "relaxed so that the region's
foreground:background ratio is about 1" and gives no formula; ours is:

1. the tight box of the foreground's A pixels;
2. if its area is below 2A (foreground over half of it), width and height grow
   by one factor about the box's centre until the area reaches 2A, rounding
   outward; a tight box of 2A or more keeps its size;
3. a side shorter than min(size_p, image side) is widened to exactly that
   about its centre (start rounded down), so that the fine stage has at least
   one whole patch; this applies to every box, grown or not;
4. the box is shifted inside the image; only a side longer than the image is
   clipped to it.

No foreground gives no box (None).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Box(NamedTuple):
    """Pixels [x0, x1) x [y0, y1) of an image."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height


def tight_box(foreground: torch.Tensor) -> tuple[Box | None, int]:
    """The smallest box holding every True pixel of a (H, W) mask, and their count A."""
    if foreground.dim() != 2:
        raise ValueError(f"a foreground mask is (H, W), got shape {tuple(foreground.shape)}")
    area = int(foreground.sum())
    if area == 0:
        return None, 0
    rows = torch.nonzero(foreground.any(dim=1)).flatten()
    cols = torch.nonzero(foreground.any(dim=0)).flatten()
    return Box(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1), area


def _grown(lo: int, hi: int, length: float) -> tuple[int, int]:
    """[lo, hi) grown about its centre to at least `length`, each end rounded outward."""
    centre = (lo + hi) / 2
    return math.floor(centre - length / 2), math.ceil(centre + length / 2)


def _at_least(lo: int, hi: int, length: int) -> tuple[int, int]:
    """[lo, hi) widened about its centre to exactly `length` when shorter (start rounded down)."""
    if hi - lo >= length:
        return lo, hi
    start = math.floor((lo + hi - length) / 2)
    return start, start + length


def _inside(lo: int, hi: int, side: int) -> tuple[int, int]:
    """[lo, hi) shifted inside [0, side); clipped to it only when longer than the side."""
    if hi - lo >= side:
        return 0, side
    if lo < 0:
        return 0, hi - lo
    if hi > side:
        return lo - (hi - side), side
    return lo, hi


def relax_box(tight: Box, area: int, image_size: tuple[int, int], size_p: int) -> Box:
    """Steps 2-4 of the rule on a tight box of `area` foreground pixels.

    image_size: (width, height) of the image; size_p: the fine stage's patch side."""
    width, height = image_size
    x0, y0, x1, y1 = tight
    if tight.area < 2 * area:
        factor = math.sqrt(2 * area / tight.area)
        x0, x1 = _grown(x0, x1, tight.width * factor)
        y0, y1 = _grown(y0, y1, tight.height * factor)
        # float rounding may leave the product a hair short of 2A: one more pixel per side
        while (x1 - x0) * (y1 - y0) < 2 * area:
            x0, x1, y0, y1 = x0 - 1, x1 + 1, y0 - 1, y1 + 1
    x0, x1 = _at_least(x0, x1, min(size_p, width))
    y0, y1 = _at_least(y0, y1, min(size_p, height))
    x0, x1 = _inside(x0, x1, width)
    y0, y1 = _inside(y0, y1, height)
    return Box(x0, y0, x1, y1)


def foreground_box(foreground: torch.Tensor, size_p: int) -> tuple[Box | None, int]:
    """The relaxed box of a (H, W) foreground mask and the foreground's pixel count A;
    (None, 0) when the mask is empty."""
    tight, area = tight_box(foreground)
    if tight is None:
        return None, 0
    height, width = foreground.shape
    return relax_box(tight, area, (int(width), int(height)), size_p), area
