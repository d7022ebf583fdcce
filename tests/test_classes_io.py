"""utils.io (atomic writes) and dataset.classes (class tables, with the mIoU of utils.metrics)."""
import json
import math
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.classes import DEEPGLOBE, ClassTable, class_table
from utils import io as uio
from utils.io import (atomic_copy, atomic_write, is_temp_name, remove_stale_temps, remove_stale_temps_in,
                      save_png, temp_name, write_json)
from utils.metrics import ConfusionMatrix, mean_iou


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- atomic_write


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # not visible before the end of the block
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_crash_inside_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    # also when nothing was there before, and for KeyboardInterrupt (a BaseException)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "g.bin") as f:
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(uio.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(uio.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with atomic_write(tmp_path / "f") as f:
        f.write(b"x")
    assert events == ["fsync", "replace"]


def test_atomic_write_permissions_are_0666_minus_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "a") as f:
            f.write(b"x")
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    with atomic_write(tmp_path / "b") as f:
        f.write(b"x")
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_atomic_write_text_mode_and_bad_mode(tmp_path):
    with atomic_write(tmp_path / "t.txt", "w", encoding="utf-8") as f:
        f.write("é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    for mode in ("r", "a", "w+", "rb"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_write(tmp_path / "x", mode):
                pass
    with pytest.raises(LookupError):  # the file is made, then the text layer fails
        with atomic_write(tmp_path / "x", "w", encoding="no-such-codec"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_atomic_write_never_deletes_a_file_it_did_not_make(tmp_path, monkeypatch):
    taken = tmp_path / "f.1.0123abcd.tmp"
    taken.write_bytes(b"someone else's")
    monkeypatch.setattr(uio, "temp_name", lambda path: str(taken))
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "f"):
            pass
    assert taken.read_bytes() == b"someone else's"


def test_two_concurrent_writers_get_different_temp_names(tmp_path):
    path = tmp_path / "shared.bin"
    inside, names, go = threading.Barrier(2), [], threading.Event()

    def writer(data):
        with atomic_write(path) as f:
            names.append(f.name)
            f.write(data)
            inside.wait(timeout=10)  # both temp files are open at the same time here
            go.wait(timeout=10)

    threads = [threading.Thread(target=writer, args=(d,)) for d in (b"a" * 10, b"b" * 10)]
    for t in threads:
        t.start()
    while len(names) < 2:
        threading.Event().wait(0.01)
    go.set()
    for t in threads:
        t.join()
    assert len(set(names)) == 2
    assert all(is_temp_name(n, path) for n in names)
    assert path.read_bytes() in (b"a" * 10, b"b" * 10)  # one whole file, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.bin"]


def test_temp_names(tmp_path):
    name = temp_name(tmp_path / "x.pth")
    assert os.path.dirname(name) == str(tmp_path)  # same folder: the rename stays on one file system
    assert is_temp_name(name) and is_temp_name(name, tmp_path / "x.pth")
    assert not is_temp_name(name, tmp_path / "x.pt")
    assert not is_temp_name(name, tmp_path / "y.pth")
    assert temp_name(tmp_path / "x.pth") != name
    for other in ("x.pth", "x.pth.tmp", "x.pth.12.nothex!.tmp", "x.pth.12.abcdef012.tmp", "notes.tmp"):
        assert not is_temp_name(other)


def test_remove_stale_temps_only_touches_temp_names(tmp_path):
    path = tmp_path / "m.pth"
    keep = [tmp_path / n for n in ("m.pth", "m.pth.tmp", "m.pth.old.tmp", "m.best.pth.1.0123abcd.tmp", "notes.txt")]
    for p in keep:
        p.write_bytes(b"keep")
    stale = [tmp_path / "m.pth.123.0123abcd.tmp", tmp_path / "m.pth.4.ffffffff.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert remove_stale_temps(path) == sorted(str(p) for p in stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    # a whole folder: every temp file, of any target
    assert remove_stale_temps_in(tmp_path) == [str(tmp_path / "m.best.pth.1.0123abcd.tmp")]
    assert remove_stale_temps_in(tmp_path / "no_such_folder") == []


def test_write_json(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": [1, 2.5], "a": None})
    assert path.read_text() == '{\n  "b": [\n    1,\n    2.5\n  ],\n  "a": null\n}'
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"b": [1, 2.5], "a": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_save_png_array_image_and_failure(tmp_path):
    path = tmp_path / "p.png"
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_png(path, arr)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), arr)
    rgb = np.zeros((2, 5, 3), np.uint8)
    rgb[..., 1] = 200
    save_png(path, Image.fromarray(rgb), compress_level=1)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    # the same bytes as PIL writing to the file name itself
    Image.fromarray(arr).save(tmp_path / "direct.png")
    save_png(path, arr)
    assert path.read_bytes() == (tmp_path / "direct.png").read_bytes()
    with pytest.raises(TypeError):
        save_png(path, np.zeros((2, 2), np.complex64))  # PIL cannot take it
    assert path.read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.png", "p.png"]


def test_atomic_copy_links_or_copies(tmp_path, monkeypatch):
    src = tmp_path / "a"
    src.write_bytes(b"data" * 1000)
    assert atomic_copy(src, tmp_path / "b") == "linked"
    assert os.path.samefile(src, tmp_path / "b")

    def no_link(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(uio.os, "link", no_link)
    (tmp_path / "c").write_bytes(b"old")
    assert atomic_copy(src, tmp_path / "c") == "copied"
    assert (tmp_path / "c").read_bytes() == src.read_bytes() and not os.path.samefile(src, tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing", tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- class tables

# docs/MODEL.md section 7
SPEC_COLOURS = {
    "unknown": (0, 0, 0), "urban": (0, 255, 255), "agriculture": (255, 255, 0), "rangeland": (255, 0, 255),
    "forest": (0, 255, 0), "water": (0, 0, 255), "barren": (255, 255, 255),
}


def test_deepglobe_table_is_the_spec():
    assert DEEPGLOBE.n_class == 7
    assert dict(zip(DEEPGLOBE.names, DEEPGLOBE.colors)) == SPEC_COLOURS
    assert DEEPGLOBE.ignore_index == 255
    assert DEEPGLOBE.miou_classes == (1, 2, 3, 4, 5, 6)
    assert DEEPGLOBE.names[0] == "unknown" and DEEPGLOBE.names[6] == "barren"
    assert DEEPGLOBE.palette.dtype == np.uint8 and DEEPGLOBE.palette.shape == (7, 3)
    assert not DEEPGLOBE.palette.flags.writeable
    with pytest.raises(Exception):
        DEEPGLOBE.names = ("x",)  # frozen


def test_decode_every_palette_colour_and_the_off_palette_one():
    # one pixel per class colour, each also in a dimmed/brightened version that thresholds to it
    exact = np.array([DEEPGLOBE.colors], np.uint8)  # (1, 7, 3)
    noisy = np.where(exact >= 128, 128, 127).astype(np.uint8)  # the values right at the threshold
    classes, off = DEEPGLOBE.decode_rgb(np.concatenate([exact, noisy]))
    np.testing.assert_array_equal(classes, [list(range(7))] * 2)
    assert classes.dtype == np.uint8 and off == 0
    # red is the one thresholded colour that is no class: class 0, counted
    red = np.array([[[255, 0, 0], [200, 100, 30], [0, 0, 0]]], np.uint8)
    classes, off = DEEPGLOBE.decode_rgb(red)
    np.testing.assert_array_equal(classes, [[0, 0, 0]])
    assert off == 2
    # alpha is ignored; a float mask decodes the same; (H, W) is an error
    rgba = np.concatenate([exact, np.zeros((1, 7, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(DEEPGLOBE.decode_rgb(rgba)[0], [list(range(7))])
    np.testing.assert_array_equal(DEEPGLOBE.decode_rgb(noisy.astype(np.float32))[0], [list(range(7))])
    with pytest.raises(ValueError, match="RGB mask"):
        DEEPGLOBE.decode_rgb(np.zeros((4, 4), np.uint8))


def test_colorize_draws_ignore_and_unknown_indices_black():
    mask = np.array([[0, 1, 2, 3], [4, 5, 6, 255], [7, 100, 6, 1]], np.uint8)
    out = DEEPGLOBE.colorize(mask)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[1, 3].tolist() == [0, 0, 0] and out[2, 0].tolist() == [0, 0, 0] and out[2, 1].tolist() == [0, 0, 0]
    assert [tuple(out[0, i]) for i in range(4)] == [DEEPGLOBE.colors[i] for i in range(4)]
    # colorize then decode gives the classes back (255 -> black -> 0)
    np.testing.assert_array_equal(DEEPGLOBE.decode_rgb(out)[0], np.where(mask < 7, mask, 0))


def test_miou_by_hand():
    # classes 1..6: 0.5 + NaN(->0) + 0.25 + 1 + 0 + 0.75 = 2.5, / 6
    iou = [0.9, 0.5, math.nan, 0.25, 1.0, 0.0, 0.75]
    assert mean_iou(iou, DEEPGLOBE.miou_classes) == pytest.approx(2.5 / 6)
    table = ClassTable("t", ("a", "b", "c"), [(0, 0, 0)] * 3, miou_classes=(0, 2))
    assert mean_iou([0.2, 0.9, 0.4], table.miou_classes) == pytest.approx(0.3)
    assert mean_iou(iou) == mean_iou(iou, DEEPGLOBE.miou_classes)  # bitwise: same terms, same order
    assert mean_iou(iou, (0, 6)) == pytest.approx(0.825)
    # labels 0 0 1 1 2, predictions 0 1 1 1 0: IoU 0: 1/3, 1: 2/3, 2: 0
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0]))
    assert cm.iou() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx(1 / 3)  # classes 1, 2 by default
    cm_all = ConfusionMatrix(3, miou_classes=(0, 1, 2))
    cm_all.matrix += cm.matrix
    assert cm_all.miou() == pytest.approx(1 / 3 * (1 / 3 + 2 / 3))


def test_generic_table():
    assert class_table(7) is DEEPGLOBE
    t = class_table(10)
    assert t.n_class == 10 and t.names == tuple(f"class {i}" for i in range(10))
    assert t.miou_classes == tuple(range(1, 10)) and t.ignore_index == 255
    assert t.colors[:7] == DEEPGLOBE.colors  # classes 0..6 drawn as they always were
    assert len(set(t.colors)) == 10 and class_table(10).colors == t.colors  # distinct, deterministic
    assert len(set(class_table(255).colors)) == 255
    assert class_table(3).colors == DEEPGLOBE.colors[:3] and class_table(3).names[2] == "class 2"
    out = t.colorize(np.array([[9, 255]], np.uint8))
    assert tuple(out[0, 0]) == t.colors[9] and out[0, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="0 or 255"):
        t.decode_rgb(np.zeros((2, 2, 3), np.uint8))  # its palette cannot be thresholded
    for bad in (0, 256):
        with pytest.raises(ValueError, match="n_class"):
            class_table(bad)
    assert math.isnan(mean_iou([0.5], class_table(1).miou_classes))


def test_table_checks_its_fields():
    with pytest.raises(ValueError, match="one RGB colour"):
        ClassTable("t", ("a", "b"), [(0, 0, 0)])
    with pytest.raises(ValueError, match="ignore_index"):
        ClassTable("t", ("a", "b"), [(0, 0, 0), (1, 1, 1)], ignore_index=1)
    with pytest.raises(ValueError, match="miou_classes"):
        ClassTable("t", ("a", "b"), [(0, 0, 0), (1, 1, 1)], miou_classes=(2,))


def test_table_pickles_for_loader_workers():
    import pickle

    t = pickle.loads(pickle.dumps(class_table(9)))
    assert t == class_table(9) and not t.palette.flags.writeable
    np.testing.assert_array_equal(t.colorize(np.arange(9)[None]), class_table(9).colorize(np.arange(9)[None]))
