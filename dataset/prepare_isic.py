"""Turn the ISIC 2018 lesion segmentation (task 1) training download into the training layout.

    python -m dataset.prepare_isic --raw_path RAW --data_path data/isic [--seed 0 | --splits DIR]

RAW holds the two unpacked archives of the challenge's training data:
``ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg`` (2594 RGB images of many sizes, up to
6748x4499) and ``ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png`` (0 background,
255 lesion). Every image of the split gets

    OUT/<split>/Sat/ISIC_<id>_sat.jpg     a hard link to the raw JPEG (a byte copy across file systems)
    OUT/<split>/Label/ISIC_<id>_mask.png  'L' PNG, 0 background, 1 lesion

The GLNet paper splits the 2594 images 2074 / 260 / 260 (train / crossvali / test) but did not
publish its lists. By default this tool makes a split of that shape, the same on every machine:
the ids are ordered by the SHA-256 digest of ``"<seed>:<id>"`` (``--seed``, 0 by default), the
first ceil(n/10) go to crossvali, the next ceil(n/10) to test and the rest to train (80/10/10:
exactly 2074 / 260 / 260 for 2594 images). ``--splits DIR`` uses your lists instead
(``train.txt``, ``crossvali.txt``, ``test.txt``, lines ``ISIC_<id>_sat.jpg`` or ``ISIC_<id>``).
Either way the lists used are written to ``OUT/splits/``.

Images smaller than a patch are fine (the loader pads them). A mask of another size than its
image, a mask value other than 0 / 255, an image without a mask (or a listed id without its
files) is an error naming the file. Re-runs skip finished files (``dataset/prepare_binary.py``).

Exit codes: 0 done; 2 an error (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dataset.prepare_binary import (
    Item, add_output_args, check_data_path, prepare_items, read_split_lists,
)
from utils.errors import UserError, run_main

INPUT_DIR = "ISIC2018_Task1-2_Training_Input"
TRUTH_DIR = "ISIC2018_Task1_Training_GroundTruth"
EXT = ".jpg"
IMAGE_NAME = re.compile(r"(ISIC_\d+)\.jpg")
MASK_NAME = re.compile(r"(ISIC_\d+)_segmentation\.png")
LAYOUT = f"{INPUT_DIR}/ISIC_<id>.jpg and {TRUTH_DIR}/ISIC_<id>_segmentation.png"


def scan(raw: Path) -> Dict[str, Dict[str, Path]]:
    """``{"image": {id: path}, "mask": {id: path}}`` of the two raw folders (other files ignored)."""
    if not raw.is_dir():
        raise UserError(f"--raw_path {raw} is not a folder; point it at the folder holding {LAYOUT}")
    found: Dict[str, Dict[str, Path]] = {}
    for kind, sub, pattern in (("image", INPUT_DIR, IMAGE_NAME), ("mask", TRUTH_DIR, MASK_NAME)):
        folder = raw / sub
        if not folder.is_dir():
            raise UserError(f"--raw_path {raw} has no {sub}/ folder; point it at the folder holding {LAYOUT}")
        found[kind] = {}
        for name in os.listdir(folder):
            match = pattern.fullmatch(name)
            if match:
                found[kind][match.group(1)] = folder / name
    if not found["image"]:
        raise UserError(f"no ISIC_<id>.jpg images in {raw / INPUT_DIR}")
    return found


def held_out_count(n: int) -> int:
    """Images of crossvali and of test each in an 80/10/10 split of n: ceil(n / 10), which
    gives ISIC 2018's 2594 images the paper's 2074 / 260 / 260."""
    return math.ceil(n / 10)


def seeded_split(ids: Sequence[str], seed: int) -> Dict[str, List[str]]:
    """80/10/10 by the SHA-256 order of "<seed>:<id>": independent of listing order and of
    library versions. crossvali and test get ceil(n/10) each, train the rest."""
    if len(ids) < 3:
        raise UserError(f"a split needs at least 3 images, the raw folders have {len(ids)}")
    order = sorted(set(ids), key=lambda i: (hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), i))
    k = held_out_count(len(order))
    return {"train": sorted(order[2 * k:]), "crossvali": sorted(order[:k]), "test": sorted(order[k:2 * k])}


def plan(found, lists, data_path: Path) -> List[Item]:
    """An Item per listed id; a listed id without its image or mask is an error."""
    items, missing = [], []
    for split, ids in lists.items():
        for image_id in ids:
            image, mask = found["image"].get(image_id), found["mask"].get(image_id)
            if image is None:
                missing.append(f"{INPUT_DIR}/{image_id}.jpg (listed in {split}.txt)")
            elif mask is None:
                missing.append(f"{TRUTH_DIR}/{image_id}_segmentation.png (the mask of {image.name}, "
                               f"listed in {split}.txt)")
            else:
                items.append(Item(split, image_id, str(image), str(mask), str(data_path), EXT))
    if missing:
        more = f"; {len(missing)} such files" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]} does not exist{more}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataset.prepare_isic",
        description="Convert the ISIC 2018 task 1 training download into "
                    "OUT/{train,crossvali,test}/{Sat,Label} (80/10/10: 2074 / 260 / 260 of 2594).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw_path", required=True, type=Path, help=f"folder holding {LAYOUT}")
    add_output_args(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split: ids ordered by SHA-256 of '<seed>:<id>', the first "
                             "tenth (rounded up) crossvali, the next tenth test, the rest train")
    parser.add_argument("--splits", "--split_dir", dest="splits", type=Path, default=None,
                        help="folder with your train.txt, crossvali.txt, test.txt (lines "
                             "ISIC_<id>_sat.jpg) instead of the seeded split")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> int:
    found = scan(args.raw_path)
    data_path = check_data_path(args.data_path)
    extra: List[str] = []
    if args.splits is None:
        no_mask = sorted(set(found["image"]) - set(found["mask"]))
        if no_mask:
            raise UserError(f"{found['image'][no_mask[0]]} has no mask {TRUTH_DIR}/{no_mask[0]}_segmentation.png"
                            + (f" ({len(no_mask)} such images)" if len(no_mask) > 1 else ""))
        lists = seeded_split(list(found["image"]), args.seed)
        extra.append(f"split: seeded (--seed {args.seed}), {len(found['image'])} images -> "
                     + " / ".join(str(len(lists[s])) for s in ("train", "crossvali", "test")))
    else:
        lists = read_split_lists(args.splits, EXT)
        listed = {i for ids in lists.values() for i in ids}
        extra.append(f"split: the lists in {args.splits}")
        unlisted = sorted(set(found["image"]) - listed)
        if unlisted:
            extra.append(f"not in any split list (skipped): {len(unlisted)} images")
    orphans = sorted(set(found["mask"]) - set(found["image"]))
    if orphans:
        extra.append(f"masks without an image (skipped): {len(orphans)}")
    items = plan(found, lists, data_path)
    return prepare_items("ISIC 2018", items, lists, data_path, args.workers, "lesion", EXT, extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(parse_args, prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
