"""Patch geometry against hand-computed tables (docs/MODEL.md section 4)."""
import pytest
import torch

from utils.geometry import (
    PatchGrid,
    add_patch_scores,
    coverage_template,
    crop_global,
    merge_all,
    patch_starts,
)


@pytest.mark.parametrize(
    "length, patch, starts",
    [
        # 2448/508: 5 patches overlap by 23 < 50, so 6 with step 388.
        (2448, 508, [0, 388, 776, 1164, 1552, 1940]),
        # 1224/508: 3 patches, step 358 (overlap 150).
        (1224, 508, [0, 358, 716]),
        # 400/128: 4 -> step 90.67, overlap 37 < 50 -> 5, step 68.
        (400, 128, [0, 68, 136, 204, 272]),
        # 360/128: 3 -> step 116 (overlap 12) -> 4, step 77.33: 0, 77, 155(154.67), 232.
        (360, 128, [0, 77, 155, 232]),
        # 420/128: 4 -> step 97.33 -> 5, step 73.
        (420, 128, [0, 73, 146, 219, 292]),
        # side == patch: one patch (the original divides by zero).
        (508, 508, [0]),
        # one pixel more: two patches, the second flush with the border.
        (509, 508, [0, 1]),
    ],
)
def test_patch_starts(length, patch, starts):
    assert patch_starts(length, patch) == starts


def test_round_half_to_even():
    # 2 * 2.5 = 5 would round up with round-half-up; step (133-128)/2 = 2.5 -> round(2.5) = 2.
    # 133/128: n=2 -> step 5, overlap 123; so use a 3-patch case with a .5 step:
    # L=301, p=128: n=3 -> step 86.5, overlap 41.5 < 50 -> n=4, step 57.67 -> 0, 58, 115, 173.
    assert patch_starts(301, 128) == [0, 58, 115, 173]
    # L=245, p=128: n=2 -> step 117 overlap 11 -> n=3 step 58.5: round(58.5) = 58 (even), not 59.
    assert patch_starts(245, 128) == [0, 58, 117]


def test_side_smaller_than_patch_needs_padding():
    with pytest.raises(ValueError, match="pad"):
        patch_starts(300, 508)
    grid = PatchGrid.for_size(508, 600, 508)  # the image's datasets pad 300 rows to 508
    assert (grid.n_rows, grid.n_cols) == (1, 2)


def test_grid_2448():
    g = PatchGrid.for_size(2448, 2448, 508)
    assert (g.n_rows, g.n_cols, len(g)) == (6, 6, 36)
    assert g.tops[:7] == (0, 0, 0, 0, 0, 0, 388)  # rows outer, columns inner
    assert g.lefts[:7] == (0, 388, 776, 1164, 1552, 1940, 0)
    assert g.tops[-1] == g.lefts[-1] == 1940
    assert g.ratio == (508 / 2448, 508 / 2448)
    # patch 7 on a 127 x 127 map: top = left = round(388 / 2448 * 127) = round(20.13), size round(26.35)
    assert g.boxes(127, 127, [7]) == [(20, 20, 26, 26)]


def test_grid_non_square():
    g = PatchGrid.for_size(360, 420, 128)
    assert (g.n_rows, g.n_cols) == (4, 5)
    assert g.tops[5] == 77 and g.lefts[5] == 0 and g.lefts[4] == 292


def test_boxes_on_feature_maps():
    g = PatchGrid.for_size(2448, 2448, 508)
    # 127 x 127 map (size_g 508 / 4): box side round(127 * 508/2448) = round(26.35) = 26;
    # patch 7 (388, 388): round(388/2448*127) = round(20.13) = 20; last: round(100.65) = 101.
    assert g.boxes(127, 127, [0, 7, 35]) == [(0, 0, 26, 26), (20, 20, 26, 26), (101, 101, 26, 26)]
    # 16 x 16 (c5): side round(3.32) = 3; 1940/2448*16 = 12.68 -> 13.
    assert g.boxes(16, 16, [35]) == [(13, 13, 3, 3)]


def test_coverage_template_counts():
    g = PatchGrid.for_size(400, 400, 128)  # starts 0, 68, 136, 204, 272
    t = coverage_template(g)
    assert t.shape == (1, 1, 400, 400) and t.dtype == torch.float32
    # Row coverage: [0,68) 1, [68,128) 2, [128,136) 1, [136,196) 2, ...
    assert t[0, 0, 0, 0] == 1
    assert t[0, 0, 70, 0] == 2
    assert t[0, 0, 70, 70] == 4
    assert t[0, 0, 130, 130] == 1
    assert t[0, 0, 399, 399] == 1
    # Every pixel is covered, and the counts add up to the patch areas.
    assert t.min() >= 1
    assert t.sum() == len(g) * 128 * 128


