"""Units of training and evaluation (docs/MODEL.md sections 5-8), against hand-computed values.

Focal loss, poly schedule, confusion matrix / mIoU, test-time augmentation, stage freezing,
the DeepGlobe loader (mixed sizes, padding, user errors) and one mode-2 epoch on a tiny model.
CPU only; the one model run uses 64 px inputs.
"""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import engine
import helper
import inference
from dataset.deep_globe import DeepGlobe, collate
from dataset.synthetic import generate
from utils.errors import UserError
from utils.geometry import PatchGrid
from utils.loss import focal_loss
from utils.lr_scheduler import poly_lr
from utils.metrics import ConfusionMatrix, mean_iou

N_CLASS = 7


# ----------------------------------------------------------------------------- focal loss


def _logits(*pixels):
    """(1, C, 1, n) logits from per-pixel lists of class logits."""
    return torch.tensor(pixels, dtype=torch.float32).T[None, :, None, :]


def test_focal_loss_two_pixels_by_hand():
    # pixel 1: logits (0, 0, 0) -> softmax (1/3, 1/3, 1/3); target 2: p_t = 1/3,
    #   loss = -(1 - 1/3)^3 ln(1/3) = (8/27) ln 3 = 0.2962963 * 1.0986123 = 0.3255147
    # pixel 2: logits (ln 2, 0, 0) -> exp (2, 1, 1) / 4 = (1/2, 1/4, 1/4); target 1: p_t = 1/4,
    #   loss = -(3/4)^3 ln(1/4) = (27/64) ln 4 = 0.421875 * 1.3862944 = 0.5848430
    # mean = (0.3255147 + 0.5848430) / 2 = 0.4551788
    logits = _logits([0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0])
    target = torch.tensor([[[2, 1]]])
    loss = focal_loss(logits, target)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.4551788, rel=1e-5)
    # gamma 3 is the default: gamma 0 would be plain cross-entropy (ln 3 + ln 4) / 2 = 1.2424533
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(1.2424533, rel=1e-5)


def test_focal_loss_near_certain_prediction_hits_upper_clamp():
    # logits (100, 0, 0), target 0: p_t = 1 / (1 + 2 e^-100) is 1.0 in float32, so without the clamp
    # the loss would be exactly 0 (ln 1 = 0). Clamped to 1 - 1e-7, which float32 rounds to
    # 1 - 2^-23 (the nearest float32): loss = (2^-23)^3 * -ln(1 - 2^-23) ~= 2^-69 * 2^-23 = 2^-92
    # = 2.02e-28.
    loss = focal_loss(_logits([100.0, 0.0, 0.0]), torch.tensor([[[0]]]))
    assert loss.item() > 0.0
    assert loss.item() == pytest.approx(2.0**-92, rel=1e-3)


def test_focal_loss_confidently_wrong_hits_lower_clamp():
    # logits (0, 200, 0), target 0: p_t = e^-200 / ... underflows to 0 in float32 (ln 0 = -inf).
    # Clamped to 1e-7: loss = (1 - 1e-7)^3 * ln(1e7) = 16.118091 (float32 1e-7 = 1.00000001e-7).
    loss = focal_loss(_logits([0.0, 200.0, 0.0]), torch.tensor([[[0]]]))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(16.118091, rel=1e-5)


def test_focal_loss_leaves_out_pixels_labelled_255():
    # The two pixels of the hand example plus a third, confidently wrong pixel labelled 255.
    # Counted, it would add a large term and change the divisor to 3; left out, the mean
    # stays (0.3255147 + 0.5848430) / 2 = 0.4551788.
    logits = _logits([0.0, 0.0, 0.0], [-50.0, 60.0, -40.0], [math.log(2.0), 0.0, 0.0])
    target = torch.tensor([[[2, 255, 1]]])
    assert focal_loss(logits, target).item() == pytest.approx(0.4551788, rel=1e-5)


def test_focal_loss_gradient_flows_only_from_kept_pixels():
    logits = _logits([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]).requires_grad_()
    focal_loss(logits, torch.tensor([[[1, 255]]])).backward()
    assert logits.grad[0, :, 0, 0].abs().sum() > 0
    assert torch.equal(logits.grad[0, :, 0, 1], torch.zeros(3))


