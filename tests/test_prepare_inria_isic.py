"""dataset/prepare_inria.py and dataset/prepare_isic.py (issue 11) on tiny fake downloads made
here (Inria: 0/255 TIFF masks; ISIC: JPEGs of several sizes with 0/255 PNG masks), the
published Inria split lists, and each data set through the three stages and evaluation."""
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import prepare_inria, prepare_isic
from dataset.classes import INRIA, ISIC

REPO = Path(__file__).resolve().parents[1]
INRIA_SPLITS = REPO / "dataset" / "splits" / "inria"
CITIES = ("austin", "chicago", "kitsap", "tyrol-w", "vienna")
ISIC_IN = "ISIC2018_Task1-2_Training_Input"
ISIC_GT = "ISIC2018_Task1_Training_GroundTruth"


# ---------------------------------------------------------------------------- fake downloads


def rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def building_mask(seed: int, h: int, w: int) -> np.ndarray:
    """0/1 array: a few random rectangles (the 'buildings')."""
    rng = np.random.default_rng(1000 + seed)
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y:y + rng.integers(4, 24), x:x + rng.integers(4, 24)] = 1
    return mask


INRIA_TILES = {"austin1": 0, "austin2": 1, "chicago1": 2, "kitsap1": 3, "vienna1": 4, "tyrol-w1": 5}
INRIA_SIZE = (72, 96)  # (H, W) of every fake tile
INRIA_LISTS = {"train": ["austin1", "chicago1", "vienna1"], "crossvali": ["austin2"], "test": ["kitsap1"]}


@pytest.fixture
def inria_raw(tmp_path) -> Path:
    """AerialImageDataset/train/{images,gt}/<tile>.tif (tyrol-w1 is in no list), and test/."""
    root = tmp_path / "AerialImageDataset"
    for sub in ("images", "gt"):
        (root / "train" / sub).mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    h, w = INRIA_SIZE
    for name, seed in INRIA_TILES.items():
        Image.fromarray(rgb(seed, h, w)).save(root / "train" / "images" / f"{name}.tif")
        Image.fromarray(building_mask(seed, h, w) * 255).save(root / "train" / "gt" / f"{name}.tif")
    Image.fromarray(rgb(9, h, w)).save(root / "test" / "images" / "bellingham1.tif")
    return root


def write_lists(folder: Path, lists, ext: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, ids in lists.items():
        (folder / f"{split}.txt").write_text("".join(f"{i}_sat{ext}\n" for i in ids))
    return folder


@pytest.fixture
def inria_splits(tmp_path) -> Path:
    return write_lists(tmp_path / "inria_lists", INRIA_LISTS, ".tif")


def isic_size(n: int):
    """(H, W) of fake ISIC image n: sizes and aspects vary, some smaller than a 64 px patch."""
    return 40 + 7 * (n % 5), 50 + 11 * (n % 4)


def make_isic(root: Path, ids) -> Path:
    (root / ISIC_IN).mkdir(parents=True)
    (root / ISIC_GT).mkdir(parents=True)
    (root / ISIC_IN / "LICENSE.txt").write_text("CC-BY-NC\n")  # the real folder has such files
    for n in ids:
        h, w = isic_size(n)
        Image.fromarray(rgb(n, h, w)).save(root / ISIC_IN / f"ISIC_{n:07d}.jpg", quality=90)
        Image.fromarray(building_mask(n, h, w) * 255).save(root / ISIC_GT / f"ISIC_{n:07d}_segmentation.png")
    return root


ISIC_IDS = list(range(20))


@pytest.fixture
def isic_raw(tmp_path) -> Path:
    return make_isic(tmp_path / "isic_raw", ISIC_IDS)


# ---------------------------------------------------------------------------- helpers


def run_inria(raw, out, splits, *extra):
    return prepare_inria.main(["--raw_path", str(raw), "--data_path", str(out), "--splits", str(splits),
                               "--workers", "1", *map(str, extra)])


def run_isic(raw, out, *extra):
    return prepare_isic.main(["--raw_path", str(raw), "--data_path", str(out), "--workers", "1", *map(str, extra)])


def files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def states(root: Path):
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def read_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im)


