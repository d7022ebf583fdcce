"""Data sets as data (issue 11): the folder layout with any image extension, class tables
from files, mask decoding through the table, dataset presets and the --dataset/--classes flags."""
import numpy as np
import pytest
import torch
from PIL import Image

from dataset.deep_globe import DeepGlobe, find_images
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
        find_images(str(tmp_path / "train"), True)
    msg = str(e.value)
    assert "'a'" in msg and "a_sat.jpg" in msg and "a_sat.tif" in msg and "\n" not in msg


def test_image_without_label_names_its_real_file(tmp_path):
    _pair(tmp_path, "a", ".png")
    _pair(tmp_path, "b", ".tif", mask=False)
    with pytest.raises(UserError, match=r"b_sat\.tif has no .*b_mask\.png"):
        find_images(str(tmp_path / "train"), True)


# ----------------------------------------------------------------------------- class tables

from dataset.classes import DEEPGLOBE, INRIA, ISIC, ClassTable, load_class_table  # noqa: E402

ROADS_JSON = """{
  "name": "roads",
  "classes": [
    {"name": "background", "color": [0, 0, 0], "values": [0], "miou": false},
    {"name": "road", "color": [255, 128, 0], "values": [1, 200]},
    {"name": "path", "color": [0, 128, 255], "values": 2}
  ],
  "ignore_values": [99],
  "ignore_colors": [[255, 0, 255]]
}"""


def test_json_table(tmp_path):
    path = tmp_path / "roads.json"
    path.write_text(ROADS_JSON)
    t = load_class_table(path)
    assert t.names == ("background", "road", "path")
    assert t.colors == ((0, 0, 0), (255, 128, 0), (0, 128, 255))
    assert t.values == ((0,), (1, 200), (2,)) and t.ignore_values == (99,)
    assert t.ignore_colors == ((255, 0, 255),) and t.miou_classes == (1, 2)
    assert "roads" in t.name and str(path) in t.name
    classes, bad = t.decode_values(np.array([[0, 1, 200, 2, 99]], np.uint8))
    assert bad is None and classes.tolist() == [[0, 1, 1, 2, 255]]


def test_json_table_of_names_only(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"classes": ["sea", "land"]}')
    t = load_class_table(path)
    assert t.names == ("sea", "land") and t.values == ((0,), (1,)) and t.ignore_values == (255,)
    assert t.miou_classes == (0, 1) and len(set(t.colors)) == 2  # every class counts; colours made up


