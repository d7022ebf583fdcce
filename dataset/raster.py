"""Images of any size for predict.py: read by windows, with the global view and a thumbnail.

Two readers, one interface (`open_image`):
- PIL (JPEG, PNG, BMP, WebP; TIFF when rasterio is missing) decodes the whole image once
  (3 bytes per pixel are kept; JPEG and PNG cannot be read by windows).
- rasterio (TIFF and GeoTIFF) reads windows of the file, so the image is never held whole
  above `FAITHFUL_MAX_PIXELS`; it also gives the georeference that the GeoTIFF output keeps.

The global view is the one evaluation uses (docs/MODEL.md section 6: the image padded to at
least one patch, PIL bilinear resize to size_g x size_g or, with --global_view aspect, to
the long side size_g; / 255) for every image up to
FAITHFUL_MAX_PIXELS. Above it (rasterio only), it comes from a decimated read (GDAL
'average' resampling of the whole image to the global view's size), which needs no full-resolution
copy but is not PIL's filter: the global branch sees a slightly different image.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dataset.deep_globe import global_size, global_view_of
from utils.errors import UserError

# Largest image (pixels) whose global view is the faithful PIL resize of the whole image;
# 6749 x 4499 (30.4 MP, the paper's largest) fits.
FAITHFUL_MAX_PIXELS = 32_000_000
RASTERIO_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
RASTERIO_HINT = "pip install rasterio"


def limit_gdal_cache(mb: int = 64) -> None:
    """Cap GDAL's block cache (by default 5 % of the RAM, which windowed reads of a large
    TIFF fill) unless the user set GDAL_CACHEMAX; call before the first read."""
    os.environ.setdefault("GDAL_CACHEMAX", str(mb))


def have_rasterio() -> bool:
    return importlib.util.find_spec("rasterio") is not None


@dataclass
class Georeference:
    crs: Any
    transform: Any


class ImageSource:
    """An RGB image, `height` x `width`, read by windows: `read(top, left, h, w)` gives
    (3, h, w) uint8, zero past the right and bottom borders (the padding of section 6)."""

    path: str
    height: int
    width: int
    image_global: torch.Tensor  # (3, h, w) float32, the global view
    georef: Georeference | None = None
    faithful: bool = True  # whether image_global is evaluation's

    def read(self, top: int, left: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int) -> np.ndarray:
        """(h, w, 3) uint8, long side at most max_side."""
        raise NotImplementedError

    def whole(self) -> np.ndarray:
        """The whole image (3, H, W) uint8 (for --tta, which needs it)."""
        return self.read(0, 0, self.height, self.width)

    def window(self, box, size_g: int, size_p: int, view: str = "square") -> "WindowSource":
        """The box (x0, y0, x1, y1) of this image as an image of its own (coarse-to-fine:
        docs/MODEL.md section 9), with the global view such an image would get."""
        return WindowSource(self, box, size_g, size_p, view)

    def window_faithful(self, height: int, width: int) -> bool:
        """Whether a window of that size gets evaluation's global view (`window_global`)."""
        return True

    def window_global(self, box, size_g: int, size_p: int, view: str) -> torch.Tensor:
        """The global view of the box's pixels: read whole, then evaluation's PIL resize."""
        x0, y0, x1, y1 = box
        image = Image.fromarray(self.read(y0, x0, y1 - y0, x1 - x0).transpose(1, 2, 0))
        return global_view_of(image, size_g, size_p, view)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WindowSource(ImageSource):
    """The box (x0, y0, x1, y1) of another source (inside it), read through it: `read` gives
    the box's pixels, zero past the box's right and bottom borders (not the image's), so the
    box is an image of its own; nothing outside it is read."""

    def __init__(self, parent: ImageSource, box, size_g: int, size_p: int, view: str = "square") -> None:
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= parent.width and 0 <= y0 < y1 <= parent.height):
            raise ValueError(f"box {tuple(box)} is not inside the {parent.width}x{parent.height} image")
        self.parent, self.left, self.top = parent, x0, y0
        self.path, self.height, self.width = parent.path, y1 - y0, x1 - x0
        self.faithful = parent.window_faithful(self.height, self.width)
        self.image_global = parent.window_global((x0, y0, x1, y1), size_g, size_p, view)

    def read(self, top, left, h, w):
        out = np.zeros((3, h, w), dtype=np.uint8)
        hh, ww = min(h, self.height - top), min(w, self.width - left)
        if hh > 0 and ww > 0:
            out[:, :hh, :ww] = self.parent.read(self.top + top, self.left + left, hh, ww)
        return out