def one_error_line(err: str) -> str:
    """The error line of stderr, checked to be the only line but the progress bar's."""
    lines = err.rstrip("\n").split("\n")  # (not splitlines: the bar's lines hold \r)
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert all("img/s]" in line for line in lines[:-1]), err
    return lines[-1]


def sat_ids(out: Path, split: str, ext: str):
    return sorted(p.name[: -len(f"_sat{ext}")] for p in (out / split / "Sat").iterdir())


# ---------------------------------------------------------------------------- the published split


def test_published_inria_split_is_126_27_27_with_36_tiles_per_city():
    lists = {s: (INRIA_SPLITS / f"{s}.txt").read_text().split() for s in ("train", "crossvali", "test")}
    assert [len(lists[s]) for s in ("train", "crossvali", "test")] == [126, 27, 27]
    names = [n for ids in lists.values() for n in ids]
    assert len(set(names)) == 180  # no overlap, no repeat
    tiles = [re.fullmatch(r"([a-z-]+)(\d+)_sat\.tif", n) for n in names]
    assert all(tiles), [n for n, t in zip(names, tiles) if not t]
    # the 180 labelled tiles of the download: <city>1..36 for each of the five cities
    assert {(t.group(1), int(t.group(2))) for t in tiles} == {(c, k) for c in CITIES for k in range(1, 37)}
    assert "FCtL" in (INRIA_SPLITS / "README.md").read_text()  # where the lists come from


def test_inria_default_split_is_the_published_one(inria_raw, tmp_path, capsys):
    # the fake download lacks most of the 180 tiles: the default lists ask for them
    rc = prepare_inria.main(["--raw_path", str(inria_raw), "--data_path", str(tmp_path / "out"), "--workers", "1"])
    assert rc == 2
    err = one_error_line(capsys.readouterr().err)
    first = (INRIA_SPLITS / "train.txt").read_text().split()[0][: -len("_sat.tif")]
    assert f"train/images/{first}.tif (listed in train.txt) does not exist" in err
    # the 6 fake tiles are among the 180 listed: image and mask of the other 174 are missing
    assert "; 348 listed files are missing" in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


# ---------------------------------------------------------------------------- Inria


