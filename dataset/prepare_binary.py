"""What the preparers of the two-class data sets (Inria Aerial, ISIC 2018) share.

Both downloads come as an RGB image and a single-band 0/255 mask per id; the training layout
(docs/MODEL.md section 8, as for DeepGlobe) is

    OUT/<split>/Sat/<id>_sat.<ext>    a hard link to the raw image (a byte copy across file systems)
    OUT/<split>/Label/<id>_mask.png   8-bit 'L' PNG, 0 = background, 1 = the object class

`dataset/prepare_inria.py` and `dataset/prepare_isic.py` find the files and choose the split;
the rest is here: split lists, checks before anything is written, the conversion of one image
(a worker's job), the progress bar, the summary.

Re-running is cheap: an image already linked (or copied, same size) and a label this tool wrote
from the same raw mask (name, size and mtime stored in a PNG text chunk) are kept without
decoding anything. Every output is written to a temp file next to it and renamed
(`utils.io`), so an interrupted run leaves no partial file; the next run removes its temp files.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from utils.errors import UserError
from utils.io import atomic_write, place_copy, remove_stale_temps_in, save_png

SPLITS = ("train", "crossvali", "test")
SAT_TAG = "_sat"  # OUT/<split>/Sat/<id>_sat.<ext>
MASK_SUFFIX = "_mask.png"
LISTS_DIR = "splits"  # OUT/splits/<split>.txt: the lists a data folder was prepared with
# PNG text chunks of each label: the raw mask it was made from, and its foreground pixel count
KEY_SOURCE = "glnet-source-mask"
KEY_FOREGROUND = "glnet-foreground-pixels"


class BadFile(ValueError):
    """A raw file that cannot be converted; the message names it."""


@dataclass(frozen=True)
class Item:
    """One image to place: its raw files and its split (paths as strings: sent to workers)."""
    split: str
    image_id: str
    image_src: str
    mask_src: str
    out_root: str
    ext: str  # of the image, with its dot: ".tif", ".jpg"

    @property
    def image_dst(self) -> Path:
        return Path(self.out_root, self.split, "Sat", f"{self.image_id}{SAT_TAG}{self.ext}")

    @property
    def mask_dst(self) -> Path:
        return Path(self.out_root, self.split, "Label", f"{self.image_id}{MASK_SUFFIX}")


@dataclass
class Outcome:
    item: Item
    image: str = ""  # linked / copied / present
    label: str = ""  # written / present
    foreground: int = 0
    pixels: int = 0
    error: str = ""


# ---------------------------------------------------------------------------- split lists


def list_name(image_id: str, ext: str) -> str:
    """The line of a split list for an id: its name in OUT/<split>/Sat/."""
    return f"{image_id}{SAT_TAG}{ext}"


def read_split_lists(folder: Path, ext: str) -> Dict[str, List[str]]:
    """``{split: [id, ...]}`` from ``folder/{train,crossvali,test}.txt``.

    A line is ``<id>_sat<ext>`` (the name in Sat/) or a bare ``<id>``; blank lines and a
    repeated line are skipped. All three files are needed, train and crossvali not empty, and
    no id may be in two lists (an image in training and in a held-out split).
    """
    if not folder.is_dir():
        raise UserError(f"split folder {folder} does not exist (it needs train.txt, crossvali.txt, test.txt)")
    tail = f"{SAT_TAG}{ext}"
    lists: Dict[str, List[str]] = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise UserError(f"split list {path} is missing (the folder needs train.txt, crossvali.txt, test.txt)")
        ids = []
        for line in path.read_text().splitlines():
            name = line.strip()
            if name:
                ids.append(name[: -len(tail)] if name.endswith(tail) else name)
        lists[split] = list(dict.fromkeys(ids))
    for split in ("train", "crossvali"):
        if not lists[split]:
            raise UserError(f"split list {folder / (split + '.txt')} is empty")
    seen: Dict[str, str] = {}
    for split, ids in lists.items():
        for image_id in ids:
            if image_id in seen:
                raise UserError(f"{image_id} is listed in both {seen[image_id]}.txt and {split}.txt "
                                f"in {folder}; an image belongs to one split")
            seen[image_id] = split
    return lists


def write_split_lists(folder: Path, lists: Dict[str, List[str]], ext: str) -> None:
    """Write ``folder/<split>.txt`` (one ``<id>_sat<ext>`` per line, sorted), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with atomic_write(folder / f"{split}.txt", "w") as f:
            f.write("".join(list_name(i, ext) + "\n" for i in sorted(lists[split])))


