"""Coarse-to-fine training (docs/MODEL.md section 9): --crop_foreground, the ISIC challenge
score of 2-class tables, and the local-only stage (--mode local) from training through
evaluation and predict.py. Small random-init models on the CPU, 64 px patches."""
import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import engine
import helper
import inference
from dataset.classes import class_table
from dataset.deep_globe import DeepGlobe
from models import GLNet, LocalOnly
from utils.checkpoint import save_state_dict
from utils.errors import UserError
from utils.geometry import PatchGrid
from utils.metrics import ChallengeScore, ConfusionMatrix, challenge_iou
from utils.run import restore_args

from test_predict import run_predict


# ----------------------------------------------------------------------------- --crop_foreground

def _write_pair(root, split, id_, image, label):
    """One image (PNG, exact pixels) and its class-index mask in the folder layout."""
    os.makedirs(root / split / "Sat", exist_ok=True)
    os.makedirs(root / split / "Label", exist_ok=True)
    Image.fromarray(image).save(root / split / "Sat" / f"{id_}_sat.png")
    Image.fromarray(label).save(root / split / "Label" / f"{id_}_mask.png")


@pytest.fixture
def boxed(tmp_path):
    """A 160 x 200 image whose label has class 3 on rows 40..49, columns 100..109 (100 px),
    ignored pixels (255) in the bottom-left corner and 0 elsewhere; and a second image
    whose label has no foreground (all 0)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    label = np.zeros((160, 200), np.uint8)
    label[40:50, 100:110] = 3
    label[150:160, 0:10] = 255
    _write_pair(tmp_path, "crossvali", "a", image, label)
    empty = np.zeros((160, 200), np.uint8)  # (a mask of 0 and 255 alone is refused as binary)
    _write_pair(tmp_path, "crossvali", "b", image, empty)
    return tmp_path, image, label


def test_crop_foreground_cuts_image_and_label_alike(boxed):
    """The box by hand (utils/boxes.py): the tight box x 100..110, y 40..50 holds A = 100 px;
    grown to area 2A it is 14.14 px a side about (105, 45): x 97..113, y 37..53; shorter than
    a 64 px patch, each side is widened to 64 about its centre (start rounded down):
    x 73..137, y 13..77. The ignored corner (255) is no foreground: it would stretch the box
    to the bottom-left."""
    root, image, label = boxed
    ds = DeepGlobe(str(root), "crossvali", 64, 64, 7, crop_foreground=True)
    sample = ds[ds.ids.index("a")]
    assert sample["size"] == (64, 64)
    np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), image[13:77, 73:137])
    np.testing.assert_array_equal(sample["label"].numpy(), label[13:77, 73:137])
    # the global view is made from the crop
    assert sample["image_global"].shape == (3, 64, 64)
    whole = DeepGlobe(str(root), "crossvali", 64, 64, 7)[0]
    assert whole["size"] == (160, 200)


def test_crop_foreground_then_augmentation_keeps_the_pair_together(boxed):
    root, image, label = boxed
    ds = DeepGlobe(str(root), "crossvali", 64, 64, 7, train=True, crop_foreground=True)
    for epoch in range(4):  # flips and rotations of the 64 x 64 crop: the same on image and label
        ds.set_epoch(epoch)
        s = ds[ds.ids.index("a")]
        img, lab = s["image"].permute(1, 2, 0).numpy(), s["label"].numpy()
        assert lab.shape == (64, 64) and (lab == 3).sum() == 100
        for r, c in zip(*np.nonzero(lab == 3)):  # the lesion's pixels of the image moved with it
            assert any((img[r, c] == v).all() for v in image[40:50, 100:110].reshape(-1, 3))


def test_a_wide_box_with_the_aspect_global_view(tmp_path):
    """A 10 x 160 px band of class 2 (rows 70..79, columns 20..179; A = 1600) in a 160 x 200
    image. Grown to area 2A about (100, 75): 226.3 x 14.1 px, x -14..214, y 67..83; the height
    widened to a 64 px patch: y 43..107; the width, longer than the image, clipped: x 0..200.
    --global_view aspect then sees a 64 x 200 crop: long side size_g 128, short side
    128 * 64 / 200 = 41 px, raised to the 64 px minimum."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    label = np.zeros((160, 200), np.uint8)
    label[70:80, 20:180] = 2
    _write_pair(tmp_path, "crossvali", "w", image, label)
    sample = DeepGlobe(str(tmp_path), "crossvali", 128, 64, 7, crop_foreground=True, global_view="aspect")[0]
    assert sample["size"] == (64, 200)
    np.testing.assert_array_equal(sample["label"].numpy(), label[43:107])
    assert sample["image_global"].shape == (3, 64, 128) and sample["label_global"].shape == (16, 32)