def test_csv_table_with_values_and_miou(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,r,g,b,values,miou\nbackground,0,0,0,0,no\nbuilding,255,255,255,1;255,yes\n")
    t = load_class_table(path)
    assert t.names == ("background", "building") and t.values == ((0,), (1, 255))
    assert t.ignore_values == () and t.miou_classes == (1,)  # 255 is a class value: nothing ignored


def test_kaggle_class_dict_csv(tmp_path):
    # DeepGlobe's class_dict.csv from Kaggle, as downloaded (classes in file order)
    path = tmp_path / "class_dict.csv"
    path.write_text("name,r,g,b\nurban_land,0,255,255\nagriculture_land,255,255,0\nrangeland,255,0,255\n"
                    "forest_land,0,255,0\nwater,0,0,255\nbarren_land,255,255,255\nunknown,0,0,0\n")
    t = load_class_table(path)
    assert t.n_class == 7 and t.names[0] == "urban_land" and t.names[6] == "unknown"
    assert t.colors[1] == (255, 255, 0) and t.miou_classes == tuple(range(7))
    rgb = np.array([[[0, 255, 255], [0, 0, 0], [0, 0, 255]]], np.uint8)
    classes, bad = t.decode_colors(rgb)
    assert bad is None and classes.tolist() == [[0, 6, 4]]


@pytest.mark.parametrize("name, text, needle", [
    ("dup.csv", "name,r,g,b\na,0,0,0\na,1,1,1\n", "class name 'a' appears twice"),
    ("dupc.csv", "name,r,g,b\na,0,0,0\nb,0,0,0\n", "same colour [0, 0, 0]"),
    ("dupv.json", '{"classes": [{"name": "a", "values": [0, 1]}, {"name": "b", "values": [1]}]}', "mask value 1 is given twice"),
    ("dupi.json", '{"classes": [{"name": "a", "values": [0, 255]}, "b"], "ignore_values": [255]}', "mask value 255 is given twice"),
    ("empty.json", '{"classes": []}', "no classes"),
    ("empty.csv", "", "no classes"),
    ("header.csv", "name,r,g,b\n", "no classes"),
    ("broken.json", '{"classes": [', "not valid JSON"),
    ("nokey.json", '{"clases": ["a"]}', '"classes"'),
    ("typo.json", '{"classes": [{"name": "a", "colour": [0, 0, 0]}]}', "unknown key 'colour'"),
    ("rgb.json", '{"classes": [{"name": "a", "color": [0, 0, 300]}]}', "0..255"),
    ("some.json", '{"classes": [{"name": "a", "color": [0, 0, 0]}, "b"]}', "'b' has no colour"),
    ("noheader.csv", "a,0,0,0\nb,1,1,1\n", "first line must name the columns"),
    ("cols.csv", "name,red,g,b\na,0,0,0\n", "columns must be among"),
    ("fields.csv", "name,r,g,b\na,0,0\n", "line 2 has 3 fields"),
    ("value.csv", "name,values\na,x\n", "must be an integer"),
    ("table.txt", "a\n", "expected a .json or .csv file"),
])
def test_bad_table_is_one_error_naming_the_file(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_class_table(path)
    msg = str(e.value)
    assert msg.startswith(f"class table {path}: ") and needle in msg and "\n" not in msg, msg


def test_missing_table_file(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        load_class_table(tmp_path / "nowhere.json")


def test_binary_presets_read_0_1_and_0_255_masks():
    for t in (INRIA, ISIC):
        assert t.n_class == 2 and t.miou_classes == (0, 1) and t.ignore_values == ()
        raw, _ = t.decode_values(np.array([[0, 255, 255, 0]], np.uint8))
        prepared, _ = t.decode_values(np.array([[0, 1, 1, 0]], np.uint8))
        assert raw.tolist() == prepared.tolist() == [[0, 1, 1, 0]]
        assert t.decode_values(np.array([[0, 128]], np.uint8))[1] == 128
    assert INRIA.names[1] == "building" and ISIC.names[1] == "lesion"


def test_exact_colour_decoding_of_a_user_table():
    t = ClassTable("t", ("a", "b"), ((10, 20, 30), (200, 100, 0)), ignore_colors=((255, 255, 255),))
    rgba = np.array([[[10, 20, 30, 255], [200, 100, 0, 0], [255, 255, 255, 255]]], np.uint8)
    classes, bad = t.decode_colors(rgba)
    assert bad is None and classes.tolist() == [[0, 1, 255]]
    classes, bad = t.decode_colors(np.array([[[10, 20, 30], [200, 100, 1]]], np.uint8))  # one channel off
    assert bad == (200, 100, 1)


def test_deepglobe_table_keeps_its_raw_values_and_decoding():
    assert DEEPGLOBE.values == tuple((i,) for i in range(7)) and DEEPGLOBE.ignore_values == (255,)
    assert DEEPGLOBE.rgb_masks == "prepare"
    mask = np.array([[0, 3, 6, 255]], np.uint8)
    assert DEEPGLOBE.decode_values(mask)[0].tolist() == mask.tolist()
    assert DEEPGLOBE.decode_values(np.array([[7]], np.uint8))[1] == 7


# ----------------------------------------------------------------------------- masks through the table

from dataset.deep_globe import collate, read_label  # noqa: E402
from utils.metrics import ConfusionMatrix  # noqa: E402


def _binary_mask(h=32, w=40):
    mask = np.zeros((h, w), np.uint8)
    mask[8:20, 10:30] = 255  # a 12 x 20 'building'
    return mask


def test_raw_0_255_mask_gives_class_1_and_counts_in_the_metrics(tmp_path):
    _pair(tmp_path, "a", ".tif", mask=_binary_mask())
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2, classes=INRIA)
    ds.check_files()
    label = ds[0]["label"]
    assert int((label == 1).sum()) == 12 * 20 and int((label == 0).sum()) == 32 * 40 - 240
    assert not (label == 255).any()  # no foreground turned into 'ignore'
    cm = ConfusionMatrix(2, miou_classes=INRIA.miou_classes)
    cm.update(label.long(), torch.zeros_like(label).long())  # predicting background everywhere
    iou = cm.iou()
    assert iou[1] == 0.0 and iou[0] == pytest.approx((1280 - 240) / 1280)  # building pixels counted, missed


def test_prepared_0_1_mask_reads_the_same(tmp_path):
    _pair(tmp_path, "a", ".png", mask=(_binary_mask() // 255).astype(np.uint8))
    _pair(tmp_path, "b", ".png", mask=_binary_mask())
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2, classes=ISIC)
    assert torch.equal(ds[0]["label"], ds[1]["label"]) and int(ds[0]["label"].sum()) == 240


def test_0_255_mask_with_255_as_ignore_is_refused_not_silently_ignored(tmp_path):
    _pair(tmp_path, "a", ".png", mask=_binary_mask())
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2)  # --n_class 2 alone: 255 = ignore
    with pytest.raises(UserError) as e:
        ds[0]
    msg = str(e.value)
    assert "a_mask.png" in msg and "only the values 0 and 255" in msg and "--dataset inria" in msg
    # a table that says 255 is 'ignore' reads it so
    t = ClassTable("t", ("a", "b"), ((0, 0, 0), (1, 1, 1)), ignore_values=(255,), refuse_0_255=False)
    assert (np.asarray(read_label(str(tmp_path / "train" / "Label" / "a_mask.png"), t)) == 255).sum() == 240


def test_unknown_mask_value_names_file_value_and_table(tmp_path):
    mask = _binary_mask()
    mask[0, 0] = 128
    _pair(tmp_path, "a", ".png", mask=mask)
    with pytest.raises(UserError) as e:
        DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2, classes=INRIA)[0]
    msg = str(e.value)
    assert "a_mask.png" in msg and "label value 128" in msg and INRIA.name in msg and "background = 0, building = 1 or 255" in msg


def test_rgb_mask_through_a_user_table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,r,g,b\nsoil,120,80,40\ncrop,30,200,60\n")
    table = load_class_table(path)
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[:] = (120, 80, 40)
    rgb[:, 25:] = (30, 200, 60)
    _pair(tmp_path, "a", ".jpg", mask=rgb)
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2, classes=table)
    ds.check_files()
    label = ds[0]["label"]
    assert int(label.sum()) == 32 * 15 and int(label[:, :25].sum()) == 0
    rgb[3, 3] = (30, 200, 61)  # one channel off: exact match only
    _pair(tmp_path, "a", ".jpg", mask=rgb)
    with pytest.raises(UserError, match=r"a_mask\.png has colour \[30, 200, 61\], which class table .*t\.csv"):
        ds[0]