# ----------------------------------------------------------------------------- poly schedule


@pytest.mark.parametrize(
    "epoch, i, expected",
    [
        # base 0.01, 4 epochs x 5 iterations: N = 20, T = epoch * 5 + i, lr = 0.01 (1 - T/20)^0.9
        (0, 0, 0.01),  # T = 0: the base lr
        (1, 3, 0.01 * 0.6**0.9),  # T = 8: 0.6^0.9 = exp(0.9 ln 0.6) = 0.6314472 -> 0.006314472
        (2, 0, 0.01 * 0.5**0.9),  # T = 10 (mid): 0.5^0.9 = 0.5358867 -> 0.005358867
        (3, 4, 0.01 * 0.05**0.9),  # T = 19 (last): 0.05^0.9 = 0.0674643 -> 0.000674643
    ],
)
def test_poly_lr(epoch, i, expected):
    assert poly_lr(0.01, epoch, i, 5, 4) == pytest.approx(expected, rel=1e-9)


def test_poly_lr_numbers():
    # The same values written out, so that a wrong exponent cannot hide in the table's formula.
    assert poly_lr(0.01, 2, 0, 5, 4) == pytest.approx(0.005358867, rel=1e-6)
    assert poly_lr(0.01, 3, 4, 5, 4) == pytest.approx(0.000674643, rel=1e-5)
    # T counts iterations over epochs: (epoch 1, i 0) is T = 5 of N = 20 -> 0.75^0.9 = 0.7719...
    assert poly_lr(1.0, 1, 0, 5, 4) == pytest.approx(0.75**0.9, rel=1e-9)
    assert poly_lr(1.0, 1, 0, 5, 4) != pytest.approx(poly_lr(1.0, 0, 1, 5, 4))


# ----------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_and_iou_by_hand():
    label = torch.tensor([[1, 1, 1, 2], [2, 3, 255, 0]])
    pred = torch.tensor([[1, 1, 2, 2], [3, 3, 4, 0]])
    cm = ConfusionMatrix(N_CLASS)
    # Two updates accumulate: first row, then second row.
    cm.update(label[0], pred[0])
    cm.update(label[1], pred[1])
    # rows = label, cols = prediction; the label-255 pixel (predicted 4) is skipped:
    #   (0,0)=1, (1,1)=2, (1,2)=1, (2,2)=1, (2,3)=1, (3,3)=1
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for (r, c), v in {(0, 0): 1, (1, 1): 2, (1, 2): 1, (2, 2): 1, (2, 3): 1, (3, 3): 1}.items():
        expected[r, c] = v
    assert torch.equal(cm.matrix.cpu(), expected)
    iou = cm.iou()
    # IoU = diag / (row + col - diag):
    #   0: 1 / (1 + 1 - 1) = 1;  1: 2 / (3 + 2 - 2) = 2/3;  2: 1 / (2 + 2 - 1) = 1/3;
    #   3: 1 / (1 + 2 - 1) = 1/2;  4, 5, 6: 0 / 0 -> NaN (4 only appears under label 255)
    assert iou[:4] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.5])
    assert all(math.isnan(x) for x in iou[4:])
    # mIoU over classes 1..6, NaN as 0: (2/3 + 1/3 + 1/2 + 0 + 0 + 0) / 6 = 1.5 / 6 = 0.25
    # (with class 0 it would be 2.5 / 7 = 0.357)
    assert cm.miou() == pytest.approx(0.25)


def test_mean_iou_excludes_class_0_and_counts_nan_as_zero():
    # (0.5 + 0 + 0.25 + 0 + 0 + 1.0) / 6 = 1.75 / 6 = 0.2916667
    assert mean_iou([0.9, 0.5, math.nan, 0.25, math.nan, math.nan, 1.0]) == pytest.approx(1.75 / 6)


def test_confusion_matrix_all_ignored_is_empty():
    cm = ConfusionMatrix(N_CLASS)
    cm.update(torch.full((3, 3), 255), torch.ones(3, 3, dtype=torch.int64))
    assert int(cm.matrix.sum()) == 0
    assert cm.miou() == 0.0


