"""The GLNet folder layout (docs/MODEL.md sections 6 and 8), DeepGlobe's and any other data set's.

    data_path/<split>/Sat/<id>_sat.<ext>   RGB image, ext one of .jpg .jpeg .png .tif .tiff
                                           (DeepGlobe: .jpg); one file per id
    data_path/<split>/Label/<id>_mask.png  single-channel class indices (0..6 for DeepGlobe)

Each sample carries the full-resolution image as a uint8 tensor (patches are
sliced from it on the model's device), the global image (PIL bilinear resize of
the uint8 image to size_g, as the original) and, with labels, the label and its
size_g/4 version (PIL NEAREST). Images smaller than the patch size are padded at
the bottom/right (image 0, label 255 = ignore) and `size` keeps the true size.
`image_views` / `label_views` build these from one PIL image, for use outside the
folder layout too (e.g. predicting on an arbitrary image).

Masks are decoded through the run's class table (dataset/classes.py): single-channel
values (class indices, or raw values such as 0/255) through its values, RGB masks through
its colours (exact match; DeepGlobe's table refuses them and points to its preparation
script). A value or colour the table does not know is an error naming the file, the value
and the table, never a silent 'ignore'. Images must be 8-bit with 1 or 3 bands (or a
palette); 16-bit or 4-band images are one error line each.

The checks of a label file (readable, a mask the table can decode, the image's size, values
known to the table) are written once here: `check_label_header` looks at the header only
(`DeepGlobe.check_files` runs it on a whole split before a run starts), `read_label`
and `__getitem__` apply the same checks with the same messages while loading.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dataset.classes import IGNORE_LABEL, ClassTable, class_table
from utils.boxes import Box, foreground_box
from utils.errors import UserError

SAT_SUFFIX = "_sat.jpg"  # DeepGlobe's image names
SAT_STEM = "_sat"
SAT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")  # compared lower-case
MASK_SUFFIX = "_mask.png"
PREPARE_HINT = "convert the download with: python -m dataset.prepare_deep_globe --raw_path RAW --data_path OUT"


def split_dir(data_path: str, split: str) -> str:
    """Folder of a split; 'test' also accepts the original's 'offical_crossvali' name."""
    path = os.path.join(data_path, split)
    if split == "test" and not os.path.isdir(path):
        alt = os.path.join(data_path, "offical_crossvali")
        if os.path.isdir(alt):
            return alt
    return path


def image_id(name: str) -> str | None:
    """'<id>_sat.<ext>' -> id for an image extension of SAT_EXTENSIONS, else None."""
    stem, ext = os.path.splitext(name)
    if ext.lower() in SAT_EXTENSIONS and stem.endswith(SAT_STEM) and len(stem) > len(SAT_STEM):
        return stem[: -len(SAT_STEM)]
    return None


def find_images(folder: str, with_labels: bool) -> dict[str, str]:
    """{id: image file name} of `folder`/Sat, sorted by id; with labels, every image needs its
    mask and vice versa. One id with two image files (a.jpg and a.png) is an error."""
    sat = os.path.join(folder, "Sat")
    if not os.path.isdir(sat):
        raise UserError(f"image folder not found: {sat} (expected <data_path>/<split>/Sat/<id>_sat.jpg, "
                        f"or .jpeg .png .tif .tiff)")
    files: dict[str, str] = {}
    for name in sorted(os.listdir(sat)):
        id_ = image_id(name)
        if id_ is None:
            continue
        if id_ in files:
            raise UserError(f"two images for id {id_!r} in {sat}: {files[id_]} and {name}; keep one")
        files[id_] = name
    if not files:
        raise UserError(f"no *{SAT_SUFFIX} images in {sat} (nor *_sat.jpeg .png .tif .tiff)")
    files = dict(sorted(files.items()))
    ids = list(files)
    if with_labels:
        lab = os.path.join(folder, "Label")
        if not os.path.isdir(lab):
            raise UserError(f"label folder not found: {lab}")
        masks = {f[: -len(MASK_SUFFIX)] for f in os.listdir(lab) if f.endswith(MASK_SUFFIX)}
        no_mask = [i for i in ids if i not in masks]
        if no_mask:
            raise UserError(
                f"image without label: {os.path.join(sat, files[no_mask[0]])} has no "
                f"{os.path.join(lab, no_mask[0] + MASK_SUFFIX)} ({len(no_mask)} such images)"
            )
        no_image = sorted(masks - set(ids))
        if no_image:
            raise UserError(
                f"label without image: {os.path.join(lab, no_image[0] + MASK_SUFFIX)} has no "
                f"{os.path.join(sat, no_image[0] + SAT_STEM)}.<ext> ({len(no_image)} such labels)"
            )
    return files


def _unreadable(path: str, e: Exception) -> UserError:
    return UserError(f"cannot read {path}: corrupt or truncated image ({e}); re-download or remove it")