# ---------------------------------------------------------------------------- checks first


def check_data_path(data_path: Path) -> Path:
    """The absolute output folder; one that exists and is no folder is an error."""
    if data_path.exists() and not data_path.is_dir():
        raise UserError(f"--data_path {data_path} exists and is not a folder")
    return data_path.resolve()


def check_strays(items: Sequence[Item]) -> None:
    """Refuse an output folder that holds images or labels this plan does not put there (made
    with another split: the same image would then sit in two splits and leak into testing)."""
    if not items:
        return
    root = Path(items[0].out_root)
    planned = {(it.split, it.image_id) for it in items}
    strays = []
    for split in SPLITS:
        for sub, marker in (("Sat", SAT_TAG + "."), ("Label", MASK_SUFFIX)):
            folder = root / split / sub
            if not folder.is_dir():
                continue
            for name in sorted(os.listdir(folder)):
                if name.endswith(".tmp") or marker not in name:
                    continue
                image_id = name[: name.rindex(marker)]
                if (split, image_id) not in planned:
                    strays.append(folder / name)
    if strays:
        raise UserError(f"{strays[0]} is not in the {strays[0].parent.parent.name} list of this run "
                        f"({len(strays)} such files): --data_path {root} was prepared with another "
                        "split; use a new --data_path or delete the old one")


