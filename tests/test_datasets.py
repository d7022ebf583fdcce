"""Data sets as data (issue 11): the folder layout with any image extension, class tables
from files, mask decoding through the table, dataset presets and the --dataset/--classes flags."""
import numpy as np
import pytest
import torch
from PIL import Image

from dataset.deep_globe import DeepGlobe, find_ids
from utils.errors import UserError


def _pair(root, id_, ext=".jpg", size=(40, 32), mask=None, split="train"):
    """<split>/Sat/<id>_sat<ext> (RGB) and <split>/Label/<id>_mask.png; size is (W, H)."""
    (root / split / "Sat").mkdir(parents=True, exist_ok=True)
    (root / split / "Label").mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / split / "Sat" / f"{id_}_sat{ext}")
    if mask is not False:
        arr = np.zeros((h, w), np.uint8) if mask is None else mask
        Image.fromarray(arr).save(root / split / "Label" / f"{id_}_mask.png")


# ----------------------------------------------------------------------------- layout


def test_images_of_every_extension_are_found(tmp_path):
    for i, ext in enumerate((".jpg", ".jpeg", ".png", ".tif", ".tiff", ".PNG")):
        _pair(tmp_path, f"im{i}", ext)
    (tmp_path / "train" / "Sat" / "notes_sat.txt").write_text("not an image")
    (tmp_path / "train" / "Sat" / "other.png").write_bytes(b"")  # no _sat: not an image of the layout
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16)
    assert ds.ids == [f"im{i}" for i in range(6)]
    assert [ds.image_path(i).rsplit("_sat", 1)[1] for i in ds.ids] == [".jpg", ".jpeg", ".png", ".tif", ".tiff", ".PNG"]
    for i in range(len(ds)):
        assert ds[i]["size"] == (32, 40)


def test_one_id_with_two_extensions_is_an_error(tmp_path):
    _pair(tmp_path, "a", ".jpg")
    _pair(tmp_path, "a", ".tif")
    with pytest.raises(UserError) as e:
        find_ids(str(tmp_path / "train"), True)
    msg = str(e.value)
    assert "'a'" in msg and "a_sat.jpg" in msg and "a_sat.tif" in msg and "\n" not in msg


def test_image_without_label_names_its_real_file(tmp_path):
    _pair(tmp_path, "a", ".png")
    _pair(tmp_path, "b", ".tif", mask=False)
    with pytest.raises(UserError, match=r"b_sat\.tif has no .*b_mask\.png"):
        find_ids(str(tmp_path / "train"), True)