def _open(path: str, mode: str | None = None) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode is not None else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise _unreadable(path, e) from e


def read_header(path: str) -> tuple[tuple[int, int], int, str]:
    """((width, height), number of bands, PIL mode) from the file header, without decoding
    the pixels."""
    try:
        with Image.open(path) as im:
            return im.size, len(im.getbands()), im.mode
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise _unreadable(path, e) from e


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def check_image_mode(path: str, mode: str, bands: int) -> None:
    """Images must be 8-bit with 1 or 3 bands (or a palette): the model reads 8-bit RGB."""
    if mode in _HIGH_DEPTH:
        raise UserError(f"{path} is a {'32-bit' if mode in ('I', 'F') else '16-bit'} image ({mode}); the model reads "
                        "8-bit RGB: convert it to 8 bits per channel (scale to 0..255) first")
    if bands not in (1, 3):
        raise UserError(f"{path} has {bands} bands ({mode}); the model reads 3-band RGB: save it as RGB "
                        "(drop the alpha or extra band) first")


def read_image(path: str) -> Image.Image:
    """An image of the layout as RGB; 16-bit and 4-band images are user errors."""
    im = _open(path)
    check_image_mode(path, im.mode, len(im.getbands()))
    return im.convert("RGB") if im.mode != "RGB" else im


def _table(classes: ClassTable | int | None) -> ClassTable:
    if classes is None:
        return class_table(7)
    return class_table(classes) if isinstance(classes, int) else classes


def _check_label_bands(path: str, bands: int, classes: ClassTable) -> None:
    if bands >= 3 and classes.rgb_masks == "prepare":
        raise UserError(f"{path} is a {bands}-channel colour mask, not a class-index mask; {PREPARE_HINT}")
    if bands == 2 or bands > 4:
        raise UserError(f"{path} is a {bands}-channel mask; expected one channel (class indices or mask values) "
                        "or RGB colours")


def _check_label_size(path: str, image_size: tuple[int, int], label_size: tuple[int, int]) -> None:
    """Sizes are PIL's (width, height)."""
    if label_size != image_size:
        raise UserError(
            f"size mismatch: image {image_size[0]}x{image_size[1]} but label "
            f"{label_size[0]}x{label_size[1]} in {path}"
        )


def check_label_header(path: str, image_size: tuple[int, int], classes: ClassTable | int | None = None) -> None:
    """Header-only checks of a label file for an image of PIL size `image_size` (width,
    height): readable, a mask the table can decode, the image's size. The label values need
    a full decode: `read_label` checks those."""
    label_size, bands, _ = read_header(path)
    _check_label_bands(path, bands, _table(classes))
    _check_label_size(path, image_size, label_size)


def _unknown(path: str, what: str, classes: ClassTable) -> UserError:
    if classes.values == tuple((i,) for i in range(classes.n_class)) and not classes.ignore_colors:
        ignore = "".join(f" and {v} = ignore" for v in classes.ignore_values)
        known = f"--n_class is {classes.n_class}; allowed: 0..{classes.n_class - 1}{ignore}"
    else:
        known = f"it knows {classes.known_values()}"
    return UserError(f"{path} has {what}, which class table {classes.name!r} does not know ({known}); "
                     "fix the mask or the table (--classes)")


def _refuse_binary(path: str, arr: np.ndarray, classes: ClassTable) -> None:
    """A 0/255 binary mask read with 255 = ignore would lose its whole foreground: refused."""
    if arr.max() == 255 and arr.min() == 0 and not np.any((arr != 0) & (arr != 255)):
        raise UserError(
            f"{path} has only the values 0 and 255, and class table {classes.name!r} reads 255 as 'ignore', which "
            "would leave nothing labelled but class 0; for binary 0/255 masks use --dataset inria or isic, or a "
            "--classes table that maps 255 to a class (README 'Your own data'); if 255 is 'ignore', list it in the "
            "table's ignore_values")


def read_label(path: str, classes: ClassTable | int | None = None) -> Image.Image:
    """A mask decoded through the class table (an int: `class_table(n)`) as a mode 'L' image
    of class indices, ignored pixels `classes.ignore_index`. Single-channel masks ('L', 'P'
    indices, '1', 16-bit) go through the table's values, RGB(A) ones through its colours;
    an unknown value or colour is a user error."""
    classes = _table(classes)
    im = _open(path)
    _check_label_bands(path, len(im.getbands()), classes)
    arr = np.asarray(im)
    if arr.ndim == 3:
        decoded, bad_color = classes.decode_colors(arr)
        if bad_color is not None:
            raise _unknown(path, f"colour {list(bad_color)}", classes)
    else:
        if arr.dtype.kind == "f":
            raise UserError(f"{path} is a floating-point mask; expected integer class indices or mask values")
        decoded, bad_value = classes.decode_values(arr.astype(np.uint8) if arr.dtype == bool else arr)
        if bad_value is not None:
            raise _unknown(path, f"label value {bad_value}", classes)
        if classes.refuse_0_255 and 255 in classes.ignore_values and classes.n_class > 1 and arr.size:
            _refuse_binary(path, arr, classes)
    return Image.fromarray(decoded)