def make_output_folders(data_path: Path) -> int:
    """Create OUT/<split>/{Sat,Label}; returns how many stale temp files were removed there."""
    try:
        for split in SPLITS:
            for sub in ("Sat", "Label"):
                (data_path / split / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folders in --data_path {data_path}: {exc.strerror}") from None
    return sum(len(remove_stale_temps_in(data_path / s / sub)) for s in SPLITS for sub in ("Sat", "Label"))


# ---------------------------------------------------------------------------- one image


def source_stamp(path: Path) -> str:
    """What identifies a raw mask's content cheaply: name, bytes, modification time."""
    st = os.stat(path)
    return f"{path.name} {st.st_size} {st.st_mtime_ns}"


def read_binary_mask(path: Path) -> np.ndarray:
    """A 0/255 mask file -> (H, W) uint8 of 0/1; any other value is an error naming it."""
    try:
        with Image.open(path) as im:
            if im.mode == "1":
                im = im.convert("L")
            if im.mode != "L":
                raise BadFile(f"{path}: a {im.mode} image, expected a single-band 0/255 mask")
            values = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise BadFile(f"{path}: not a readable mask ({exc})") from None
    odd = (values != 0) & (values != 255)  # (a bincount of every pixel would make int64 copies)
    if odd.any():
        counts = np.bincount(values[odd], minlength=256)
        found = np.flatnonzero(counts)
        raise BadFile(f"{path}: value {found[0]} in {counts[found[0]]} pixels "
                      f"(expected only 0 and 255; {found.size} such values)")
    return values >> 7  # uint8: 255 -> 1


def stored_text(dst: Path, size: Tuple[int, int], key_source: str, stamp: str, key: str) -> Optional[str]:
    """The text chunk `key` of `dst` when it is an 'L' PNG of `size` written from the raw file
    `stamp` names (its chunk `key_source`), else None (absent, unreadable, foreign, stale)."""
    try:
        with Image.open(dst) as im:
            if im.format != "PNG" or im.mode != "L" or im.size != size or im.info.get(key_source) != stamp:
                return None
            return im.info.get(key)
    except OSError:
        return None


def existing_label(dst: Path, size: Tuple[int, int], stamp: str) -> Optional[int]:
    """The foreground count of a label this tool wrote from the same raw mask, else None."""
    text = stored_text(dst, size, KEY_SOURCE, stamp, KEY_FOREGROUND)
    try:
        return None if text is None else int(text)
    except ValueError:  # foreign
        return None


def header_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the file's header; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise BadFile(f"{path}: not a readable image ({exc})") from None


def convert(item: Item) -> Outcome:
    """Write one label and place its image; an error is returned, not raised (worker)."""
    out = Outcome(item)
    try:
        image_src, mask_src = Path(item.image_src), Path(item.mask_src)
        size = header_size(image_src)
        mask_size = header_size(mask_src)
        if mask_size != size:
            raise BadFile(f"{mask_src} is {mask_size[0]}x{mask_size[1]} but its image "
                          f"{image_src.name} is {size[0]}x{size[1]}")
        out.pixels = size[0] * size[1]
        stamp = source_stamp(mask_src)
        known = existing_label(item.mask_dst, size, stamp)
        if known is not None:
            out.label, out.foreground = "present", known
        else:
            mask = read_binary_mask(mask_src)
            out.foreground = int(np.count_nonzero(mask))
            info = PngInfo()
            info.add_text(KEY_SOURCE, stamp)
            info.add_text(KEY_FOREGROUND, str(out.foreground))
            save_png(item.mask_dst, mask, pnginfo=info)
            out.label = "written"
        # the image last: an id whose mask failed leaves no unpaired image behind
        out.image = place_copy(image_src, item.image_dst)
    except Exception as exc:  # reported after the run as one error line
        out.error = str(exc) if isinstance(exc, BadFile) else f"{item.image_src}: {type(exc).__name__}: {exc}"
    return out


# ---------------------------------------------------------------------------- the run


def run_items(items: Sequence[Item], workers: int, desc: str, job=convert) -> list:
    """job() (convert() by default: a module-level function that returns an outcome with
    ``item``) on every item behind a progress bar, in ``workers`` processes (here if <= 1)."""
    bar = dict(total=len(items), desc=desc, unit="img")
    if workers <= 1 or len(items) <= 1:
        outcomes = [job(item) for item in tqdm(items, **bar)]
    else:
        with Pool(min(workers, len(items))) as pool:
            outcomes = list(tqdm(pool.imap_unordered(job, items), **bar))
    order = {(it.split, it.image_id): n for n, it in enumerate(items)}
    return sorted(outcomes, key=lambda o: order[(o.item.split, o.item.image_id)])


def summary(title: str, outcomes: Sequence[Outcome], lists: Dict[str, List[str]], foreground: str,
            lists_at: Path, extra: Iterable[str] = ()) -> List[str]:
    """The report printed at the end of a run, as lines."""
    done = [o for o in outcomes if not o.error]
    lines = ["", f"{title} preparation summary"]
    shares = []
    for split in SPLITS:
        mine = [o for o in done if o.item.split == split]
        lines.append(f"  {split:<10} {len(mine):5d} images and labels ({len(lists[split])} listed)")
        pixels = sum(o.pixels for o in mine)
        if pixels:
            shares.append(f"{split} {100.0 * sum(o.foreground for o in mine) / pixels:.2f} %")
    n = {k: sum(o.image == k for o in done) for k in ("linked", "copied", "present")}
    copied = " (hard links impossible there: lossless byte copies)" if n["copied"] else ""
    lines.append(f"Sat:   {n['linked']} hard-linked, {n['copied']} copied{copied}, "
                 f"{n['present']} skipped (already present)")
    lines.append(f"Label: {sum(o.label == 'written' for o in done)} written (0/255 -> 0/1), "
                 f"{sum(o.label == 'present' for o in done)} skipped (already present)")
    if shares:
        lines.append(f"{foreground} pixels: " + ", ".join(shares))
    lines.extend(extra)
    lines.append(f"split lists written to {lists_at}/{{train,crossvali,test}}.txt")
    return lines


def prepare_items(title: str, items: Sequence[Item], lists: Dict[str, List[str]], data_path: Path,
                  workers: int, foreground: str, ext: str, extra: Iterable[str] = ()) -> int:
    """Check, write the lists, convert, report. Returns 0; a failed image is a UserError."""
    check_strays(items)
    stale = make_output_folders(data_path)
    lists_at = data_path / LISTS_DIR
    write_split_lists(lists_at, lists, ext)
    outcomes = run_items(items, workers, f"prepare {title}")
    extra = list(extra)
    if stale:
        extra.append(f"removed {stale} temp files left by an interrupted run")
    print("\n".join(summary(title, outcomes, lists, foreground, lists_at, extra)))
    return finish(outcomes, data_path)


def finish(outcomes, data_path: Path) -> int:
    """The end of a preparation, after its summary: the first failed image's error as a
    UserError (saying how many failed), else a 'done' line and 0."""
    failed = [o for o in outcomes if o.error]
    if failed:
        more = f" ({len(failed)} images failed; the others are done, a re-run skips them)" if len(failed) > 1 else ""
        raise UserError(failed[0].error + more)
    print(f"done: {len(outcomes)} images in {data_path}")
    return 0


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """The flags the Inria, ISIC and URUR preparers share: --data_path (the output) and --workers."""
    parser.add_argument("--data_path", required=True, type=Path, help="output folder")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes; 1 or less: no pool")
