"""predict.py's output files, written from row strips without the whole image in memory.

The strips of an image go to a `Spool` (uint8 rows in a temporary file, 1 byte per pixel
on disk); once the image is done, each asked-for format is written from the spool by bands
of rows, every file atomically (a temp name next to it, renamed when complete):

    index       <stem>_mask.png        single-band class indices (0..n_class-1)
    color       <stem>_color.png       palette PNG in the class table's colours
    overlay     <stem>_overlay.jpg     the image blended with the colours, long side <= --overlay_size
    geotiff     <stem>_mask.tif        uint8 class indices with the input's CRS and transform,
                                       tiled, deflate-compressed, the class colours as colour map
    confidence  <stem>_confidence.png  top-1 probability x 255

PNGs are streamed row by row with pypng; GeoTIFFs with rasterio windows.

With --coarse_to_fine (docs/MODEL.md section 9) each image also gets <stem>_box.json (the
box the fine stage predicted: `write_box_json`), and the overlay draws that box.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Iterator

import numpy as np

from utils.errors import UserError
from utils.io import atomic_write, save_image, temp_name, write_json

FORMATS = ("index", "color", "overlay", "geotiff", "confidence")
SUFFIXES = {
    "index": "_mask.png",
    "color": "_color.png",
    "overlay": "_overlay.jpg",
    "geotiff": "_mask.tif",
    "confidence": "_confidence.png",
}
BOX_SUFFIX = "_box.json"
BOX_COLOUR = (255, 255, 0)  # the box's outline on the overlay
PNG_MAX_SIDE = 2**31 - 1
BAND_ROWS = 256  # rows read back from a spool at a time (and the GeoTIFF block size)


def output_paths(out_dir: str, stem: str, formats) -> dict[str, str]:
    return {f: os.path.join(out_dir, stem + SUFFIXES[f]) for f in formats}


class Spool:
    """The uint8 rows of one height x width image, written top to bottom, read back by bands."""

    def __init__(self, height: int, width: int, folder: str | None = None) -> None:
        self.height, self.width, self.rows_written = height, width, 0
        self.file = tempfile.TemporaryFile(dir=folder)

    def write(self, top: int, rows: np.ndarray) -> None:
        if top != self.rows_written or rows.shape[1:] != (self.width,):
            raise ValueError(f"strip at row {top} of shape {rows.shape}: expected row {self.rows_written}, width {self.width}")
        self.file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        self.rows_written += rows.shape[0]

    def read(self, top: int, n: int) -> np.ndarray:
        self.file.seek(top * self.width)
        return np.frombuffer(self.file.read(n * self.width), dtype=np.uint8).reshape(n, self.width)

    def bands(self, rows: int = BAND_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        for top in range(0, self.height, rows):
            yield top, self.read(top, min(rows, self.height - top))

    def sample(self, height: int, width: int) -> np.ndarray:
        """A height x width nearest-neighbour sample of the image (pixel centres)."""
        ys = ((np.arange(height) + 0.5) * self.height / height).astype(np.int64)
        xs = ((np.arange(width) + 0.5) * self.width / width).astype(np.int64)
        return np.stack([self.read(int(y), 1)[0, xs] for y in ys])

    @property
    def complete(self) -> bool:
        return self.rows_written == self.height

    def close(self) -> None:
        self.file.close()


def _png_rows(spool: Spool) -> Iterator[np.ndarray]:
    for _, band in spool.bands():
        yield from band


def write_png(path: str, spool: Spool, palette: np.ndarray | None = None) -> None:
    """8-bit greyscale PNG of the spool, or a palette PNG with `palette` (n, 3) uint8."""
    import png

    if max(spool.height, spool.width) > PNG_MAX_SIDE:
        raise UserError(f"{path}: {spool.width}x{spool.height} is past PNG's limit; use --format geotiff")
    if palette is None:
        writer = png.Writer(spool.width, spool.height, greyscale=True, bitdepth=8, compression=6)
    else:
        writer = png.Writer(spool.width, spool.height, palette=[tuple(int(v) for v in c) for c in palette],
                            bitdepth=8, compression=6)
    with atomic_write(path) as f:
        writer.write(f, _png_rows(spool))


def write_geotiff(path: str, spool: Spool, georef, palette: np.ndarray) -> None:
    """Tiled, deflate-compressed uint8 GeoTIFF of the spool; georef (crs, transform) or None
    (a plain TIFF); the class colours as its colour map."""
    import rasterio
    from rasterio.windows import Window

    profile = dict(driver="GTiff", width=spool.width, height=spool.height, count=1, dtype="uint8",
                   tiled=True, blockxsize=BAND_ROWS, blockysize=BAND_ROWS, compress="deflate",
                   BIGTIFF="IF_SAFER")
    if georef is not None:
        profile.update(crs=georef.crs, transform=georef.transform)
    tmp = temp_name(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # a plain TIFF: said already
            dst = rasterio.open(tmp, "w", **profile)
        with dst:
            for top, band in spool.bands():
                dst.write(band[None], window=Window(0, top, spool.width, band.shape[0]))
            dst.write_colormap(1, {i: (*(int(v) for v in c), 255) for i, c in enumerate(palette)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_overlay(path: str, spool: Spool, thumbnail: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
                  box: tuple[int, int, int, int] | None = None) -> None:
    """The thumbnail (h, w, 3) blended with the class colours sampled at its size, as JPEG;
    `box` (x0, y0, x1, y1 in pixels of the image), if given, drawn on it (`draw_box`)."""
    h, w = thumbnail.shape[:2]
    classes = spool.sample(h, w)
    colours = np.zeros((h, w, 3), dtype=np.uint8)
    valid = classes < len(palette)
    colours[valid] = palette[classes[valid]]
    blend = thumbnail.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    image = np.clip(blend.round(), 0, 255).astype(np.uint8)
    if box is not None:
        draw_box(image, box, (spool.width, spool.height))
    save_image(path, image, "JPEG", quality=90)


def draw_box(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int],
             colour: tuple[int, int, int] = BOX_COLOUR) -> None:
    """Draw in place the outline of `box` (x0, y0, x1, y1, x1 and y1 exclusive, in pixels of
    an image of `size` (width, height)) on `image` (h, w, 3), a resized copy of that image:
    the outline follows the box's edges scaled to `image`, about 1/256 of its long side thick
    (at least 1 pixel), inside the box."""
    h, w = image.shape[:2]
    width, height = size
    x0, x1 = (min(w, max(0, round(v * w / width))) for v in box[0::2])
    y0, y1 = (min(h, max(0, round(v * h / height))) for v in box[1::2])
    x1, y1 = max(x1, min(x0 + 1, w)), max(y1, min(y0 + 1, h))  # a box of under a pixel keeps one
    t = max(1, max(h, w) // 256)
    image[y0 : min(y0 + t, y1), x0:x1] = colour
    image[max(y1 - t, y0) : y1, x0:x1] = colour
    image[y0:y1, x0 : min(x0 + t, x1)] = colour
    image[y0:y1, max(x1 - t, x0) : x1] = colour


def write_box_json(path: str, box: tuple[int, int, int, int] | None, foreground: int,
                   size: tuple[int, int]) -> None:
    """<stem>_box.json: {"box": [x0, y0, x1, y1] (pixels of the image, x1 and y1 exclusive)
    or null (no foreground), "coarse_foreground_px": the coarse foreground's pixel count,
    "image_size": [width, height]}, written atomically."""
    write_json(path, {"box": None if box is None else [int(v) for v in box],
                      "coarse_foreground_px": int(foreground), "image_size": [int(v) for v in size]})