# ----------------------------------------------------------------------------- TTA

# A fake predictor: per-pixel class scores from the pixel's colour (local and aggregated),
# and global logits from the 4x4-average-pooled global image. Both commute with every
# flip/rotation, so TTA must give back exactly the plain prediction.
_GEN = torch.Generator().manual_seed(1234)
W_GLOBAL = torch.randn(N_CLASS, 3, generator=_GEN)
W_LOCAL = torch.randn(N_CLASS, 3, generator=_GEN)
W_AGG = torch.randn(N_CLASS, 3, generator=_GEN)
H, W = 48, 80  # non-square; the global logits are 8 x 8, 48 / 8 = 6 and 80 / 8 = 10 exactly


def _colour_scores(image, weight):
    # centred colours, so that different pixels prefer different classes
    return torch.einsum("ck,khw->chw", weight, image.float() / 255 - 0.5)


def _global_scores(image_global, weight):
    return torch.einsum("ck,bkhw->bchw", weight, F.avg_pool2d(image_global, 4) - 0.5)


def _equivariant_fn(mode, image, image_global):
    g = _global_scores(image_global, W_GLOBAL)
    if mode == 1:
        return inference.Scores(g, None, None)
    return inference.Scores(g, _colour_scores(image, W_LOCAL), _colour_scores(image, W_AGG))


def _shifted_fn(*args):
    """Not equivariant: every score map is rolled by one cell to the right in the frame of the
    view it was computed on. Undone, each of the 8 views is shifted in its own direction."""
    s = _equivariant_fn(*args)
    roll = lambda x: None if x is None else torch.roll(x, 1, dims=-1)  # noqa: E731
    return inference.Scores(roll(s.global_), roll(s.local), roll(s.aggregated))


def _predict(score, image, image_global, tta):
    """Class maps from a scoring of the whole image (image, global image) -> Scores, as
    inference.predict makes them: through the TTA wrapper or not."""
    if tta:
        return inference.tta_class_maps(score, image, image_global)
    return inference.class_maps(score(image, image_global), image.shape[-2:])


def _blocks(x):
    """(8, 8) class map -> (48, 80): each cell a 6 x 10 block (nearest with integer factors)."""
    return x.repeat_interleave(H // 8, 0).repeat_interleave(W // 8, 1)


def _four_neighbours(x):
    """Sum of the map shifted by one cell in each of the 4 directions (circularly)."""
    return sum(torch.roll(x, s, dims=d) for s in (1, -1) for d in (-1, -2))


@pytest.fixture()
def tta_input():
    g = torch.Generator().manual_seed(7)
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    image_global = torch.rand(1, 3, 32, 32, generator=g)
    return image, image_global


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("tta", [False, True])
def test_predict_equivariant_predictor_same_with_and_without_tta(tta_input, mode, tta):
    image, image_global = tta_input
    out = _predict(functools.partial(_equivariant_fn, mode), image, image_global, tta)
    assert set(out) == set(helper.STAGES[mode].outputs)
    # Expected, computed without helper: argmax per pixel; global argmax at 8 x 8 in blocks.
    expected_global = _blocks(_global_scores(image_global, W_GLOBAL)[0].argmax(0))
    assert out["global"].shape == (H, W)
    assert len(expected_global.unique()) >= 3  # a varied map: misplaced cells would show
    assert torch.equal(out["global"], expected_global)
    if mode == 2:
        assert torch.equal(out["local"], _colour_scores(image, W_LOCAL).argmax(0))
        assert torch.equal(out["aggregated"], _colour_scores(image, W_AGG).argmax(0))


def test_predict_tta_undoes_each_view(tta_input, monkeypatch):
    """A predictor that shifts its scores by one cell in its view: undone correctly, the 8 shifts
    point in the 4 directions twice each, so the TTA scores are 2 x the sum of the 4 one-cell
    shifts of the plain scores (circular shifts commute with flips and rotations)."""
    image, image_global = tta_input
    local = _colour_scores(image, W_LOCAL)
    agg = _colour_scores(image, W_AGG)
    glob = _global_scores(image_global, W_GLOBAL)[0]  # (C, 8, 8); one cell = 6 x 10 pixels
    expected = {
        "global": _blocks(_four_neighbours(glob).argmax(0)),
        "local": _four_neighbours(local).argmax(0),
        "aggregated": _four_neighbours(agg).argmax(0),
    }
    # The expectation is not just the plain prediction (else a no-op TTA would pass).
    assert not torch.equal(expected["local"], local.argmax(0))
    out = _predict(functools.partial(_shifted_fn, 2), image, image_global, tta=True)
    for name in ("global", "local", "aggregated"):
        assert torch.equal(out[name], expected[name]), name

    # A wrong undo (rotating the same way again instead of back) breaks it.
    def wrong_undo(x, k, flip):
        x = torch.rot90(x, k, dims=(-2, -1))
        return x.flip(-1) if flip else x

    monkeypatch.setattr(inference, "undo_dihedral", wrong_undo)
    bad = _predict(functools.partial(_shifted_fn, 2), image, image_global, tta=True)
    assert not torch.equal(bad["local"], expected["local"])


def test_dihedral_views_are_the_8_distinct_ones_and_undo_inverts_them():
    square = torch.arange(16).reshape(1, 4, 4)
    views = [inference.dihedral(square, k, flip) for flip in (False, True) for k in range(4)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    # The dihedral group of a square: every view is a rotation of the original or of its mirror.
    group = {
        tuple(torch.rot90(s, k, dims=(-2, -1)).flatten().tolist()) for s in (square, square.flip(-1)) for k in range(4)
    }
    assert {tuple(v.flatten().tolist()) for v in views} == group

    rect = torch.arange(2 * 3 * 5).reshape(2, 3, 5)
    for flip in (False, True):
        for k in range(4):
            view = inference.dihedral(rect, k, flip)
            assert view.shape == ((2, 5, 3) if k % 2 else (2, 3, 5))
            assert torch.equal(inference.undo_dihedral(view, k, flip), rect), (k, flip)


# ----------------------------------------------------------------------------- stages


@pytest.mark.parametrize(
    "mode, trained",
    [
        (1, {"resnet_global", "fpn_global", "ensemble_conv"}),
        (2, {"resnet_local", "fpn_local", "ensemble_conv"}),
        (3, {"resnet_global", "fpn_global", "ensemble_conv"}),
    ],
)
def test_configure_stage_and_train_mode(glnet, mode, trained):
    model = glnet
    parts = ["resnet_global", "resnet_local", "fpn_global", "fpn_local", "ensemble_conv"]
    # Start from the opposite state, so that the call has to set every flag both ways.
    other = 2 if mode != 2 else 1
    helper.configure_stage(model, helper.STAGES[other])
    model.eval()
    params = helper.configure_stage(model, helper.STAGES[mode])
    helper.set_train_mode(model, helper.STAGES[mode])
    expected_ids = {id(p) for name in trained for p in getattr(model, name).parameters()}
    assert {id(p) for p in params} == expected_ids
    assert len(params) == len(expected_ids)
    for name in parts:
        part = getattr(model, name)
        is_trained = name in trained
        assert all(p.requires_grad == is_trained for p in part.parameters()), name
        assert all(m.training == is_trained for m in part.modules()), name


# ----------------------------------------------------------------------------- DeepGlobe loader


SIZES = [(64, 72), (40, 64)]  # (H, W); the second is shorter than size_p = 64


@pytest.fixture(scope="module")
def mixed_data(synthetic_data):
    return str(synthetic_data(n_train=2, n_val=0, n_test=0, sizes=SIZES, seed=3)[0])


def test_mixed_sizes_batch_and_padding(mixed_data):
    ds = DeepGlobe(mixed_data, "train", size_g=64, size_p=64, n_class=N_CLASS)
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate)))
    assert sorted(batch["size"]) == sorted(SIZES)
    small = batch["size"].index((40, 64))
    big = 1 - small
    # The full-resolution images stay a list of different shapes; the 40-row image is padded to 64.
    assert batch["image"][big].shape == (3, 64, 72) and batch["image"][big].dtype == torch.uint8
    assert batch["image"][small].shape == (3, 64, 64)
    assert batch["label"][small].shape == (64, 64)
    assert torch.all(batch["image"][small][:, 40:] == 0)
    assert torch.all(batch["label"][small][40:] == 255)
    assert torch.all(batch["label"][small][:40] < N_CLASS)
    assert torch.all(batch["label"][big] < N_CLASS)
    # The true image is untouched by the padding: it matches the JPEG as decoded by PIL.
    img_id = batch["id"][small]
    with Image.open(f"{mixed_data}/train/Sat/{img_id}_sat.jpg") as im:
        decoded = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(batch["image"][small][:, :40], decoded)
    # Global images and their labels are stacked: (2, 3, 64, 64) float in [0, 1], (2, 16, 16).
    assert batch["image_global"].shape == (2, 3, 64, 64) and batch["image_global"].dtype == torch.float32
    assert 0.0 <= float(batch["image_global"].min()) and float(batch["image_global"].max()) <= 1.0
    assert batch["label_global"].shape == (2, 16, 16)
    # PIL NEAREST 64 -> 16 samples source row floor((r + 0.5) * 4) = 4r + 2: rows r >= 10 read the
    # padding (rows 40..63; 4*10+2 = 42), rows r < 10 the image (4*9+2 = 38).
    lg = batch["label_global"][small]
    assert torch.all(lg[10:] == 255) and torch.all(lg[:10] < N_CLASS)


def test_patch_grids_of_the_mixed_batch_are_small():
    # 72 / 64: 2 patches, step 8, overlap 56 >= 50: starts 0, 8; 64 rows: one patch
    assert PatchGrid.for_size(64, 72, 64).col_starts == (0, 8)
    assert len(PatchGrid.for_size(64, 72, 64)) == 2
    # 40 x 64, padded to 64 x 64: one patch
    assert len(PatchGrid.for_size(64, 64, 64)) == 1


def test_train_one_epoch_mode2_on_mixed_batch(mixed_data, glnet):
    model = glnet
    ds = DeepGlobe(mixed_data, "train", size_g=64, size_p=64, n_class=N_CLASS, train=True, seed=1)
    loader = DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate)
    stage = helper.STAGES[2]
    params = helper.configure_stage(model, stage)
    optimizer = helper.make_optimizer(params, 1e-4)
    watched = ("fpn_local.classify.weight", "resnet_local.layer1.0.conv1.weight", "ensemble_conv.weight")
    before = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith(("resnet_global.", "fpn_global.")) or k in watched
    }
    calls = []
    cfg = helper.Config(stage, torch.device("cpu"), N_CLASS, 64, 2, num_epochs=1, lr=1e-4, progress=False)
    stats = engine.train_one_epoch(
        helper.TrainStep(model, cfg), loader, optimizer, 0, on_iteration=lambda i, lr, loss: calls.append((i, lr, loss)),
    )
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    for name in ("global", "local", "aggregated"):
        assert 0.0 <= stats[f"miou_{name}"] <= 1.0
    # One batch: one iteration at T = 0, i.e. the base lr.
    assert len(calls) == 1 and calls[0][1] == pytest.approx(1e-4)
    after = model.state_dict()
    # Mode 2 trains the local branch; the global branch (BatchNorm statistics included) is untouched.
    for k, v in before.items():
        if k in watched:
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k


