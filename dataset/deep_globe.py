"""DeepGlobe land-cover dataset in the GLNet layout (GLNET_SPEC.md sections 6 and 8).

    data_path/<split>/Sat/<id>_sat.jpg     RGB image
    data_path/<split>/Label/<id>_mask.png  single-channel class indices (0..6)

Each sample carries the full-resolution image as a uint8 tensor (patches are
sliced from it on the model's device), the global image (PIL bilinear resize of
the uint8 image to size_g, as the original) and, with labels, the label and its
size_g/4 version (PIL NEAREST). Images smaller than the patch size are padded at
the bottom/right (image 0, label 255 = ignore) and `size` keeps the true size.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from utils.errors import UserError

IGNORE_INDEX = 255
SAT_SUFFIX = "_sat.jpg"
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


def find_ids(folder: str, with_labels: bool) -> list[str]:
    """Sorted ids of `folder`/Sat; with labels, every image needs its mask and vice versa."""
    sat = os.path.join(folder, "Sat")
    if not os.path.isdir(sat):
        raise UserError(f"image folder not found: {sat} (expected <data_path>/<split>/Sat/<id>_sat.jpg)")
    ids = sorted(f[: -len(SAT_SUFFIX)] for f in os.listdir(sat) if f.endswith(SAT_SUFFIX))
    if not ids:
        raise UserError(f"no *{SAT_SUFFIX} images in {sat}")
    if with_labels:
        lab = os.path.join(folder, "Label")
        if not os.path.isdir(lab):
            raise UserError(f"label folder not found: {lab}")
        masks = {f[: -len(MASK_SUFFIX)] for f in os.listdir(lab) if f.endswith(MASK_SUFFIX)}
        no_mask = [i for i in ids if i not in masks]
        if no_mask:
            raise UserError(
                f"image without label: {os.path.join(sat, no_mask[0] + SAT_SUFFIX)} has no "
                f"{os.path.join(lab, no_mask[0] + MASK_SUFFIX)} ({len(no_mask)} such images)"
            )
        no_image = sorted(masks - set(ids))
        if no_image:
            raise UserError(
                f"label without image: {os.path.join(lab, no_image[0] + MASK_SUFFIX)} has no "
                f"{os.path.join(sat, no_image[0] + SAT_SUFFIX)} ({len(no_image)} such labels)"
            )
    return ids


def _open(path: str, mode: str | None = None) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode is not None else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read {path}: corrupt or truncated image ({e}); re-download or remove it") from e


def read_label(path: str, n_class: int) -> Image.Image:
    """A class-index mask as a mode 'L' image; RGB masks and bad values are user errors."""
    im = _open(path)
    if len(im.getbands()) >= 3:
        raise UserError(f"{path} is a {len(im.getbands())}-channel colour mask, not a class-index mask; {PREPARE_HINT}")
    arr = np.asarray(im)  # 'L', or 'P' whose indices are the classes
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise UserError(f"{path} has label values outside 0..255; expected 8-bit class indices")
        arr = arr.astype(np.uint8)
    im = Image.fromarray(arr)
    bad = (arr >= n_class) & (arr != IGNORE_INDEX)
    if bad.any():
        raise UserError(
            f"{path} has label value {int(arr[bad].max())} but --n_class is {n_class} "
            f"(allowed: 0..{n_class - 1} and {IGNORE_INDEX} = ignore)"
        )
    return im


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


def _pad(im: Image.Image, height: int, width: int, fill) -> Image.Image:
    if im.size == (width, height):
        return im
    out = Image.new(im.mode, (width, height), fill)
    out.paste(im, (0, 0))
    return out


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
    ) -> None:
        self.root = split_dir(data_path, split)
        if not os.path.isdir(self.root):
            raise UserError(f"data split not found: {self.root}")
        self.ids = find_ids(self.root, labels)
        self.size_g, self.size_p, self.n_class = size_g, size_p, n_class
        self.labels, self.train, self.seed = labels, train, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index) only: reproducible with workers."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        image = _open(os.path.join(self.root, "Sat", id_ + SAT_SUFFIX), "RGB")
        label = None
        if self.labels:
            path = os.path.join(self.root, "Label", id_ + MASK_SUFFIX)
            label = read_label(path, self.n_class)
            if label.size != image.size:
                raise UserError(
                    f"size mismatch: image {image.size[0]}x{image.size[1]} but label "
                    f"{label.size[0]}x{label.size[1]} in {path}"
                )
        if self.train:
            image, label = augment(image, label, random.Random(hash((self.seed, self.epoch, index))))
        width, height = image.size
        ph, pw = max(height, self.size_p), max(width, self.size_p)
        image = _pad(image, ph, pw, (0, 0, 0))
        g = self.size_g
        sample = {
            "id": id_,
            "size": (height, width),
            "image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),  # uint8 (3, H, W)
            "image_global": _to_float(image.resize((g, g), Image.BILINEAR)),
        }
        if label is not None:
            label = _pad(label, ph, pw, IGNORE_INDEX)
            sample["label"] = torch.from_numpy(np.asarray(label).copy())  # uint8 (H, W)
            sample["label_global"] = torch.from_numpy(
                np.asarray(label.resize((g // 4, g // 4), Image.NEAREST)).astype(np.int64)
            )
        return sample


def _to_float(im: Image.Image) -> torch.Tensor:
    """ToTensor: (3, h, w) float32 in [0, 1], no normalisation (section 1)."""
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches keep full-resolution images as lists, so images of mixed sizes can share
    a batch; the global images (all size_g) are stacked."""
    out = {k: [s[k] for s in samples] for k in samples[0]}
    out["image_global"] = torch.stack(out["image_global"])
    if "label_global" in out:
        out["label_global"] = torch.stack(out["label_global"])
    return out