def test_16_bit_mask_values_go_through_the_table(tmp_path):
    _pair(tmp_path, "a", ".png", mask=False)
    mask = np.zeros((32, 40), np.uint16)
    mask[:, 20:] = 1000
    Image.fromarray(mask).save(tmp_path / "train" / "Label" / "a_mask.png")
    t = ClassTable("t", ("a", "b"), ((0, 0, 0), (9, 9, 9)), values=((0,), (1000,)))
    label = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2, classes=t)[0]["label"]
    assert int(label.sum()) == 32 * 20
    with pytest.raises(UserError, match="label value 1000"):
        DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=2)[0]


@pytest.mark.parametrize("kind, needle", [("16bit", "16-bit image"), ("rgba", "4 bands")])
def test_16_bit_and_4_band_images_are_one_error(tmp_path, kind, needle):
    _pair(tmp_path, "a", ".png")
    sat = tmp_path / "train" / "Sat" / "a_sat.png"
    if kind == "16bit":
        Image.fromarray(np.full((32, 40), 4000, np.uint16)).save(sat)
    else:
        Image.fromarray(np.full((32, 40, 4), 100, np.uint8)).save(sat)
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16)
    for fn in (ds.check_files, lambda: ds[0]):
        with pytest.raises(UserError) as e:
            fn()
        assert str(sat) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_small_and_mixed_size_images_share_a_batch(tmp_path):
    _pair(tmp_path, "small", ".png", size=(20, 12), mask=np.ones((12, 20), np.uint8))
    _pair(tmp_path, "big", ".jpg", size=(72, 40), mask=np.ones((40, 72), np.uint8))
    ds = DeepGlobe(str(tmp_path), "train", size_g=32, size_p=32, n_class=2, classes=INRIA)
    batch = collate([ds[0], ds[1]])
    assert batch["size"] == [(40, 72), (12, 20)]
    assert batch["image"][0].shape == (3, 40, 72) and batch["image"][1].shape == (3, 32, 32)  # padded to a patch
    assert int((batch["label"][1] == 255).sum()) == 32 * 32 - 12 * 20  # padding is 'ignore'
    assert batch["image_global"].shape == (2, 3, 32, 32) and batch["label_global"].shape == (2, 8, 8)


