"""AvgDist (SimMIM section 4.1.2, Figure 3(a)): mean distance of masked pixels to the nearest visible."""

import math

import numpy as np
import pytest
import torch

from mixmim.cli import main
from mixmim.evaluation.avgdist import avg_dist, draw_pixel_masks, mask_avg_dist


def test_empty_mask_has_zero_avgdist():
    assert avg_dist(np.zeros((8, 8), bool)) == 0.0
    assert avg_dist(torch.zeros(3, 8, 8)) == 0.0


def test_hand_computed_values():
    # A 3x3 masked block inside a 5x5 image: its 8 border pixels touch a visible pixel (distance 1,
    # the corners too, through an edge neighbour), the centre is 2 away.
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    assert avg_dist(mask) == pytest.approx((8 * 1 + 2) / 9)
    # Everything masked but the top-left pixel of a 4x4 image: distance sqrt(i^2 + j^2) each.
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False
    expected = sum(math.hypot(i, j) for i in range(4) for j in range(4) if (i, j) != (0, 0)) / 15
    assert avg_dist(mask) == pytest.approx(expected)
    # Outside the image is not visible: a masked left column of 2 pixels is measured inward only.
    mask = np.zeros((2, 3), bool)
    mask[:, 0] = True
    assert avg_dist(mask) == pytest.approx(1.0)


def test_several_masks_average_their_avgdists():
    a = np.zeros((5, 5), bool)
    a[1:4, 1:4] = True
    b = np.zeros((5, 5), bool)
    b[2, 2] = True
    assert avg_dist(np.stack([a, b])) == pytest.approx(((10 / 9) + 1) / 2)


def test_a_fully_masked_image_has_no_avgdist():
    with pytest.raises(ValueError, match="every pixel is masked"):
        avg_dist(np.ones((4, 4), bool))


def test_masks_of_every_generator_have_the_pixel_size_and_ratio():
    for method, kind, cell in (("simmim", "random", 32), ("simmim", "square", 32), ("simmim", "block", 16),
                               ("mixmim", "random", 32), ("mixmim", "block", 32)):
        masks = draw_pixel_masks(kind, 0.5, cell, 192, count=4, method=method)
        assert masks.shape == (4, 192, 192) and masks.dtype == torch.bool
        assert 0.2 < masks.float().mean() < 0.8
    with pytest.raises(ValueError, match="mixmim has no 'square'"):
        draw_pixel_masks("square", 0.5, method="mixmim")


def test_figure_3a_trends_hold():
    """What section 4.1.2 reads off Figure 3(a): AvgDist grows with the ratio and with the patch size;
    square and block-wise masks sit about as high as random 64-px patches; random 32 at 0.6, the
    default, lands near the good value of 15 (appendix C.2)."""
    def value(kind, ratio, cell):
        return mask_avg_dist(kind, ratio, cell, 192, draws=8)[0]

    assert value("random", 0.2, 32) < value("random", 0.5, 32) < value("random", 0.8, 32)
    assert value("random", 0.6, 4) < value("random", 0.6, 8) < value("random", 0.6, 16) < value("random", 0.6, 32)
    assert value("random", 0.6, 4) < 3 and 10 < value("random", 0.6, 32) < 20
    assert value("random", 0.2, 64) > value("random", 0.2, 32)
    assert value("block", 0.4, 32) > value("random", 0.4, 32) and value("square", 0.44, 32) > value("random", 0.4, 64)


def test_info_prints_the_avgdist_of_a_strategy(capsys):
    assert main(["info", "--mask", "random", "--mask-ratio", "0.6", "--mask-cell", "32", "--img-size", "192",
                 "--draws", "5"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("AvgDist ") and "random masking, 32-px cells" in line and "mean of 5 draws" in line
    value = float(line.split()[1])
    assert value == pytest.approx(mask_avg_dist("random", 0.6, 32, 192, draws=5)[0], abs=0.006)
    assert main(["info", "--mask", "block", "--mask-method", "mixmim", "--mask-ratio", "0.5", "--draws", "2"]) == 0
    assert main(["info", "--mask", "square", "--mask-method", "mixmim"]) == 2
