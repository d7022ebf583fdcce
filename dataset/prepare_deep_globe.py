"""Turn the raw DeepGlobe land-cover download into the training layout (docs/MODEL.md section 8).

    python -m dataset.prepare_deep_globe --raw_path RAW --data_path OUT

RAW is searched recursively for ``<id>_sat.jpg`` / ``<id>_mask.png`` pairs, so the Kaggle
download (``train/``, ``valid/``, ``test/``, ``class_dict.csv``, ...) works as it is unpacked.
Every id of the split lists (``dataset/splits/{train,crossvali,test}.txt`` by default, lines
``<id>_sat.jpg``) gets

    OUT/<split>/Sat/<id>_sat.jpg      a hard link to the raw JPEG (a byte copy where linking fails)
    OUT/<split>/Label/<id>_mask.png   8-bit 'L' PNG of class indices 0..6

Train and crossvali ids need a mask; test ids get a label only when RAW has their mask.

Mask decoding: each channel is thresholded at 128 and the colour looked up in the DeepGlobe
palette (``dataset.classes.DEEPGLOBE.decode_rgb``). Two things are reported, neither changes the result:
  * off-palette pixels: the thresholded colour is no class colour (only red (255, 0, 0) is
    possible); they become 0 'unknown'.
  * ambiguous pixels: some channel lies in 64..191, i.e. far from both 0 and 255, so the
    threshold decides a colour the mask does not show clearly.

Re-running is cheap and safe: existing outputs are kept (a Sat of the right size, a label PNG
written by this tool with the right size) and only re-read for the summary; every output is
written to a temp file in the same folder and renamed (``utils.io``), so an interrupted run
leaves no partial file, and the next run removes the temp files a killed one left.

Exit codes: 0 done; 1 a listed id is missing from RAW (ignored with --allow_missing) or a file
could not be converted; 2 bad usage (RAW missing, no image/mask pairs, no split lists).
"""
import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from dataset.classes import DEEPGLOBE
from utils.errors import UserError, run_main
from utils.io import place_copy, remove_stale_temps_in, save_png

# Referenced by the data loader's error message when a label is not an index mask.
PREPARE_COMMAND = "python -m dataset.prepare_deep_globe --raw_path RAW --data_path OUT"

SPLITS = ("train", "crossvali", "test")
LABELLED_SPLITS = ("train", "crossvali")  # training and validation cannot go without a label
DEFAULT_SPLIT_DIR = Path(__file__).resolve().parent / "splits"
SAT_SUFFIX = "_sat.jpg"
MASK_SUFFIX = "_mask.png"
AMBIGUOUS_RANGE = (64, 191)  # a channel value in here is far from both 0 and 255
# Stats stored as PNG text chunks in each label, so a re-run can report them without the raw mask.
KEY_OFF_PALETTE = "glnet-off-palette-pixels"
KEY_AMBIGUOUS = "glnet-ambiguous-pixels"
N_SHOWN = 5  # "first few" ids listed per summary line


class UsageError(UserError):
    """A mistake in the command line or the RAW folder: one line on stderr, exit code 2."""


@dataclass
class RawIndex:
    sat: Dict[str, Path] = field(default_factory=dict)
    mask: Dict[str, Path] = field(default_factory=dict)
    duplicates: List[Path] = field(default_factory=list)  # ignored second copies of an id


@dataclass(frozen=True)
class Job:
    split: str
    image_id: str
    sat_src: str
    mask_src: Optional[str]
    out_root: str


@dataclass
class Result:
    split: str
    image_id: str
    sat: str = ""  # linked / copied / present
    label: str = "none"  # written / rewritten / present / none
    class_counts: Optional[Tuple[int, ...]] = None
    off_palette: int = 0
    ambiguous: int = 0
    error: str = ""


# ---------------------------------------------------------------------------- discovery


