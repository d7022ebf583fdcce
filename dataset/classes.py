"""Class tables: names, colours, the raw mask values of each class, the ignored values and the
classes of the reported mIoU (docs/MODEL.md section 7). `DEEPGLOBE`, `INRIA`, `ISIC` and
`URUR` are the presets' tables; `class_table(n_class)` gives the table a run with only --n_class uses;
`load_class_table(path)` reads a user's table from JSON or CSV (README "Your own data").
numpy only (no torch), so the data tools stay light.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from utils.errors import UserError
from utils.labels import IGNORE_LABEL

MAX_RAW_VALUE = 65535  # raw mask values may be 16-bit


def _code(colors: np.ndarray) -> np.ndarray:
    """3-bit code of thresholded colours: red*4 + green*2 + blue (each bit = channel >= 128)."""
    bits = (np.asarray(colors)[..., :3] >= 128).astype(np.uint8)
    return (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]


def _ranges(values: Sequence[int]) -> str:
    """'0..6, 255' for [0, 1, 2, 3, 4, 5, 6, 255]."""
    vs, parts, i = sorted(set(values)), [], 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        parts.append(str(vs[i]) if i == j else f"{vs[i]}..{vs[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


@dataclass(frozen=True)
class ClassTable:
    """The classes of a data set. `colors`: one RGB colour per class (any (n, 3) sequence;
    stored as a tuple of int triples). `miou_classes`: the classes averaged in the reported
    mIoU; None (the default) means 1..n-1, class 0 ('unknown' in DeepGlobe) left out.
    `other_mious`: further means reported beside it, as (key, classes) pairs; the key
    starts with 'miou_' and names the mean in the metrics (URUR: 'miou_all', classes 0..7).

    Mask decoding (`decode_values`, `decode_colors`): `values[c]` are the raw mask values
    that mean class c (None: each class its own index); `ignore_values` the raw values that
    mean 'no label' (None: `ignore_index` unless a class uses it); `ignore_colors` the same
    for RGB masks. `rgb_masks`: 'exact' (an RGB mask's colours must be class or ignore
    colours exactly) or 'prepare' (the loader refuses RGB masks: they are converted by a
    preparation script, DeepGlobe's, with `decode_rgb`'s thresholding). `refuse_0_255`: with
    255 ignored, a single-channel mask of only 0 and 255 is most likely a binary mask whose
    foreground would silently become 'ignore'; the loader refuses it (False: 255 really is
    'ignore' in such masks, e.g. a table file that lists it in ignore_values)."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_LABEL
    miou_classes: tuple[int, ...] | None = None
    values: tuple[tuple[int, ...], ...] | None = None
    ignore_values: tuple[int, ...] | None = None
    ignore_colors: tuple[tuple[int, int, int], ...] = ()
    rgb_masks: str = "exact"
    refuse_0_255: bool = True
    other_mious: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # derived in __post_init__: (n, 3) uint8 palette; thresholded code -> class; off-palette codes
    _palette: np.ndarray = field(init=False, repr=False, compare=False)
    _code_to_class: np.ndarray | None = field(init=False, repr=False, compare=False)
    _off_codes: np.ndarray | None = field(init=False, repr=False, compare=False)
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Checks every field and fills the derived ones: one straight list of checks of a
        frozen dataclass, longer than 60 lines because each field has its own."""
        set_ = object.__setattr__  # frozen: fields are set once, here
        names = tuple(str(n) for n in self.names)
        palette = np.asarray(self.colors)
        if not names:
            raise ValueError(f"class table {self.name!r} has no classes")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"class table {self.name!r}: class name {dup!r} appears twice")
        if palette.shape != (len(names), 3) or palette.min() < 0 or palette.max() > 255:
            raise ValueError(f"class table {self.name!r}: need one RGB colour (0..255) per class, "
                             f"got an array of shape {palette.shape} for {len(names)} names")
        if 0 <= self.ignore_index < len(names):
            raise ValueError(f"class table {self.name!r}: ignore_index {self.ignore_index} is a class")
        if self.rgb_masks not in ("exact", "prepare"):
            raise ValueError(f"class table {self.name!r}: rgb_masks must be 'exact' or 'prepare', got {self.rgb_masks!r}")
        palette = palette.astype(np.uint8)
        palette.flags.writeable = False
        miou = tuple(range(1, len(names))) if self.miou_classes is None else tuple(int(c) for c in self.miou_classes)
        if not all(0 <= c < len(names) for c in miou):
            raise ValueError(f"class table {self.name!r}: miou_classes {miou} must be classes of the table")
        others = tuple((str(k), tuple(int(c) for c in cs)) for k, cs in self.other_mious)
        for key, cs in others:
            if not key.startswith("miou_") or not cs or not all(0 <= c < len(names) for c in cs):
                raise ValueError(f"class table {self.name!r}: other_mious needs keys 'miou_<name>' and classes of "
                                 f"the table, got {key!r}: {cs}")
        values = tuple((i,) for i in range(len(names))) if self.values is None else \
            tuple(tuple(int(v) for v in vs) for vs in self.values)
        if len(values) != len(names) or not all(values):
            raise ValueError(f"class table {self.name!r}: need at least one mask value per class")
        used = [v for vs in values for v in vs]
        if self.ignore_values is None:
            ignore = () if self.ignore_index in used else (int(self.ignore_index),)
        else:
            ignore = tuple(int(v) for v in self.ignore_values)
        seen: set[int] = set()
        for v in used + list(ignore):
            if not 0 <= v <= MAX_RAW_VALUE:
                raise ValueError(f"class table {self.name!r}: mask value {v} is not in 0..{MAX_RAW_VALUE}")
            if v in seen:
                raise ValueError(f"class table {self.name!r}: mask value {v} is given twice")
            seen.add(v)
        ignore_colors = tuple(tuple(int(x) for x in c) for c in self.ignore_colors)
        if any(len(c) != 3 or not all(0 <= x <= 255 for x in c) for c in ignore_colors):
            raise ValueError(f"class table {self.name!r}: ignore colours must be RGB triples in 0..255")
        set_(self, "names", names)
        set_(self, "colors", tuple(tuple(int(v) for v in c) for c in palette))
        set_(self, "miou_classes", miou)
        set_(self, "other_mious", others)
        set_(self, "values", values)
        set_(self, "ignore_values", ignore)
        set_(self, "ignore_colors", ignore_colors)
        set_(self, "_palette", palette)
        # decode_values' lookup: raw value -> class index, ignore_index, or -1 (unknown)
        lut = np.full(max(256, max(seen) + 1), -1, dtype=np.int16)
        for c, vs in enumerate(values):
            lut[list(vs)] = c
        lut[list(ignore)] = self.ignore_index
        lut.flags.writeable = False
        set_(self, "_lut", lut)
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
        return ClassTable, (self.name, self.names, self.colors, self.ignore_index, self.miou_classes,
                            self.values, self.ignore_values, self.ignore_colors, self.rgb_masks, self.refuse_0_255,
                            self.other_mious)

    def known_values(self) -> str:
        """The raw mask values this table knows, for messages: 'background = 0, building = 1
        or 255' (more than 8 classes: 'classes 0..9, ignore 255')."""
        ignore = f", ignore = {_ranges(self.ignore_values)}" if self.ignore_values else ""
        if self.n_class > 8:
            return f"classes {_ranges([v for vs in self.values for v in vs])}{ignore}"
        return ", ".join(f"{n} = {' or '.join(map(str, vs))}" for n, vs in zip(self.names, self.values)) + ignore

    def decode_values(self, mask: np.ndarray) -> tuple[np.ndarray, int | None]:
        """Raw single-channel mask (H, W) of non-negative integers -> (class indices (H, W)
        uint8, ignored pixels `ignore_index`; the first value the table does not know, or
        None). With the default values a class-index mask comes back unchanged."""
        mask = np.asarray(mask)
        if mask.size and (mask.min() < 0 or mask.max() >= len(self._lut)):
            bad = mask[(mask < 0) | (mask >= len(self._lut))]
            return np.zeros(mask.shape, np.uint8), int(bad.flat[0])
        out = self._lut[mask]
        unknown = out < 0
        if unknown.any():
            return np.zeros(mask.shape, np.uint8), int(mask[unknown].min())
        return out.astype(np.uint8), None

    def decode_colors(self, mask_rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int] | None]:
        """RGB mask (H, W, 3+) -> (class indices (H, W) uint8, the first colour that is no class
        or ignore colour, or None). Exact matches only (no thresholding); alpha is dropped."""
        if len(set(self.colors) | set(self.ignore_colors)) != self.n_class + len(self.ignore_colors):
            raise ValueError(f"class table {self.name!r}: RGB masks need distinct class and ignore colours")
        rgb = np.asarray(mask_rgb)[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        known = [((r << 16) | (g << 8) | b, c) for c, (r, g, b) in enumerate(self.colors)]
        known += [((r << 16) | (g << 8) | b, self.ignore_index) for r, g, b in self.ignore_colors]
        known.sort()
        keys = np.array([k for k, _ in known])
        classes = np.array([c for _, c in known], dtype=np.uint8)
        pos = np.minimum(np.searchsorted(keys, code), len(keys) - 1)
        hit = keys[pos] == code
        if not hit.all():
            first = int(code[~hit].flat[0])
            return np.zeros(code.shape, np.uint8), (first >> 16, (first >> 8) & 255, first & 255)
        return classes[pos], None

    @property
    def n_class(self) -> int:
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """(n_class, 3) uint8 colours, read-only."""
        return self._palette

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
    rgb_masks="prepare",  # raw RGB masks go through prepare_deep_globe (thresholded, counted)
)