def test_inria_builds_the_layout(inria_raw, inria_splits, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_inria(inria_raw, out, inria_splits) == 0
    report = capsys.readouterr().out
    expected = [f"{s}/{sub}" for s in ("crossvali", "test", "train") for sub in ("Label", "Sat")]
    listed = [(s, i) for s, ids in INRIA_LISTS.items() for i in ids]
    assert files(out) == sorted(
        [f"{s}/Sat/{i}_sat.tif" for s, i in listed] + [f"{s}/Label/{i}_mask.png" for s, i in listed]
        + [f"splits/{s}.txt" for s in INRIA_LISTS])
    assert sorted({str(Path(f).parent) for f in files(out) if not f.startswith("splits")}) == expected
    h, w = INRIA_SIZE
    for split, image_id in listed:
        seed = INRIA_TILES[image_id]
        label = read_label(out / split / "Label" / f"{image_id}_mask.png")
        np.testing.assert_array_equal(label, building_mask(seed, h, w))  # 255 -> 1, 0 -> 0
        assert set(np.unique(label)) == {0, 1}
        src, dst = inria_raw / "train" / "images" / f"{image_id}.tif", out / split / "Sat" / f"{image_id}_sat.tif"
        assert os.path.samefile(src, dst)  # a hard link, not a copy
    # the lists it was made with are kept in the data folder, one <tile>_sat.tif per line
    for split, ids in INRIA_LISTS.items():
        assert (out / "splits" / f"{split}.txt").read_text().split() == sorted(f"{i}_sat.tif" for i in ids)
    assert "Sat:   5 hard-linked, 0 copied, 0 skipped" in report
    assert "Label: 5 written" in report
    assert "not in any split list (skipped): 1 tiles" in report  # tyrol-w1
    assert f"done: 5 images in {out}" in report
    # building share of train: counted here from the fake masks
    train = sum(int(building_mask(INRIA_TILES[i], h, w).sum()) for i in INRIA_LISTS["train"])
    assert f"building pixels: train {100 * train / (3 * h * w):.2f} %" in report


def test_inria_rerun_skips_finished_files_and_redoes_changed_masks(inria_raw, inria_splits, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_inria(inria_raw, out, inria_splits) == 0
    before = states(out / "train")
    capsys.readouterr()
    assert run_inria(inria_raw, out, inria_splits) == 0
    report = capsys.readouterr().out
    assert states(out / "train") == before  # nothing rewritten
    assert "Sat:   0 hard-linked, 0 copied, 5 skipped (already present)" in report
    assert "Label: 0 written (0/255 -> 0/1), 5 skipped (already present)" in report

    # a corrected raw mask is converted again; a temp file of a killed run is removed
    h, w = INRIA_SIZE
    new = np.zeros((h, w), dtype=np.uint8)
    new[10:20, 30:50] = 255
    Image.fromarray(new).save(inria_raw / "train" / "gt" / "chicago1.tif")
    (out / "test" / "Label" / "kitsap1_mask.png.4242.0123abcd.tmp").write_bytes(b"half")
    assert run_inria(inria_raw, out, inria_splits) == 0
    report = capsys.readouterr().out
    assert "Label: 1 written" in report and "removed 1 temp files" in report
    np.testing.assert_array_equal(read_label(out / "train" / "Label" / "chicago1_mask.png"), new // 255)
    assert not list((out / "test" / "Label").glob("*.tmp"))


def test_inria_copies_when_hard_links_fail(inria_raw, inria_splits, tmp_path, capsys, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    assert run_inria(inria_raw, out, inria_splits) == 0
    assert "Sat:   0 hard-linked, 5 copied (hard links impossible there: lossless byte copies)" in capsys.readouterr().out
    src, dst = inria_raw / "train" / "images" / "austin1.tif", out / "train" / "Sat" / "austin1_sat.tif"
    assert dst.read_bytes() == src.read_bytes() and not os.path.samefile(src, dst)


def test_inria_mask_value_other_than_0_255_is_one_line(inria_raw, inria_splits, tmp_path, capsys):
    h, w = INRIA_SIZE
    bad = building_mask(2, h, w) * 255
    bad[5, 7] = 128
    bad[6, 7] = 3
    gt = inria_raw / "train" / "gt" / "chicago1.tif"
    Image.fromarray(bad).save(gt)
    out = tmp_path / "out"
    assert run_inria(inria_raw, out, inria_splits) == 2
    err = one_error_line(capsys.readouterr().err)
    assert str(gt) in err and "value 3 in 1 pixels" in err and "2 such values" in err
    # that tile is not placed at all; the others are done (and a re-run skips them)
    assert not (out / "train" / "Label" / "chicago1_mask.png").exists()
    assert not (out / "train" / "Sat" / "chicago1_sat.tif").exists()
    assert (out / "train" / "Sat" / "austin1_sat.tif").exists()


def test_inria_missing_listed_file_is_one_line_before_any_work(inria_raw, inria_splits, tmp_path, capsys):
    (inria_raw / "train" / "gt" / "vienna1.tif").unlink()
    out = tmp_path / "out"
    assert run_inria(inria_raw, out, inria_splits) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{inria_raw / 'train' / 'gt' / 'vienna1.tif'} (listed in train.txt) does not exist" in err
    assert not out.exists()


def test_inria_mask_of_another_size_is_one_line(inria_raw, inria_splits, tmp_path, capsys):
    gt = inria_raw / "train" / "gt" / "kitsap1.tif"
    Image.fromarray(np.zeros((72, 95), dtype=np.uint8)).save(gt)
    assert run_inria(inria_raw, tmp_path / "out", inria_splits) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{gt} is 95x72 but its image kitsap1.tif is 96x72" in err


def test_inria_bad_usage_is_one_line(inria_raw, inria_splits, tmp_path, capsys):
    assert run_inria(tmp_path / "nowhere", tmp_path / "out", inria_splits) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is not a folder" in err and "train/images/<city><n>.tif" in err
    (tmp_path / "empty").mkdir()
    assert run_inria(tmp_path / "empty", tmp_path / "out", inria_splits) == 2
    assert "has no train/images/ and train/gt/" in one_error_line(capsys.readouterr().err)
    # the folder holding AerialImageDataset/ is accepted too
    assert run_inria(inria_raw.parent, tmp_path / "out", inria_splits) == 0
    capsys.readouterr()
    # lists: a missing file, an id in two splits
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train.txt").write_text("austin1_sat.tif\n")
    assert run_inria(inria_raw, tmp_path / "out2", tmp_path / "partial") == 2
    assert "crossvali.txt is missing" in one_error_line(capsys.readouterr().err)
    twice = write_lists(tmp_path / "twice", {"train": ["austin1"], "crossvali": ["austin2"], "test": ["austin1"]}, ".tif")
    assert run_inria(inria_raw, tmp_path / "out2", twice) == 2
    assert "austin1 is listed in both train.txt and test.txt" in one_error_line(capsys.readouterr().err)


def test_output_prepared_with_another_split_is_refused(inria_raw, inria_splits, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_inria(inria_raw, out, inria_splits) == 0
    moved = write_lists(tmp_path / "moved", {"train": ["austin1", "chicago1", "vienna1"],
                                             "crossvali": ["kitsap1"], "test": ["austin2"]}, ".tif")
    capsys.readouterr()
    assert run_inria(inria_raw, out, moved) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is not in the" in err and "prepared with another split" in err
    # austin2 would otherwise be in crossvali/ (old) and test/ (new) at once
    assert not (out / "test" / "Sat" / "austin2_sat.tif").exists()


# ---------------------------------------------------------------------------- ISIC


def sha_split(ids, seed):
    """The documented rule, written out here: SHA-256 order of '<seed>:<id>', ceil(n/10) to
    crossvali, the next ceil(n/10) to test, the rest to train."""
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    k = math.ceil(len(ids) / 10)
    return {"crossvali": sorted(order[:k]), "test": sorted(order[k:2 * k]), "train": sorted(order[2 * k:])}


def test_isic_builds_the_layout_with_a_seeded_80_10_10_split(isic_raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_isic(isic_raw, out) == 0
    report = capsys.readouterr().out
    names = [f"ISIC_{n:07d}" for n in ISIC_IDS]
    got = {s: sat_ids(out, s, ".jpg") for s in ("train", "crossvali", "test")}
    assert [len(got[s]) for s in ("train", "crossvali", "test")] == [16, 2, 2]
    assert sorted(sum(got.values(), [])) == names  # each image in exactly one split
    assert got == sha_split(names, 0)
    for split, ids in got.items():
        assert (out / "splits" / f"{split}.txt").read_text().split() == [f"{i}_sat.jpg" for i in ids]
        assert sorted(p.name for p in (out / split / "Label").iterdir()) == [f"{i}_mask.png" for i in ids]
        for image_id in ids:
            n = int(image_id[5:])
            h, w = isic_size(n)
            label = read_label(out / split / "Label" / f"{image_id}_mask.png")
            np.testing.assert_array_equal(label, building_mask(n, h, w))
            assert os.path.samefile(isic_raw / ISIC_IN / f"{image_id}.jpg", out / split / "Sat" / f"{image_id}_sat.jpg")
    assert "split: seeded (--seed 0), 20 images -> 16 / 2 / 2" in report
    assert f"split lists written to {out / 'splits'}" in report
    assert "Sat:   20 hard-linked" in report

    before = states(out)
    capsys.readouterr()
    assert run_isic(isic_raw, out) == 0  # idempotent
    report = capsys.readouterr().out
    assert "Sat:   0 hard-linked, 0 copied, 20 skipped" in report and "Label: 0 written" in report
    assert {p: s for p, s in states(out).items() if "splits" not in p.parts} == \
        {p: s for p, s in before.items() if "splits" not in p.parts}


def test_isic_split_does_not_depend_on_file_order_and_follows_the_seed(tmp_path, capsys):
    forward = make_isic(tmp_path / "a", ISIC_IDS)
    backward = make_isic(tmp_path / "b", ISIC_IDS[::-1])  # files created in the other order
    assert run_isic(forward, tmp_path / "out_a") == 0
    assert run_isic(backward, tmp_path / "out_b") == 0
    assert run_isic(forward, tmp_path / "out_c", "--seed", 7) == 0
    lists = {k: {s: (tmp_path / k / "splits" / f"{s}.txt").read_text() for s in ("train", "crossvali", "test")}
             for k in ("out_a", "out_b", "out_c")}
    assert lists["out_a"] == lists["out_b"]
    assert lists["out_a"] != lists["out_c"]
    assert sat_ids(tmp_path / "out_c", "test", ".jpg") == sha_split([f"ISIC_{n:07d}" for n in ISIC_IDS], 7)["test"]


def test_isic_worker_processes_give_the_same_files(isic_raw, tmp_path, capsys):
    assert run_isic(isic_raw, tmp_path / "one") == 0
    assert prepare_isic.main(["--raw_path", str(isic_raw), "--data_path", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert "Sat:   20 hard-linked" in capsys.readouterr().out.split("preparation summary")[-1]
    assert files(tmp_path / "one") == files(tmp_path / "two")
    for path in (tmp_path / "one").rglob("*_mask.png"):
        np.testing.assert_array_equal(read_label(path), read_label(tmp_path / "two" / path.relative_to(tmp_path / "one")))


def test_isic_full_size_split_is_2074_260_260():
    ids = [f"ISIC_{n:07d}" for n in range(0, 2 * 2594, 2)]
    lists = prepare_isic.seeded_split(ids, 0)
    assert [len(lists[s]) for s in ("train", "crossvali", "test")] == [2074, 260, 260]
    assert sorted(sum(lists.values(), [])) == sorted(ids)
    assert lists == sha_split(ids, 0)


def test_isic_user_lists(isic_raw, tmp_path, capsys):
    mine = write_lists(tmp_path / "mine", {"train": ["ISIC_0000003", "ISIC_0000004"], "crossvali": ["ISIC_0000005"],
                                           "test": ["ISIC_0000006"]}, ".jpg")
    out = tmp_path / "out"
    assert run_isic(isic_raw, out, "--splits", mine) == 0
    report = capsys.readouterr().out
    assert sat_ids(out, "train", ".jpg") == ["ISIC_0000003", "ISIC_0000004"]
    assert sat_ids(out, "crossvali", ".jpg") == ["ISIC_0000005"]
    assert sat_ids(out, "test", ".jpg") == ["ISIC_0000006"]
    assert (out / "splits" / "train.txt").read_text() == "ISIC_0000003_sat.jpg\nISIC_0000004_sat.jpg\n"
    assert "not in any split list (skipped): 16 images" in report

    unknown = write_lists(tmp_path / "unknown", {"train": ["ISIC_0000003"], "crossvali": ["ISIC_0099999"],
                                                 "test": []}, ".jpg")
    assert run_isic(isic_raw, tmp_path / "out2", "--splits", unknown) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{ISIC_IN}/ISIC_0099999.jpg (listed in crossvali.txt) does not exist" in err


def test_isic_mask_of_another_size_is_one_line(isic_raw, tmp_path, capsys):
    gt = isic_raw / ISIC_GT / "ISIC_0000002_segmentation.png"
    h, w = isic_size(2)
    Image.fromarray(np.zeros((w, h), dtype=np.uint8)).save(gt)  # transposed
    assert run_isic(isic_raw, tmp_path / "out") == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{gt} is {h}x{w} but its image ISIC_0000002.jpg is {w}x{h}" in err
    assert not list((tmp_path / "out").rglob("ISIC_0000002*"))


def test_isic_bad_mask_value_and_missing_mask_are_one_line(isic_raw, tmp_path, capsys):
    gt = isic_raw / ISIC_GT / "ISIC_0000011_segmentation.png"
    h, w = isic_size(11)
    Image.fromarray(np.full((h, w), 17, dtype=np.uint8)).save(gt)
    assert run_isic(isic_raw, tmp_path / "out") == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{gt}: value 17 in {h * w} pixels" in err

    Image.fromarray(building_mask(11, h, w) * 255).save(gt)
    rgb_gt = isic_raw / ISIC_GT / "ISIC_0000012_segmentation.png"
    Image.fromarray(np.zeros(isic_size(12) + (3,), dtype=np.uint8)).save(rgb_gt)
    assert run_isic(isic_raw, tmp_path / "out1") == 2
    assert f"{rgb_gt}: a RGB image, expected a single-band 0/255 mask" in one_error_line(capsys.readouterr().err)
    Image.fromarray(building_mask(12, *isic_size(12)) * 255).save(rgb_gt)
    rgb_gt.write_bytes(rgb_gt.read_bytes()[:80])  # truncated: the header reads, the pixels do not
    assert run_isic(isic_raw, tmp_path / "out1") == 2
    assert f"{rgb_gt}: not a readable mask" in one_error_line(capsys.readouterr().err)

    (isic_raw / ISIC_GT / "ISIC_0000004_segmentation.png").unlink()
    assert run_isic(isic_raw, tmp_path / "out2") == 2
    err = one_error_line(capsys.readouterr().err)
    assert "ISIC_0000004.jpg has no mask" in err and "ISIC_0000004_segmentation.png" in err

    assert run_isic(tmp_path, tmp_path / "out3") == 2
    assert f"has no {ISIC_IN}/ folder" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- the three stages


def run_stages(cli, data, root, dataset):
    """`--dataset <dataset>` through modes 1, 2, 3 (1 epoch each) and the evaluation of mode 3
    (task "ev") on the test split with its predictions, at 64 px, each run checked to exit 0;
    returns the logs folder, the predictions folder and what the evaluation printed."""
    models, logs, preds = root / "models", root / "runs", root / "preds"
    common = ["--dataset", dataset, "--data_path", data, "--model_path", models, "--log_path", logs,
              "--backbone_weights", "none", "--num_workers", 0, "--no_progress", "--device", "cpu",
              "--size_g", 64, "--size_p", 64, "--batch_size", 2, "--sub_batch_size", 4, "--num_epochs", 1,
              "--path_g", "g.pth", "--path_g2l", "g2l.pth", "--path_l2g", "l2g.pth"]
    for extra in (["--mode", 1, "--task_name", "g"], ["--mode", 2, "--task_name", "g2l"],
                  ["--mode", 3, "--task_name", "l2g"],
                  ["--mode", 3, "--task_name", "ev", "--evaluation", "--split", "test", "--predictions_dir", preds]):
        rc, out, err = cli(*common, *extra)
        assert rc == 0, f"{extra}: {err[-2000:]}\n{out[-2000:]}"
    return logs, preds, out


def stages(cli, data, root, dataset, n_test):
    """`run_stages`, then the evaluation's metrics and files checked for a 2-class data set;
    returns the metrics and the predictions folder."""
    logs, preds, _ = run_stages(cli, data, root, dataset)
    metrics = json.loads((logs / "ev.test.metrics.json").read_text())
    assert len(list(preds.iterdir())) == n_test
    for name in ("global", "local", "aggregated"):
        iou = metrics[name]["iou"]  # background and the object class
        assert len(iou) == 2 and all(x is None or 0.0 <= x <= 1.0 for x in iou)
    assert (logs / "g.train.args.json").is_file()
    args = json.loads((logs / "g.train.args.json").read_text())
    assert args["dataset"] == dataset and args["n_class"] == 2
    return metrics, preds


def colours(path: Path):
    with Image.open(path) as im:
        return im.size, {tuple(int(v) for v in c) for c in np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)}


# Each stage is one optimizer step (2 training images, batch 2): on the CPU a step of GLNet's
# 79 M parameters (Adam included) takes seconds even at 64 px.


def test_inria_through_the_three_stages(inria_raw, tmp_path, cli):
    lists = write_lists(tmp_path / "lists", {"train": ["austin1", "chicago1"], "crossvali": ["austin2"],
                                             "test": ["kitsap1"]}, ".tif")
    data = tmp_path / "data"
    assert run_inria(inria_raw, data, lists) == 0
    _, preds = stages(cli, data, tmp_path, "inria", n_test=1)
    size, used = colours(preds / "kitsap1_mask.png")
    assert size == (INRIA_SIZE[1], INRIA_SIZE[0])  # full resolution (W, H)
    assert used <= {tuple(c) for c in INRIA.colors}


def test_isic_through_the_three_stages(tmp_path, cli):
    raw = make_isic(tmp_path / "raw", range(4))  # seeded split 2 / 1 / 1; sides below and above 64 px
    data = tmp_path / "data"
    assert run_isic(raw, data) == 0
    _, preds = stages(cli, data, tmp_path, "isic", n_test=1)
    (test_id,) = sat_ids(data, "test", ".jpg")
    h, w = isic_size(int(test_id[5:]))
    size, used = colours(preds / f"{test_id}_mask.png")
    assert size == (w, h)
    assert used <= {tuple(c) for c in ISIC.colors}
