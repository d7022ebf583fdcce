"""predict.py: the same predictions as evaluation in every mode, strip writing equal to the
whole-image argmax, GeoTIFF in and out with its georeference, and one line per bad input."""
import contextlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import helper
import inference
from dataset.classes import class_table
from models import GLNet
from utils.checkpoint import save_state_dict
from dataset.raster import PILSource, open_image

try:
    import rasterio
except ImportError:  # the GeoTIFF tests skip; rasterio is in requirements-dev.txt
    rasterio = None

SIZES = ["--size_g", 64, "--size_p", 128, "--sub_batch_size", 4]


def run_predict(*argv):
    import predict

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = predict.cli([str(a) for a in argv])
    assert torch.is_grad_enabled()  # in-process runs leave the caller's autograd state alone
    return rc, out.getvalue(), err.getvalue()


def _random_model(seed: int, n_class: int = 7) -> GLNet:
    torch.manual_seed(seed)
    model = GLNet(n_class)
    with torch.no_grad():  # larger weights than the init's, so that classes differ between pixels
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(module_tmp):
    root = module_tmp("predict_models")
    for seed, name in enumerate(("g.pth", "g2l.pth", "l2g.pth")):
        save_state_dict(_random_model(seed), str(root / name))
    return ["--model_path", root, "--path_g", "g.pth", "--path_g2l", "g2l.pth", "--path_l2g", "l2g.pth",
            "--no_progress", "--device", "cpu"]


@pytest.mark.parametrize("mode, view", [(1, "square"), (2, "square"), (3, "square"), (3, "aspect")])
def test_index_output_equals_evaluation_predictions(mode, view, checkpoints, synthetic_data, cli, tmp_path):
    """On a DeepGlobe-layout split (images of sizes that are multiples of nothing), the colour
    masks of --evaluation --predictions_dir and predict.py's index/color outputs agree pixel
    for pixel."""
    data, summary = synthetic_data(n_train=1, n_val=3, n_test=0, seed=31, sizes=[(150, 211), (64, 64), (40, 90)])
    preds = tmp_path / "eval"
    rc, _, err = cli("--data_path", data, "--log_path", tmp_path / "runs", "--mode", mode, "--evaluation",
                     "--predictions_dir", preds, "--num_workers", 0, "--global_view", view, "--batch_size", 1,
                     *SIZES, *checkpoints)
    assert rc == 0, err
    sat = data / "crossvali" / "Sat"
    rc, out, err = run_predict(sat, "--out", tmp_path / "out", "--mode", mode, "--format", "index", "color",
                               "--global_view", view, *SIZES, *checkpoints)
    assert rc == 0, err
    table = class_table(7)
    ids = sorted(f[: -len("_sat.jpg")] for f in os.listdir(sat))
    assert len(ids) == 3 and out.count("patches") == 3
    seen = set()
    for id_ in ids:
        expected = np.array(Image.open(preds / f"{id_}_mask.png").convert("RGB"))
        index = np.array(Image.open(tmp_path / "out" / f"{id_}_sat_mask.png"))
        color = np.array(Image.open(tmp_path / "out" / f"{id_}_sat_color.png").convert("RGB"))
        assert index.shape == expected.shape[:2]
        np.testing.assert_array_equal(table.colorize(index), expected)
        np.testing.assert_array_equal(color, expected)
        seen.update(np.unique(index).tolist())
    assert len(seen) > 1  # not one constant class: the comparison says something


def _whole_image_prediction(model, stage, frozen, path, size_g, size_p, sub_batch):
    from dataset.deep_globe import image_views

    with Image.open(path) as im:
        v = image_views(im, size_g, size_p)
    h, w = v["size"]
    settings = inference.Settings(size_p, sub_batch, 1)
    pred = inference.predict(stage, inference.Models(model, frozen), inference.ImagePixels(v["image"]),
                             v["image_global"][None], settings)
    return pred[stage.main_output][:h, :w].numpy()


def _source_strips(model, stage, src, size_p, sub_batch, frozen=None, confidence=False, spill_dir=None):
    """predict.py's strips of the main output of an ImageSource, as numpy (classes, confidence)."""
    settings = inference.Settings(size_p, sub_batch, 1, confidence=confidence, spill_dir=spill_dir)
    pixels = inference.SourcePixels(src, size_p, torch.device("cpu"))
    for strip in inference.predict_strips(stage, inference.Models(model, frozen), pixels, src.image_global[None],
                                          (src.height, src.width), settings, (stage.main_output,)):
        assert strip.output == stage.main_output
        conf = None if strip.confidence is None else strip.confidence.numpy()
        yield strip.top, strip.classes.to(torch.uint8).numpy(), conf


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_strips_equal_whole_image_argmax(mode, tmp_path):
    """Bands of rows finished one by one give the whole-image argmax, with a patch grid whose
    starts are multiples of nothing (full-resolution canvas) and one where the scores are
    summed on 4x4 cells (starts 0, 64, 128); each row comes exactly once, top to bottom."""
    model, frozen = _random_model(3, 5), _random_model(4, 5)
    rng = np.random.default_rng(mode)
    for h, w, size_p in [(173, 229, 128), (150, 61, 96), (256, 256, 128)]:
        path = tmp_path / f"x{h}_{w}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        stage = helper.STAGES[mode]
        expected = _whole_image_prediction(model, stage, frozen, path, 64, size_p, 3)
        got = np.full((h, w), 255, dtype=np.uint8)
        next_row = 0
        with PILSource(str(path), 64, size_p, None) as src:
            for top, classes, conf in _source_strips(model, stage, src, size_p, 3, frozen, True, str(tmp_path)):
                assert top == next_row and classes.shape[1] == w
                assert conf.shape == classes.shape
                next_row += classes.shape[0]
                got[top:next_row] = classes
        assert next_row == h
        np.testing.assert_array_equal(got, expected)


def test_rows_leave_before_the_image_is_read(tmp_path):
    """Mode 2: the first rows are handed out while later rows of patches are still unread
    (the scores of the whole image are never held), and the strips cover the image once."""
    model = _random_model(5, 3)
    path = tmp_path / "tall.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 100, 3), dtype=np.uint8)).save(path)
    events = []
    with PILSource(str(path), 128, 128, None) as src:  # patch rows at 0, 67, 135, ..., 472
        real_read = src.read

        def read(top, left, h, w):
            events.append(("read", top))
            return real_read(top, left, h, w)

        src.read = read
        for top, classes, _ in _source_strips(model, helper.STAGES[2], src, 128, 2):
            events.append(("strip", top, top + classes.shape[0]))
    reads = [e[1] for e in events if e[0] == "read"]
    strips = [e[1:] for e in events if e[0] == "strip"]
    assert reads == [0, 67, 135, 202, 270, 337, 405, 472]  # each row of patches read once, in order
    # rows 0..67 are final once the second row of patches is about to be added
    assert strips[0] == (0, 67) and events.index(("strip", 0, 67)) < events.index(("read", 135))
    assert [a for a, _ in strips[1:]] == [b for _, b in strips[:-1]] and strips[-1][1] == 600


def test_confidence_is_the_probability_of_the_mean_logits(tmp_path):
    """Where patches overlap, the scores are sums: the confidence is the top-1 softmax of
    their mean, not of the sum (which would be inflated in overlaps)."""
    from dataset.deep_globe import image_views
    from utils.geometry import PatchGrid, coverage_template

    torch.manual_seed(7)
    model = GLNet(4).eval()  # the init's scale: probabilities well inside (0, 1)
    path = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (170, 150, 3), dtype=np.uint8)).save(path)
    with Image.open(path) as im:
        v = image_views(im, 64, 128)
    stage = helper.STAGES[2]
    inputs = inference.Inputs.of(inference.ImagePixels(v["image"]), v["image_global"][None], 128)
    s = inference.whole_scores(stage, inference.Models(model), inputs, inference.Settings(128, 3, 1))
    count = coverage_template(PatchGrid.for_size(170, 150, 128))[0, 0]  # starts 0, 42 and 0, 22
    assert count.max() == 4
    mean = inference.upsample_canvas(s.aggregated, s.stride) / count
    expected = torch.softmax(mean, 0).amax(0).mul(255).round().to(torch.uint8).numpy()
    assert len(np.unique(expected)) > 5  # probabilities that vary: the comparison says something
    got = np.zeros((170, 150), dtype=np.uint8)
    with PILSource(str(path), 64, 128, None) as src:
        for top, _, conf in _source_strips(model, stage, src, 128, 3, confidence=True):
            got[top : top + len(conf)] = conf
    np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(rasterio is None, reason="rasterio not installed")