def _legacy_sample(path_image, path_label, size_g, size_p, transposes=()):
    """The loader's sample as DeepGlobe.__getitem__ built it inline up to commit aae1ea1
    (kept here as the reference for image_views / label_views); `transposes` are applied
    first, as the train-time augmentation does."""
    image = Image.open(path_image).convert("RGB")
    label = Image.fromarray(np.asarray(Image.open(path_label))) if path_label else None
    for op in transposes:
        image = image.transpose(op)
        label = label.transpose(op) if label is not None else None

    def pad(im, height, width, fill):
        if im.size == (width, height):
            return im
        out = Image.new(im.mode, (width, height), fill)
        out.paste(im, (0, 0))
        return out

    width, height = image.size
    ph, pw = max(height, size_p), max(width, size_p)
    image = pad(image, ph, pw, (0, 0, 0))
    g = size_g
    sample = {
        "size": (height, width),
        "image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
        "image_global": torch.from_numpy(np.asarray(image.resize((g, g), Image.BILINEAR)).copy())
        .permute(2, 0, 1).float().div(255),
    }
    if label is not None:
        label = pad(label, ph, pw, 255)
        sample["label"] = torch.from_numpy(np.asarray(label).copy())
        sample["label_global"] = torch.from_numpy(np.asarray(label.resize((g // 4, g // 4), Image.NEAREST)).astype(np.int64))
    return sample


def _assert_same_sample(got, want):
    assert list(got) == list(want)  # same keys in the same order
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


VIEW_SIZES = [(64, 72), (40, 64), (37, 53), (96, 96)]  # (H, W): larger, shorter, both shorter, equal


@pytest.fixture(scope="module")
def view_data(module_tmp):
    root = module_tmp("views")
    generate(root, n_train=4, n_val=0, n_test=0, sizes=VIEW_SIZES, seed=5)
    return root


@pytest.mark.parametrize("size_g, size_p", [(64, 64), (48, 92), (32, 40), (100, 24)])
def test_samples_are_those_of_the_inline_loader(view_data, size_g, size_p):
    import random

    ds = DeepGlobe(str(view_data), "train", size_g=size_g, size_p=size_p, n_class=N_CLASS)
    for i, id_ in enumerate(ds.ids):
        sat, lab = view_data / "train" / "Sat" / f"{id_}_sat.jpg", view_data / "train" / "Label" / f"{id_}_mask.png"
        got = ds[i]
        assert got.pop("id") == id_
        _assert_same_sample(got, _legacy_sample(sat, lab, size_g, size_p))
    # with augmentation: the same draws give the same flips/rotations as before
    ds = DeepGlobe(str(view_data), "train", size_g=size_g, size_p=size_p, n_class=N_CLASS, train=True, seed=2)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i, id_ in enumerate(ds.ids):
            sat, lab = view_data / "train" / "Sat" / f"{id_}_sat.jpg", view_data / "train" / "Label" / f"{id_}_mask.png"
            rng = random.Random(hash((2, epoch, i)))
            ops = []
            if rng.random() < 0.5:
                ops.append(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < 0.5:
                ops.append(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]))
            got = ds[i]
            del got["id"]
            _assert_same_sample(got, _legacy_sample(sat, lab, size_g, size_p, ops))
    # the unlabelled split: image views only
    ds = DeepGlobe(str(view_data), "train", size_g=size_g, size_p=size_p, n_class=N_CLASS, labels=False)
    got = ds[1]
    del got["id"]
    _assert_same_sample(got, _legacy_sample(view_data / "train" / "Sat" / f"{ds.ids[1]}_sat.jpg", None, size_g, size_p))


def test_image_and_label_views_by_hand():
    from dataset.deep_globe import image_views, label_views

    # a 5 x 6 (H x W) image, padded to 8 x 8 (size_p 8), global view 4 x 4
    arr = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    v = image_views(Image.fromarray(arr), size_g=4, size_p=8)
    assert list(v) == ["size", "image", "image_global"] and v["size"] == (5, 6)
    assert v["image"].dtype == torch.uint8 and v["image"].shape == (3, 8, 8)
    assert torch.equal(v["image"][:, :5, :6], torch.from_numpy(arr).permute(2, 0, 1))
    assert int(v["image"][:, 5:].sum()) == 0 and int(v["image"][:, :, 6:].sum()) == 0
    assert v["image_global"].dtype == torch.float32 and v["image_global"].shape == (3, 4, 4)
    # bilinear 8 -> 4 of the padded image, / 255: PIL's own resize
    padded = np.zeros((8, 8, 3), np.uint8)
    padded[:5, :6] = arr
    expect = np.asarray(Image.fromarray(padded).resize((4, 4), Image.BILINEAR))
    assert torch.equal(v["image_global"], torch.from_numpy(expect.copy()).permute(2, 0, 1).float() / 255)
    # images at least size_p keep their size; a non-RGB image is converted
    big = image_views(Image.fromarray(arr[..., 0]), size_g=4, size_p=3)
    assert big["image"].shape == (3, 5, 6) and torch.equal(big["image"][1], torch.from_numpy(arr[..., 0]))
    lab = np.array([[0, 1, 2, 3, 4, 5]] * 5, np.uint8)
    lv = label_views(Image.fromarray(lab), size_g=16, size_p=8, ignore_index=255)
    assert list(lv) == ["label", "label_global"]
    assert lv["label"].dtype == torch.uint8 and lv["label"].shape == (8, 8)
    assert torch.equal(lv["label"][:5, :6], torch.from_numpy(lab))
    assert torch.all(lv["label"][5:] == 255) and torch.all(lv["label"][:, 6:] == 255)
    # NEAREST 8 -> 4 reads source pixel 2r + 1 (r = 0..3): columns 1, 3, 5, 7 (7 is padding)
    assert lv["label_global"].dtype == torch.int64
    assert lv["label_global"].tolist() == [[1, 3, 5, 255]] * 2 + [[255] * 4] * 2
    assert torch.all(label_views(Image.fromarray(lab), 16, 8, ignore_index=9)["label"][5:] == 9)


# ----------------------------------------------------------------------------- loader errors


def _write_sample(root, split, img_id, image=None, mask=None, size=(32, 40)):
    """Write <split>/Sat/<id>_sat.jpg and/or <split>/Label/<id>_mask.png; size is (H, W)."""
    (root / split / "Sat").mkdir(parents=True, exist_ok=True)
    (root / split / "Label").mkdir(parents=True, exist_ok=True)
    if image is not False:
        arr = image if image is not None else np.full(size + (3,), 120, np.uint8)
        Image.fromarray(arr).save(root / split / "Sat" / f"{img_id}_sat.jpg", quality=90)
    if mask is not False:
        arr = mask if mask is not None else np.full(size, 2, np.uint8)
        Image.fromarray(arr).save(root / split / "Label" / f"{img_id}_mask.png")


def _load_all(root, n_class=N_CLASS):
    ds = DeepGlobe(str(root), "train", size_g=16, size_p=16, n_class=n_class)
    return [ds[i] for i in range(len(ds))]


def test_loader_reads_a_clean_split(tmp_path):
    mask = np.full((32, 40), 3, np.uint8)
    mask[0, :5] = 255  # 255 = ignore is a valid value
    _write_sample(tmp_path, "train", "1", mask=mask)
    _write_sample(tmp_path, "train", "2")
    samples = _load_all(tmp_path)
    assert [s["id"] for s in samples] == ["1", "2"]
    assert samples[0]["size"] == (32, 40)
    assert torch.equal(samples[0]["label"], torch.from_numpy(mask))


def test_loader_error_image_without_label(tmp_path):
    _write_sample(tmp_path, "train", "1")
    _write_sample(tmp_path, "train", "2", mask=False)
    with pytest.raises(UserError, match=r"2_sat\.jpg") as e:
        _load_all(tmp_path)
    assert "2_mask.png" in str(e.value)


def test_loader_error_label_without_image(tmp_path):
    _write_sample(tmp_path, "train", "1")
    _write_sample(tmp_path, "train", "3", image=False)
    with pytest.raises(UserError, match=r"3_mask\.png"):
        _load_all(tmp_path)


def test_loader_error_size_mismatch(tmp_path):
    _write_sample(tmp_path, "train", "1", mask=np.zeros((32, 32), np.uint8))
    with pytest.raises(UserError, match=r"1_mask\.png") as e:
        _load_all(tmp_path)
    assert "40x32" in str(e.value) and "32x32" in str(e.value)  # width x height of each


def test_loader_error_label_value_out_of_range(tmp_path):
    mask = np.full((32, 40), 1, np.uint8)
    mask[5, 5] = 7  # classes are 0..6 with --n_class 7
    _write_sample(tmp_path, "train", "1", mask=mask)
    with pytest.raises(UserError, match=r"1_mask\.png") as e:
        _load_all(tmp_path)
    assert "7" in str(e.value)
    # The same file is fine with 8 classes.
    assert _load_all(tmp_path, n_class=8)[0]["label"][5, 5] == 7


def test_loader_error_rgb_mask_points_to_prepare_script(tmp_path):
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[..., 1:] = 255  # urban cyan, as in the raw DeepGlobe download
    _write_sample(tmp_path, "train", "1", mask=rgb)
    with pytest.raises(UserError, match=r"1_mask\.png") as e:
        _load_all(tmp_path)
    assert "prepare_deep_globe" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_loader_error_corrupt_jpeg(tmp_path, damage):
    rng = np.random.default_rng(0)
    _write_sample(tmp_path, "train", "1", image=rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    path = tmp_path / "train" / "Sat" / "1_sat.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a jpeg at all" * 10)
    with pytest.raises(UserError, match=r"1_sat\.jpg"):
        _load_all(tmp_path)


def _first_error(fn):
    with pytest.raises(UserError) as e:
        fn()
    return str(e.value)


def test_check_files_finds_header_problems_with_the_loaders_messages(tmp_path):
    from dataset.deep_globe import PREPARE_HINT, check_label_header

    _write_sample(tmp_path, "train", "1")
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=N_CLASS)
    ds.check_files()  # a clean split passes
    label = tmp_path / "train" / "Label" / "1_mask.png"
    # size mismatch: sizes as width x height, the label named; the loader says the same
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(label)
    msg = _first_error(ds.check_files)
    assert msg == f"size mismatch: image 40x32 but label 32x32 in {label}"
    assert _first_error(lambda: ds[0]) == msg
    # a colour mask points to the preparation script
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(label)
    msg = _first_error(ds.check_files)
    assert msg == f"{label} is a 3-channel colour mask, not a class-index mask; {PREPARE_HINT}"
    assert _first_error(lambda: ds[0]) == msg
    # an unreadable label or image
    label.write_bytes(b"not a png" * 10)
    assert _first_error(ds.check_files).startswith(f"cannot read {label}: corrupt or truncated image (")
    assert _first_error(lambda: check_label_header(str(label), (40, 32))).endswith("; re-download or remove it")
    _write_sample(tmp_path, "train", "1")
    sat = tmp_path / "train" / "Sat" / "1_sat.jpg"
    sat.write_bytes(b"garbage" * 10)
    assert _first_error(ds.check_files).startswith(f"cannot read {sat}: corrupt or truncated image (")


def test_open_names_the_missing_folder_and_the_preparation_command(tmp_path):
    from dataset.deep_globe import PREPARE_HINT

    nowhere = tmp_path / "nowhere"
    assert _first_error(lambda: DeepGlobe.open(str(nowhere), "train", 16, 16)) == (
        f"--data_path {nowhere} does not exist (expected train/, crossvali/ inside); {PREPARE_HINT}")
    assert _first_error(lambda: DeepGlobe.open(str(tmp_path), "crossvali", 16, 16)) == (
        f"--data_path {tmp_path} has no crossvali/ folder (expected crossvali/Sat/<id>_sat.jpg and "
        f"crossvali/Label/<id>_mask.png); {PREPARE_HINT}")
    assert _first_error(lambda: DeepGlobe.open(str(tmp_path), "test", 16, 16, labels=False)) == (
        f"--data_path {tmp_path} has no test/ folder (expected test/Sat/<id>_sat.jpg); {PREPARE_HINT}")
    _write_sample(tmp_path, "train", "1")
    ds = DeepGlobe.open(str(tmp_path), "train", 16, 16, N_CLASS, train=True, seed=4)
    assert ds.ids == ["1"] and ds.train and ds.seed == 4 and ds.classes.n_class == N_CLASS


def test_check_files_reads_headers_only(tmp_path):
    mask = np.full((32, 40), 1, np.uint8)
    mask[3, 3] = 9  # a bad value needs the pixels: left to the loader
    _write_sample(tmp_path, "train", "1", mask=mask)
    ds = DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=N_CLASS)
    ds.check_files()
    assert "label value 9" in _first_error(lambda: ds[0])
    # the unlabelled split does not look at labels
    (tmp_path / "train" / "Label" / "1_mask.png").write_bytes(b"junk")
    DeepGlobe(str(tmp_path), "train", size_g=16, size_p=16, n_class=N_CLASS, labels=False).check_files()


def test_focal_loss_all_ignored_is_zero_not_nan():
    from utils.loss import focal_loss

    logits = torch.zeros(1, 7, 2, 2, requires_grad=True)
    loss = focal_loss(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