def test_an_image_without_foreground_is_kept_whole(boxed):
    root, image, _ = boxed
    ds = DeepGlobe(str(root), "crossvali", 64, 64, 7, crop_foreground=True)
    sample = ds[ds.ids.index("b")]
    assert sample["size"] == (160, 200)
    np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), image)


def test_a_resume_with_another_crop_foreground_is_refused():
    saved = {"crop_foreground": False, "mode": 4}
    args = argparse.Namespace(crop_foreground=True, mode=4)
    with pytest.raises(UserError, match="--crop_foreground True differs from the interrupted run"):
        restore_args(args, saved, {"crop_foreground"}, "x.resume.pth")
    args = argparse.Namespace(crop_foreground=False, mode=4)
    restore_args(args, {"crop_foreground": True, "mode": 4}, set(), "x.resume.pth")
    assert args.crop_foreground is True  # not given again: the interrupted run's setting


def _one_line_error(result, *words):
    rc, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]


def test_crop_foreground_refusals_are_one_line(cli, boxed, tmp_path):
    root, _, _ = boxed
    common = ["--data_path", root, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r", "--n_class", 7,
              "--device", "cpu", "--size_g", 64, "--size_p", 64, "--mode", "local", "--crop_foreground"]
    _one_line_error(cli(*common, "--test", "--predictions_dir", tmp_path / "p"), "--crop_foreground", "--test")
    _one_line_error(cli(*common, "--evaluation", "--predictions_dir", tmp_path / "p"), "--predictions_dir")
    _one_line_error(cli(*common, "--evaluation", "--coarse_to_fine"), "--crop_foreground", "--coarse_to_fine")


# ----------------------------------------------------------------------------- the challenge score

def _cm(tn, fp, fn, tp):
    cm = ConfusionMatrix(2)
    cm.matrix = torch.tensor([[tn, fp], [fn, tp]])
    return cm


def test_challenge_score_by_hand():
    # foreground IoU = tp / (tp + fp + fn): 8 / 10 = 0.8 counts, 5 / 10 = 0.5 < 0.65 scores 0,
    # 13 / 20 = 0.65 exactly counts, no foreground in label nor prediction counts as 1
    assert challenge_iou(_cm(90, 1, 1, 8).matrix) == pytest.approx(0.8)
    assert challenge_iou(_cm(90, 3, 2, 5).matrix) == 0.0
    assert challenge_iou(_cm(80, 4, 3, 13).matrix) == pytest.approx(0.65)
    assert challenge_iou(_cm(100, 0, 0, 0).matrix) == 1.0
    total = ConfusionMatrix(2)
    total.challenge = ChallengeScore()
    assert np.isnan(total.challenge.value())
    for image in (_cm(90, 1, 1, 8), _cm(90, 3, 2, 5), _cm(100, 0, 0, 0)):
        total.add_image(image)
    assert total.challenge.value() == pytest.approx((0.8 + 0.0 + 1.0) / 3)
    # the pixel counts add up as before: the dataset's IoU is not the mean of the images'
    assert total.matrix.tolist() == [[280, 4], [3, 13]]
    results = engine.metrics_dict({"global": total})
    assert results["global"]["challenge_score"] == pytest.approx(0.6)
    assert results["global"]["iou"][1] == pytest.approx(13 / 20)
    table = engine.format_table(results, class_table(2))
    assert re.search(r"^challenge\s+0\.6000$", table, re.M), table


