"""inference.py: the band sink gives the whole-canvas predictions row band by row band, and
evaluation's confusion matrices filled band by band equal those of whole canvases."""
import numpy as np
import pytest
import torch
from PIL import Image

import engine
import helper
import inference
from models import GLNet
from utils.geometry import PatchGrid


def _parts(grid, n_class, sub_batch, seed):
    """Random scores of every patch of `grid` in sub-batches, as a scoring function yields
    them: the global logits, then per sub-batch the local and aggregated ones."""
    g = torch.Generator().manual_seed(seed)
    p = grid.patch // 4
    parts = [inference.GlobalScores(torch.randn(1, n_class, 16, 16, generator=g))]
    for index in inference.sub_batches(len(grid), sub_batch):
        for name in ("local", "aggregated"):
            parts.append(inference.PatchScores(name, torch.randn(len(index), n_class, p, p, generator=g), index))
    return parts


@pytest.mark.parametrize("height, width, patch, stride", [(300, 261, 128, 1), (256, 384, 128, 4), (173, 229, 96, 1)])
@pytest.mark.parametrize("confidence", [False, True])
def test_bands_give_the_whole_canvas_class_maps(height, width, patch, stride, confidence):
    """Fed the same scores, `Bands` hands out every row of each output once, top to bottom,
    cropped to the image, with the class indices of the whole canvases' argmax; rows leave
    before the last patches are in."""
    padded = (max(height, patch), max(width, patch))
    grid = PatchGrid.for_size(*padded, patch)
    assert grid.n_rows >= 2 and inference.score_grid(grid)[1] == stride
    parts = _parts(grid, 5, 3, seed=height)
    canvases = inference.Canvases(grid)
    for part in parts:
        canvases.add(part)
    expected = inference.class_maps(canvases.scores(), padded)
    bands = inference.Bands(grid, (height - 7, width - 5), ("global", "local", "aggregated"), confidence)
    got = {name: torch.full((height - 7, width - 5), -1, dtype=torch.int64) for name in expected}
    next_row = dict.fromkeys(expected, 0)
    first_strip_at = {}
    for i, part in enumerate(parts):
        for strip in bands.add(part):
            first_strip_at.setdefault(strip.output, i)
            assert strip.top == next_row[strip.output]
            assert strip.classes.shape[1] == width - 5 and strip.classes.dtype == torch.int64
            assert (strip.confidence is not None) == confidence
            if confidence:
                assert strip.confidence.shape == strip.classes.shape and strip.confidence.dtype == torch.uint8
            next_row[strip.output] += strip.classes.shape[0]
            got[strip.output][strip.top : next_row[strip.output]] = strip.classes
    for strip in bands.close():
        assert strip.top == next_row[strip.output]
        next_row[strip.output] += strip.classes.shape[0]
        got[strip.output][strip.top : next_row[strip.output]] = strip.classes
    assert next_row == dict.fromkeys(expected, height - 7)
    for name in expected:
        assert torch.equal(got[name], expected[name][: height - 7, : width - 5]), name
    assert first_strip_at["local"] < len(parts) - 2  # a band of rows left before the image was done


def test_bands_drop_the_outputs_not_asked_for_and_free_each_band_after_its_last_patch():
    grid = PatchGrid.for_size(200, 200, 128)
    bands = inference.Bands(grid, (200, 200), ("aggregated",))
    strips, open_bands = [], []
    for part in _parts(grid, 3, 2, seed=1):
        strips += bands.add(part)
        open_bands.append(set(bands.bands))
    assert open_bands[:-1] == [set()] * 2 + [{"aggregated"}] * (len(open_bands) - 3)  # global, local: no band
    assert open_bands[-1] == set() and bands.close() == []  # all rows left with the last patch
    assert {s.output for s in strips} == {"aggregated"}
    assert sum(s.classes.shape[0] for s in strips) == 200


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    model = GLNet(5).eval()
    with torch.no_grad():  # larger weights: classes that differ between pixels
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(3)
    torch.manual_seed(4)
    return model, GLNet(5, local=False, context=False).eval()


def _batch(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for h, w in sizes:
        ph, pw = max(h, 128), max(w, 128)
        image = torch.zeros(3, ph, pw, dtype=torch.uint8)
        image[:, :h, :w] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        label = torch.full((ph, pw), 255, dtype=torch.uint8)
        label[:h, :w] = torch.randint(0, 5, (h, w), dtype=torch.uint8, generator=g)
        images.append(image)
        labels.append(label)
    return {"image": images, "label": labels, "image_global": torch.rand(len(sizes), 3, 64, 64, generator=g),
            "size": list(sizes), "id": [f"im{seed}_{i}" for i in range(len(sizes))]}


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_evaluation_band_by_band_equals_whole_canvases(models, mode, tmp_path):
    """engine.evaluate fills its confusion matrices band by band (no whole score canvas);
    they equal the matrices of the whole-canvas class maps (inference.predict), and so do
    the written masks and the example's class maps."""
    model, frozen = models
    stage = helper.STAGES[mode]
    loader = [_batch([(300, 261), (100, 140)], seed=1), _batch([(173, 229)], seed=2)]
    cfg = helper.Config(stage, torch.device("cpu"), 5, 128, 3, progress=False)
    cms, example = engine.evaluate(model, loader, cfg, frozen, predictions_dir=str(tmp_path))

    expected = cfg.confusion_matrices()
    settings = inference.Settings.for_device(torch.device("cpu"), 128, 3)
    first = None
    for batch in loader:
        for b, image in enumerate(batch["image"]):
            h, w = batch["size"][b]
            maps = inference.predict(stage, inference.Models(model, frozen), inference.ImagePixels(image),
                                     batch["image_global"][b : b + 1], settings)
            for name, m in maps.items():
                expected[name].update(batch["label"][b][:h, :w], m[:h, :w])
            first = first or {k: v[:h, :w] for k, v in maps.items()}
            written = np.array(Image.open(tmp_path / f"{batch['id'][b]}_mask.png").convert("RGB"))
            assert (written == cfg.classes.colorize(maps[stage.main_output][:h, :w].numpy().astype(np.uint8))).all()
    assert cms.keys() == expected.keys() == set(stage.outputs)
    for name in cms:
        assert torch.equal(cms[name].matrix, expected[name].matrix), name
        assert cms[name].matrix.sum() == 300 * 261 + 100 * 140 + 173 * 229
    assert example["predictions"].keys() == first.keys()
    for name, m in first.items():
        assert torch.equal(example["predictions"][name], m.to(torch.uint8)), name
    if mode != 1:
        assert len(torch.unique(first["aggregated"])) > 1  # not one constant class: the comparison says something


def test_spilled_and_kept_halves_give_the_same_scores(models, tmp_path):
    """Mode 3 keeps each patch's local half of the ensemble in memory (evaluation) or in a
    temporary file (predict.py): bit for bit the same scores."""
    model, frozen = models
    image = torch.randint(0, 256, (3, 300, 261), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    ig = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    inputs = inference.Inputs.of(inference.ImagePixels(image), ig, 128)
    kept = inference.whole_scores(helper.STAGES[3], inference.Models(model, frozen), inputs, inference.Settings(128, 4, 1))
    spilled = inference.whole_scores(helper.STAGES[3], inference.Models(model, frozen), inputs,
                                     inference.Settings(128, 4, 1, spill_dir=str(tmp_path)))
    for name in ("global_", "local", "aggregated"):
        assert torch.equal(getattr(kept, name), getattr(spilled, name)), name
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone
