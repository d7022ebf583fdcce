"""Turn the URUR download (Ji et al., CVPR 2023: 5120x5120 images, 8 classes) into the
training layout.

    python -m dataset.prepare_urur --raw_path RAW --data_path data/urur

The release does not document its folders and the public loaders read two layouts; either is
accepted, in RAW or in RAW/URUR:

    <split>/image/<name>.png  with  <split>/label/<name>.png
    imgs/<split>/<name>.png   with  labels/<split>/<name>.png

<split> is train, val or test (the splits the tree has; val becomes crossvali). Images may be
.png, .jpg or .tif; a label has its image's name with .png (or .tif). Every image gets

    OUT/<split>/Sat/<name>_sat.<ext>    a hard link to the raw image (a byte copy across file systems)
    OUT/<split>/Label/<name>_mask.png   'L' PNG of class indices 0..7 (dataset.classes.URUR)

A label is a single-channel image of class indices 0..7 (checked: any other value is an
error naming the file and the value) or an RGB image in the release's class colours (decoded;
a colour that is no class colour is an error naming the file and the colour). An image
without its label, a label of another size than its image or a tree in neither layout is one
``error:`` line. Re-runs keep finished files (a label written from the same raw file: name,
bytes and mtime stored in the PNG, as ``prepare_binary.py`` does); the summary gives the
images per split and the share of each class.

Exit codes: 0 done; 2 an error (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from dataset.classes import URUR
from dataset.prepare_binary import (
    BadFile, Item, add_output_args, check_data_path, check_strays, finish, header_size, make_output_folders, run_items,
    source_stamp, stored_text,
)
from utils.errors import UserError, run_main
from utils.io import place_copy, save_png

SPLITS = {"train": "train", "val": "crossvali", "test": "test"}  # the release's name -> ours
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LABEL_EXTS = (".png", ".tif", ".tiff")
# the two layouts: (how the message names it, (image folder, label folder) of a split in a root)
LAYOUTS = (
    ("<split>/image/ with <split>/label/", lambda root, s: (root / s / "image", root / s / "label")),
    ("imgs/<split>/ with labels/<split>/", lambda root, s: (root / "imgs" / s, root / "labels" / s)),
)
SUBFOLDERS = ("URUR", "urur")  # RAW may be the folder the archive was unpacked into
# PNG text chunks of each label: the raw label it was made from, its pixels per class
KEY_SOURCE = "glnet-source-label"
KEY_COUNTS = "glnet-class-pixels"


@dataclass
class Tree:
    """A recognised raw tree: its root, layout and {release split: (image folder, label folder)}."""
    root: Path
    layout: str
    splits: Dict[str, Tuple[Path, Path]]


@dataclass
class Outcome:
    item: Item
    image: str = ""  # linked / copied / present
    label: str = ""  # written / present
    decoded: str = ""  # indices / colours (a label written this run)
    counts: List[int] = field(default_factory=lambda: [0] * URUR.n_class)
    error: str = ""


# ---------------------------------------------------------------------------- the raw tree


def find_tree(raw: Path) -> Tree:
    """The layout of RAW (or RAW/URUR): the first root where one layout has a split; a root
    where both have one, or no layout anywhere, is an error naming what was looked for."""
    looked = f"{' or '.join(name for name, _ in LAYOUTS)} (<split>: {', '.join(SPLITS)})"
    if not raw.is_dir():
        raise UserError(f"--raw_path {raw} is not a folder; point it at the unpacked URUR release ({looked})")
    roots = [raw] + [raw / sub for sub in SUBFOLDERS if (raw / sub).is_dir()]
    for root in roots:
        found = []
        for name, folders in LAYOUTS:
            splits = {}
            for split in SPLITS:
                image_dir, label_dir = folders(root, split)
                if image_dir.is_dir() and not label_dir.is_dir():
                    raise UserError(f"{image_dir} has no label folder {label_dir} beside it (layout {name})")
                if image_dir.is_dir():
                    splits[split] = (image_dir, label_dir)
            if splits:
                found.append(Tree(root, name, splits))
        if len(found) > 1:
            raise UserError(f"--raw_path {root} holds both layouts ({found[0].layout}; {found[1].layout}); "
                            "point it at one of them")
        if found:
            return found[0]
    where = " and ".join(str(r) for r in [raw] + [raw / s for s in SUBFOLDERS[:1]])
    raise UserError(f"--raw_path {raw} is no URUR tree: looked for {looked} in {where}")


def files_by_name(folder: Path, exts: Sequence[str]) -> Dict[str, Path]:
    """{name without extension: path} of the files of `folder` with one of `exts` (any case);
    two files of one name (a.png, a.jpg) are an error naming both."""
    found: Dict[str, Path] = {}
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        stem, ext = os.path.splitext(entry)
        if ext.lower() not in exts or not path.is_file():
            continue
        if stem in found:
            raise UserError(f"{found[stem]} and {path} have the same name; keep one")
        found[stem] = path
    return found


def plan(tree: Tree, data_path: Path) -> Tuple[List[Item], Dict[str, int], List[str]]:
    """An Item per image; the number of images per split of ours; notes for the summary. An
    image without its label is an error."""
    items: List[Item] = []
    counts = {ours: 0 for ours in SPLITS.values()}
    notes: List[str] = []
    for split, (image_dir, label_dir) in tree.splits.items():
        images, labels = files_by_name(image_dir, IMAGE_EXTS), files_by_name(label_dir, LABEL_EXTS)
        unlabelled = sorted(set(images) - set(labels))
        if unlabelled:
            more = f" ({len(unlabelled)} such images)" if len(unlabelled) > 1 else ""
            raise UserError(f"{images[unlabelled[0]]} has no label {label_dir / unlabelled[0]}.png{more}")
        orphans = sorted(set(labels) - set(images))
        if orphans:
            notes.append(f"labels without an image in {label_dir} (skipped): {len(orphans)}")
        for name, image in images.items():
            items.append(Item(SPLITS[split], name, str(image), str(labels[name]), str(data_path), image.suffix.lower()))
        counts[SPLITS[split]] = len(images)
    return items, counts, notes


# ---------------------------------------------------------------------------- one image


def value_error(path: Path, values: np.ndarray, bad: np.ndarray) -> BadFile:
    """The error of a label holding values that are no class index."""
    value = values[bad].min()
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(URUR.names))
    return BadFile(f"{path}: value {value} in {np.count_nonzero(values == value)} pixels; URUR labels are class "
                   f"indices 0..{URUR.n_class - 1} ({classes})")


def read_label(path: Path) -> Tuple[np.ndarray, str]:
    """A raw label -> ((H, W) uint8 class indices, 'indices' or 'colours'); anything that is
    neither class indices 0..7 nor URUR's colours is an error naming the file."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(im)
            elif mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):  # P: the palette's indices
                values = np.asarray(im)
            else:
                raise BadFile(f"{path}: a {mode} image; expected single-channel class indices 0..7 or an RGB "
                              "label in URUR's class colours")
    except (UnidentifiedImageError, OSError) as exc:
        raise BadFile(f"{path}: not a readable label ({exc})") from None
    if mode in ("RGB", "RGBA"):
        classes, colour = URUR.decode_colors(rgb)
        if colour is not None:
            n = int(np.count_nonzero((rgb[..., :3] == colour).all(axis=-1)))
            hint = (" (class indices saved in three channels? save them as a single-channel PNG)"
                    if colour[0] == colour[1] == colour[2] < URUR.n_class else "")
            raise BadFile(f"{path}: colour {colour} in {n} pixels is none of URUR's {URUR.n_class} class colours"
                          + hint)
        return classes, "colours"
    bad = (values < 0) | (values >= URUR.n_class)
    if bad.any():
        raise value_error(path, values, bad)
    return values.astype(np.uint8), "indices"