def test_geotiff_keeps_crs_and_transform(checkpoints, tmp_path):
    from rasterio.transform import from_origin

    h, w = 150, 133
    data = np.random.default_rng(1).integers(0, 255, (3, h, w), dtype=np.uint8)
    transform = from_origin(500000.0, 4200000.0, 0.5, 0.5)
    src = tmp_path / "scene.tif"
    with rasterio.open(src, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(data)
    rc, out, err = run_predict(src, "--out", tmp_path / "out", "--mode", 3, "--format", "geotiff", "index",
                               "overlay", "confidence", *SIZES, *checkpoints)
    assert rc == 0, err
    with rasterio.open(tmp_path / "out" / "scene_mask.tif") as ds:
        assert ds.crs.to_epsg() == 32633 and ds.transform == transform
        assert (ds.count, ds.height, ds.width, ds.dtypes[0]) == (1, h, w, "uint8")
        assert ds.profile["tiled"] and ds.compression.name.lower() == "deflate"
        assert ds.colormap(1)[1][:3] == class_table(7).colors[1]
        mask = ds.read(1)
    index = np.array(Image.open(tmp_path / "out" / "scene_mask.png"))
    np.testing.assert_array_equal(mask, index)
    # the same pixels as a PNG of the image: rasterio's windows read what PIL decodes
    Image.fromarray(data.transpose(1, 2, 0)).save(tmp_path / "scene_png.png")
    rc, _, err = run_predict(tmp_path / "scene_png.png", "--out", tmp_path / "out2", "--mode", 3, *SIZES, *checkpoints)
    assert rc == 0, err
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out2" / "scene_png_mask.png")), index)
    conf = np.array(Image.open(tmp_path / "out" / "scene_confidence.png"))
    assert conf.shape == (h, w) and conf.min() >= 255 // 7  # the top-1 of 7 classes is at least 1/7
    assert Image.open(tmp_path / "out" / "scene_overlay.jpg").size == (w, h)


@pytest.mark.skipif(rasterio is None, reason="rasterio not installed")
def test_multiband_tiff_needs_bands_and_plain_tiff_says_so(checkpoints, tmp_path):
    h, w = 70, 80
    data = np.random.default_rng(2).integers(0, 255, (5, h, w), dtype=np.uint8)
    src = tmp_path / "multi.tif"
    with rasterio.open(src, "w", driver="GTiff", width=w, height=h, count=5, dtype="uint8") as dst:
        dst.write(data)
    rc, _, err = run_predict(src, "--out", tmp_path / "o", "--mode", 1, *SIZES, *checkpoints)
    assert rc == 2 and "5 bands" in err and "--bands" in err
    rc, out, err = run_predict(src, "--out", tmp_path / "o", "--mode", 1, "--bands", "3,2,1",
                               "--format", "geotiff", *SIZES, *checkpoints)
    assert rc == 0, err
    assert "no georeference" in err and "plain TIFF" in err
    # bands 3,2,1 are the RGB image the model sees
    Image.fromarray(data[[2, 1, 0]].transpose(1, 2, 0)).save(tmp_path / "rgb.png")
    rc, _, err = run_predict(tmp_path / "rgb.png", "--out", tmp_path / "o", "--mode", 1, *SIZES, *checkpoints)
    with rasterio.open(tmp_path / "o" / "multi_mask.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), np.array(Image.open(tmp_path / "o" / "rgb_mask.png")))


@pytest.mark.skipif(rasterio is None, reason="rasterio not installed")
def test_decimated_global_view_above_the_faithful_size(tmp_path):
    """Past --faithful_max_mp the global view comes from a decimated read: close to the PIL
    resize, and the whole image is never read at once."""
    h, w = 300, 260
    yy, xx = np.mgrid[0:h, 0:w]
    data = np.stack([(xx % 256), (yy % 256), ((xx + yy) // 3 % 256)]).astype(np.uint8)
    path = tmp_path / "big.tif"
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8") as dst:
        dst.write(data)
    faithful = open_image(str(path), 64, 64)
    decimated = open_image(str(path), 64, 64, max_pixels=10_000)
    assert faithful.faithful and not decimated.faithful
    a, b = faithful.image_global, decimated.image_global
    assert a.shape == b.shape == (3, 64, 64)
    assert (a - b).abs().mean() < 0.02
    np.testing.assert_array_equal(decimated.read(290, 250, 20, 20)[:, :10, :10], data[:, 290:, 250:])
    assert not decimated.read(290, 250, 20, 20)[:, 10:, :].any()  # past the border: zero padding
    faithful.close()
    decimated.close()


def test_bad_inputs_one_line_each_and_the_others_written(checkpoints, tmp_path):
    good = tmp_path / "in" / "good.png"
    good.parent.mkdir()
    Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)).save(good)
    (tmp_path / "in" / "notanimage.jpg").write_text("hello")
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "in" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    Image.fromarray(np.zeros((40, 40), dtype=np.uint16)).save(tmp_path / "in" / "deep.png")
    (tmp_path / "empty").mkdir()
    # 600 px: at --size_g 64 the global c5 map has 2 cells, round(2 * 128 / 600) = 0 per patch
    Image.fromarray(np.zeros((600, 60, 3), dtype=np.uint8)).save(tmp_path / "in" / "tall.png")
    rc, out, err = run_predict(tmp_path / "in", tmp_path / "empty", tmp_path / "missing*.png",
                               "--out", tmp_path / "out", "--mode", 1, *SIZES, *checkpoints)
    assert rc == 2
    lines = err.strip().splitlines()
    assert sum("notanimage.jpg" in l for l in lines) == 1
    assert sum("truncated.jpg" in l and "truncated" in l for l in lines) == 1
    assert sum("deep.png" in l and "16-bit" in l for l in lines) == 1
    assert sum("no images in this folder" in l for l in lines) == 1
    assert sum("missing*.png" in l for l in lines) == 1
    assert sum("tall.png" in l and "too large for --size_g 64" in l for l in lines) == 1
    assert lines[-1] == "6 of 7 inputs not written"
    assert sorted(os.listdir(tmp_path / "out")) == ["good_color.png", "good_mask.png"]
    assert "Traceback" not in err
    # an image smaller than a patch is padded, not an error
    assert np.array(Image.open(tmp_path / "out" / "good_mask.png")).shape == (50, 70)


def test_refusals_before_any_work(checkpoints, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d in (a, b):
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(d / "x.png")
    rc, out, err = run_predict(a / "x.png", b / "x.png", "--out", tmp_path / "o", "--mode", 1, *SIZES, *checkpoints)
    assert rc == 2 and str(b / "x.png") in err and "same name x" in err
    assert out.count("patches") == 1 and (tmp_path / "o" / "x_mask.png").exists()  # the first is written
    rc, _, err = run_predict(a / "x.png", "--out", tmp_path / "o", *SIZES, *checkpoints, "--path_l2g", "nope.pth")
    assert rc == 2 and "nope.pth" in err and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, err = run_predict(a / "x.png", "--out", blocker / "sub", *SIZES, *checkpoints)
    assert rc == 2 and "--out" in err and err.count("\n") == 1
    # x_mask.png is an input: predicting x.png into the same folder would replace it
    Image.fromarray(np.full((64, 64, 3), 7, dtype=np.uint8)).save(a / "x_mask.png")
    before = (a / "x_mask.png").read_bytes()
    rc, out, err = run_predict(a, "--out", a, "--mode", 1, *SIZES, *checkpoints)
    assert rc == 2 and "would overwrite the input" in err and "x_mask.png" in err
    assert (a / "x_mask.png").read_bytes() == before
    assert (a / "x_mask_mask.png").exists()  # the other input was written


def test_an_unexpected_error_on_one_image_leaves_the_others(checkpoints, tmp_path, monkeypatch):
    from utils import outputs

    for name in ("a", "b"):
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    real = outputs.write_png

    def write_png(path, spool, palette=None):
        if os.path.basename(path).startswith("a_"):
            raise ValueError("disk on fire")
        return real(path, spool, palette)

    monkeypatch.setattr(outputs, "write_png", write_png)
    rc, out, err = run_predict(tmp_path / "a.png", tmp_path / "b.png", "--out", tmp_path / "o", "--mode", 1,
                               *SIZES, *checkpoints)
    assert rc == 1 and "a.png: ValueError: disk on fire" in err and "1 of 2 inputs not written" in err
    assert sorted(os.listdir(tmp_path / "o")) == ["b_color.png", "b_mask.png"]  # nothing half-written of a


def test_predict_sh_passes_its_arguments(tmp_path):
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "predict.sh")
    res = subprocess.run(["bash", script, "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=f"{os.sys.executable}"), timeout=120)
    assert res.returncode == 0 and "--format" in res.stdout and "INPUT" in res.stdout


def test_torchrun_shares_the_inputs_out(checkpoints, tmp_path):
    """Two processes under torchrun: each image is predicted by one of them, written once, the
    same as in one process; a bad input on either process makes the exit status 2."""
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (90 + 10 * i, 120, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    common = ["--mode", 1, *SIZES, *checkpoints]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(repo, "predict.py"), folder, "--out", tmp_path / "two", *common]
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode != 0 and "broken.png" in res.stderr
    assert res.stdout.count("patches") == 3  # one summary line per good image, over both processes
    rc, _, err = run_predict(folder, "--out", tmp_path / "one", *common)
    assert rc == 2 and "broken.png" in err
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 6
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("argv, formats, inputs", [
    (["a.jpg", "--format", "index", "color"], ["index", "color"], ["a.jpg"]),
    (["--format", "index", "scene.jpg"], ["index"], ["scene.jpg"]),  # was: invalid choice 'scene.jpg'
    (["--format", "index,overlay", "scene.jpg", "b.tif"], ["index", "overlay"], ["scene.jpg", "b.tif"]),
    (["--format", "color", "a.jpg", "--format", "index", "b.jpg"], ["color", "index"], ["a.jpg", "b.jpg"]),
    (["x/", "--format", "index,index"], ["index"], ["x/"]),
    (["a.jpg"], ["index", "color"], ["a.jpg"]),
])
def test_format_leaves_the_inputs_alone(argv, formats, inputs):
    import predict

    args = predict.get_parser().parse_args(["--out", "o", *argv])
    assert predict.split_formats(args.format, args.inputs) == (formats, inputs)


def test_a_bad_format_or_no_input_is_one_line(checkpoints, tmp_path):
    rc, _, err = run_predict("--out", tmp_path / "o", "--format", "indx", "a.jpg", *SIZES, *checkpoints)
    assert rc == 2 and "--format indx: not a format" in err and err.count("\n") == 1
    rc, _, err = run_predict("--out", tmp_path / "o", "--format", "index", *SIZES, *checkpoints)
    assert rc == 2 and "no INPUT given" in err and err.count("\n") == 1
