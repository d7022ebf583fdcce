"""Class tables: names, colours, the ignore label and the classes of the reported mIoU
(GLNET_SPEC.md section 7). `DEEPGLOBE` is the land-cover table; `class_table(n_class)` gives
the table a run with --n_class uses. numpy only (no torch), so the data tools stay light.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

IGNORE_LABEL = 255  # label value skipped by the loss and the metrics (padding, no label)


def miou_over(iou: Sequence[float], classes: Sequence[int]) -> float:
    """Mean of iou[c] over `classes`, a NaN (class absent from labels and predictions)
    counted as 0 (section 7); NaN when `classes` is empty (a 1-class table)."""
    values = [iou[c] for c in classes]
    if not values:
        return math.nan
    return sum(0.0 if math.isnan(x) else x for x in values) / len(values)


def _code(colors: np.ndarray) -> np.ndarray:
    """3-bit code of thresholded colours: red*4 + green*2 + blue (each bit = channel >= 128)."""
    bits = (np.asarray(colors)[..., :3] >= 128).astype(np.uint8)
    return (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]


@dataclass(frozen=True)
class ClassTable:
    """The classes of a data set. `colors`: one RGB colour per class (any (n, 3) sequence;
    stored as a tuple of int triples). `miou_classes`: the classes averaged in the reported
    mIoU; None (the default) means 1..n-1, class 0 ('unknown' in DeepGlobe) left out."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_LABEL
    miou_classes: tuple[int, ...] | None = None
    # derived in __post_init__: (n, 3) uint8 palette; thresholded code -> class; off-palette codes
    _palette: np.ndarray = field(init=False, repr=False, compare=False)
    _code_to_class: np.ndarray | None = field(init=False, repr=False, compare=False)
    _off_codes: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: fields are set once, here
        names = tuple(str(n) for n in self.names)
        palette = np.asarray(self.colors)
        if not names:
            raise ValueError(f"class table {self.name!r} has no classes")
        if palette.shape != (len(names), 3) or palette.min() < 0 or palette.max() > 255:
            raise ValueError(f"class table {self.name!r}: need one RGB colour (0..255) per class, "
                             f"got an array of shape {palette.shape} for {len(names)} names")
        if 0 <= self.ignore_index < len(names):
            raise ValueError(f"class table {self.name!r}: ignore_index {self.ignore_index} is a class")
        palette = palette.astype(np.uint8)
        palette.flags.writeable = False
        miou = tuple(range(1, len(names))) if self.miou_classes is None else tuple(int(c) for c in self.miou_classes)
        if not all(0 <= c < len(names) for c in miou):
            raise ValueError(f"class table {self.name!r}: miou_classes {miou} must be classes of the table")
        set_(self, "names", names)
        set_(self, "colors", tuple(tuple(int(v) for v in c) for c in palette))
        set_(self, "miou_classes", miou)
        set_(self, "_palette", palette)
        # decode_rgb's lookup: only for palettes of distinct pure colours (channels 0 or 255)
        code_to_class = off_codes = None
        codes = _code(palette)
        if np.isin(palette, (0, 255)).all() and len(set(codes.tolist())) == len(names):
            code_to_class = np.zeros(8, dtype=np.uint8)  # codes of no class -> 0
            code_to_class[codes] = np.arange(len(names), dtype=np.uint8)
            off_codes = np.setdiff1d(np.arange(8), codes)
        set_(self, "_code_to_class", code_to_class)
        set_(self, "_off_codes", off_codes)

    def __reduce__(self):
        # rebuilt from the fields (e.g. in loader workers): derived arrays stay read-only
        return ClassTable, (self.name, self.names, self.colors, self.ignore_index, self.miou_classes)

    @property
    def n_class(self) -> int:
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """(n_class, 3) uint8 colours, read-only."""
        return self._palette

    @property
    def row_names(self) -> tuple[str, ...]:
        """'<index> <name>' per class, for the rows of a table."""
        return tuple(f"{i} {n}" for i, n in enumerate(self.names))

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Class-index mask (H, W) -> colour image (H, W, 3) uint8. Indices outside the
        palette (e.g. 255 = ignore) are drawn black."""
        mask = np.asarray(mask)
        out = np.zeros(mask.shape + (3,), dtype=np.uint8)
        valid = mask < self.n_class
        out[valid] = self._palette[mask[valid]]
        return out

    def decode_rgb(self, mask_rgb: np.ndarray) -> tuple[np.ndarray, int]:
        """RGB mask (H, W, 3) -> (class indices (H, W) uint8, off-palette pixel count).

        Each channel is thresholded at 128 (>= 128 -> 255, else 0, section 7) and the resulting
        colour looked up in the palette. A thresholded colour that is no class colour (for
        DeepGlobe only red (255, 0, 0) is possible) becomes class 0 and is counted in the
        second return value. Extra channels (alpha) are ignored. Needs a palette of distinct
        colours with channels 0 or 255 (DeepGlobe's)."""
        if self._code_to_class is None:
            raise ValueError(f"class table {self.name!r}: RGB masks can only be decoded with a palette "
                             "of distinct colours whose channels are 0 or 255")
        mask = np.asarray(mask_rgb)
        if mask.ndim != 3 or mask.shape[2] < 3:
            raise ValueError(f"expected an RGB mask of shape (H, W, 3), got {mask.shape}")
        rgb = mask[..., :3]
        if rgb.dtype == np.uint8:
            bits = rgb >> 7  # 1 where the channel is >= 128, without a comparison pass
        else:
            bits = (rgb >= 128).astype(np.uint8)
        code = (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]
        classes = self._code_to_class[code]
        off_palette = sum(int(np.count_nonzero(code == c)) for c in self._off_codes)
        return classes, off_palette

    def miou(self, iou: Sequence[float]) -> float:
        """The reported mIoU of per-class IoUs: mean over `miou_classes`, NaN counted as 0."""
        return miou_over(iou, self.miou_classes)


DEEPGLOBE = ClassTable(
    name="DeepGlobe land cover",
    names=("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"),
    # RGB colour of each class index, as in the DeepGlobe masks
    colors=(
        (0, 0, 0),
        (0, 255, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 255),
    ),
)


def _generic_colors(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours: DeepGlobe's first (so classes 0..6 look as they always did), then
    the PASCAL VOC bit-interleaved palette, skipping colours already taken."""
    colors = list(DEEPGLOBE.colors[:n])
    taken, i = set(colors), 0
    while len(colors) < n:
        i += 1
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        if (r, g, b) not in taken:
            taken.add((r, g, b))
            colors.append((r, g, b))
    return colors


def class_table(n_class: int) -> ClassTable:
    """The table of a run with `n_class` classes: DEEPGLOBE for 7, else generic classes
    'class i' with distinct colours and the mIoU over classes 1..n-1."""
    if n_class == DEEPGLOBE.n_class:
        return DEEPGLOBE
    if not 1 <= n_class <= IGNORE_LABEL:
        raise ValueError(f"n_class must be in 1..{IGNORE_LABEL} (labels are 8-bit, {IGNORE_LABEL} = ignore), got {n_class}")
    return ClassTable(name=f"{n_class} classes", names=tuple(f"class {i}" for i in range(n_class)),
                      colors=tuple(_generic_colors(n_class)))

