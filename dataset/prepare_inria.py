"""Turn the Inria Aerial Image Labeling download into the training layout.

    python -m dataset.prepare_inria --raw_path AerialImageDataset --data_path data/inria

RAW is the unpacked ``AerialImageDataset/`` (or the folder holding it). Its 180 labelled
5000x5000 tiles are ``train/images/<city><n>.tif`` (RGB) with ``train/gt/<city><n>.tif``
(0 = background, 255 = building); its ``test/`` tiles have no public labels and are not used.
They are split 126 / 27 / 27 by the public lists in ``dataset/splits/inria/`` (see the README
there: the split of the papers that follow GLNet; ``--splits DIR`` takes other lists, lines
``<city><n>_sat.tif``), and every listed tile gets

    OUT/<split>/Sat/<city><n>_sat.tif     a hard link to the raw TIFF (a byte copy across file systems)
    OUT/<split>/Label/<city><n>_mask.png  'L' PNG, 0 background, 1 building

plus the lists it was made with in ``OUT/splits/``. Before anything is written, every listed
image and mask must exist; a mask value other than 0 / 255 or a mask of another size than its
image is an error naming the file. Re-runs skip finished files (``dataset/prepare_binary.py``).

Exit codes: 0 done; 2 an error (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Tuple

from dataset.prepare_binary import (
    Item, add_output_args, check_data_path, prepare_items, read_split_lists,
)
from utils.errors import UserError, run_main

DEFAULT_SPLITS = Path(__file__).resolve().parent / "splits" / "inria"
EXT = ".tif"
LAYOUT = "train/images/<city><n>.tif and train/gt/<city><n>.tif"


def find_root(raw: Path) -> Path:
    """The folder holding train/images and train/gt: RAW itself or RAW/AerialImageDataset."""
    if not raw.is_dir():
        raise UserError(f"--raw_path {raw} is not a folder; point it at the unpacked Inria "
                        f"AerialImageDataset/ ({LAYOUT})")
    for root in (raw, raw / "AerialImageDataset"):
        if (root / "train" / "images").is_dir() and (root / "train" / "gt").is_dir():
            return root
    raise UserError(f"--raw_path {raw} has no train/images/ and train/gt/ folders; point it at the "
                    f"unpacked Inria AerialImageDataset/ ({LAYOUT})")


def plan(root: Path, lists, data_path: Path) -> Tuple[List[Item], List[str]]:
    """An Item per listed tile; a listed tile without its image or mask is an error."""
    items, missing = [], []
    for split, ids in lists.items():
        for image_id in ids:
            image = root / "train" / "images" / f"{image_id}{EXT}"
            mask = root / "train" / "gt" / f"{image_id}{EXT}"
            missing.extend(f"{p} (listed in {split}.txt)" for p in (image, mask) if not p.is_file())
            items.append(Item(split, image_id, str(image), str(mask), str(data_path), EXT))
    if missing:
        more = f"; {len(missing)} listed files are missing" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]} does not exist{more}")
    listed = {i for ids in lists.values() for i in ids}
    unlisted = sorted(p.stem for p in (root / "train" / "images").glob(f"*{EXT}") if p.stem not in listed)
    return items, unlisted


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataset.prepare_inria",
        description="Convert the Inria Aerial Image Labeling download into "
                    "OUT/{train,crossvali,test}/{Sat,Label} (126 / 27 / 27 labelled tiles).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw_path", required=True, type=Path,
                        help=f"the unpacked AerialImageDataset/ ({LAYOUT})")
    add_output_args(parser)
    parser.add_argument("--splits", "--split_dir", dest="splits", type=Path, default=DEFAULT_SPLITS,
                        help="folder with train.txt, crossvali.txt, test.txt (lines <city><n>_sat.tif); "
                             "the default is the public 126/27/27 split")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> int:
    root = find_root(args.raw_path)
    lists = read_split_lists(args.splits, EXT)
    data_path = check_data_path(args.data_path)
    items, unlisted = plan(root, lists, data_path)
    extra = [f"not in any split list (skipped): {len(unlisted)} tiles of {root / 'train' / 'images'}"] if unlisted else []
    return prepare_items("Inria Aerial", items, lists, data_path, args.workers, "building", EXT, extra)


def main(argv=None) -> int:
    return run_main(parse_args, prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
