"""URUR (issue 23): the class table and preset, both mIoU conventions (by hand on a tiny
confusion matrix), dataset/prepare_urur.py on fake releases in the two public layouts, and each
prepared tree through the three stages and evaluation with --dataset urur."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import prepare_urur
from dataset.classes import DEEPGLOBE, URUR
from dataset.presets import PRESETS
from engine import format_table, metrics_dict
from test_prepare_inria_isic import colours, files, one_error_line, rgb, run_stages, states
from utils.metrics import ConfusionMatrix

# the release's classes in label order with their colours (the URUR README)
RELEASE = [("others", (0, 0, 0)), ("building", (230, 230, 230)), ("farmland", (95, 163, 7)),
           ("greenhouse", (100, 100, 100)), ("woodland", (200, 230, 160)), ("bareland", (255, 255, 100)),
           ("water", (150, 200, 250)), ("road", (240, 100, 80))]
SIZE = (64, 72)  # (H, W) of every fake image: one patch high, two wide at 64 px


def test_class_table_and_preset():
    assert list(zip(URUR.names, URUR.colors)) == RELEASE
    assert URUR.miou_classes == (1, 2, 3, 4, 5, 6, 7)  # `miou`: GLNet's convention, class 0 left out
    assert URUR.other_mious == (("miou_all", (0, 1, 2, 3, 4, 5, 6, 7)),)
    p = PRESETS["urur"]
    assert (p.size_g, p.size_p, p.batch_size, p.sub_batch_size) == (508, 508, 6, 6)
    assert p.data_path == "./data/urur/" and p.path_l2g == "fpn_urur_local2global.pth"
    assert DEEPGLOBE.other_mious == ()


# ---------------------------------------------------------------------------- the two means


def tiny_matrix() -> ConfusionMatrix:
    """12 pixels. Per class (intersection / union): 0: 2/4, 1: 2/3, 2: 1/2, 3: 1/2, 4, 5, 6: 1/1,
    7: 0/1 (its one pixel predicted as 0)."""
    label = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 0])
    cm = ConfusionMatrix(8, miou_classes=URUR.miou_classes)
    cm.update(label, pred)
    return cm


def test_both_mious_by_hand():
    results = metrics_dict({"aggregated": tiny_matrix()}, URUR)["aggregated"]
    assert set(results) == {"iou", "miou", "miou_all"}
    assert results["iou"] == pytest.approx([0.5, 2 / 3, 0.5, 0.5, 1.0, 1.0, 1.0, 0.0])
    # 1..7: (2/3 + 1/2 + 1/2 + 1 + 1 + 1 + 0) / 7 = (14/3) / 7 = 2/3
    assert results["miou"] == pytest.approx(2 / 3)
    # 0..7: (1/2 + 14/3) / 8 = (31/6) / 8 = 31/48
    assert results["miou_all"] == pytest.approx(31 / 48)


def test_table_prints_both_means_labelled():
    table = format_table(metrics_dict({"local": tiny_matrix(), "aggregated": tiny_matrix()}, URUR), URUR)
    lines = table.splitlines()
    assert lines[-2].split() == ["mIoU", "(1..7)", "0.6667", "0.6667"]
    assert lines[-1].split() == ["mIoU_all", "(0..7)", "0.6458", "0.6458"]
    assert lines[1].split() == ["0", "others", "0.5000", "0.5000"] and lines[8].split()[:2] == ["7", "road"]


def test_deepglobe_metrics_and_table_unchanged():
    cm = ConfusionMatrix(7)
    cm.update(torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 5]))
    results = metrics_dict({"global": cm}, DEEPGLOBE)
    assert set(results["global"]) == {"iou", "miou"}
    # 5: 1/2, 6: 1/2, 1..4: 1 -> (4 + 1) / 6
    assert results["global"]["miou"] == pytest.approx(5 / 6)
    expected = "\n".join(["class               global"] + [
        f"{c} {name:<12}{iou:>12}" for c, (name, iou) in enumerate(zip(DEEPGLOBE.names, [
            "1.0000", "1.0000", "1.0000", "1.0000", "1.0000", "0.5000", "0.5000"]))
    ] + ["mIoU (1..6)         0.8333"])
    assert format_table(results, DEEPGLOBE) == expected


# ---------------------------------------------------------------------------- fake releases


def label_of(seed: int) -> np.ndarray:
    """Class indices 0..7 in horizontal bands of 8 rows, shifted by the seed (every class
    present); the test image (seed 7): 32 rows of building (1), 16 of road (7), 16 of others (0)."""
    h, w = SIZE
    if seed == 7:
        return np.repeat(np.array([1] * 32 + [7] * 16 + [0] * 16, np.uint8)[:, None], w, axis=1)
    return ((np.arange(h)[:, None] // 8 + seed + np.zeros((1, w), np.int64)) % 8).astype(np.uint8)


LAYOUTS = {
    "split_first": lambda root, split: (root / split / "image", root / split / "label"),
    "imgs_labels": lambda root, split: (root / "imgs" / split, root / "labels" / split),
}
NAMES = {"train": ["a1", "a2"], "val": ["b1"], "test": ["c1"]}


def make_release(root: Path, layout: str, rgb_label: str = "a2") -> Path:
    """A fake URUR release in `layout`: PNG images, single-channel labels but `rgb_label`,
    drawn in the release's colours."""
    for split, names in NAMES.items():
        image_dir, label_dir = LAYOUTS[layout](root, split)
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for name in names:
            seed = int(name[1]) + 3 * "abc".index(name[0])
            Image.fromarray(rgb(seed, *SIZE)).save(image_dir / f"{name}.png")
            label = label_of(seed)
            if name == rgb_label:
                palette = np.array([c for _, c in RELEASE], np.uint8)
                Image.fromarray(palette[label]).save(label_dir / f"{name}.png")
            else:
                Image.fromarray(label).save(label_dir / f"{name}.png")
    return root


