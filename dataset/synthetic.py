"""Seeded generator of small DeepGlobe-format land-cover data sets (docs/MODEL.md section 8).

Every image is built so that a global-only and a local-only model each miss something, the
situation GLNet was designed for:

* Large regions: warped Voronoi zones (vegetation, dry land, city) split further by thresholded
  low-frequency noise. Each class has a base colour and a fine texture of period <= 4 px
  (agriculture diagonal stripes, forest dot lattice, urban grid, water ripples, rangeland and
  barren speckle). Agriculture and forest have nearly the same mean colour: once a 4x
  downsampling has averaged the texture away, the global view can hardly tell them apart.
* Thin structures: 2 px roads (class 1) across the whole image and 2 px meandering rivers
  (class 5) through the dry zones. A 4x downsampling (e.g. 512 -> 128 global) leaves them below
  half a pixel of coverage; only full-resolution patches can delineate them.
* Context: rangeland (3) and barren (6) share colour and texture. Rangeland is always a blob
  enclosed by agriculture/forest (a margin away from every other zone); barren is a large zone
  of its own that always holds a lake (and a river). Inside a patch they look the same; the
  surroundings, seen by the global branch, tell them apart.
* Label-free noise: colour cast, smooth shading, Gaussian noise, JPEG (quality 90). Class 0
  (unknown) is one small flat dark "no data" blob per image (about 1-2 % of the pixels).

Same seed -> byte-identical files. Every file is written atomically (utils.io); a
`synthetic.json` manifest, written last, makes a re-run with the same parameters a no-op.
`--raw` writes the Kaggle download layout instead (RGB masks next to the images), for testing
the preparation script.

    python -m dataset.synthetic --out data/synthetic --size 512 --n_train 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from dataset.classes import DEEPGLOBE
from utils.io import atomic_write, save_image, save_png

MANIFEST = "synthetic.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 90
MIN_SIZE = 32
N_CLASSES = DEEPGLOBE.n_class
UNKNOWN, URBAN, AGRICULTURE, RANGELAND, FOREST, WATER, BARREN = range(N_CLASSES)

# GLNet layout: split name -> folder; the raw layout keeps all labelled images in train/ and the
# split lists apart, as the GLNet split lists partition the labelled Kaggle train/ folder.
SPLITS = ("train", "crossvali", "test")

# Names used by the Kaggle download's class_dict.csv (rows in its order).
_KAGGLE_CLASS_DICT = (
    ("urban_land", URBAN),
    ("agriculture_land", AGRICULTURE),
    ("rangeland", RANGELAND),
    ("forest_land", FOREST),
    ("water", WATER),
    ("barren_land", BARREN),
    ("unknown", UNKNOWN),
)

# Surfaces: the 7 classes plus roads and rivers, which are drawn flat (no texture).
ROAD, RIVER = N_CLASSES, N_CLASSES + 1
SURFACE_CLASS = np.array([0, 1, 2, 3, 4, 5, 6, URBAN, WATER], dtype=np.uint8)
SURFACE_RGB = np.array(
    [
        (14, 14, 16),  # unknown: flat no-data
        (150, 146, 150),  # urban
        (110, 126, 68),  # agriculture } nearly equal on purpose:
        (186, 166, 124),  # rangeland   |
        (104, 123, 70),  # forest      } only the texture separates them
        (42, 74, 118),  # water
        (186, 166, 124),  # barren: equal to rangeland on purpose (told apart by context)
        (200, 196, 188),  # road
        (42, 74, 118),  # river
    ],
    dtype=np.float32,
)
SURFACE_TEXTURE_AMP = np.array([0, 30, 28, 24, 44, 10, 24, 0, 0], dtype=np.float32)
THIN_WIDTH = 2.0  # px; under half coverage after a 4x bilinear downsampling

GREEN, DRY, CITY = 0, 1, 2  # zone kinds


# ----------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Zero-mean, unit-std float32 noise with about `cells` blobs along the longer side."""
    s = max(h, w)
    gh = max(2, int(round(cells * h / s))) + 2
    gw = max(2, int(round(cells * w / s))) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _spread_points(rng: np.random.Generator, k: int, aspect: tuple[float, float],
                   min_dist: float) -> np.ndarray:
    """k points in [0.1, 0.9] x the normalised image extent, at least min_dist apart if possible."""
    ey, ex = aspect
    pts: list[np.ndarray] = []
    for _ in range(200):
        if len(pts) == k:
            break
        p = rng.uniform(0.1, 0.9, 2) * (ey, ex)
        if all(np.hypot(*(p - q)) >= min_dist for q in pts):
            pts.append(p)
    while len(pts) < k:  # very elongated images: accept what fits
        pts.append(rng.uniform(0.1, 0.9, 2) * (ey, ex))
    return np.stack(pts)