def test_table_and_n_class_must_agree(tmp_path):
    _pair(tmp_path, "a", ".png")
    with pytest.raises(UserError, match="--n_class 7 but class table .* has 2 classes"):
        DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=7, classes=INRIA)


# ----------------------------------------------------------------------------- presets and the CLI

import json  # noqa: E402

from conftest import load_state  # noqa: E402
from dataset.presets import PRESETS, add_dataset_args, classes_from_args  # noqa: E402

BINARY_CSV = "name,r,g,b,values\nbackground,0,0,0,0\nblob,255,255,255,1;255\n"


def _resolved(*argv):
    import train_deep_globe

    return train_deep_globe.resolve_args(train_deep_globe.get_parser().parse_args([str(a) for a in argv]))


def test_deepglobe_preset_is_todays_defaults():
    args = _resolved()
    assert args.dataset == "deepglobe" and args.classes is None
    assert (args.n_class, args.size_g, args.size_p, args.batch_size, args.sub_batch_size) == (7, 508, 508, 6, 6)
    assert (args.data_path, args.path_g, args.path_g2l, args.path_l2g) == (
        "./data/deep_globe/", "fpn_deepglobe_global.pth", "fpn_deepglobe_global2local.pth", "fpn_deepglobe_local2global.pth")
    assert (args.num_epochs, args.lr, args.task_name) == (120, 5e-5, "fpn_deepglobe_global")
    args = _resolved("--mode", 2)
    assert (args.num_epochs, args.lr, args.task_name) == (50, 2e-5, "fpn_deepglobe_global2local")
    assert classes_from_args(_resolved("--n_class", 9)).n_class == 9  # generic classes, as before presets


def test_inria_and_isic_presets_fill_defaults_and_given_flags_win():
    args = _resolved("--dataset", "inria", "--mode", 3)
    assert (args.n_class, args.size_g, args.size_p, args.batch_size, args.sub_batch_size) == (2, 536, 536, 4, 6)
    assert (args.task_name, args.path_g, args.path_g2l) == ("fpn_inria_local2global", "fpn_inria_global.pth",
                                                            "fpn_inria_global2local.pth")
    assert args.data_path == "./data/inria/" and classes_from_args(args).names == ("background", "building")
    args = _resolved("--dataset", "inria", "--size_g", 256, "--batch_size", 2, "--task_name", "mine", "--n_class", 2)
    assert (args.size_g, args.batch_size, args.task_name, args.size_p) == (256, 2, "mine", 536)
    args = _resolved("--dataset", "isic")
    assert args.n_class == 2 and classes_from_args(args).names == ("background", "lesion")


