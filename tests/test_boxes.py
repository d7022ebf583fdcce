"""The foreground box rule (utils/boxes.py, docs/MODEL.md section 9), on hand-computed cases."""
import pytest
import torch

from utils.boxes import Box, foreground_box, relax_box, tight_box


def mask(height, width, *blocks):
    m = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in blocks:
        m[y0:y1, x0:x1] = True
    return m


def test_empty_mask_has_no_box():
    assert foreground_box(mask(50, 80), size_p=16) == (None, 0)
    assert tight_box(mask(50, 80)) == (None, 0)


def test_tight_box_is_exclusive_and_counts_pixels():
    m = mask(100, 100, (30, 10, 50, 20))
    m[90, 5] = True  # a stray pixel widens and lengthens the tight box
    assert tight_box(m) == (Box(5, 10, 50, 91), 201)


def test_box_of_half_foreground_or_less_keeps_its_size():
    # two pixels at opposite corners of a 10x10 box: A = 2, area 100 >= 2A
    m = mask(100, 100, (0, 0, 1, 1), (9, 9, 10, 10))
    assert foreground_box(m, size_p=4) == (Box(0, 0, 10, 10), 2)


def test_full_box_grows_by_one_factor_to_twice_the_foreground():
    # 20 x 10 block, A = 200: factor sqrt(2); width 28.28 about x = 40 -> [25, 55),
    # height 14.14 about y = 15 -> [7, 23); 30 x 16 = 480 >= 400
    box, area = foreground_box(mask(100, 100, (30, 10, 50, 20)), size_p=8)
    assert (box, area) == (Box(25, 7, 55, 23), 200)
    assert box.area >= 2 * area


def test_box_at_an_edge_is_shifted_inside():
    # 10 x 10 block in the corner: grown to [-3, 13) on both axes, shifted to [0, 16)
    assert foreground_box(mask(100, 100, (0, 0, 10, 10)), size_p=8) == (Box(0, 0, 16, 16), 100)
    # same at the far corner: [87, 103) shifted to [84, 100)
    assert foreground_box(mask(100, 100, (90, 90, 100, 100)), size_p=8) == (Box(84, 84, 100, 100), 100)


def test_box_smaller_than_a_patch_becomes_one_patch():
    # one pixel at x = 50, y = 60 of a 200 x 100 image: grown to 3 x 3, then each side to
    # size_p = 32 about the centre 50.5 / 60.5: start floor(34.5) = 34, floor(44.5) = 44
    box, area = foreground_box(mask(100, 200, (50, 60, 51, 61)), size_p=32)
    assert (box, area) == (Box(34, 44, 66, 76), 1)


def test_side_longer_than_the_image_is_clipped():
    # image 20 px wide, patch 32: the width becomes the image's, the height the patch's
    box, _ = foreground_box(mask(100, 20, (8, 40, 12, 44)), size_p=32)
    assert box == Box(0, 26, 20, 58)
    # a full 20 x 10 box grown to 30 x 16 ([-5, 25) x [-3, 13)) in an image 20 px wide:
    # the width is clipped, the height shifted down
    assert relax_box(Box(0, 0, 20, 10), 200, (20, 100), 4) == Box(0, 0, 20, 16)


def test_grown_box_past_both_borders_is_the_image():
    assert relax_box(Box(0, 0, 20, 20), 400, (22, 22), 4) == Box(0, 0, 22, 22)


def test_mask_must_be_two_dimensional():
    with pytest.raises(ValueError, match="shape"):
        tight_box(torch.zeros(1, 4, 4, dtype=torch.bool))