def test_coverage_template_matches_patch_by_patch_count():
    g = PatchGrid.for_size(360, 420, 128)
    ref = torch.zeros(360, 420)
    for top, left in zip(g.tops, g.lefts):
        ref[top : top + 128, left : left + 128] += 1
    assert torch.equal(coverage_template(g)[0, 0], ref)


def test_crop_global_takes_the_patch_region():
    g = PatchGrid.for_size(2448, 2448, 508)
    fmap = torch.arange(127 * 127, dtype=torch.float32).reshape(1, 1, 127, 127)
    # Resizing a crop to its own size is the identity, so the crop itself is visible.
    crops = crop_global(fmap, g, [7, 35], (26, 26))
    assert crops.shape == (2, 1, 26, 26)
    assert torch.equal(crops[0, 0], fmap[0, 0, 20:46, 20:46])
    assert torch.equal(crops[1, 0], fmap[0, 0, 101:127, 101:127])


def test_crop_global_resizes_bilinear():
    g = PatchGrid.for_size(2448, 2448, 508)
    fmap = torch.ones(1, 3, 16, 16) * 2.5
    out = crop_global(fmap, g, [0, 1, 2], (16, 16))
    assert out.shape == (3, 3, 16, 16)
    assert torch.allclose(out, torch.full_like(out, 2.5))


@pytest.mark.parametrize(
    "side, size", [(2448, (32, 32)), (2448, (16, 16)), (1224, (127, 127))]
)
def test_merge_constant_round_trip(side, size):
    # Where the rounded boxes tile the map like the resized template says, merging
    # a constant gives the constant back.
    g = PatchGrid.for_size(side, side, 508)
    local = torch.full((len(g), 4, 32, 32), 3.0)
    merged = merge_all(local, g, size, coverage_template(g))
    assert merged.shape == (1, 4, *size)
    assert torch.allclose(merged, torch.full_like(merged, 3.0), atol=1e-5)


@pytest.mark.parametrize("hw, p, size", [((2448, 2448), 508, (127, 127)), ((360, 420), 128, (90, 105))])
def test_merge_constant_is_box_count_over_resized_template(hw, p, size):
    # The original's quirk (kept for parity): the canvas counts the rounded boxes,
    # the divisor is the full-resolution template resized bilinearly, and the two
    # differ along some overlap borders. Merging 1 gives exactly their ratio.
    g = PatchGrid.for_size(*hw, p)
    count = torch.zeros(size)
    for top, left, bh, bw in g.boxes(*size):
        count[top : top + bh, left : left + bw] += 1
    template = coverage_template(g)
    resized = torch.nn.functional.interpolate(template, size=size, mode="bilinear", align_corners=False)
    merged = merge_all(torch.ones(len(g), 1, 16, 16), g, size, template)
    assert torch.allclose(merged[0, 0], count / resized[0, 0], atol=1e-6)
    # and it is the constant over most of the map
    assert ((merged - 1).abs() < 1e-5).float().mean() > 0.85


def test_add_patch_scores_reassembles_with_nearest():
    g = PatchGrid.for_size(400, 400, 128)
    canvas = torch.zeros(2, 400, 400)
    logits = torch.ones(len(g), 2, 32, 32)
    logits[:, 1] = 0
    logits[:, 0, 0, 0] = 5  # nearest x4: a 4x4 block at the patch's corner
    add_patch_scores(canvas, logits, g, range(len(g)))
    template = coverage_template(g)[0, 0]
    expected = template.clone()
    for top, left in zip(g.tops, g.lefts):
        expected[top : top + 4, left : left + 4] += 4
    assert torch.equal(canvas[0], expected)
    assert torch.equal(canvas[1], torch.zeros(400, 400))


def test_add_patch_scores_sub_batches_equal_one_batch():
    g = PatchGrid.for_size(360, 420, 128)
    logits = torch.randn(len(g), 3, 32, 32)
    a = add_patch_scores(torch.zeros(3, 360, 420), logits, g, range(len(g)))
    b = torch.zeros(3, 360, 420)
    for s in range(0, len(g), 6):
        idx = list(range(s, min(s + 6, len(g))))
        add_patch_scores(b, logits[idx], g, idx)
    assert torch.equal(a, b)