def test_n_class_disagreeing_with_the_table(tmp_path, cli):
    table = tmp_path / "t.csv"
    table.write_text(BINARY_CSV)
    for extra in (["--dataset", "inria"], ["--dataset", "folder", "--classes", table]):
        rc, out, err = cli(*extra, "--n_class", 7, "--data_path", tmp_path / "nowhere")
        assert rc == 2 and err.startswith("error: --n_class 7 disagrees with the class table") and err.count("\n") == 1, err
        assert "2 classes" in err


@pytest.mark.parametrize("dataset, hint", [("inria", "prepare_inria"), ("isic", "prepare_isic"),
                                           ("deepglobe", "prepare_deep_globe")])
def test_missing_data_path_names_the_presets_preparation(tmp_path, cli, dataset, hint):
    rc, out, err = cli("--dataset", dataset, "--data_path", tmp_path / "nowhere")
    assert rc == 2 and "nowhere does not exist" in err and f"python -m dataset.{hint} " in err and err.count("\n") == 1


def test_folder_needs_classes_and_a_bad_table_is_one_line(tmp_path, cli):
    rc, out, err = cli("--dataset", "folder", "--data_path", tmp_path)
    assert rc == 2 and "--dataset folder needs --classes FILE" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": ["a", "a"]}')
    rc, out, err = cli("--dataset", "folder", "--classes", bad, "--data_path", tmp_path)
    assert rc == 2 and err == f"error: class table {bad}: class name 'a' appears twice\n"