def existing_label(dst: Path, size: Tuple[int, int], stamp: str) -> Optional[List[int]]:
    """The class pixel counts of a label this tool wrote from the same raw label, else None."""
    text = stored_text(dst, size, KEY_SOURCE, stamp, KEY_COUNTS)
    try:
        counts = None if text is None else [int(v) for v in text.split()]
    except ValueError:  # foreign
        return None
    return counts if counts is not None and len(counts) == URUR.n_class else None


def convert(item: Item) -> Outcome:
    """Write one label and place its image; an error is returned, not raised (worker)."""
    out = Outcome(item)
    try:
        image_src, label_src = Path(item.image_src), Path(item.mask_src)
        size, label_size = header_size(image_src), header_size(label_src)
        if label_size != size:
            raise BadFile(f"{label_src} is {label_size[0]}x{label_size[1]} but its image "
                          f"{image_src.name} is {size[0]}x{size[1]}")
        stamp = source_stamp(label_src)
        known = existing_label(item.mask_dst, size, stamp)
        if known is not None:
            out.label, out.counts = "present", known
        else:
            classes, out.decoded = read_label(label_src)
            out.counts = [int(np.count_nonzero(classes == c)) for c in range(URUR.n_class)]  # no int64 copy
            info = PngInfo()
            info.add_text(KEY_SOURCE, stamp)
            info.add_text(KEY_COUNTS, " ".join(map(str, out.counts)))
            save_png(item.mask_dst, classes, pnginfo=info)
            out.label = "written"
        out.image = place_copy(image_src, item.image_dst)  # last: a failed label leaves no unpaired image
    except Exception as exc:  # reported after the run as one error line
        out.error = str(exc) if isinstance(exc, BadFile) else f"{item.image_src}: {type(exc).__name__}: {exc}"
    return out