def augment(image: Image.Image, label: Image.Image | None, rng: random.Random):
    """Train-time flips/rotations, identical on image and label (section 6)."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        label = label.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if label is not None else None
    if rng.random() < 0.5:
        op = rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270])
        image = image.transpose(op)
        label = label.transpose(op) if label is not None else None
    return image, label


def foreground_crop(image: Image.Image, label: Image.Image, size_p: int,
                    ignore_index: int = IGNORE_LABEL) -> tuple[Image.Image, Image.Image, Box | None]:
    """--crop_foreground (docs/MODEL.md section 9): the image and its class-index label cut
    alike to the box of the label's foreground, relaxed by `utils.boxes.foreground_box` for
    patches of `size_p`. Foreground: every class but 0; ignored pixels (`ignore_index`) are
    not foreground. A label without foreground keeps the image whole (box None)."""
    classes = torch.from_numpy(np.array(label))
    box, _ = foreground_box((classes != 0) & (classes != ignore_index), size_p)
    if box is None:
        return image, label, None
    return image.crop(tuple(box)), label.crop(tuple(box)), box


def _pad(im: Image.Image, size_p: int, fill) -> Image.Image:
    """Pad at the bottom/right to at least size_p per side."""
    width, height = im.size
    pw, ph = max(width, size_p), max(height, size_p)
    if (pw, ph) == (width, height):
        return im
    out = Image.new(im.mode, (pw, ph), fill)
    out.paste(im, (0, 0))
    return out


def _to_float(im: Image.Image) -> torch.Tensor:
    """ToTensor: (3, h, w) float32 in [0, 1], no normalisation (section 1)."""
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255)


GLOBAL_VIEWS = ("square", "aspect")
MIN_ASPECT_SIDE = 64  # short side of an 'aspect' global view, at least (BatchNorm needs a c5 of 2x2)


def global_size(height: int, width: int, size_g: int, view: str = "square") -> tuple[int, int]:
    """(h, w) of the global view of a (padded) H x W image. 'square': size_g x size_g, the
    original's squash (section 6). 'aspect': the long side size_g, the short side scaled
    alike and rounded to a multiple of 4 (the FPN output is 1/4 of the input), at least
    min(size_g, MIN_ASPECT_SIDE). Patch crops and merges follow either: they are ratios of
    the map's own size (utils/geometry.py)."""
    if view == "square":
        return size_g, size_g
    if view != "aspect":
        raise ValueError(f"global view must be one of {GLOBAL_VIEWS}, got {view!r}")
    long_, short = max(height, width), min(height, width)
    side = max(min(size_g, MIN_ASPECT_SIDE), int(size_g * short / long_ / 4 + 0.5) * 4)
    return (size_g, side) if height >= width else (side, size_g)


def global_view_of(image: Image.Image, size_g: int, size_p: int, global_view: str = "square") -> torch.Tensor:
    """The global view (3, h, w) of an RGB image: padded to at least size_p per side, PIL
    bilinear resize to `global_size`, / 255 (section 6)."""
    image = _pad(image, size_p, (0, 0, 0))
    h, w = global_size(image.height, image.width, size_g, global_view)
    return _to_float(image.resize((w, h), Image.BILINEAR))


