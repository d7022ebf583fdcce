"""dataset/prepare_deep_globe.py on a tiny fake Kaggle download (CPU, a few seconds)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset.classes import DEEPGLOBE
from dataset.prepare_deep_globe import DEFAULT_SPLIT_DIR, count_ambiguous, main

REPO_ROOT = Path(__file__).resolve().parents[1]
H, W = 30, 40  # every fake image is 40x30, made of 2 x 4 cells of 15 x 10 pixels

# Mask of id 1: channel values close to the 128 threshold, and one red cell (no class colour).
MASK1_CELLS = [
    [(127, 128, 250), (128, 250, 3), (250, 3, 128), (3, 127, 3)],
    [(127, 250, 127), (3, 3, 128), (128, 128, 128), (250, 127, 3)],
]
MASK1_CLASSES = np.array([[1, 2, 3, 0],
                          [4, 5, 6, 0]], dtype=np.uint8)
# Mask of id 2: clean colours, every class but 'unknown' once, nothing ambiguous.
MASK2_CELLS = [
    [(0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0)],
    [(0, 0, 255), (255, 255, 255), (252, 254, 251), (0, 0, 0)],
]
MASK2_CLASSES = np.array([[1, 2, 3, 4],
                          [5, 6, 6, 0]], dtype=np.uint8)
MASK3_CELLS = [[(2, 253, 1)] * 4] * 2  # forest
MASK3_CLASSES = np.full((2, 4), 4, dtype=np.uint8)
MASK4_CELLS = [[(250, 250, 3)] * 4] * 2  # agriculture
MASK4_CLASSES = np.full((2, 4), 2, dtype=np.uint8)


def cells_to_image(cells) -> np.ndarray:
    return np.kron(np.asarray(cells, dtype=np.uint8), np.ones((15, 10, 1), dtype=np.uint8))


def cells_to_classes(small: np.ndarray) -> np.ndarray:
    return np.kron(small, np.ones((15, 10), dtype=np.uint8))


def write_sat(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture
def raw(tmp_path) -> Path:
    """Kaggle-like download: train/ with sat+mask pairs, valid/ and test/ with sat only."""
    root = tmp_path / "raw"
    for sub in ("train", "valid", "test"):
        (root / sub).mkdir(parents=True)
    (root / "class_dict.csv").write_text("name,r,g,b\nurban_land,0,255,255\n")
    (root / "metadata.csv").write_text("image_id,split\n1,train\n")
    for image_id, cells in (("1", MASK1_CELLS), ("2", MASK2_CELLS), ("3", MASK3_CELLS),
                            ("4", MASK4_CELLS), ("9", MASK3_CELLS)):
        write_sat(root / "train" / f"{image_id}_sat.jpg", int(image_id))
        Image.fromarray(cells_to_image(cells)).save(root / "train" / f"{image_id}_mask.png")
    write_sat(root / "valid" / "5_sat.jpg", 5)  # listed in test, no mask
    write_sat(root / "valid" / "6_sat.jpg", 6)  # not listed
    write_sat(root / "test" / "7_sat.jpg", 7)  # not listed
    return root


def write_splits(folder: Path, train=("1", "2"), crossvali=("3",), test=("4", "5")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("crossvali", crossvali), ("test", test)):
        (folder / f"{name}.txt").write_text("".join(f"{i}_sat.jpg\n" for i in ids))
    return folder


@pytest.fixture
def splits(tmp_path) -> Path:
    return write_splits(tmp_path / "splits")


def run(raw, out, splits, *extra) -> int:
    return main(["--raw_path", str(raw), "--data_path", str(out), "--split_dir", str(splits),
                 "--workers", "1", *extra])


def all_files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def file_states(root: Path):
    return {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in root.rglob("*")
            if p.is_file()}


def label(out: Path, split: str, image_id: str) -> np.ndarray:
    with Image.open(out / split / "Label" / f"{image_id}_mask.png") as im:
        assert im.mode == "L"
        return np.asarray(im)


EXPECTED_FILES = [
    "crossvali/Label/3_mask.png", "crossvali/Sat/3_sat.jpg",
    "test/Label/4_mask.png", "test/Sat/4_sat.jpg", "test/Sat/5_sat.jpg",
    "train/Label/1_mask.png", "train/Label/2_mask.png",
    "train/Sat/1_sat.jpg", "train/Sat/2_sat.jpg",
]


def test_decode_rgb_thresholds_each_channel():
    mask = np.array([[(0, 0, 0), (127, 127, 127), (128, 128, 128), (255, 0, 0)],
                     [(0, 128, 255), (255, 255, 127), (200, 10, 130), (90, 200, 20)],
                     [(1, 2, 254), (127, 0, 0), (128, 0, 0), (250, 3, 3)]], dtype=np.uint8)
    classes, off_palette = DEEPGLOBE.decode_rgb(mask)
    expected = np.array([[0, 0, 6, 0],
                         [1, 2, 3, 4],
                         [5, 0, 0, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(classes, expected)
    assert classes.dtype == np.uint8
    assert off_palette == 3  # (255,0,0), (128,0,0), (250,3,3) are red after thresholding


def test_count_ambiguous_uses_64_to_191():
    mask = np.array([[(0, 63, 255), (192, 0, 0), (64, 0, 0), (255, 255, 191)],
                     [(3, 250, 128), (127, 127, 127), (255, 255, 255), (0, 0, 0)]],
                    dtype=np.uint8)
    assert count_ambiguous(mask) == 4  # (64,..), (..,191), (..,128), (127,..)
    assert count_ambiguous(mask.astype(np.int32)) == 4


def test_prepare_builds_training_layout(raw, splits, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(raw, out, splits) == 0
    assert all_files(out) == EXPECTED_FILES  # no temp files, nothing unlisted

    np.testing.assert_array_equal(label(out, "train", "1"), cells_to_classes(MASK1_CLASSES))
    np.testing.assert_array_equal(label(out, "train", "2"), cells_to_classes(MASK2_CLASSES))
    np.testing.assert_array_equal(label(out, "crossvali", "3"), cells_to_classes(MASK3_CLASSES))
    np.testing.assert_array_equal(label(out, "test", "4"), cells_to_classes(MASK4_CLASSES))
    for split, image_id, folder in (("train", "1", "train"), ("train", "2", "train"),
                                    ("crossvali", "3", "train"), ("test", "4", "train"),
                                    ("test", "5", "valid")):
        src = raw / folder / f"{image_id}_sat.jpg"
        dst = out / split / "Sat" / f"{image_id}_sat.jpg"
        assert dst.read_bytes() == src.read_bytes()
    assert not (out / "test" / "Label" / "5_mask.png").exists()
    # same file system: a hard link, no copy
    assert os.stat(out / "train" / "Sat" / "1_sat.jpg").st_ino == os.stat(
        raw / "train" / "1_sat.jpg").st_ino

    report = capsys.readouterr().out
    assert "masks with colours far from every class (off-palette pixels -> 0 unknown): 1 " \
           "(1_mask.png (150 px))" in report
    # every cell of 1_mask has a channel in 64..191; the other masks have none
    assert "masks with ambiguous pixels (a channel in 64..191, decided by the 128 threshold): " \
           "1 (1_mask.png (1200 px))" in report
    assert "skipped: test ids without a mask in RAW (Sat only): 1 (5)" in report
    # 6 and 7 (sat only) and 9 (sat + mask) are in RAW but in no split list
    assert "skipped: files in RAW not in any split list: 4 (6_sat.jpg, 7_sat.jpg, 9_mask.png, " \
           "9_sat.jpg)" in report
    # class shares: train = 1_mask (2 unknown, one cell each of 1..6) + 2_mask (1 unknown, 1..5
    # once, 6 twice) -> 16 cells: unknown 3/16, barren 3/16, others 2/16.
    share_lines = {line.split()[1]: line.split()[2:] for line in report.splitlines()
                   if line.startswith("  ") and line.split()[0].isdigit()}
    assert share_lines["unknown"][0] == "18.75"
    assert share_lines["urban"][0] == "12.50"
    assert share_lines["barren"][0] == "18.75"
    assert share_lines["forest"][1] == "100.00"  # crossvali column
    assert "done:" in report


def test_rerun_is_a_noop(raw, splits, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(raw, out, splits) == 0
    first = capsys.readouterr().out
    before = file_states(out)
    assert run(raw, out, splits) == 0
    second = capsys.readouterr().out
    assert file_states(out) == before
    assert "Sat:   0 hard-linked, 0 copied, 5 skipped (already present)" in second
    assert "Label: 0 written, 0 rewritten (invalid or foreign file), 4 skipped" in second
    # the rest of the summary (shares, off-palette masks) is the same as in the first run
    skip = ("Sat:", "Label:")
    assert [x for x in first.splitlines() if not x.startswith(skip)] == \
           [x for x in second.splitlines() if not x.startswith(skip)]


def test_broken_label_and_stale_temp_files_are_replaced(raw, splits, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(raw, out, splits) == 0
    good = (out / "train" / "Label" / "1_mask.png").read_bytes()
    (out / "train" / "Label" / "1_mask.png").write_bytes(good[: len(good) // 2])  # truncated
    Image.fromarray(cells_to_image(MASK2_CELLS)).save(out / "train" / "Label" / "2_mask.png")
    # temp files of killed writes (utils.io.temp_name), a Label and a Sat one
    (out / "train" / "Label" / "1_mask.png.123.0123abcd.tmp").write_bytes(b"half")
    (out / "crossvali" / "Sat" / "3_sat.jpg.77.ffff0000.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert run(raw, out, splits) == 0
    report = capsys.readouterr().out
    assert "Label: 0 written, 2 rewritten" in report
    assert "removed 2 temp files" in report
    assert all_files(out) == EXPECTED_FILES
    np.testing.assert_array_equal(label(out, "train", "1"), cells_to_classes(MASK1_CLASSES))
    np.testing.assert_array_equal(label(out, "train", "2"), cells_to_classes(MASK2_CLASSES))


def test_copy_when_hard_link_fails(raw, splits, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    assert run(raw, out, splits) == 0
    src, dst = raw / "train" / "1_sat.jpg", out / "train" / "Sat" / "1_sat.jpg"
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_ino != os.stat(src).st_ino


def test_missing_ids_fail_unless_allowed(raw, tmp_path, capsys):
    splits = write_splits(tmp_path / "splits", train=("1", "999"), crossvali=("3", "6"))
    out = tmp_path / "out"
    assert run(raw, out, splits) == 1
    report = capsys.readouterr().out
    assert "listed ids missing from RAW: 1 (999 (train))" in report
    # 6 has a sat but crossvali needs a label: not written, counts as missing
    assert "listed train/crossvali ids without a mask in RAW (not written): 1 (6 (crossvali))" \
        in report
    assert "FAILED: 2 listed ids are missing" in report
    assert not (out / "crossvali" / "Sat" / "6_sat.jpg").exists()

    assert run(raw, out, splits, "--allow_missing") == 0
    assert "999 (train)" in capsys.readouterr().out


def test_corrupt_or_mismatched_mask_fails(raw, splits, tmp_path, capsys):
    (raw / "train" / "1_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((H, W + 1, 3), dtype=np.uint8)).save(raw / "train" / "3_mask.png")
    out = tmp_path / "out"
    assert run(raw, out, splits) == 1
    report = capsys.readouterr().out
    assert "failed (not written): 2 (1 (train): " in report
    assert "3_mask.png is 41x30 but 3_sat.jpg is 40x30" in report
    assert not (out / "train" / "Label" / "1_mask.png").exists()
    assert not (out / "crossvali" / "Sat" / "3_sat.jpg").exists()
    assert (out / "train" / "Label" / "2_mask.png").exists()  # the others are still done


def test_bad_usage_is_one_line_and_exit_2(raw, splits, tmp_path, capsys):
    assert run(tmp_path / "nowhere", tmp_path / "out", splits) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --raw_path") and "Traceback" not in err

    empty = tmp_path / "empty"
    (empty / "valid").mkdir(parents=True)
    write_sat(empty / "valid" / "5_sat.jpg", 5)
    assert run(empty, tmp_path / "out", splits) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no <id>_sat.jpg / <id>_mask.png pairs" in err

    assert run(raw, tmp_path / "out", tmp_path / "no_splits") == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_command_line_with_worker_processes(raw, splits, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dataset.prepare_deep_globe", "--raw_path", str(raw),
           "--data_path", str(out), "--split_dir", str(splits), "--workers", "2"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DeepGlobe preparation summary" in done.stdout
    assert all_files(out) == EXPECTED_FILES
    np.testing.assert_array_equal(label(out, "train", "1"), cells_to_classes(MASK1_CLASSES))

    cmd[cmd.index("--raw_path") + 1] = str(tmp_path / "nowhere")
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_shipped_split_lists():
    lists = {name: (DEFAULT_SPLIT_DIR / f"{name}.txt").read_text().splitlines()
             for name in ("train", "crossvali", "test")}
    assert {k: len(v) for k, v in lists.items()} == {"train": 454, "crossvali": 207, "test": 142}
    everything = [line for lines in lists.values() for line in lines]
    assert len(set(everything)) == 803
    assert all(line.endswith("_sat.jpg") for line in everything)