def run_prepare(raw, out, *extra):
    return prepare_urur.main(["--raw_path", str(raw), "--data_path", str(out), "--workers", "1", *map(str, extra)])


def read_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prepare_builds_the_layout(layout, tmp_path, capsys):
    raw = make_release(tmp_path / "raw", layout)
    out = tmp_path / "out"
    assert run_prepare(raw, out) == 0
    report = capsys.readouterr().out
    assert files(out) == sorted(
        f"{ours}/{sub}/{name}{tail}" for theirs, ours in (("train", "train"), ("val", "crossvali"), ("test", "test"))
        for name in NAMES[theirs] for sub, tail in (("Sat", "_sat.png"), ("Label", "_mask.png")))
    for theirs, ours in (("train", "train"), ("val", "crossvali"), ("test", "test")):
        image_dir, _ = LAYOUTS[layout](raw, theirs)
        for name in NAMES[theirs]:
            assert os.path.samefile(image_dir / f"{name}.png", out / ours / "Sat" / f"{name}_sat.png")
            seed = int(name[1]) + 3 * "abc".index(name[0])
            np.testing.assert_array_equal(read_label(out / ours / "Label" / f"{name}_mask.png"), label_of(seed))
    assert "train          2 images and labels" in report and "crossvali      1 images and labels" in report
    assert "Sat:   4 hard-linked, 0 copied, 0 skipped" in report
    assert "Label: 4 written (1 of them decoded from RGB colours), 0 skipped" in report
    # class shares: train and crossvali 64 rows in bands of 8 (each class 8 of 64 rows), test
    # 32 / 16 / 16 rows of building / road / others
    lines = report.splitlines()
    table = [line.split() for line in lines[lines.index("class shares (% of the pixels of each split):") + 2:][:3]]
    assert table == [["train"] + ["12.50"] * 8, ["crossvali"] + ["12.50"] * 8,
                     ["test", "25.00", "50.00"] + ["0.00"] * 5 + ["25.00"]]