def test_evaluation_scores_each_image_for_the_challenge(monkeypatch):
    """engine.evaluate counts each image's strips in that image's own matrix: two 2 x 4
    images whose predictions come a row at a time."""
    labels = [torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])]
    # image 0: tp 2, fp 1 -> IoU 2/3 >= 0.65 counts; image 1: tp 2, fn 2 -> 0.5 scores 0
    preds = [torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])]

    def row_strips(stage, models, pixels, image_global, size, settings, outputs):
        k = int(pixels.image[0, 0, 0])  # the image's number, written in its pixels
        for top in range(2):
            yield inference.Strip("global", top, preds[k][top : top + 1])

    monkeypatch.setattr(engine.inference, "predict_strips", row_strips)
    batch = {"id": ["x", "y"], "size": [(2, 4), (2, 4)],
             "image": [torch.full((3, 2, 4), k, dtype=torch.uint8) for k in (0, 1)],
             "image_global": torch.zeros(2, 3, 4, 4), "label": labels}
    cfg = helper.Config(helper.STAGES[1], torch.device("cpu"), 2, 64, 1, progress=False)
    cms, _ = engine.evaluate(torch.nn.Identity(), [batch], cfg)
    assert cms["global"].challenge.value() == pytest.approx((2 / 3 + 0.0) / 2)
    assert cms["global"].matrix.tolist() == [[9, 1], [2, 4]]
    # tables of more classes keep no challenge score
    seven = helper.Config(helper.STAGES[1], torch.device("cpu"), 7, 64, 1, progress=False)
    cms, _ = engine.evaluate(torch.nn.Identity(), [batch], seven)
    assert cms["global"].challenge is None and "challenge_score" not in engine.metrics_dict(cms)["global"]
    assert cms["global"].matrix[:2, :2].tolist() == [[9, 1], [2, 4]]


# ----------------------------------------------------------------------------- --mode local

def test_stage_names_and_numbers():
    import predict
    import train_deep_globe

    assert [cli.stage_mode(t) for t in ("global", "global2local", "local2global", "local")] == [1, 2, 3, 4]
    assert [cli.stage_mode(t) for t in ("1", "2", "3", "4")] == [1, 2, 3, 4]
    assert train_deep_globe.get_parser().parse_args(["--mode", "local2global"]).mode == 3
    assert train_deep_globe.get_parser().parse_args(["--mode", "2"]).mode == 2
    assert predict.get_parser().parse_args(["--out", "o", "--mode", "local"]).mode == 4
    assert predict.get_parser().parse_args(["--out", "o"]).mode == 3
    with pytest.raises(SystemExit) as e:
        train_deep_globe.get_parser().parse_args(["--mode", "local_only"])
    assert e.value.code == 2