def thumb_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _window(array: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """(3, h, w) from an (H, W, 3) array, zero-filled past its bottom/right."""
    out = np.zeros((3, h, w), dtype=np.uint8)
    part = array[top : top + h, left : left + w]
    out[:, : part.shape[0], : part.shape[1]] = part.transpose(2, 0, 1)
    return out


class PILSource(ImageSource):
    """Decoded whole by PIL; its pixels kept once as (H, W, 3) uint8."""

    def __init__(self, path: str, size_g: int, size_p: int, max_side: int | None, view: str = "square") -> None:
        self.path = path
        Image.MAX_IMAGE_PIXELS = None  # large images are the point here
        try:
            with Image.open(path) as im:
                im.load()
                _check_mode(path, im)
                image = im if im.mode == "RGB" else im.convert("RGB")
                self.width, self.height = image.size
                self.image_global = global_view_of(image, size_g, size_p, view)
                self._thumb = (np.array(image.resize(thumb_size(self.height, self.width, max_side)[::-1], Image.BILINEAR))
                               if max_side else None)
                self.array = np.asarray(image)
                del image
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UserError(f"cannot read {path}: not an image, or a corrupt or truncated one ({e})") from e

    def read(self, top, left, h, w):
        return _window(self.array, top, left, h, w)

    def thumbnail(self, max_side):
        return self._thumb


def _check_mode(path: str, im: Image.Image) -> None:
    """8-bit images only: 16-bit and float data would need a scaling we cannot guess (the
    other modes convert to RGB as evaluation converts them)."""
    if im.mode.startswith(("I", "F")):
        raise UserError(f"{path}: {im.mode} pixels (16-bit or float); the model takes 8-bit RGB: "
                        "rescale to 8 bits first (e.g. gdal_translate -ot Byte -scale)")


class RasterioSource(ImageSource):
    """A TIFF/GeoTIFF read by windows with rasterio; `bands` picks 3 bands (1-based)."""

    def __init__(self, path: str, size_g: int, size_p: int, bands: tuple[int, ...] | None,
                 max_pixels: int = FAITHFUL_MAX_PIXELS, view: str = "square") -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        self.path, self.max_pixels = path, max_pixels
        self.ds = None
        try:
            with warnings.catch_warnings():  # no georeference: predict.py says so in its own words
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.ds = rasterio.open(path)
        except RasterioIOError as e:
            raise UserError(f"cannot read {path}: not an image, or a corrupt or truncated one ({e})") from e
        ds = self.ds
        try:
            self.height, self.width = ds.height, ds.width
            self.lut = self._palette(ds) if bands is None and ds.count == 1 else None
            self.bands = self._pick_bands(ds.count, bands)
            dtypes = {ds.dtypes[b - 1] for b in self.bands}
            if dtypes != {"uint8"}:
                raise UserError(f"{path}: {'/'.join(sorted(dtypes))} pixels; the model takes 8-bit RGB: rescale to "
                                "8 bits first (e.g. gdal_translate -ot Byte -scale)")
            if ds.crs is not None or not ds.transform.is_identity:
                self.georef = Georeference(ds.crs, ds.transform)
            self.faithful = self.height * self.width <= max_pixels
            self.image_global = self._make_global(size_g, size_p, view)
        except Exception:
            self.close()
            raise

    def _palette(self, ds) -> np.ndarray | None:
        """(256, 3) colours of a paletted single-band TIFF (as PIL's P -> RGB), else None."""
        from rasterio.enums import ColorInterp

        if ds.colorinterp[0] != ColorInterp.palette:
            return None
        lut = np.zeros((256, 3), dtype=np.uint8)
        for i, c in ds.colormap(1).items():
            if 0 <= i < 256:
                lut[i] = c[:3]
        return lut

    def _pick_bands(self, count: int, bands) -> tuple[int, ...]:
        if bands is not None:
            bad = [b for b in bands if not 1 <= b <= count]
            if bad:
                raise UserError(f"{self.path} has {count} band(s): --bands {bad[0]} does not exist")
            return tuple(bands)
        from rasterio.enums import ColorInterp

        if self.ds.colorinterp[0] in (ColorInterp.cyan, ColorInterp.Y):
            raise UserError(f"{self.path}: a {self.ds.colorinterp[0].name} TIFF; convert it to RGB first "
                            "(or pick three bands with --bands)")
        if count in (1, 2):
            return (1, 1, 1)  # grey (and alpha, dropped), as PIL's L / LA -> RGB
        if count in (3, 4):
            return (1, 2, 3)  # RGB (an alpha band is dropped, as PIL's RGBA -> RGB)
        raise UserError(f"{self.path} has {count} bands; pick the three to use as RGB with --bands, e.g. --bands 3,2,1")

    def _read(self, window=None, out_shape=None, resampling=None) -> np.ndarray:
        from rasterio.errors import RasterioIOError

        from rasterio.enums import Resampling

        unique = sorted(set(self.bands))
        if self.lut is not None and out_shape is not None:
            resampling = Resampling.nearest  # palette indices cannot be averaged
        kw = {} if out_shape is None else dict(out_shape=(len(unique), *out_shape), resampling=resampling)
        try:
            data = self.ds.read(unique, window=window, **kw)
        except RasterioIOError as e:
            cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
            raise UserError(f"cannot read {self.path}: corrupt or truncated ({cause})") from e
        if self.lut is not None:
            return self.lut[data[0]].transpose(2, 0, 1)
        return data[[unique.index(b) for b in self.bands]]

    def read(self, top, left, h, w):
        from rasterio.windows import Window

        out = np.zeros((3, h, w), dtype=np.uint8)
        hh, ww = min(h, self.height - top), min(w, self.width - left)
        if hh > 0 and ww > 0:
            out[:, :hh, :ww] = self._read(Window(left, top, ww, hh))
        return out

    def _make_global(self, size_g: int, size_p: int, view: str) -> torch.Tensor:
        if self.faithful:
            image = Image.fromarray(self._read().transpose(1, 2, 0))
            return global_view_of(image, size_g, size_p, view)
        from rasterio.enums import Resampling

        # (no padding: an image above FAITHFUL_MAX_PIXELS is larger than any patch)
        shape = global_size(self.height, self.width, size_g, view)
        small = self._read(out_shape=shape, resampling=Resampling.average)
        return torch.from_numpy(np.ascontiguousarray(small)).float().div(255)

    def window_faithful(self, height: int, width: int) -> bool:
        return height * width <= self.max_pixels

    def window_global(self, box, size_g: int, size_p: int, view: str) -> torch.Tensor:
        """As `_make_global` for an image of the box's size: up to max_pixels the box read
        whole and PIL's resize, above it a decimated read of the box's window."""
        x0, y0, x1, y1 = box
        if self.window_faithful(y1 - y0, x1 - x0):
            return super().window_global(box, size_g, size_p, view)
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        shape = global_size(y1 - y0, x1 - x0, size_g, view)
        small = self._read(Window(x0, y0, x1 - x0, y1 - y0), out_shape=shape, resampling=Resampling.average)
        return torch.from_numpy(np.ascontiguousarray(small)).float().div(255)

    def thumbnail(self, max_side):
        from rasterio.enums import Resampling

        return self._read(out_shape=thumb_size(self.height, self.width, max_side),
                          resampling=Resampling.average).transpose(1, 2, 0).copy()

    def close(self):
        if self.ds is not None:
            self.ds.close()
            self.ds = None


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if path.lower().endswith(RASTERIO_EXTENSIONS) and have_rasterio():
        import rasterio
        from rasterio.errors import RasterioIOError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path) as ds:
                    return ds.height, ds.width
        except RasterioIOError as e:
            raise UserError(f"cannot read {path}: not an image, or a corrupt or truncated one ({e})") from e
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size[::-1]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read {path}: not an image, or a corrupt or truncated one ({e})") from e


def open_image(path: str, size_g: int, size_p: int, bands: tuple[int, ...] | None = None,
               max_side: int | None = None, max_pixels: int = FAITHFUL_MAX_PIXELS, view: str = "square") -> ImageSource:
    """The reader for `path`: rasterio for TIFF when installed, PIL otherwise. `max_side`:
    the PIL reader makes a thumbnail of that long side while it has the image (overlays)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if path.lower().endswith(RASTERIO_EXTENSIONS) and have_rasterio():
        return RasterioSource(path, size_g, size_p, bands, max_pixels, view)
    if bands is not None:
        raise UserError(f"--bands needs a TIFF read with rasterio ({RASTERIO_HINT}); {path} is read with PIL")
    return PILSource(path, size_g, size_p, max_side, view)