def test_add_dataset_args_and_classes_from_args_for_other_tools(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    assert classes_from_args(parser.parse_args([])).name == "DeepGlobe land cover"
    assert classes_from_args(parser.parse_args(["--dataset", "isic"])).names[1] == "lesion"
    table = tmp_path / "t.csv"
    table.write_text(BINARY_CSV)
    assert classes_from_args(parser.parse_args(["--dataset", "folder", "--classes", str(table)])).names[1] == "blob"
    assert set(PRESETS) == {"deepglobe", "inria", "isic", "urur", "folder"}


def _blobs(root, n_train=6, n_val=2, size=64, seed=0):
    """An easy binary task: bright squares (0/255 mask, 255 = blob) on a dark textured ground."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("crossvali", n_val)):
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            for _ in range(2):
                s = int(rng.integers(size // 5, size // 3))
                t, l = rng.integers(0, size - s, 2)
                mask[t:t + s, l:l + s] = 255
            img = rng.normal(60, 20, (size, size, 3))
            img[mask == 255] += 120
            ext = (".png", ".tif", ".jpg")[i % 3]
            _pair(root, f"{split}{i}", ext, size=(size, size), mask=mask, split=split)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / "Sat" / f"{split}{i}_sat{ext}")
    return root


def test_folder_dataset_trains_and_evaluates_through_the_cli(tmp_path, cli):
    data = _blobs(tmp_path / "data", n_train=2, n_val=1)
    table = tmp_path / "blobs.csv"
    table.write_text(BINARY_CSV)
    common = ["--dataset", "folder", "--classes", table, "--data_path", data, "--model_path", tmp_path / "m",
              "--log_path", tmp_path / "r", "--backbone_weights", "none", "--num_workers", 0, "--no_progress",
              "--device", "cpu", "--size_g", 64, "--size_p", 64, "--batch_size", 2]
    rc, out, err = cli(*common, "--num_epochs", 1)
    assert rc == 0, err
    assert (tmp_path / "m" / "fpn_folder_global.pth").is_file()  # the preset's task name
    saved = json.loads((tmp_path / "r" / "fpn_folder_global.train.args.json").read_text())
    assert saved["dataset"] == "folder" and saved["classes"] == str(table) and saved["n_class"] == 2
    assert saved["sub_batch_size"] == 6 and saved["path_g"] == "fpn_folder_global.pth"  # filled by the preset
    state = load_state(tmp_path / "m" / "fpn_folder_global.pth")
    assert state["module.fpn_global.classify.weight"].shape[0] == 2
    rc, out, err = cli(*common, "--evaluation", "--task_name", "ev", "--predictions_dir", tmp_path / "p")
    assert rc == 0, err
    assert "blob" in out and "background" in out
    metrics = json.loads((tmp_path / "r" / "ev.crossvali.metrics.json").read_text())
    assert len(metrics["global"]["iou"]) == 2
    with Image.open(tmp_path / "p" / "crossvali0_mask.png") as im:  # drawn in the table's colours
        colours = {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3).tolist()}
    assert im.size == (64, 64) and colours <= {(0, 0, 0), (255, 255, 255)}


def test_resume_keeps_dataset_and_classes(tmp_path):
    from utils import run

    args = _resolved()  # a resumed command that leaves out --dataset/--classes
    saved = dict(vars(_resolved("--dataset", "isic")), classes=None)
    run.restore_args(args, saved, explicit=set(), path="x.resume.pth")
    assert args.dataset == "isic" and args.n_class == 2 and classes_from_args(args).names[1] == "lesion"
    args = _resolved("--dataset", "inria")
    with pytest.raises(UserError, match="--dataset inria differs"):
        run.restore_args(args, saved, explicit={"dataset"}, path="x.resume.pth")


def test_two_class_checkpoint_round_trip(tmp_path):
    from models import GLNet
    from utils.checkpoint import load_checkpoint, save_state_dict

    torch.manual_seed(1)
    a, b = GLNet(2), GLNet(2)
    save_state_dict(a, str(tmp_path / "two.pth"))
    raw = load_state(tmp_path / "two.pth")
    ref = GLNet(7).state_dict()
    assert set(raw) == {"module." + k for k in ref}  # the same keys as the 7-class format
    changed = {k for k in ref if raw["module." + k].shape != ref[k].shape}
    assert changed == {"fpn_global.classify.weight", "fpn_global.classify.bias", "fpn_local.classify.weight",
                       "fpn_local.classify.bias", "ensemble_conv.weight", "ensemble_conv.bias"}
    assert all(raw["module." + k].shape[0] == 2 for k in changed)
    load_checkpoint(b, str(tmp_path / "two.pth"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(UserError, match="2 classes"):
        load_checkpoint(GLNet(7), str(tmp_path / "two.pth"))


def test_foreground_of_an_easy_binary_task_is_learned(tmp_path):
    """Mode 1 on 0/255 blob masks through the Inria table: the blob IoU on held-out images
    ends far above what a model that ignored 255 (IoU 0) or guessed would reach. Twelve steps
    of a random-init ResNet-50 are too few for BatchNorm running statistics to settle, so the
    model normalises with batch statistics in evaluation too (the loader, table, loss and
    training step under test are unchanged)."""
    import engine
    import helper
    from models import GLNet
    from torch.utils.data import DataLoader

    data = _blobs(tmp_path, n_train=4, n_val=4, size=64, seed=3)
    train = DeepGlobe(str(data), "train", 64, 64, n_class=2, classes=INRIA, train=True, seed=0)
    val = DeepGlobe(str(data), "crossvali", 64, 64, n_class=2, classes=INRIA)
    torch.manual_seed(0)
    model = GLNet(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    stage = helper.STAGES[1]
    optimizer = helper.make_optimizer(helper.configure_stage(model, stage), 2e-4)
    cfg = helper.Config(stage, torch.device("cpu"), 2, 64, 4, num_epochs=12, lr=2e-4, progress=False, classes=INRIA)
    step = helper.TrainStep(model, cfg)
    loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    for epoch in range(cfg.num_epochs):
        train.set_epoch(epoch)
        engine.train_one_epoch(step, loader, optimizer, epoch)
    cms, _ = engine.evaluate(model, DataLoader(val, batch_size=2, collate_fn=collate), cfg)
    iou = cms["global"].iou()
    share = sum(float((val[i]["label"] == 1).float().mean()) for i in range(len(val))) / len(val)
    assert iou[1] > 0.3 and iou[1] > 2 * share, (iou, share)  # predicting 'blob' everywhere scores `share`


# ----------------------------------------------------------------------------- --global_view aspect

from dataset.deep_globe import global_size, image_views, label_views  # noqa: E402


def test_global_size_square_and_aspect():
    assert global_size(100, 200, 128) == (128, 128)  # square: the original's squash
    assert global_size(512, 384, 128, "aspect") == (128, 96)  # 128 * 384 / 512
    assert global_size(100, 200, 128, "aspect") == (64, 128)
    assert global_size(250, 1000, 160, "aspect") == (64, 160)  # 40 px, raised to the 64 px floor
    assert global_size(300, 100, 128, "aspect") == (128, 64)
    assert global_size(200, 200, 128, "aspect") == (128, 128)
    with pytest.raises(ValueError):
        global_size(1, 1, 8, "round")


def test_aspect_views_keep_the_shape_of_the_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 192, 3), dtype=np.uint8))
    lab = Image.fromarray(np.ones((96, 192), np.uint8))
    square = image_views(img, 128, 64)
    aspect = image_views(img, 128, 64, "aspect")
    assert square["image_global"].shape == (3, 128, 128) and aspect["image_global"].shape == (3, 64, 128)
    assert torch.equal(square["image"], aspect["image"])  # the full-resolution image is the same
    assert label_views(lab, 128, 64, global_view="aspect")["label_global"].shape == (16, 32)
    assert label_views(lab, 128, 64)["label_global"].shape == (32, 32)


def test_patch_crops_of_a_non_square_global_map_land_on_the_patch():
    """A 128 x 256 image, 128 px patches at columns 0, 64, 128 (overlap >= 50), aspect view
    64 x 128 = an exact halving: the crop of the view at each patch is the part under it
    (columns 0, 32, 64 of the view, 64 wide)."""
    from utils.geometry import PatchGrid, crop_global

    grid = PatchGrid.for_size(128, 256, 128)
    assert grid.lefts == (0, 64, 128) and grid.tops == (0, 0, 0)
    view = torch.arange(64 * 128, dtype=torch.float32).reshape(1, 1, 64, 128)
    crops = crop_global(view, grid, [0, 1, 2], (64, 64))
    for k, left in enumerate((0, 32, 64)):
        assert torch.equal(crops[k, 0], view[0, 0, :, left:left + 64]), k


def test_aspect_view_trains_modes_1_and_2_through_the_cli(tmp_path, cli):
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for split in ("train", "crossvali"):
        for i, (h, w) in enumerate(((96, 128), (128, 96))):  # landscape and portrait: 2 patches of 96 px each
            _pair(data, f"{split}{i}", ".png", size=(w, h), mask=rng.integers(0, 2, (h, w), dtype=np.uint8), split=split)
    common = ["--dataset", "isic", "--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r",
              "--backbone_weights", "none", "--num_workers", 0, "--no_progress", "--device", "cpu", "--size_g", 128,
              "--size_p", 96, "--num_epochs", 1, "--global_view", "aspect"]
    rc, out, err = cli(*common, "--batch_size", 2)
    assert rc == 2 and "--global_view aspect needs --batch_size 1" in err and err.count("\n") == 1
    rc, out, err = cli(*common, "--batch_size", 1, "--mode", 1)
    assert rc == 0, err
    rc, out, err = cli(*common, "--batch_size", 1, "--mode", 2, "--sub_batch_size", 4)
    assert rc == 0, err
    saved = json.loads((tmp_path / "r" / "fpn_isic_global2local.train.args.json").read_text())
    assert saved["global_view"] == "aspect"