# Binary tables: the prepared data holds 0/1 masks, the downloads 0/255 ones; both are read
# (255 is a class value here, so nothing is ignored). The mIoU is over both classes, as the
# Inria and ISIC papers report it; the foreground IoU is the table's row 1.
INRIA = ClassTable(
    name="Inria aerial buildings",
    names=("background", "building"),
    colors=((0, 0, 0), (255, 255, 255)),
    miou_classes=(0, 1),
    values=((0,), (1, 255)),
    ignore_values=(),
)
ISIC = ClassTable(
    name="ISIC skin lesions",
    names=("background", "lesion"),
    colors=((0, 0, 0), (255, 255, 255)),
    miou_classes=(0, 1),
    values=((0,), (1, 255)),
    ignore_values=(),
)

# URUR (Ji et al., CVPR 2023): the 8 classes in label order with the colours of the release's
# README. Class 0 ('others') is a class there, not 'unknown': the works that report URUR
# (mmsegmentation-based) average over all 8, GLNet's own metric leaves class 0 out. Both are
# reported: `miou` over 1..7 (GLNet's convention, as for DeepGlobe), `miou_all` over 0..7.
URUR = ClassTable(
    name="URUR",
    names=("others", "building", "farmland", "greenhouse", "woodland", "bareland", "water", "road"),
    colors=(
        (0, 0, 0),
        (230, 230, 230),
        (95, 163, 7),
        (100, 100, 100),
        (200, 230, 160),
        (255, 255, 100),
        (150, 200, 250),
        (240, 100, 80),
    ),
    other_mious=(("miou_all", tuple(range(8))),),
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



# ----------------------------------------------------------------------------- tables from files

_JSON_KEYS = {"name", "classes", "ignore_values", "ignore_colors"}
_CLASS_KEYS = {"name", "color", "values", "miou"}
_CSV_COLUMNS = ("name", "r", "g", "b", "values", "miou")
_TRUE, _FALSE = ("1", "yes", "true", "y"), ("0", "no", "false", "n")


class TableError(UserError, ValueError):
    """A class table file that cannot be used; the message names the file."""


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _color(value, what: str) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{what} must be [r, g, b], got {value!r}")
    rgb = tuple(_int(x, what) for x in value)
    if not all(0 <= x <= 255 for x in rgb):
        raise ValueError(f"{what} must have channels in 0..255, got {list(rgb)}")
    return rgb  # type: ignore[return-value]


def _flag(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{what} must be true/false (or 1/0, yes/no), got {value!r}")


def _build(name: str, rows: list[dict], ignore_values=None, ignore_colors=()) -> ClassTable:
    """The table of parsed rows {name, color (or None), values (or None), miou}."""
    if not rows:
        raise ValueError("no classes")
    if len(rows) > IGNORE_LABEL:
        raise ValueError(f"{len(rows)} classes; at most {IGNORE_LABEL} (labels are 8-bit, {IGNORE_LABEL} = ignore)")
    given = [r["color"] is not None for r in rows]
    if any(given) and not all(given):
        raise ValueError(f"class {rows[given.index(False)]['name']!r} has no colour: give every class one, or none")
    colors = [r["color"] for r in rows] if all(given) else _generic_colors(len(rows))
    seen: dict = {}
    for r, c in zip(rows, colors):
        if c in seen:
            raise ValueError(f"classes {seen[c]!r} and {r['name']!r} have the same colour {list(c)}")
        seen[c] = r["name"]
    for c in ignore_colors:
        if c in seen:
            raise ValueError(f"ignore colour {list(c)} is also the colour of class {seen[c]!r}")
    values = tuple(tuple(r["values"]) if r["values"] is not None else (i,) for i, r in enumerate(rows))
    for i, r in enumerate(rows):
        if r["values"] is not None and not r["values"]:
            raise ValueError(f"class {r['name']!r} has an empty list of values")
    miou = tuple(i for i, r in enumerate(rows) if r["miou"])
    try:
        return ClassTable(name=name, names=tuple(r["name"] for r in rows), colors=tuple(colors), miou_classes=miou,
                          values=values, ignore_values=ignore_values, ignore_colors=tuple(ignore_colors),
                          refuse_0_255=ignore_values is None)
    except ValueError as e:  # the file is named by load_class_table
        prefix = f"class table {name!r}: "
        raise ValueError(str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)) from None


def _from_json(text: str, path: str) -> ClassTable:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or "classes" not in data:
        raise ValueError('expected an object with a "classes" list')
    extra = set(data) - _JSON_KEYS
    if extra:
        raise ValueError(f"unknown key {sorted(extra)[0]!r} (known: {', '.join(sorted(_JSON_KEYS))})")
    if not isinstance(data["classes"], list):
        raise ValueError('"classes" must be a list')
    rows = []
    for i, c in enumerate(data["classes"]):
        if isinstance(c, str):
            c = {"name": c}
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
            raise ValueError(f"class {i} must be a name or an object with a \"name\" string, got {c!r}")
        extra = set(c) - _CLASS_KEYS
        if extra:
            raise ValueError(f"class {c['name']!r}: unknown key {sorted(extra)[0]!r} (known: {', '.join(sorted(_CLASS_KEYS))})")
        vals = c.get("values")
        if vals is not None:
            vals = [vals] if not isinstance(vals, list) else vals
            vals = [_int(v, f"class {c['name']!r} value") for v in vals]
        color = c.get("color")
        rows.append({"name": c["name"].strip(), "values": vals, "miou": _flag(c.get("miou", True), f"class {c['name']!r} miou"),
                     "color": None if color is None else _color(color, f"class {c['name']!r} color")})
    ignore = data.get("ignore_values")
    if ignore is not None:
        ignore = [_int(v, "ignore value") for v in (ignore if isinstance(ignore, list) else [ignore])]
    colors = data.get("ignore_colors", [])
    if not isinstance(colors, list):
        raise ValueError('"ignore_colors" must be a list of [r, g, b]')
    name = data.get("name")
    name = f"{name} ({path})" if isinstance(name, str) and name else path
    return _build(name, rows, ignore, [_color(c, "ignore colour") for c in colors])


def _from_csv(text: str, path: str) -> ClassTable:
    lines = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    if not lines:
        raise ValueError("no classes (an empty file)")
    header = [h.strip().lower() for h in lines[0]]
    if "name" not in header:
        raise ValueError(f"the first line must name the columns, e.g. name,r,g,b (Kaggle's class_dict.csv); got {lines[0]}")
    unknown = [h for h in header if h not in _CSV_COLUMNS]
    if unknown or len(set(header)) != len(header):
        raise ValueError(f"columns must be among {','.join(_CSV_COLUMNS)}, each once; got {','.join(header)}")
    rgb = [h in header for h in "rgb"]
    if any(rgb) and not all(rgb):
        raise ValueError("give all three colour columns r,g,b or none")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise ValueError(f"line {n} has {len(line)} fields, the header {len(header)}")
        cell = {h: v.strip() for h, v in zip(header, line)}
        if not cell["name"]:
            raise ValueError(f"line {n} has no class name")
        what = f"line {n} ({cell['name']!r})"
        vals = cell.get("values")
        vals = None if not vals else [_int(v, f"{what} value") for v in vals.replace(";", " ").split()]
        color = _color([cell["r"], cell["g"], cell["b"]], f"{what} colour") if all(rgb) else None
        rows.append({"name": cell["name"], "values": vals, "color": color,
                     "miou": _flag(cell["miou"], f"{what} miou") if cell.get("miou") else True})
    return _build(path, rows)


def load_class_table(path: str | os.PathLike) -> ClassTable:
    """A class table from a .json or .csv file (formats in README "Your own data"). Classes
    are numbered in file order; every class counts in the mIoU unless it says otherwise.
    Anything wrong with the file is one TableError (a ValueError) naming it."""
    path = str(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".csv"):
        raise TableError(f"class table {path}: expected a .json or .csv file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM from spreadsheet programs
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TableError(f"class table {path}: cannot read it ({e})") from None
    try:
        return _from_json(text, path) if ext == ".json" else _from_csv(text, path)
    except TableError:
        raise
    except ValueError as e:
        raise TableError(f"class table {path}: {e}") from None
