"""Tests of the synthetic DeepGlobe-format generator (dataset/synthetic.py)."""
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset.classes import DEEPGLOBE
from dataset.synthetic import (BARREN, FOREST, AGRICULTURE, RANGELAND, URBAN, WATER, MANIFEST,
                               class_shares, generate, main, render_sample)

SMALL = dict(n_train=2, n_val=1, n_test=1, size=96)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _down4(a: np.ndarray) -> np.ndarray:
    """PIL bilinear (antialiased) 4x downsampling of a float map."""
    h, w = a.shape
    im = Image.fromarray(a.astype(np.float32)).resize((w // 4, h // 4), Image.Resampling.BILINEAR)
    return np.asarray(im)


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    a = _files(Path(generate(tmp_path / "a", seed=3, **SMALL)["out_dir"]))
    b = _files(Path(generate(tmp_path / "b", seed=3, **SMALL)["out_dir"]))
    c = _files(Path(generate(tmp_path / "c", seed=4, **SMALL)["out_dir"]))
    assert a == b
    assert len(a) == 2 * 4 + 1  # 4 images + 4 masks + manifest
    sat_a = sorted(v for k, v in a.items() if k.endswith("_sat.jpg"))
    sat_c = sorted(v for k, v in c.items() if k.endswith("_sat.jpg"))
    assert not set(sat_a) & set(sat_c)


def test_glnet_layout_formats_and_mixed_sizes(tmp_path):
    sizes = [(96, 128), (80, 64), (64, 64)]
    s = generate(tmp_path, n_train=3, n_val=2, n_test=1, sizes=sizes, seed=1)
    assert s["layout"] == "glnet" and not s["skipped"]
    all_ids = [i for split in ("train", "crossvali", "test") for i in s["splits"][split]]
    assert [len(s["splits"][k]) for k in ("train", "crossvali", "test")] == [3, 2, 1]
    assert len(set(all_ids)) == 6 and all(i.isdigit() and len(i) >= 5 for i in all_ids)
    for n, img_id in enumerate(all_ids):
        split = "train" if n < 3 else "crossvali" if n < 5 else "test"
        with Image.open(tmp_path / split / "Sat" / f"{img_id}_sat.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        with Image.open(tmp_path / split / "Label" / f"{img_id}_mask.png") as m:
            assert m.format == "PNG" and m.mode == "L" and m.size == (w, h)
            assert np.asarray(m).max() <= 6
        assert (h, w) == sizes[n % len(sizes)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crossvali", MANIFEST, "test", "train"]


def test_raw_layout_has_exact_palette_colours(tmp_path):
    s = generate(tmp_path / "raw", rgb_masks=True, seed=2, **SMALL)
    raw = tmp_path / "raw"
    palette = {tuple(c) for c in DEEPGLOBE.palette.tolist()}
    masks = sorted((raw / "train").glob("*_mask.png"))
    assert len(masks) == 4 and len(list((raw / "train").glob("*_sat.jpg"))) == 4
    for p in masks:
        with Image.open(p) as m:
            assert m.mode == "RGB"
            colours = {tuple(c) for c in np.unique(np.asarray(m).reshape(-1, 3), axis=0).tolist()}
        assert colours <= palette
        assert (raw / "train" / p.name.replace("_mask.png", "_sat.jpg")).is_file()
    # unlabelled Kaggle-like valid/ folder
    assert len(list((raw / "valid").glob("*_sat.jpg"))) == 1
    assert not list((raw / "valid").glob("*_mask.png"))
    with open(raw / "class_dict.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(int(r["r"]), int(r["g"]), int(r["b"])) for r in rows} == palette
    # split lists name labelled images of train/
    for split in ("train", "crossvali", "test"):
        names = (raw / "splits" / f"{split}.txt").read_text().split()
        assert names == [f"{i}_sat.jpg" for i in s["splits"][split]]
        assert all((raw / "train" / n).is_file() for n in names)
    # same images as the GLNet layout with the same seed
    g = generate(tmp_path / "glnet", seed=2, **SMALL)
    assert {k: g["splits"][k] for k in g["splits"]} == {k: s["splits"][k] for k in g["splits"]}
    assert class_shares(raw) == class_shares(tmp_path / "glnet") == g["class_shares"]


def test_thin_structures_vanish_under_4x_downsampling():
    for seed in range(3):
        sample = render_sample(np.random.default_rng(seed), 256, 256)
        thin, mask = sample["thin"], sample["mask"]
        assert set(np.unique(mask[thin])) <= {URBAN, WATER}
        share = thin.mean()
        assert share > 0.004
        # after a 4x bilinear downsampling almost no cell is still mostly road/river
        assert (_down4(thin) > 0.5).mean() < 0.25 * share


def test_textures_vanish_under_4x_downsampling():
    sample = render_sample(np.random.default_rng(5), 256, 256)
    grey = sample["image"].astype(np.float32).mean(2)
    mask = sample["mask"]
    small_grey = _down4(grey)
    small_mask = np.asarray(Image.fromarray(mask).resize((64, 64), Image.Resampling.NEAREST))
    for cls in (AGRICULTURE, FOREST):
        full = (mask[:, 1:] == cls) & (mask[:, :-1] == cls)
        low = (small_mask[:, 1:] == cls) & (small_mask[:, :-1] == cls)
        assert full.sum() > 500 and low.sum() > 30
        tex_full = np.abs(np.diff(grey, axis=1))[full].mean()
        tex_low = np.abs(np.diff(small_grey, axis=1))[low].mean()
        assert tex_full > 10 and tex_low < 0.4 * tex_full


def test_rangeland_and_barren_told_apart_only_by_context():
    for seed in range(4):
        sample = render_sample(np.random.default_rng(seed), 192, 192)
        mask, image = sample["mask"], sample["image"].astype(np.float32)
        rng_px, bar_px = mask == RANGELAND, mask == BARREN
        if rng_px.sum() < 200 or bar_px.sum() < 200:
            continue
        # rangeland never touches barren or water (4-neighbourhood)
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            pair = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel())}
            for other in (BARREN, WATER):
                assert (RANGELAND, other) not in pair and (other, RANGELAND) not in pair
        # locally alike: same texture statistics (colour differs only by the smooth shading)
        std_r = np.abs(np.diff(image, axis=1))[rng_px[:, 1:] & rng_px[:, :-1]].mean()
        std_b = np.abs(np.diff(image, axis=1))[bar_px[:, 1:] & bar_px[:, :-1]].mean()
        assert abs(std_r - std_b) < 0.15 * std_b


def test_every_class_present_and_unknown_rare(tmp_path):
    s = generate(tmp_path, n_train=4, n_val=2, n_test=1, size=128, seed=0)
    shares = s["class_shares"]
    assert list(shares) == list(DEEPGLOBE.names)
    assert all(v > 0 for v in shares.values())
    assert shares["unknown"] < 0.05
    assert abs(sum(shares.values()) - 1) < 1e-4
    assert class_shares(tmp_path) == shares


def test_rerun_is_skipped_and_changed_parameters_rewrite(tmp_path):
    generate(tmp_path, seed=0, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate(tmp_path, seed=0, **SMALL)
    assert again["skipped"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    # fewer images: the old ones are removed, not left behind
    fewer = generate(tmp_path, seed=0, **{**SMALL, "n_train": 1})
    assert not fewer["skipped"]
    assert len(list(tmp_path.rglob("*_sat.jpg"))) == 3
    assert len(list(tmp_path.rglob("*_mask.png"))) == 3


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n_train", "1", "--n_val", "1",
                 "--n_test", "0", "--sizes", "64x96,96x64", "--raw"]) == 0
    assert "raw data set" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "train").glob("*_mask.png"))) == 2
    assert main(["--out", str(tmp_path / "e"), "--size", "8"]) == 2
    assert "too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "f"), "--sizes", "64by64"])