def test_local_only_network_forward_backward():
    torch.manual_seed(0)
    net = LocalOnly(7)
    state = net.state_dict()
    # its own plain FPN: sized for the local maps alone (2048 channels into toplayer, not
    # 4096 with a half of zeros), no context layers, no global branch, no ensemble
    assert state["fpn_local.toplayer.weight"].shape == (256, 2048, 1, 1)
    assert state["fpn_local.smooth1_1.weight"].shape == (256, 256, 3, 3)
    assert state["fpn_local.classify.weight"].shape == (7, 512, 3, 3)
    assert {k.split(".")[0] for k in state} == {"resnet_local", "fpn_local"}
    # ResNet-50: 53 convs (downsample ones included) and 53 BatchNorms of 5 entries = 318;
    # the plain FPN: 4 lateral, 4 + 4 smoothing convs and classify, weight and bias = 26
    assert len(state) == 318 + 26
    assert not any(k.startswith("fpn_local.smooth.") or "_ext" in k for k in state)
    params = helper.configure_stage(net, helper.STAGES[4])
    assert len(params) == len(list(net.parameters()))
    cfg = helper.Config(helper.STAGES[4], torch.device("cpu"), 7, 64, 2, num_epochs=1, lr=1e-4, progress=False)
    step = helper.TrainStep(net, cfg).train()
    g = torch.Generator().manual_seed(1)
    batch = {"image": [torch.randint(0, 256, (3, 96, 80), dtype=torch.uint8, generator=g)],
             "label": [torch.randint(0, 7, (96, 80), dtype=torch.uint8, generator=g)]}
    micros = list(step.micro_batches(batch))
    n = len(PatchGrid.for_size(96, 80, 64))  # (the patch grid of section 4)
    assert n > 2 and [len(m["patches"]) for m in micros] == [2] * (n // 2) + [n % 2] * (n % 2)
    for m in micros:
        assert m["patches"].shape[1:] == (3, 64, 64) and m["labels"].shape[1:] == (16, 16)
        result = step(m)
        result.objective.backward()
    assert [name for name, _, pred in result.scored] == ["local"] and result.scored[0][2].shape == (2, 16, 16)
    assert net.resnet_local.conv1.weight.grad.abs().sum() > 0
    assert net.fpn_local.classify.weight.grad.abs().sum() > 0


def test_local_only_prediction_changes_only_under_the_edited_patches():
    """Local only sees nothing outside a patch: edit pixels of the input and its scores change
    inside the patches that hold the edit, and nowhere else."""
    torch.manual_seed(2)
    net = LocalOnly(5).eval()
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8, generator=g)
    grid = PatchGrid.for_size(100, 120, 64)
    edited = image.clone()
    edited[:, 80:84, 10:14] = 255 - edited[:, 80:84, 10:14]
    covering = [k for k in range(len(grid)) if grid.tops[k] < 84 and 80 < grid.tops[k] + 64
                and grid.lefts[k] < 14 and 10 < grid.lefts[k] + 64]  # patches holding an edited pixel
    assert covering and len(covering) < len(grid)
    inside = torch.zeros(100, 120, dtype=torch.bool)
    for k in covering:
        inside[grid.tops[k] : grid.tops[k] + 64, grid.lefts[k] : grid.lefts[k] + 64] = True
    settings = inference.Settings(64, 3, 1)
    scores = []
    for x in (image, edited):
        s = inference.whole_scores(helper.STAGES[4], inference.Models(net), inference.Inputs.of(
            inference.ImagePixels(x), torch.zeros(1, 3, 64, 64), 64), settings)
        assert s.global_ is None and s.aggregated is None
        scores.append(inference.upsample_canvas(s.local, s.stride))
    changed = (scores[0] != scores[1]).any(0)
    assert changed.any()
    assert not (changed & ~inside).any()


def test_local_only_tta_has_no_global_output():
    """--tta on the local-only stage: only the local output. On an image that all 8
    flips/rotations leave unchanged, each view's scores, undone, are those of the image turned
    back, so their sum, and the TTA map, is itself unchanged by all 8 (a view left undone
    would break that)."""
    torch.manual_seed(4)
    net = LocalOnly(3).eval()
    half = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    half = torch.maximum(half, half.transpose(1, 2))  # symmetric about the diagonal
    image = torch.cat([torch.cat([half, half.flip(2)], 2), torch.cat([half.flip(1), half.flip(1, 2)], 2)], 1)
    for k in range(4):  # invariant under all 8 flips/rotations
        assert torch.equal(torch.rot90(image, k, (1, 2)), image)
        assert torch.equal(torch.rot90(image.flip(2), k, (1, 2)), image)
    with torch.no_grad():  # each class's mean logit over the image moved to 0: no class everywhere
        net.fpn_local.classify.bias -= net(image[None].float() / 255).mean((0, 2, 3))
    tta = inference.predict(helper.STAGES[4], inference.Models(net), inference.ImagePixels(image),
                            torch.zeros(1, 3, 64, 64), inference.Settings(64, 2, 1, tta=True))
    assert set(tta) == {"local"} and tta["local"].shape == (64, 64)
    m = tta["local"]
    assert len(m.unique()) > 1
    for k in range(4):
        assert torch.equal(torch.rot90(m, k), m) and torch.equal(torch.rot90(m.flip(1), k), m)


def _images(root, split, n, size, seed):
    """`n` random images with a square of class 1 (and 0 around) of a 2-class data set."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = size
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.zeros((h, w), np.uint8)
        label[10 + 5 * i : 40 + 5 * i, 20:50] = 1
        image[label == 1] //= 2  # darker foreground: something to learn
        _write_pair(root, split, f"{split}{i}", image, label)


def _balanced_copy(path, out, folder):
    """The checkpoint at `path` with the bias of class 1 moved by the median margin of class 0
    over a patch of each image of `folder`: one epoch on two images predicts background
    everywhere, and the masks compared below should hold both classes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = LocalOnly(2)
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    patches = torch.stack([torch.from_numpy(np.array(Image.open(folder / f))[:64, :64]).permute(2, 0, 1)
                           for f in sorted(os.listdir(folder))]).float() / 255
    with torch.no_grad():
        logits = net.eval()(patches)
    state["module.fpn_local.classify.bias"][1] -= (logits[:, 1] - logits[:, 0]).median()
    torch.save(state, out)


@pytest.fixture(scope="module")
def local_run(module_tmp):
    """--mode local training (with --crop_foreground) on a 2-class folder data set, then
    evaluation of its checkpoint with and without the crop, and predict.py."""
    from conftest import run_cli

    root = module_tmp("local")
    data = root / "data"
    _images(data, "train", 2, (112, 96), 0)
    _images(data, "crossvali", 2, (96, 120), 1)
    common = ["--data_path", data, "--model_path", root / "m", "--log_path", root / "r", "--n_class", 2,
              "--backbone_weights", "none", "--num_workers", 0, "--no_progress", "--device", "cpu",
              "--size_g", 64, "--size_p", 64, "--batch_size", 2, "--sub_batch_size", 3, "--path_local", "loc.pth"]
    out = {"root": root, "data": data, "common": common}
    out["train"] = run_cli(*common, "--mode", "local", "--task_name", "loc", "--num_epochs", 1, "--lr", 1e-3,
                           "--crop_foreground")
    assert out["train"][0] == 0, out["train"][2]
    out["eval_crop"] = run_cli(*common, "--mode", "local", "--task_name", "loc_crop", "--evaluation",
                               "--crop_foreground")
    _balanced_copy(root / "m" / "loc.pth", root / "m" / "loc3.pth", data / "crossvali" / "Sat")
    out["eval"] = run_cli(*common, "--mode", "4", "--task_name", "loc_eval", "--evaluation", "--path_local",
                          "loc3.pth", "--predictions_dir", root / "preds")
    for name in ("eval_crop", "eval"):
        assert out[name][0] == 0, out[name][2]
    out["predict"] = run_predict(data / "crossvali" / "Sat", "--out", root / "out", "--mode", "local",
                                 "--format", "index", "--model_path", root / "m", "--path_local", "loc3.pth",
                                 "--n_class", 2, "--size_g", 64, "--size_p", 64, "--sub_batch_size", 2,
                                 "--device", "cpu", "--no_progress")
    assert out["predict"][0] == 0, out["predict"][2]
    return out


def test_local_run_records_the_crop_and_writes_local_only_keys(local_run):
    root = local_run["root"]
    args = json.loads((root / "r" / "loc.train.args.json").read_text())
    assert args["crop_foreground"] is True and args["mode"] == 4
    state = torch.load(root / "m" / "loc.pth", map_location="cpu", weights_only=True)
    assert {k.split(".")[1] for k in state} == {"resnet_local", "fpn_local"}
    resume = torch.load(root / "m" / "loc.resume.pth", map_location="cpu", weights_only=False)
    assert resume["args"]["crop_foreground"] is True