def scan_raw(raw: Path, exclude: Optional[Path] = None) -> RawIndex:
    """Index every ``<id>_sat.jpg`` and ``<id>_mask.png`` below ``raw`` (``exclude`` not entered).

    An id found twice keeps the copy sorted first (preferring a sat that has its mask beside it).
    """
    found_sat: Dict[str, List[Path]] = {}
    found_mask: Dict[str, List[Path]] = {}
    for folder, dirs, files in os.walk(raw):
        if exclude is not None:
            dirs[:] = [d for d in dirs if Path(folder, d).resolve() != exclude]
        dirs.sort()
        for name in sorted(files):
            if name.endswith(SAT_SUFFIX):
                found_sat.setdefault(name[: -len(SAT_SUFFIX)], []).append(Path(folder, name))
            elif name.endswith(MASK_SUFFIX):
                found_mask.setdefault(name[: -len(MASK_SUFFIX)], []).append(Path(folder, name))
    index = RawIndex()
    for image_id, paths in found_sat.items():
        mask_dirs = {p.parent for p in found_mask.get(image_id, [])}
        paths = sorted(paths, key=lambda p: (p.parent not in mask_dirs, str(p)))
        index.sat[image_id] = paths[0]
        index.duplicates.extend(paths[1:])
    for image_id, paths in found_mask.items():
        sat_dir = index.sat[image_id].parent if image_id in index.sat else None
        paths = sorted(paths, key=lambda p: (p.parent != sat_dir, str(p)))
        index.mask[image_id] = paths[0]
        index.duplicates.extend(paths[1:])
    return index


def read_split_lists(split_dir: Path) -> Dict[str, List[str]]:
    """``{split: [id, ...]}`` from ``<split>.txt`` (lines ``<id>_sat.jpg``); absent ones skipped."""
    if not split_dir.is_dir():
        raise UsageError(f"split folder {split_dir} does not exist")
    lists = {}
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            continue
        ids = []
        for line in path.read_text().splitlines():
            name = line.strip()
            if name:
                ids.append(name[: -len(SAT_SUFFIX)] if name.endswith(SAT_SUFFIX) else name)
        lists[split] = list(dict.fromkeys(ids))  # drop repeated lines, keep order
    if not lists:
        names = ", ".join(f"{s}.txt" for s in SPLITS)
        raise UsageError(f"no split list ({names}) in {split_dir}")
    return lists


# ---------------------------------------------------------------------------- one image


def count_ambiguous(mask_rgb: np.ndarray) -> int:
    """Pixels with some channel in AMBIGUOUS_RANGE (far from 0 and 255)."""
    low, high = AMBIGUOUS_RANGE
    rgb = np.asarray(mask_rgb)[..., :3]
    if rgb.dtype != np.uint8 or (low, high) != (64, 191):
        return int(np.count_nonzero(((rgb >= low) & (rgb <= high)).any(axis=-1)))
    # Fast path, 8x quicker than the line above: v - 64 (wrapping uint8) is < 128 exactly when
    # 64 <= v <= 191, so a pixel is clear when bit 7 is set in every channel's shifted value.
    shifted = rgb - np.uint8(64)
    all_clear = shifted[..., 0] & shifted[..., 1] & shifted[..., 2]
    return int(all_clear.size - np.count_nonzero(all_clear >> 7))


def read_raw_mask(path: Path) -> np.ndarray:
    """Raw DeepGlobe colour mask -> (H, W, 3) uint8; a single-channel file is an error."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "P", "RGBX"):
            im = im.convert("RGB")
        if im.mode != "RGB":
            raise ValueError(f"mask mode is {im.mode!r}, expected the RGB DeepGlobe colour mask")
        return np.asarray(im)


def write_label(classes: np.ndarray, dst: Path, off_palette: int, ambiguous: int) -> None:
    """Write the index mask as an 'L' PNG (a uint8 (H, W) array), atomically."""
    info = PngInfo()
    info.add_text(KEY_OFF_PALETTE, str(off_palette))
    info.add_text(KEY_AMBIGUOUS, str(ambiguous))
    save_png(dst, classes, pnginfo=info)


def read_existing_label(path: Path, size: Tuple[int, int]):
    """``(class_counts, off_palette, ambiguous)`` of a label this tool wrote, else None.

    None (-> the label is rewritten) for a missing, unreadable, non-'L', wrongly sized, foreign
    (no stats chunk) or out-of-range file.
    """
    if not path.exists():
        return None
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "L" or im.size != size:
                return None
            off_palette = int(im.info[KEY_OFF_PALETTE])
            ambiguous = int(im.info[KEY_AMBIGUOUS])
            counts = np.bincount(np.asarray(im).ravel(), minlength=DEEPGLOBE.n_class)
    except Exception:  # truncated or otherwise unusable: rewrite it
        return None
    if len(counts) > DEEPGLOBE.n_class:
        return None
    return tuple(int(c) for c in counts), off_palette, ambiguous


def process(job: Job) -> Result:
    """Place one image (and its label) in the output tree; errors are returned, not raised."""
    result = Result(job.split, job.image_id)
    out = Path(job.out_root) / job.split
    try:
        sat_src = Path(job.sat_src)
        if job.mask_src is not None:
            mask_src = Path(job.mask_src)
            with Image.open(sat_src) as sat_im, Image.open(mask_src) as mask_im:
                size = sat_im.size  # header only, no decoding
                if mask_im.size != size:
                    raise ValueError(f"{mask_src.name} is {mask_im.size[0]}x{mask_im.size[1]} but "
                                     f"{sat_src.name} is {size[0]}x{size[1]}")
            dst = out / "Label" / f"{job.image_id}{MASK_SUFFIX}"
            existing = read_existing_label(dst, size)
            if existing is not None:
                result.label = "present"
                result.class_counts, result.off_palette, result.ambiguous = existing
            else:
                result.label = "rewritten" if dst.exists() else "written"
                rgb = read_raw_mask(mask_src)
                classes, result.off_palette = DEEPGLOBE.decode_rgb(rgb)
                result.ambiguous = count_ambiguous(rgb)
                result.class_counts = tuple(
                    int(c) for c in np.bincount(classes.ravel(), minlength=DEEPGLOBE.n_class))
                write_label(classes, dst, result.off_palette, result.ambiguous)
        result.sat = place_copy(sat_src, out / "Sat" / f"{job.image_id}{SAT_SUFFIX}")
    except Exception as exc:  # a corrupt or odd file: reported in the summary, exit code 1
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def run_jobs(jobs: Sequence[Job], workers: int) -> List[Result]:
    """Process all jobs with a progress bar, in ``workers`` processes (in this one if <= 1)."""
    bar = dict(total=len(jobs), desc="prepare", unit="img")
    if workers <= 1 or len(jobs) <= 1:
        return [process(job) for job in tqdm(jobs, **bar)]
    with Pool(min(workers, len(jobs))) as pool:
        return list(tqdm(pool.imap_unordered(process, jobs), **bar))


# ---------------------------------------------------------------------------- whole run


def remove_stale_temp_files(data_path: Path) -> int:
    """Delete temp files a killed earlier run may have left in the output folders."""
    return sum(len(remove_stale_temps_in(data_path / split / sub))
               for split in SPLITS for sub in ("Sat", "Label"))


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:N_SHOWN])
    return shown + (", ..." if len(items) > N_SHOWN else "")


def _share_table(results: Sequence[Result], splits: Sequence[str]) -> List[str]:
    totals = {}
    for split in list(splits) + ["all"]:
        counts = [r.class_counts for r in results
                  if r.class_counts is not None and split in (r.split, "all")]
        totals[split] = np.sum(counts, axis=0) if counts else np.zeros(DEEPGLOBE.n_class)
    columns = [s for s in list(splits) + ["all"] if totals[s].sum() > 0]
    if not columns:
        return ["class pixel shares: no labels"]
    lines = ["class pixel shares (%):" + "".join(f"{c:>11}" for c in columns)]
    for index, name in enumerate(DEEPGLOBE.names):
        row = "".join(f"{100.0 * totals[c][index] / totals[c].sum():>11.2f}" for c in columns)
        lines.append(f"  {index} {name:<20}{row}")
    return lines


def summarize(results, lists, index, missing, mask_missing, unlisted, no_mask_test, overlap,
              stale_removed) -> List[str]:
    """The report printed at the end of a run, as lines: one parameter per finding of the run
    (the findings are computed apart, each by its own check)."""
    lines = ["", "DeepGlobe preparation summary"]
    for split in lists:
        done = [r for r in results if r.split == split and not r.error]
        n_label = sum(r.class_counts is not None for r in done)
        lines.append(f"  {split:<10} {len(done):4d} images, {n_label:4d} labels "
                     f"({len(lists[split])} listed)")
    sat = {k: sum(r.sat == k for r in results) for k in ("linked", "copied", "present")}
    label = {k: sum(r.label == k for r in results) for k in ("written", "rewritten", "present")}
    lines.append(f"Sat:   {sat['linked']} hard-linked, {sat['copied']} copied, "
                 f"{sat['present']} skipped (already present)")
    lines.append(f"Label: {label['written']} written, {label['rewritten']} rewritten (invalid or "
                 f"foreign file), {label['present']} skipped (already present)")
    lines.extend(_share_table(results, list(lists)))

    def report(title, items):
        if items:
            lines.append(f"{title}: {len(items)} ({_examples(items)})")

    report("listed ids missing from RAW", [f"{i} ({s})" for s, i in missing])
    report("listed train/crossvali ids without a mask in RAW (not written)",
           [f"{i} ({s})" for s, i in mask_missing])
    report("masks with colours far from every class (off-palette pixels -> 0 unknown)",
           [f"{index.mask[r.image_id].name} ({r.off_palette} px)" for r in results
            if r.off_palette])
    report(f"masks with ambiguous pixels (a channel in {AMBIGUOUS_RANGE[0]}..{AMBIGUOUS_RANGE[1]}, "
           "decided by the 128 threshold)",
           [f"{index.mask[r.image_id].name} ({r.ambiguous} px)" for r in results if r.ambiguous])
    report("failed (not written)", [f"{r.image_id} ({r.split}): {r.error}" for r in results
                                    if r.error])
    report("skipped: test ids without a mask in RAW (Sat only)", no_mask_test)
    report("skipped: files in RAW not in any split list", unlisted)
    report("skipped: second copies of an id in RAW", [str(p) for p in index.duplicates])
    report("ids listed in more than one split (written to each)", overlap)
    if stale_removed:
        lines.append(f"removed {stale_removed} temp files left by an interrupted run")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataset.prepare_deep_globe",
        description="Convert the raw DeepGlobe land-cover download into "
                    "OUT/{train,crossvali,test}/{Sat,Label}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw_path", required=True, type=Path,
                        help="unpacked DeepGlobe download (searched recursively)")
    parser.add_argument("--data_path", required=True, type=Path, help="output folder")
    parser.add_argument("--split_dir", type=Path, default=DEFAULT_SPLIT_DIR,
                        help="folder with train.txt, crossvali.txt, test.txt")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes, min(8, CPU count) by default; 1 or less: no pool")
    parser.add_argument("--allow_missing", action="store_true",
                        help="exit 0 even when listed ids are missing from RAW")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run_main(parse_args, prepare, argv)


def prepare(args: argparse.Namespace) -> int:
    raw = args.raw_path
    if not raw.is_dir():
        raise UsageError(f"--raw_path {raw} is not a folder; point it at the unpacked "
                         "DeepGlobe land-cover download")
    lists = read_split_lists(args.split_dir)
    data_path = args.data_path.resolve()
    if data_path.exists() and not data_path.is_dir():
        raise UsageError(f"--data_path {args.data_path} exists and is not a folder")
    index = scan_raw(raw, exclude=data_path)
    if not any(image_id in index.mask for image_id in index.sat):
        raise UsageError(f"no <id>{SAT_SUFFIX} / <id>{MASK_SUFFIX} pairs found under {raw}")

    jobs, missing, mask_missing, no_mask_test = [], [], [], []
    for split, ids in lists.items():
        for image_id in ids:
            if image_id not in index.sat:
                missing.append((split, image_id))
            elif image_id not in index.mask and split in LABELLED_SPLITS:
                mask_missing.append((split, image_id))
            else:
                if image_id not in index.mask:
                    no_mask_test.append(image_id)
                mask = index.mask.get(image_id)
                jobs.append(Job(split, image_id, str(index.sat[image_id]),
                                None if mask is None else str(mask), str(data_path)))
    listed = Counter(i for ids in lists.values() for i in ids)
    unlisted = sorted(p.name for i, p in list(index.sat.items()) + list(index.mask.items())
                      if i not in listed)
    overlap = sorted(i for i, n in listed.items() if n > 1)

    try:
        for split in lists:
            (data_path / split / "Sat").mkdir(parents=True, exist_ok=True)
            if any(job.split == split and job.mask_src for job in jobs):
                (data_path / split / "Label").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folders in --data_path {args.data_path}: "
                         f"{exc.strerror}") from None
    stale_removed = remove_stale_temp_files(data_path)

    results = run_jobs(jobs, args.workers)
    order = {(s, i): n for n, (s, i) in enumerate((s, i) for s in lists for i in lists[s])}
    results.sort(key=lambda r: order[(r.split, r.image_id)])
    print("\n".join(summarize(results, lists, index, missing, mask_missing, unlisted,
                              no_mask_test, overlap, stale_removed)))

    failed = [r for r in results if r.error]
    absent = len(missing) + len(mask_missing)
    if failed:
        print(f"FAILED: {len(failed)} files could not be converted (see above)")
        return 1
    if absent and not args.allow_missing:
        print(f"FAILED: {absent} listed ids are missing from {raw} "
              "(rerun with --allow_missing to accept this)")
        return 1
    print(f"done: {data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