def image_views(image: Image.Image, size_g: int, size_p: int, global_view: str = "square") -> dict[str, Any]:
    """The model's inputs from one image (section 6): {"size": (H, W) before padding,
    "image": uint8 (3, H', W') padded with 0 to at least size_p per side, "image_global":
    float32 (3, h, w), PIL bilinear resize of the padded image to `global_size` (size_g x
    size_g for the default 'square' view), / 255}. A non-RGB image is converted to RGB first."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    return {
        "size": (height, width),
        "image": torch.from_numpy(np.asarray(_pad(image, size_p, (0, 0, 0))).copy()).permute(2, 0, 1),
        "image_global": global_view_of(image, size_g, size_p, global_view),
    }


def label_views(label: Image.Image, size_g: int, size_p: int, ignore_index: int = IGNORE_LABEL,
                global_view: str = "square") -> dict[str, Any]:
    """The targets from one class-index mask (mode 'L'), padded as `image_views` pads its
    image: {"label": uint8 (H', W') padded with ignore_index, "label_global": int64
    (h/4, w/4) of the image's global view, PIL NEAREST resize of the padded label}."""
    label = _pad(label, size_p, ignore_index)
    h, w = global_size(label.height, label.width, size_g, global_view)
    return {
        "label": torch.from_numpy(np.asarray(label).copy()),
        "label_global": torch.from_numpy(np.asarray(label.resize((w // 4, h // 4), Image.NEAREST)).astype(np.int64)),
    }


class DeepGlobe(Dataset):
    """One split of DeepGlobe; `labels=False` for the unlabelled test split."""

    def __init__(
        self,
        data_path: str,
        split: str,
        size_g: int,
        size_p: int,
        n_class: int = 7,
        labels: bool = True,
        train: bool = False,
        seed: int = 0,
        classes: ClassTable | None = None,
        global_view: str = "square",
        crop_foreground: bool = False,
    ) -> None:
        """`classes`: the table masks are decoded with (default `class_table(n_class)`);
        `global_view`: see `global_size`; `crop_foreground`: each image and its label cut to
        the label's foreground box before anything else (`foreground_crop`; needs labels).
        (Eleven parameters: a torch Dataset is built from its options, each a keyword with a
        default but the folder and the sizes.)"""
        self.root = split_dir(data_path, split)
        if not os.path.isdir(self.root):
            raise UserError(f"data split not found: {self.root}")
        self.files = find_images(self.root, labels)
        self.ids = list(self.files)
        self.size_g, self.size_p, self.n_class = size_g, size_p, n_class
        self.classes = classes if classes is not None else class_table(n_class)
        if self.classes.n_class != n_class:
            raise UserError(f"--n_class {n_class} but class table {self.classes.name!r} has {self.classes.n_class} classes")
        self.labels, self.train, self.seed = labels, train, seed
        self.global_view = global_view
        if crop_foreground and not labels:
            raise ValueError("crop_foreground needs labels: the box is the label's foreground")
        self.crop_foreground = crop_foreground
        self.epoch = 0

    @staticmethod
    def has_labels(data_path: str, split: str) -> bool:
        """Whether a split of --data_path has its Label/ folder."""
        return os.path.isdir(os.path.join(split_dir(data_path, split), "Label"))

    @classmethod
    def open(cls, data_path: str, split: str, size_g: int, size_p: int, n_class: int = 7, hint: str = PREPARE_HINT,
             **kwargs) -> "DeepGlobe":
        """The dataset of a run's --data_path: a missing folder is one error naming the flag,
        the expected layout and `hint` (how to make the folder: the preparation command).
        `kwargs` as for the constructor."""
        if not os.path.isdir(data_path):
            raise UserError(f"--data_path {data_path} does not exist (expected train/, crossvali/ inside); {hint}")
        if not os.path.isdir(split_dir(data_path, split)):
            labels = "" if not kwargs.get("labels", True) else f" and {split}/Label/<id>_mask.png"
            raise UserError(
                f"--data_path {data_path} has no {split}/ folder (expected {split}/Sat/<id>_sat.jpg{labels}); "
                + hint
            )
        return cls(data_path, split, size_g, size_p, n_class, **kwargs)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index) only: reproducible with workers."""
        self.epoch = epoch

    def image_path(self, id_: str) -> str:
        return os.path.join(self.root, "Sat", self.files[id_])

    def label_path(self, id_: str) -> str:
        return os.path.join(self.root, "Label", id_ + MASK_SUFFIX)

    def check_files(self) -> None:
        """Header-only look at every image and label of the split, so that a foreign file, a
        colour mask or a size mismatch stops a run at once rather than when the loader reaches
        it (for the validation split: after a whole training epoch). Truncated data and bad
        label values need a full decode; `__getitem__` reports those."""
        for id_ in self.ids:
            path = self.image_path(id_)
            size, bands, mode = read_header(path)
            check_image_mode(path, mode, bands)
            if self.labels:
                check_label_header(self.label_path(id_), size, self.classes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        image = read_image(self.image_path(id_))
        label = None
        if self.labels:
            path = self.label_path(id_)
            label = read_label(path, self.classes)
            _check_label_size(path, image.size, label.size)
            if self.crop_foreground:
                image, label, _ = foreground_crop(image, label, self.size_p, self.classes.ignore_index)
        if self.train:
            image, label = augment(image, label, random.Random(hash((self.seed, self.epoch, index))))
        sample = {"id": id_, **image_views(image, self.size_g, self.size_p, self.global_view)}
        if label is not None:
            sample.update(label_views(label, self.size_g, self.size_p, self.classes.ignore_index, self.global_view))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches keep full-resolution images as lists, so images of mixed sizes can share
    a batch; the global images (all size_g x size_g, or one image with --global_view
    aspect) are stacked."""
    out = {k: [s[k] for s in samples] for k in samples[0]}
    out["image_global"] = torch.stack(out["image_global"])
    if "label_global" in out:
        out["label_global"] = torch.stack(out["label_global"])
    return out