def test_local_evaluation_on_the_crops_reproduces_validation(local_run):
    root = local_run["root"]
    logged = float(re.search(r"val_local ([0-9.]+)", (root / "r" / "loc.log").read_text()).group(1))
    metrics = json.loads((root / "r" / "loc_crop.crossvali.metrics.json").read_text())
    assert set(metrics) == {"local"} and set(metrics["local"]) == {"iou", "miou", "challenge_score"}
    assert metrics["local"]["miou"] == pytest.approx(logged, abs=1e-4)
    assert "challenge" in local_run["eval_crop"][1]


def test_local_evaluation_and_predict_give_the_same_masks(local_run):
    root = local_run["root"]
    table = class_table(2)
    ids = sorted(f[: -len("_sat.png")] for f in os.listdir(local_run["data"] / "crossvali" / "Sat"))
    seen = set()
    for id_ in ids:
        expected = np.array(Image.open(root / "preds" / f"{id_}_mask.png").convert("RGB"))
        index = np.array(Image.open(root / "out" / f"{id_}_sat_mask.png"))
        assert index.shape == (96, 120)
        np.testing.assert_array_equal(table.colorize(index), expected)
        seen.update(np.unique(index).tolist())
    assert seen == {0, 1}  # both classes predicted somewhere: the comparison says something


def test_wrong_stage_checkpoints_are_one_line(local_run, tmp_path):
    from conftest import run_cli

    torch.manual_seed(0)
    save_state_dict(GLNet(2), str(tmp_path / "g2l.pth"))
    (tmp_path / "loc.pth").write_bytes((local_run["root"] / "m" / "loc.pth").read_bytes())
    common = ["--data_path", local_run["data"], "--model_path", tmp_path, "--log_path", tmp_path / "r",
              "--n_class", 2, "--device", "cpu", "--size_g", 64, "--size_p", 64, "--no_progress", "--evaluation"]
    _one_line_error(run_cli(*common, "--mode", "local", "--path_local", "g2l.pth"),
                    "--path_local", "holds a GLNet", "--mode 4 training")
    _one_line_error(run_cli(*common, "--mode", "global2local", "--path_g2l", "loc.pth"),
                    "--path_g2l", "holds the local-only network")


def test_local_only_runs_coarse_to_fine():
    """--mode local under --coarse_to_fine: inside the coarse box the local-only prediction of
    the cropped image, class 0 outside (the local-only network reads no global view)."""
    from dataset.deep_globe import image_views
    from test_coarse_to_fine import SIZE_G, SIZE_P, SUB, _collect, _favour_background, _image, _plain_maps, _random_model
    from utils.boxes import foreground_box

    size = (150, 211)
    image = _image(*size, seed=7)
    v = image_views(image, SIZE_G, SIZE_P)
    coarse = _favour_background(_random_model(1, plain=True), v["image_global"][None], keep=1)
    torch.manual_seed(5)
    net = LocalOnly(3).eval()
    with torch.no_grad():  # each class's mean logit over a patch moved to 0: no class everywhere
        net.fpn_local.classify.bias -= net(v["image"][None, :, :SIZE_P, :SIZE_P].float() / 255).mean((0, 2, 3))
    stage, models, settings = helper.STAGES[4], inference.Models(net), inference.Settings(SIZE_P, SUB, 1)
    mask = _plain_maps(helper.STAGES[1], inference.Models(coarse), image, settings)["global"] != 0
    box, _ = foreground_box(mask, SIZE_P)
    assert box is not None and box.area < size[0] * size[1] / 2
    expected = torch.zeros(size, dtype=torch.int64)
    expected[box.y0 : box.y1, box.x0 : box.x1] = _plain_maps(stage, models, image.crop(tuple(box)), settings)["local"]
    prediction = inference.CoarseToFine(coarse, SIZE_G).predict(
        stage, models, inference.ImagePixels(v["image"]), v["image_global"][None], size, settings, stage.outputs)
    got = _collect(prediction.strips, size, stage.outputs)["local"]
    assert torch.equal(got, expected)
    assert len(torch.unique(got[box.y0 : box.y1, box.x0 : box.x1])) > 1