def test_rerun_changes_nothing(tmp_path, capsys):
    raw = make_release(tmp_path / "raw", "imgs_labels")
    out = tmp_path / "out"
    assert run_prepare(raw, out) == 0
    before = states(out)
    capsys.readouterr()
    assert run_prepare(raw, out, "--workers", 2) == 0
    report = capsys.readouterr().out
    assert states(out) == before
    assert "Sat:   0 hard-linked, 0 copied, 4 skipped (already present)" in report
    assert "Label: 0 written (0 of them decoded from RGB colours), 4 skipped (already present)" in report


def test_label_value_9_is_one_line(tmp_path, capsys):
    raw = make_release(tmp_path / "raw", "split_first")
    label = label_of(1)
    label[3, 5] = 9
    Image.fromarray(label).save(raw / "train" / "label" / "a1.png")
    assert run_prepare(raw, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(raw / "train" / "label" / "a1.png") in line and "value 9 in 1 pixels" in line


def test_off_palette_rgb_label_is_one_line(tmp_path, capsys):
    raw = make_release(tmp_path / "raw", "imgs_labels")
    path = raw / "labels" / "train" / "a2.png"
    colour = np.asarray(Image.open(path)).copy()
    colour[0, 0] = (1, 2, 3)
    Image.fromarray(colour).save(path)
    assert run_prepare(raw, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and "colour (1, 2, 3) in 1 pixels" in line


def test_unknown_layout_and_missing_label_are_one_line(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "images" / "train").mkdir(parents=True)  # neither layout
    assert run_prepare(raw, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is no URUR tree" in line
    assert "<split>/image/ with <split>/label/" in line and "imgs/<split>/ with labels/<split>/" in line
    assert not (tmp_path / "out").exists()

    raw = make_release(tmp_path / "raw2", "split_first")
    (raw / "val" / "label" / "b1.png").unlink()
    assert run_prepare(raw, tmp_path / "out") == 2
    assert f"{raw / 'val' / 'image' / 'b1.png'} has no label" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- the three stages


def stages(cli, data: Path, root: Path):
    """--dataset urur through modes 1, 2, 3 (1 epoch each, 64 px) and the evaluation of mode 3
    on the test split with its predictions; returns the metrics, the printed evaluation and
    the predictions folder."""
    logs, preds, out = run_stages(cli, data, root, "urur")
    assert json.loads((logs / "g.train.args.json").read_text())["n_class"] == 8
    return json.loads((logs / "ev.test.metrics.json").read_text()), out, preds


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_through_the_three_stages(layout, tmp_path, cli):
    raw = make_release(tmp_path / "raw", layout)
    data = tmp_path / "data"
    assert prepare_urur.main(["--raw_path", str(raw), "--data_path", str(data), "--workers", "1"]) == 0
    metrics, printed, preds = stages(cli, data, tmp_path)
    for name in ("global", "local", "aggregated"):
        m = metrics[name]
        assert set(m) == {"iou", "miou", "miou_all"} and len(m["iou"]) == 8
        iou = [x or 0.0 for x in m["iou"]]  # a class without pixels (null) counts as 0
        assert m["miou"] == pytest.approx(sum(iou[1:]) / 7)
        assert m["miou_all"] == pytest.approx(sum(iou) / 8)
    table = printed.splitlines()
    means = {line.split()[0]: line.split() for line in table if line.startswith("mIoU")}
    assert means["mIoU"][1] == "(1..7)" and means["mIoU_all"][1] == "(0..7)"
    assert means["mIoU_all"][2:] == [f"{metrics[k]['miou_all']:.4f}" for k in ("global", "local", "aggregated")]
    size, used = colours(preds / "c1_mask.png")
    assert size == (SIZE[1], SIZE[0])
    assert used <= {c for _, c in RELEASE}
