"""Coarse-to-fine inference (docs/MODEL.md section 9): the box of a mode-1 model's foreground,
the stage on the box's crop exactly as on an image of that size, class 0 outside; the same
masks from evaluation and predict.py; the box files; TIFFs read only in the box's window;
one-line errors. Expected values come from independent paths: plain inference on the cropped
image, `utils.boxes.foreground_box` on the whole coarse mask, boxes and outlines by hand."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import helper
import inference
from dataset.deep_globe import image_views
from dataset.raster import PILSource
from models import GLNet
from utils.boxes import foreground_box
from utils.checkpoint import save_state_dict
from utils.geometry import PatchGrid
from utils.outputs import draw_box

try:
    import rasterio
except ImportError:
    rasterio = None

SIZE_G, SIZE_P, SUB = 64, 96, 3
CLI_SIZES = ["--size_g", SIZE_G, "--size_p", SIZE_P, "--sub_batch_size", SUB]


def _random_model(seed: int, n_class: int = 3, plain: bool = False) -> GLNet:
    torch.manual_seed(seed)
    model = GLNet(n_class, local=not plain, context=not plain)
    with torch.no_grad():  # larger weights than the init's, so that classes differ between pixels
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(3)
    return model.eval()


def _favour_background(coarse: GLNet, image_global: torch.Tensor, keep: int, tta: bool = False) -> GLNet:
    """Raise the bias of class 0 so that, on this (square) global view, only the `keep` cells of
    the logits (1/4 of the global view) most in favour of a foreground class stay foreground;
    with `tta`, of the logits summed over the 8 flips/rotations (each turned back)."""
    views = [(flip, k) for flip in (False, True) for k in range(4)] if tta else [(False, 0)]
    total = 0
    with torch.no_grad():
        for flip, k in views:
            view = torch.rot90(image_global.flip(-1) if flip else image_global, k, dims=(-2, -1))
            logits = torch.rot90(coarse.global_maps(view).output[0], -k, dims=(-2, -1))
            total = total + (logits.flip(-1) if flip else logits)
        # with a shift b of class 0's bias the summed class-0 logit grows by len(views) * b
        margin = (total[1:].amax(0) - total[0]).flatten().sort(descending=True).values / len(views)
        coarse.fpn_global.classify.bias[0] += float(margin[keep - 1] + margin[keep]) / 2
    return coarse


def _only_background(coarse: GLNet) -> GLNet:
    """The last conv made constant: class 0 has logit 1, the others 0, at every cell."""
    with torch.no_grad():
        coarse.fpn_global.classify.weight.zero_()
        coarse.fpn_global.classify.bias.zero_()
        coarse.fpn_global.classify.bias[0] = 1
    return coarse


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _collect(strips, size, outputs):
    """{output: (H, W) int64} from strips; each row exactly once, top to bottom."""
    got = {name: torch.full(size, -1, dtype=torch.int64) for name in outputs}
    next_row = dict.fromkeys(outputs, 0)
    for strip in strips:
        assert strip.top == next_row[strip.output] and strip.classes.shape[1] == size[1]
        next_row[strip.output] += strip.classes.shape[0]
        got[strip.output][strip.top : next_row[strip.output]] = strip.classes
    assert next_row == dict.fromkeys(outputs, size[0])
    return got


def _plain_maps(stage, models, image: Image.Image, settings) -> dict[str, torch.Tensor]:
    """Plain inference (whole score canvases) of an image, cropped to its size."""
    v = image_views(image, SIZE_G, SIZE_P)
    h, w = v["size"]
    maps = inference.predict(stage, models, inference.ImagePixels(v["image"]), v["image_global"][None], settings)
    return {name: m[:h, :w] for name, m in maps.items()}


# (with --tta, a square image: the 8 views' cells then fall on the same pixels)
@pytest.mark.parametrize("mode, tta, size", [(1, False, (150, 211)), (2, False, (150, 211)), (3, False, (150, 211)),
                                             (1, True, (192, 192))])
def test_fine_stage_equals_plain_inference_on_the_cropped_image(mode, tta, size):
    """The box is `foreground_box` of the coarse model's mode-1 prediction (class > 0); inside
    it every output equals plain inference on the cropped image (its own global view), bit for
    bit; outside it every pixel is class 0. With --tta both stages sum the 8 views."""
    image = _image(*size, seed=mode)
    v = image_views(image, SIZE_G, SIZE_P)
    coarse = _favour_background(_random_model(1, plain=True), v["image_global"][None], keep=1, tta=tta)
    model, frozen = _random_model(2), _random_model(3, plain=True)
    models, stage = inference.Models(model, frozen), helper.STAGES[mode]
    settings = inference.Settings(SIZE_P, SUB, 1, tta=tta)

    mask = _plain_maps(helper.STAGES[1], inference.Models(coarse), image, settings)["global"] != 0
    box, area = foreground_box(mask, SIZE_P)
    assert box is not None and box.area < size[0] * size[1] / 2  # a box well inside the image
    expected = {}
    for name, crop in _plain_maps(stage, models, image.crop(tuple(box)), settings).items():
        expected[name] = torch.zeros(size, dtype=torch.int64)
        expected[name][box.y0 : box.y1, box.x0 : box.x1] = crop

    pixels = inference.ImagePixels(v["image"])
    c2f = inference.CoarseToFine(coarse, SIZE_G)
    prediction = c2f.predict(stage, models, pixels, v["image_global"][None], size, settings, stage.outputs)
    assert prediction.coarse == (box, area) and area == int(mask.sum())
    got = _collect(prediction.strips, size, stage.outputs)
    for name in stage.outputs:
        assert torch.equal(got[name], expected[name]), name
    inside = got[stage.main_output][box.y0 : box.y1, box.x0 : box.x1]
    assert len(torch.unique(inside)) > 1  # the fine stage made classes: the comparison says something
    if mode > 1:
        crop_grid = PatchGrid.for_size(box.height, box.width, SIZE_P)
        assert pixels.patches_read == len(crop_grid) * (8 if tta else 1)  # the crop's patches only


@pytest.mark.parametrize("confidence", [False, True])
def test_no_foreground_gives_class_0_and_no_box(confidence):
    """A coarse model that prefers class 0 everywhere: no box, every row of every output is
    class 0 (confidence 255), and the stage reads no patch."""
    v = image_views(_image(130, 170, seed=5), SIZE_G, SIZE_P)
    coarse = _only_background(_random_model(1, plain=True))
    pixels = inference.ImagePixels(v["image"])
    stage = helper.STAGES[2]
    settings = inference.Settings(SIZE_P, SUB, 1, confidence=confidence)
    prediction = inference.CoarseToFine(coarse, SIZE_G).predict(
        stage, inference.Models(_random_model(2)), pixels, v["image_global"][None], (130, 170), settings, stage.outputs)
    assert prediction.coarse == (None, 0)
    strips = list(prediction.strips)
    got = _collect(strips, (130, 170), stage.outputs)
    for name in stage.outputs:
        assert torch.equal(got[name], torch.zeros((130, 170), dtype=torch.int64)), name
    assert all((s.confidence is not None) == confidence for s in strips)
    if confidence:
        assert all(bool((s.confidence == 255).all()) for s in strips)
    assert pixels.patches_read == 0


def test_a_window_reads_only_its_box_and_pads_past_its_own_border(tmp_path):
    path = tmp_path / "w.png"
    _image(120, 90, seed=6).save(path)
    with PILSource(str(path), SIZE_G, SIZE_P, None) as src:
        calls = []
        real = src.read
        src.read = lambda top, left, h, w: calls.append((top, left, h, w)) or real(top, left, h, w)
        whole = real(0, 0, 120, 90)
        win = src.window((10, 20, 60, 100), SIZE_G, SIZE_P)
        assert (win.height, win.width) == (80, 50)
        expected_global = image_views(Image.fromarray(whole[:, 20:100, 10:60].transpose(1, 2, 0)), SIZE_G, SIZE_P)
        assert torch.equal(win.image_global, expected_global["image_global"])
        calls.clear()
        out = win.read(70, 40, 20, 20)  # 10 rows and 10 columns inside the box, the rest past it
        assert calls == [(90, 50, 10, 10)]
        np.testing.assert_array_equal(out[:, :10, :10], whole[:, 90:100, 50:60])
        assert not out[:, 10:].any() and not out[:, :, 10:].any()  # zero past the box, not the image
    with pytest.raises(ValueError):
        PILSource(str(path), SIZE_G, SIZE_P, None).window((0, 0, 91, 10), SIZE_G, SIZE_P)


def test_draw_box_outlines_the_scaled_box():
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    # an image of 40 x 20 px shown at 20 x 10: the box (4, 2)-(20, 12) becomes (2, 1)-(10, 6)
    draw_box(image, (4, 2, 20, 12), (40, 20), colour=(1, 2, 3))
    expected = np.zeros((10, 20), dtype=bool)
    expected[1, 2:10] = expected[5, 2:10] = True
    expected[1:6, 2] = expected[1:6, 9] = True
    np.testing.assert_array_equal(image.any(axis=2), expected)
    assert (image[expected] == (1, 2, 3)).all()


# ----------------------------------------------------------------------------- command lines

def run_predict(*argv):
    import predict

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = predict.cli([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data(synthetic_data):
    # (sizes cycle over train, then crossvali: crossvali has 150x211, 170x130 and 64x200)
    folder, _ = synthetic_data(n_train=1, n_val=3, n_test=0, seed=41,
                               sizes=[(100, 90), (150, 211), (170, 130), (64, 200)])
    return folder


def _largest(data):
    """The largest image of crossvali, whose global view the coarse model is tuned on."""
    def area(path):
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    return max(sorted((data / "crossvali" / "Sat").iterdir()), key=area)


@pytest.fixture(scope="module")
def checkpoints(module_tmp, data):
    """Fine-stage checkpoints of 7 classes; coarse.pth: a mode-1 model whose foreground is one
    cell of the largest image's global view; empty.pth: one with no foreground at all."""
    root = module_tmp("c2f_models")
    for seed, name in enumerate(("g.pth", "g2l.pth", "l2g.pth")):
        save_state_dict(_random_model(seed, 7), str(root / name))
    with Image.open(_largest(data)) as im:
        image_global = image_views(im, SIZE_G, SIZE_P)["image_global"][None]
    save_state_dict(_favour_background(_random_model(11, 7), image_global, keep=1), str(root / "coarse.pth"))
    save_state_dict(_only_background(_random_model(12, 7)), str(root / "empty.pth"))
    save_state_dict(_random_model(13, 2), str(root / "two_classes.pth"))
    torch.save({"module.conv.weight": torch.zeros(1)}, root / "other_net.pth")
    return ["--model_path", root, "--path_g", "g.pth", "--path_g2l", "g2l.pth", "--path_l2g", "l2g.pth",
            "--no_progress", "--device", "cpu", *CLI_SIZES]