def _curve(h: int, w: int, center: np.ndarray, angle: float, amp: float, wavelength: float,
           phase: float, width: float) -> np.ndarray:
    """Pixels within width/2 of the meandering line through center (pixel units)."""
    y = np.arange(h, dtype=np.float32)[:, None] - np.float32(center[0])
    x = np.arange(w, dtype=np.float32)[None, :] - np.float32(center[1])
    ny, nx = np.float32(np.sin(angle)), np.float32(np.cos(angle))
    across = y * ny + x * nx
    along = x * ny - y * nx
    k = np.float32(2 * np.pi / wavelength)
    arg = k * along + np.float32(phase)
    # distance to the curve ~ |f| / |grad f| for f = across + amp sin(k along + phase)
    f = across + np.float32(amp) * np.sin(arg)
    grad = np.sqrt(1 + (np.float32(amp) * k * np.cos(arg)) ** 2)
    return np.abs(f) < grad * np.float32(width / 2)


def _textures(surface: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean fine texture per surface, scaled by its amplitude; periods <= 4 px."""
    h, w = surface.shape
    y = np.arange(h, dtype=np.int32)[:, None]
    x = np.arange(w, dtype=np.int32)[None, :]
    speckle = np.clip(rng.standard_normal((h, w), dtype=np.float32), -2.5, 2.5)
    patterns = {
        URBAN: np.where((x % 4 == 0) | (y % 4 == 0), -1.0, 7 / 9),  # grid (7/16 on lines)
        AGRICULTURE: np.where((x + y) % 4 < 2, 1.0, -1.0),  # diagonal stripes
        RANGELAND: speckle,
        FOREST: np.where((x % 3 == 0) & (y % 3 == 0), -1.0, 1 / 8),  # dot lattice
        WATER: np.where(y % 4 < 2, 1.0, -1.0),  # ripples
        BARREN: speckle,
    }
    tex = np.zeros((h, w), np.float32)
    for cls, pattern in patterns.items():
        sel = surface == cls
        tex[sel] = np.broadcast_to(pattern, (h, w))[sel] * SURFACE_TEXTURE_AMP[cls]
    return tex


class _Grid(NamedTuple):
    """Pixel coordinates of one image, normalised by its longer side s."""
    h: int
    w: int
    s: float
    ext: tuple[float, float]  # normalised extent (h / s, w / s)
    wv: np.ndarray  # (h, w) row coordinate, warped by smooth noise
    wu: np.ndarray  # (h, w) column coordinate, warped by smooth noise


class _Zones(NamedTuple):
    """The Voronoi zones of one image."""
    kinds: np.ndarray  # (k,) GREEN / DRY / CITY per zone
    seeds: np.ndarray  # (k, 2) zone seeds, normalised (y, x)
    dist: np.ndarray  # (k, h, w) warped distance of every pixel to each seed
    zone: np.ndarray  # (h, w) index of the nearest seed
    kind: np.ndarray  # (h, w) kind of that zone


def _grid(rng: np.random.Generator, h: int, w: int) -> _Grid:
    """Normalised coordinates, warped by smooth noise so that zone and blob borders are wavy."""
    s = float(max(h, w))
    v = (np.arange(h, dtype=np.float32) / np.float32(s))[:, None]
    u = (np.arange(w, dtype=np.float32) / np.float32(s))[None, :]
    wv = v + 0.07 * _smooth_noise(rng, h, w, 3)
    wu = u + 0.07 * _smooth_noise(rng, h, w, 3)
    return _Grid(h, w, s, (h / s, w / s), wv, wu)


def _zones(rng: np.random.Generator, g: _Grid) -> _Zones:
    """3-4 zones, one vegetation and one dry zone at least."""
    k = int(rng.integers(3, 5))
    kinds = np.array([GREEN, DRY] + list(rng.choice([GREEN, DRY, CITY], size=k - 2,
                                                    p=[0.45, 0.15, 0.4])))
    rng.shuffle(kinds)
    seeds = _spread_points(rng, k, g.ext, 0.3)
    dist = np.stack([np.hypot(g.wv - sy, g.wu - sx) for sy, sx in seeds])
    zone = dist.argmin(0)
    return _Zones(kinds, seeds, dist, zone, kinds[zone])


def _vegetation(rng: np.random.Generator, g: _Grid, z: _Zones) -> np.ndarray:
    """A new surface map: agriculture / forest blobs everywhere, rangeland blobs in the
    vegetation zones a margin (0.12) away from every other zone (the other zones are
    painted over it next)."""
    d_green = z.dist[z.kinds == GREEN].min(0)
    d_other = z.dist[z.kinds != GREEN].min(0)
    surface = np.empty((g.h, g.w), np.uint8)
    green = z.kind == GREEN
    share_agri = rng.uniform(0.35, 0.65)
    f_af = _smooth_noise(rng, g.h, g.w, 4)
    surface[:] = np.where(f_af > np.quantile(f_af, 1 - share_agri), AGRICULTURE, FOREST)
    f_r = _smooth_noise(rng, g.h, g.w, 2.5)
    inner = green & (d_other - d_green > 0.12)
    if inner.any():
        rangeland = inner & (f_r > np.quantile(f_r[inner], rng.uniform(0.5, 0.7)))
        surface[rangeland] = RANGELAND
    return surface


def _dry_land(rng: np.random.Generator, g: _Grid, z: _Zones, surface: np.ndarray) -> np.ndarray:
    """Barren over the dry zones, with a lake around each dry seed; returns the lake-border
    noise, which the no-data blob reuses."""
    surface[z.kind == DRY] = BARREN
    f_l = _smooth_noise(rng, g.h, g.w, 4)
    for j in np.flatnonzero(z.kinds == DRY):
        r = rng.uniform(0.07, 0.12)
        surface[(z.zone == j) & (z.dist[j] < r * (1 + 0.3 * f_l))] = WATER
    return f_l


def _city(rng: np.random.Generator, g: _Grid, z: _Zones, surface: np.ndarray) -> np.ndarray:
    """Urban over the city zones with a fine street grid (visual only: streets are labelled
    urban too); returns the city mask."""
    city = z.kind == CITY
    surface[city] = URBAN
    if city.any():
        sp = int(rng.integers(18, 40))
        oy, ox = rng.integers(0, sp, 2)
        yy = (np.arange(g.h)[:, None] + oy) % sp < 2
        xx = (np.arange(g.w)[None, :] + ox) % sp < 2
        surface[city & (yy | xx)] = ROAD
    return city


def _thin_structures(rng: np.random.Generator, g: _Grid, z: _Zones, surface: np.ndarray,
                     city: np.ndarray) -> np.ndarray:
    """A river through each dry seed (over dry and city zones), then 2-3 roads across the whole
    image; returns where they are thin structures (city streets are not)."""
    h, w, s = g.h, g.w, g.s
    thin = np.zeros((h, w), bool)
    for j in np.flatnonzero(z.kinds == DRY):
        c = z.seeds[j] * s
        river = _curve(h, w, c, rng.uniform(0, np.pi), rng.uniform(0.02, 0.05) * s,
                       rng.uniform(0.25, 0.5) * s, rng.uniform(0, 2 * np.pi), THIN_WIDTH)
        river &= (z.kind != GREEN) & (surface != WATER)
        surface[river] = RIVER
        thin |= river
    for _ in range(int(rng.integers(2, 4))):
        c = rng.uniform(0.15, 0.85, 2) * (h, w)
        road = _curve(h, w, c, rng.uniform(0, np.pi), rng.uniform(0, 0.02) * s,
                      rng.uniform(0.4, 0.8) * s, rng.uniform(0, 2 * np.pi), THIN_WIDTH)
        road &= (surface != WATER) & (surface != RIVER)
        surface[road] = ROAD
        thin |= road & ~city
    return thin


def _nodata_blob(rng: np.random.Generator, g: _Grid, f_l: np.ndarray) -> np.ndarray:
    """Mask of one small no-data blob (0.6-2.5 % of the image area)."""
    area = rng.uniform(0.006, 0.025) * g.h * g.w
    r = np.sqrt(area / np.pi) / g.s
    cy, cx = rng.uniform(0, 1, 2) * g.ext
    return np.hypot(g.wv - cy, g.wu - cx) < r * (1 + 0.25 * f_l)


def _paint(rng: np.random.Generator, surface: np.ndarray, nodata: np.ndarray) -> np.ndarray:
    """The image: colour + texture + cast + shading + noise (the label is unaffected by any of
    these); no-data pixels stay flat."""
    h, w = surface.shape
    rgb = SURFACE_RGB[surface]
    rgb += _textures(surface, rng)[..., None]
    rgb += rng.normal(0, 6, 3).astype(np.float32)
    rgb += 8 * _smooth_noise(rng, h, w, 3)[..., None]
    for ch in range(3):
        rgb[..., ch] += 6 * _smooth_noise(rng, h, w, 5)
    rgb += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    rgb[nodata] = SURFACE_RGB[UNKNOWN]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def render_sample(rng: np.random.Generator, h: int, w: int) -> dict:
    """One synthetic image: {'image': (h, w, 3) uint8, 'mask': (h, w) uint8 class indices,
    'thin': (h, w) bool roads/rivers drawn as thin structures}. Pure numpy, no file I/O.

    The steps draw from rng in this order; changing it changes every generated data set."""
    g = _grid(rng, h, w)
    z = _zones(rng, g)
    surface = _vegetation(rng, g, z)
    f_l = _dry_land(rng, g, z, surface)
    city = _city(rng, g, z, surface)
    thin = _thin_structures(rng, g, z, surface, city)
    nodata = _nodata_blob(rng, g, f_l)
    surface[nodata] = UNKNOWN
    thin &= ~nodata
    image = _paint(rng, surface, nodata)
    return {"image": image, "mask": SURFACE_CLASS[surface], "thin": thin}


# ----------------------------------------------------------------------------- files


def _mask_counts(mask: np.ndarray) -> np.ndarray:
    return np.bincount(mask[mask < N_CLASSES].ravel(), minlength=N_CLASSES)[:N_CLASSES]


def _shares(counts: np.ndarray) -> dict[str, float]:
    total = max(int(counts.sum()), 1)
    return {name: round(int(c) / total, 6) for name, c in zip(DEEPGLOBE.names, counts)}


def class_shares(data_dir: str | os.PathLike) -> dict[str, float]:
    """Pixel share of each class over every `*_mask.png` under data_dir (index or RGB masks;
    off-palette pixels of an RGB mask are left out)."""
    paths = sorted(Path(data_dir).rglob("*_mask.png"))
    if not paths:
        raise FileNotFoundError(f"no *_mask.png under {data_dir}: generate or prepare data first")
    counts = np.zeros(N_CLASSES, np.int64)
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "P", "RGB") else im)
        if arr.ndim == 3:
            classes, off_palette = DEEPGLOBE.decode_rgb(arr)
            mask_counts = _mask_counts(classes)
            mask_counts[0] -= off_palette  # decoded as 0 'unknown', but no class's colour: not counted
            counts += mask_counts
        else:
            counts += _mask_counts(arr)
    return _shares(counts)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _normalise_sizes(size: int, sizes: Iterable[Sequence[int]] | None) -> list[list[int]]:
    hw = [[int(size), int(size)]] if sizes is None else [[int(h), int(w)] for h, w in sizes]
    if not hw:
        raise ValueError("sizes is empty: give at least one (H, W) or leave it out")
    for h, w in hw:
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(f"image size {h}x{w} too small: use at least {MIN_SIZE} px a side")
    return hw


def _params(n_train: int, n_val: int, n_test: int, size: int, seed: int, rgb_masks: bool,
            sizes: Iterable[Sequence[int]] | None) -> dict:
    """The checked parameters as the manifest stores them (a re-run with equal ones is a no-op)."""
    for name, n in {"train": n_train, "crossvali": n_val, "test": n_test}.items():
        if int(n) < 0:
            raise ValueError(f"number of {name} images is {n}: must be >= 0")
    hw = _normalise_sizes(size, sizes)
    return {"n_train": int(n_train), "n_val": int(n_val), "n_test": int(n_test),
            "size": int(size), "seed": int(seed), "rgb_masks": bool(rgb_masks), "sizes": hw}


def _is_complete(out: Path, old: dict | None, params: dict) -> bool:
    """Whether the manifest `old` read from out was written with these parameters and all the
    files it names are still there."""
    return old is not None and old.get("version") == FORMAT_VERSION and old.get("params") == params \
        and all((out / f).is_file() for f in old.get("files", []))


def _start_fresh(out: Path, old: dict | None) -> None:
    """Create out, drop its manifest (an interrupted run is never taken as complete) and remove
    the files a previous run with other parameters wrote there (only those inside out)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    if old is not None:
        for f in old.get("files", []):
            p = (out / f).resolve()
            if out.resolve() in p.parents:
                p.unlink(missing_ok=True)


def _draw_ids(seed: int, n_pool: int) -> list[str]:
    """n_pool distinct numeric ids like DeepGlobe's ("100694"), from a stream of their own."""
    id_pool = np.random.default_rng([int(seed), 1_000_003]).choice(990_000, n_pool,
                                                                   replace=False)
    return [str(int(i) + 10_000) for i in id_pool]


def _file_names(split: str, img_id: str, rgb_masks: bool) -> tuple[str, str]:
    """(image, label) paths relative to the data set folder, in the raw or the GLNet layout."""
    if rgb_masks:
        folder = "valid" if split == "valid" else "train"
        return f"{folder}/{img_id}_sat.jpg", f"{folder}/{img_id}_mask.png"
    return f"{split}/Sat/{img_id}_sat.jpg", f"{split}/Label/{img_id}_mask.png"


def _write_sample(out: Path, sample: dict, sat: str, lab: str | None, rgb_masks: bool) -> list[str]:
    """Write the JPEG image and, unless lab is None, the mask (RGB when rgb_masks); returns
    the paths written."""
    (out / sat).parent.mkdir(parents=True, exist_ok=True)
    save_image(out / sat, sample["image"], "JPEG", quality=JPEG_QUALITY)
    if lab is None:
        return [sat]
    (out / lab).parent.mkdir(parents=True, exist_ok=True)
    save_png(out / lab, DEEPGLOBE.colorize(sample["mask"]) if rgb_masks else sample["mask"])
    return [sat, lab]


def _write_images(out: Path, groups: list[tuple[str, int]], ids: list[str], params: dict
                  ) -> tuple[dict[str, list[str]], list[str], np.ndarray]:
    """Render and write every image, taking ids and sizes in turn over the groups; returns the
    ids per split, the files written and the class pixel counts of the labelled images."""
    hw, seed, rgb_masks = params["sizes"], params["seed"], params["rgb_masks"]
    split_ids: dict[str, list[str]] = {}
    files: list[str] = []
    counts = np.zeros(N_CLASSES, np.int64)
    index = 0
    for g, (split, n) in enumerate(groups):
        split_ids[split] = ids[index:index + n]
        for i, img_id in enumerate(split_ids[split]):
            h, w = hw[index % len(hw)]
            index += 1
            # one stream per (split, position): changing n_train leaves val images unchanged
            sample = render_sample(np.random.default_rng([seed, g, i]), h, w)
            sat, lab = _file_names(split, img_id, rgb_masks)
            files += _write_sample(out, sample, sat, None if split == "valid" else lab, rgb_masks)
            if split != "valid":
                counts += _mask_counts(sample["mask"])
    return split_ids, files, counts


def generate(out_dir: str | os.PathLike, n_train: int = 8, n_val: int = 4, n_test: int = 2,
             size: int = 256, seed: int = 0, rgb_masks: bool = False,
             sizes: Iterable[Sequence[int]] | None = None) -> dict:
    """Write a synthetic data set to out_dir and return a summary (ids, class shares, ...).

    GLNet layout: {train,crossvali,test}/Sat/<id>_sat.jpg + {...}/Label/<id>_mask.png ('L').
    rgb_masks=True: the raw Kaggle layout, train/<id>_sat.jpg + RGB train/<id>_mask.png for all
    labelled images, valid/<id>_sat.jpg (unlabelled, n_val of them), class_dict.csv,
    metadata.csv and splits/{train,crossvali,test}.txt naming the images of each GLNet split.
    `sizes` (list of (H, W)) is cycled through over all images; it overrides `size`.
    """
    params = _params(n_train, n_val, n_test, size, seed, rgb_masks, sizes)
    n_train, n_val, n_test = params["n_train"], params["n_val"], params["n_test"]
    out = Path(out_dir)
    t0 = time.perf_counter()

    old = _read_manifest(out)
    if _is_complete(out, old, params):
        return {**old, "out_dir": str(out), "skipped": True,
                "seconds": round(time.perf_counter() - t0, 3)}
    _start_fresh(out, old)

    n_unlabelled = n_val if rgb_masks else 0
    # ids drawn the same way for both layouts, so that preparing the raw layout reproduces the
    # GLNet one
    ids = _draw_ids(seed, n_train + 2 * n_val + n_test)
    groups = [("train", n_train), ("crossvali", n_val), ("test", n_test), ("valid", n_unlabelled)]
    split_ids, files, counts = _write_images(out, groups, ids, params)
    if not rgb_masks:
        del split_ids["valid"]
    else:
        files += _write_raw_extras(out, split_ids)

    manifest = {"version": FORMAT_VERSION, "params": params,
                "layout": "raw" if rgb_masks else "glnet", "n_images": sum(n for _, n in groups),
                "splits": split_ids, "class_shares": _shares(counts), "files": files}
    _write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "out_dir": str(out), "skipped": False,
            "seconds": round(time.perf_counter() - t0, 3)}


