"""Patch geometry of GLNet (docs/MODEL.md section 4), as pure functions.

A full-resolution image of H x W is tiled by square patches of side p that
overlap; each patch is stored as integer (top, left) pixel positions. Feature
maps of any size h x w are related to a patch through the ratios of the
original code: the patch covers rows round(top/H*h) .. + round(h*p/H) and
columns round(left/W*w) .. + round(w*p/W). Every rounding is numpy's
round-half-to-even on float64, exactly as the original computes it, so that
crops and merges land on the same feature-map cells.

Everything that touches tensors is batched torch on the inputs' device, float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Minimum overlap between neighbouring patches, in pixels (original: 50).
MIN_OVERLAP = 50


def _round(x: float) -> int:
    """numpy round-half-to-even of a float64, as an int (the original's int(np.round(x)))."""
    return int(np.round(x))


def patch_starts(length: int, patch: int) -> list[int]:
    """Start positions of the patches along one side of `length` pixels.

    n is the smallest count covering the side, increased while neighbours
    overlap by less than MIN_OVERLAP; patch i < n-1 starts at round(i*step),
    the last one is flush with the border. length == patch gives one patch.
    """
    if patch <= 0:
        raise ValueError(f"patch size must be positive, got {patch}")
    if length < patch:
        raise ValueError(
            f"side of {length} px is smaller than the patch size {patch}; pad the image first"
        )
    if length == patch:  # the original divides by zero here
        return [0]
    n = 1
    while length > n * patch:
        n += 1
    while patch - (length - patch) / (n - 1) < MIN_OVERLAP:
        n += 1
    step = (length - patch) / (n - 1)
    return [_round(i * step) for i in range(n - 1)] + [length - patch]


@dataclass(frozen=True)
class PatchGrid:
    """The patches of one H x W image; patch k is row k // n_cols, column k % n_cols."""

    height: int
    width: int
    patch: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @classmethod
    def for_size(cls, height: int, width: int, patch: int) -> "PatchGrid":
        rows = tuple(patch_starts(height, patch))
        cols = tuple(patch_starts(width, patch))
        return cls(height, width, patch, rows, cols)

    @property
    def n_rows(self) -> int:
        return len(self.row_starts)

    @property
    def n_cols(self) -> int:
        return len(self.col_starts)

    @cached_property
    def tops(self) -> tuple[int, ...]:
        """Top of each patch, row-major."""
        return tuple(t for t in self.row_starts for _ in self.col_starts)

    @cached_property
    def lefts(self) -> tuple[int, ...]:
        """Left of each patch, row-major."""
        return tuple(l for _ in self.row_starts for l in self.col_starts)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def ratio(self) -> tuple[float, float]:
        """(p/H, p/W): the size of a patch relative to the image."""
        return self.patch / self.height, self.patch / self.width

    def boxes(self, h: int, w: int, index: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of each patch on a feature map of size h x w."""
        rh, rw = self.ratio
        bh, bw = _round(h * rh), _round(w * rw)
        index = range(len(self)) if index is None else index
        return [
            (_round(self.tops[k] / self.height * h), _round(self.lefts[k] / self.width * w), bh, bw)
            for k in index
        ]


def crop_global(fmap: torch.Tensor, grid: PatchGrid, index: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop one image's global map (1, C, h, w) at each patch in `index` and resize
    the crops bilinearly to `size` (the local map's size): (len(index), C, *size).

    Slicing past the border is truncated as Python slicing does in the original.
    """
    h, w = fmap.shape[-2:]
    size = tuple(int(s) for s in size)
    crops = [fmap[0, :, t : t + bh, l : l + bw] for t, l, bh, bw in grid.boxes(h, w, index)]
    if all(c.shape == crops[0].shape for c in crops):
        return F.interpolate(torch.stack(crops), size=size, mode="bilinear", align_corners=False)
    return torch.cat(
        [F.interpolate(c[None], size=size, mode="bilinear", align_corners=False) for c in crops]
    )


def coverage_counts(grid: PatchGrid, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and per column of the image, the count of patch rows / columns covering it
    (float32): the coverage template is their outer product."""
    rows = torch.zeros(grid.height, dtype=torch.float32, device=device)
    cols = torch.zeros(grid.width, dtype=torch.float32, device=device)
    p = grid.patch
    for t in grid.row_starts:
        rows[t : t + p] += 1
    for l in grid.col_starts:
        cols[l : l + p] += 1
    return rows, cols


def coverage_template(grid: PatchGrid, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, H, W) float32 count of the patches covering each pixel."""
    # The grid is a product of row and column starts, so the count is an outer product.
    rows, cols = coverage_counts(grid, device)
    return (rows[:, None] * cols[None, :])[None, None]


def merge_local(
    canvas: torch.Tensor, local_maps: torch.Tensor, grid: PatchGrid, index: Sequence[int]
) -> torch.Tensor:
    """Add patch maps (n, C, hl, wl) into a merge canvas (1, C, h, w) in place.

    Each map is resized bilinearly to its patch's box on the canvas and added
    there (the part past the border, if rounding makes one, is dropped).
    Returns the canvas. Finish with `normalize_merged` once all patches are in.
    """
    h, w = canvas.shape[-2:]
    boxes = grid.boxes(h, w, index)
    bh, bw = boxes[0][2], boxes[0][3]
    resized = F.interpolate(local_maps, size=(bh, bw), mode="bilinear", align_corners=False)
    for k, (t, l, _, _) in enumerate(boxes):
        dst = canvas[0, :, t : t + bh, l : l + bw]
        dst += resized[k, :, : dst.shape[-2], : dst.shape[-1]]
    return canvas


def normalize_merged(canvas: torch.Tensor, template, inplace: bool = False) -> torch.Tensor:
    """Divide a merge canvas (1, C, h, w) by the coverage template resized bilinearly to (h, w)
    (inplace: into the canvas itself, the same values without a second canvas). `template`:
    the (1, 1, H, W) template, or a function giving its resize to a size (see
    `resized_coverage`, which spares the full-resolution template)."""
    size = tuple(canvas.shape[-2:])
    if isinstance(template, torch.Tensor):
        t = F.interpolate(template, size=size, mode="bilinear", align_corners=False)
    else:
        t = template(size)
    return canvas.div_(t) if inplace else canvas / t


def resized_coverage(grid: PatchGrid, sizes, device: torch.device | str | None = None, exact: bool = True):
    """A function size -> the coverage template resized bilinearly to that size, for each
    of `sizes`, made without keeping the (H, W) template alive afterwards.

    exact=True resizes the full template once per size (4 bytes per pixel while it runs):
    the very values `normalize_merged` computes from it. exact=False never makes it: the
    template is an outer product of per-row and per-column counts, and so is its bilinear
    resize, up to float rounding (a few units in the last place; for gigapixel images)."""
    out = {}
    if exact:
        template = coverage_template(grid, device)
        for size in sizes:
            out[tuple(size)] = F.interpolate(template, size=tuple(size), mode="bilinear", align_corners=False)
        del template
    else:
        rows, cols = coverage_counts(grid, device)
        for h, w in sizes:
            r = F.interpolate(rows[None, None, :, None], size=(h, 1), mode="bilinear", align_corners=False)
            c = F.interpolate(cols[None, None, None, :], size=(1, w), mode="bilinear", align_corners=False)
            out[(h, w)] = r * c
    return lambda size: out[tuple(size)]


def merge_all(local_maps: torch.Tensor, grid: PatchGrid, size: Sequence[int], template: torch.Tensor) -> torch.Tensor:
    """Merge the maps of all patches of one image (N, C, hl, wl) into a (1, C, h, w) map."""
    canvas = local_maps.new_zeros((1, local_maps.shape[1], int(size[0]), int(size[1])))
    merge_local(canvas, local_maps, grid, range(len(grid)))
    return normalize_merged(canvas, template)


def add_patch_scores(
    canvas: torch.Tensor, patch_logits: torch.Tensor, grid: PatchGrid, index: Sequence[int], row0: int = 0
) -> torch.Tensor:
    """Reassembly: resize patch logits (n, C, hp, wp) with legacy 'nearest' to p x p and
    add them into the full-resolution score canvas (C, H, W) at the patches' positions.
    row0: the image row of the canvas's first row (a canvas holding a band of rows).
    """
    p = grid.patch
    up = F.interpolate(patch_logits, size=(p, p), mode="nearest").to(canvas.dtype)
    for k, i in enumerate(index):
        # Positions go through the ratios as in the original's patch2global.
        t = _round(grid.tops[i] / grid.height * grid.height)
        l = _round(grid.lefts[i] / grid.width * grid.width)
        canvas[:, t - row0 : t - row0 + p, l : l + p] += up[k]
    return canvas