# ---------------------------------------------------------------------------- the run


def summary(tree: Tree, outcomes: Sequence[Outcome], counts: Dict[str, int], notes: Sequence[str]) -> List[str]:
    """The report printed at the end of a run, as lines."""
    done = [o for o in outcomes if not o.error]
    release = {ours: theirs for theirs, ours in SPLITS.items()}
    lines = ["", f"URUR preparation summary (layout {tree.layout} in {tree.root})"]
    for split in SPLITS.values():
        mine = sum(o.item.split == split for o in done)
        if release[split] in tree.splits:
            lines.append(f"  {split:<10} {mine:5d} images and labels (of {counts[split]} in "
                         f"{tree.splits[release[split]][0]})")
        else:
            lines.append(f"  {split:<10} {mine:5d} images (the tree has no {release[split]} split)")
    n = {k: sum(o.image == k for o in done) for k in ("linked", "copied", "present")}
    copied = " (hard links impossible there: lossless byte copies)" if n["copied"] else ""
    lines.append(f"Sat:   {n['linked']} hard-linked, {n['copied']} copied{copied}, "
                 f"{n['present']} skipped (already present)")
    written = [o for o in done if o.label == "written"]
    lines.append(f"Label: {len(written)} written ({sum(o.decoded == 'colours' for o in written)} of them decoded "
                 f"from RGB colours), {sum(o.label == 'present' for o in done)} skipped (already present)")
    width = max(len(n) for n in URUR.names) + 1
    lines.append("class shares (% of the pixels of each split):")
    lines.append(f"  {'':<10}" + "".join(f"{name:>{width}}" for name in URUR.names))
    for split in SPLITS.values():
        pixels = np.zeros(URUR.n_class, dtype=np.int64)
        for o in done:
            if o.item.split == split:
                pixels += np.asarray(o.counts, dtype=np.int64)
        if pixels.sum():
            lines.append(f"  {split:<10}" + "".join(f"{100.0 * p / pixels.sum():>{width}.2f}" for p in pixels))
    lines.extend(notes)
    if "val" not in tree.splits:
        lines.append("note: no val split in the tree, so crossvali/ is empty; training validates on "
                     "crossvali/ after every epoch: put labelled images there (e.g. links to some of train/)")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataset.prepare_urur",
        description="Convert the URUR release into OUT/{train,crossvali,test}/{Sat,Label} "
                    "(val becomes crossvali; labels checked to be class indices 0..7).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw_path", required=True, type=Path,
                        help=f"the unpacked release: {' or '.join(n for n, _ in LAYOUTS)}, in it or in its URUR/")
    add_output_args(parser)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> int:
    tree = find_tree(args.raw_path)
    data_path = check_data_path(args.data_path)
    items, counts, notes = plan(tree, data_path)
    if not items:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) in the {tree.layout} folders of {tree.root}")
    check_strays(items)
    stale = make_output_folders(data_path)
    if stale:
        notes.append(f"removed {stale} temp files left by an interrupted run")
    outcomes = run_items(items, args.workers, "prepare URUR", job=convert)
    print("\n".join(summary(tree, outcomes, counts, notes)))
    return finish(outcomes, data_path)


def main(argv=None) -> int:
    return run_main(parse_args, prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