def _write_raw_extras(out: Path, split_ids: dict[str, list[str]]) -> list[str]:
    """class_dict.csv and metadata.csv as in the Kaggle download, plus GLNet-style split lists."""
    rows = ["name,r,g,b"] + [f"{name},{','.join(str(c) for c in DEEPGLOBE.colors[cls])}"
                             for name, cls in _KAGGLE_CLASS_DICT]
    _write_text(out / "class_dict.csv", "\n".join(rows) + "\n")
    meta = ["image_id,split,sat_image_path,mask_path"]
    for split in SPLITS:
        meta += [f"{i},train,train/{i}_sat.jpg,train/{i}_mask.png" for i in split_ids[split]]
    meta += [f"{i},valid,valid/{i}_sat.jpg," for i in split_ids["valid"]]
    _write_text(out / "metadata.csv", "\n".join(meta) + "\n")
    (out / "splits").mkdir(exist_ok=True)
    written = ["class_dict.csv", "metadata.csv"]
    for split in SPLITS:
        _write_text(out / "splits" / f"{split}.txt", "".join(f"{i}_sat.jpg\n" for i in split_ids[split]))
        written.append(f"splits/{split}.txt")
    return written


# ----------------------------------------------------------------------------- CLI


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x", 1)) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --sizes {text!r}: use HxW[,HxW...], e.g. 512x384")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dataset.synthetic", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n_train", type=int, default=8, help="training images")
    p.add_argument("--n_val", type=int, default=4, help="validation (crossvali) images")
    p.add_argument("--n_test", type=int, default=2, help="test images (labelled, to be scored)")
    p.add_argument("--size", type=int, default=256, help="side of the square images")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help="HxW sizes cycled through over the images (overrides --size)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--rgb_masks", "--raw", dest="rgb_masks", action="store_true",
                   help="write the raw Kaggle layout (RGB masks next to the images)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = generate(args.out, n_train=args.n_train, n_val=args.n_val,
                           n_test=args.n_test, size=args.size, seed=args.seed,
                           rgb_masks=args.rgb_masks, sizes=args.sizes)
    except (ValueError, OSError) as e:
        print(f"dataset.synthetic: error: {e}", file=sys.stderr)
        return 2
    state = "already complete, nothing written" if summary["skipped"] else \
        f"written in {summary['seconds']:.2f} s"
    print(f"{summary['layout']} data set at {summary['out_dir']}: {summary['n_images']} images, "
          f"{state}")
    print("class shares: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["class_shares"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