def _mask(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


@pytest.mark.parametrize("mode", [3])
def test_evaluation_and_predict_give_the_same_masks_and_boxes(mode, data, checkpoints, cli, tmp_path, monkeypatch):
    """--evaluation --coarse_to_fine and predict.py --coarse_to_fine write the same masks and
    boxes; outside each box every pixel is class 0; the box JSON files say what was found, and
    each overlay has its box drawn."""
    from dataset.classes import class_table
    from utils import outputs

    drawn = []
    real_draw = outputs.draw_box
    monkeypatch.setattr(outputs, "draw_box", lambda image, box, size: drawn.append((list(box), list(size)))
                        or real_draw(image, box, size))

    preds, logs = tmp_path / "eval", tmp_path / "runs"
    rc, out, err = cli("--data_path", data, "--log_path", logs, "--mode", mode, "--evaluation", "--task_name", "c2f",
                       "--predictions_dir", preds, "--num_workers", 0, "--batch_size", 1, "--coarse_to_fine",
                       "--path_coarse", "coarse.pth", *checkpoints)
    assert rc == 0, err
    boxes = json.loads((logs / "c2f.crossvali.boxes.json").read_text())
    assert json.loads((logs / "c2f.crossvali.metrics.json").read_text())  # scored as usual
    sat = data / "crossvali" / "Sat"
    rc, out, err = run_predict(sat, "--out", tmp_path / "out", "--mode", mode, "--format", "index", "overlay",
                               "--coarse_to_fine", "--path_coarse", "coarse.pth", *checkpoints)
    assert rc == 0, err
    table = class_table(7)
    ids = sorted(f.name[: -len("_sat.jpg")] for f in sat.iterdir())
    assert sorted(boxes) == ids
    for id_ in ids:
        index = np.array(Image.open(tmp_path / "out" / f"{id_}_sat_mask.png"))
        np.testing.assert_array_equal(table.colorize(index), _mask(preds / f"{id_}_mask.png"))
        found = json.loads((tmp_path / "out" / f"{id_}_sat_box.json").read_text())
        h, w = index.shape
        assert found["box"] == boxes[id_] and found["image_size"] == [w, h]
        assert (tmp_path / "out" / f"{id_}_sat_overlay.jpg").is_file()
        if found["box"] is not None:
            assert (found["box"], [w, h]) in drawn
        outside = np.ones((h, w), dtype=bool)
        if found["box"] is None:
            assert found["coarse_foreground_px"] == 0
        else:
            x0, y0, x1, y1 = found["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 0 < found["coarse_foreground_px"] <= (x1 - x0) * (y1 - y0) / 2
            outside[y0:y1, x0:x1] = False
        assert not index[outside].any()
    tuned = _largest(data).name[: -len("_sat.jpg")]
    x0, y0, x1, y1 = boxes[tuned]  # the coarse model finds a foreground there, and a box inside the image
    mask = np.array(Image.open(tmp_path / "out" / f"{tuned}_sat_mask.png"))
    assert (x1 - x0) * (y1 - y0) < mask.size / 2
    assert len(np.unique(mask[y0:y1, x0:x1])) > 1  # the fine stage ran: the comparison says something
    assert len(drawn) == sum(box is not None for box in boxes.values())


def test_no_foreground_writes_class_0_and_null_boxes(data, checkpoints, cli, tmp_path):
    logs = tmp_path / "runs"
    rc, _, err = cli("--data_path", data, "--log_path", logs, "--mode", 1, "--evaluation", "--task_name", "e",
                     "--num_workers", 0, "--batch_size", 1, "--coarse_to_fine", "--path_coarse", "empty.pth",
                     *checkpoints)
    assert rc == 0, err
    boxes = json.loads((logs / "e.crossvali.boxes.json").read_text())
    assert len(boxes) == 3 and set(boxes.values()) == {None}
    image = sorted((data / "crossvali" / "Sat").iterdir())[0]
    rc, out, err = run_predict(image, "--out", tmp_path / "out", "--mode", 2, "--format", "index",
                               "--coarse_to_fine", "--path_coarse", "empty.pth", *checkpoints)
    assert rc == 0, err
    assert "box none" in out and " 0 patches" in out
    stem = image.stem
    found = json.loads((tmp_path / "out" / f"{stem}_box.json").read_text())
    h, w = np.array(Image.open(image)).shape[:2]
    assert found == {"box": None, "coarse_foreground_px": 0, "image_size": [w, h]}
    assert not np.array(Image.open(tmp_path / "out" / f"{stem}_mask.png")).any()


@pytest.mark.skipif(rasterio is None, reason="rasterio not installed")
def test_a_tiff_is_read_only_in_the_box_window(data, checkpoints, tmp_path, monkeypatch):
    """predict.py on a TIFF: after the whole image's global view (read at opening, as for any
    image), every read of the fine stage lies inside the box; its prediction there equals
    predict.py on a TIFF of the cropped pixels."""
    from dataset import raster

    pixels = np.array(Image.open(_largest(data))).transpose(2, 0, 1)
    from rasterio.transform import from_origin

    geo = dict(driver="GTiff", count=3, dtype="uint8", crs="EPSG:32633", transform=from_origin(5e5, 4.2e6, 0.5, 0.5))
    tif = tmp_path / "scene.tif"
    with rasterio.open(tif, "w", width=pixels.shape[2], height=pixels.shape[1], **geo) as dst:
        dst.write(pixels)
    reads, file_reads = [], []
    real_read, real_file_read = raster.RasterioSource.read, raster.RasterioSource._read
    monkeypatch.setattr(raster.RasterioSource, "read",
                        lambda self, t, l, h, w: reads.append((t, l, h, w)) or real_read(self, t, l, h, w))
    monkeypatch.setattr(raster.RasterioSource, "_read",
                        lambda self, window=None, **kw: file_reads.append(window) or real_file_read(self, window, **kw))
    rc, out, err = run_predict(tif, "--out", tmp_path / "out", "--mode", 2, "--format", "index",
                               "--coarse_to_fine", "--path_coarse", "coarse.pth", *checkpoints)
    assert rc == 0, err
    x0, y0, x1, y1 = json.loads((tmp_path / "out" / "scene_box.json").read_text())["box"]
    assert (x1 - x0) * (y1 - y0) < pixels.shape[1] * pixels.shape[2]
    assert file_reads[0] is None and len(file_reads) > 1  # the whole image once, for its global view
    for window in file_reads[1:]:
        assert x0 <= window.col_off and window.col_off + window.width <= x1, window
        assert y0 <= window.row_off and window.row_off + window.height <= y1, window
    assert reads and all(x0 <= l and l + w <= x1 and y0 <= t and t + h <= y1 for t, l, h, w in reads), reads
    monkeypatch.undo()

    crop = tmp_path / "crop.tif"
    with rasterio.open(crop, "w", width=x1 - x0, height=y1 - y0, **geo) as dst:
        dst.write(pixels[:, y0:y1, x0:x1])
    rc, _, err = run_predict(crop, "--out", tmp_path / "plain", "--mode", 2, "--format", "index", *checkpoints)
    assert rc == 0, err
    got = np.array(Image.open(tmp_path / "out" / "scene_mask.png"))
    np.testing.assert_array_equal(got[y0:y1, x0:x1], np.array(Image.open(tmp_path / "plain" / "crop_mask.png")))
    got[y0:y1, x0:x1] = 0
    assert not got.any()


@pytest.mark.parametrize("argv, words", [
    (["--coarse_to_fine"], "--coarse_to_fine needs --path_coarse"),
    (["--path_coarse", "coarse.pth"], "--path_coarse is read only with --coarse_to_fine"),
    (["--coarse_to_fine", "--path_coarse", "nowhere.pth"], "--path_coarse: checkpoint not found"),
    (["--coarse_to_fine", "--path_coarse", "two_classes.pth"], "has 2 classes but --n_class is 7"),
    (["--coarse_to_fine", "--path_coarse", "other_net.pth"], "does not fit GLNet"),
])
@pytest.mark.parametrize("program", ["predict", "evaluation"])
def test_one_line_errors(program, argv, words, data, checkpoints, cli, tmp_path):
    if program == "predict":
        image = sorted((data / "crossvali" / "Sat").iterdir())[0]
        rc, out, err = run_predict(image, "--out", tmp_path / "out", "--mode", 1, *argv, *checkpoints)
    else:
        rc, out, err = cli("--data_path", data, "--log_path", tmp_path / "runs", "--mode", 1, "--evaluation",
                           "--num_workers", 0, *argv, *checkpoints)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing predicted


@pytest.mark.parametrize("argv, flag", [
    (["--coarse_to_fine", "--path_coarse", "coarse.pth"], "--coarse_to_fine"),
    (["--path_coarse", "coarse.pth"], "--path_coarse"),  # not silently ignored by a training run
])
def test_training_refuses_coarse_to_fine(argv, flag, data, checkpoints, cli, tmp_path):
    rc, _, err = cli("--data_path", data, "--log_path", tmp_path / "runs", "--mode", 1, "--num_workers", 0,
                     *argv, *checkpoints)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{flag} predicts with --evaluation" in err
