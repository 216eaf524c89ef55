"""Mixed convolution, max pooling and GroupNorm (MixMIM supplement section 9, Figure 4)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import GroupNormAct, StdConv2d, StdConv2dSame, create_pool2d
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from mixmim.models.mixed_conv import downsample_groups, mixed_conv2d, mixed_group_norm, mixed_max_pool2d


def _randomise_affine(norm: nn.GroupNorm) -> nn.GroupNorm:
    # the default ones / zeros affine would not notice weight and bias being swapped or skipped
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


class _PadPool(nn.Module):
    """BiT's 'fixed' stem pooling: zero padding, then an unpadded max pool."""

    def __init__(self):
        super().__init__()
        self.pad, self.pool = nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2, padding=0)

    def forward(self, x):
        return self.pool(self.pad(x))


# name -> (module factory, mixed function, stride of the op)
OPS = {
    "conv3x3_bias": (lambda: nn.Conv2d(4, 6, 3, 1, 1, bias=True), mixed_conv2d, 1),
    "conv7x7_s2": (lambda: nn.Conv2d(4, 6, 7, 2, 3), mixed_conv2d, 2),
    "conv1x1_s2": (lambda: nn.Conv2d(4, 6, 1, 2, 0), mixed_conv2d, 2),
    "conv_dw3x3": (lambda: nn.Conv2d(4, 4, 3, 1, 1, groups=4), mixed_conv2d, 1),
    "std_conv": (lambda: StdConv2d(4, 6, 3, bias=True), mixed_conv2d, 1),
    "std_conv_same_s2": (lambda: StdConv2dSame(4, 6, 3, stride=2), mixed_conv2d, 2),
    "conv_same_s2": (lambda: Conv2dSame(4, 6, 3, stride=2), mixed_conv2d, 2),
    "max_pool": (lambda: nn.MaxPool2d(3, 2, 1), mixed_max_pool2d, 2),
    "max_pool_same": (lambda: create_pool2d("max", 3, 2, padding="same"), mixed_max_pool2d, 2),
    "pad_max_pool": (_PadPool, lambda m, x, g: mixed_max_pool2d(m.pool, x, g, pad=m.pad), 2),
    "group_norm": (lambda: _randomise_affine(nn.GroupNorm(2, 4)), mixed_group_norm, 1),
    "group_norm_act": (lambda: _randomise_affine(GroupNormAct(4, 2)), mixed_group_norm, 1),
}


def _cells(pattern: list[list[int]], cell: int = 4) -> torch.Tensor:
    """(H, W) group map made of cell x cell blocks."""
    return torch.tensor(pattern).repeat_interleave(cell, 0).repeat_interleave(cell, 1)


CHECKER = [[(i + j) % 2 for j in range(4)] for i in range(4)]
MAPS = {
    "two_groups": lambda b: _cells(CHECKER)[None],
    "three_groups": lambda b: _cells([[(i + 2 * j) % 3 for j in range(4)] for i in range(4)])[None],
    "per_sample": lambda b: torch.stack(
        [_cells(CHECKER), 1 - _cells(CHECKER), _cells([[i % 2] * 4 for i in range(4)])]
    )[:b],
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("size", [16, 15])
def test_single_group_equals_plain_op(name, size):
    factory, mixed, _ = OPS[name]
    module = factory()
    x = torch.randn(2, 4, size, size)
    plain = module(x)
    assert torch.equal(mixed(module, x, None), plain)
    one = mixed(module, x, torch.zeros(1, size, size, dtype=torch.long))
    assert one.shape == plain.shape and one.dtype == plain.dtype
    if "pool" in name:
        assert torch.equal(one, plain)
    else:
        torch.testing.assert_close(one, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("group_map", list(MAPS))
def test_no_information_across_groups(name, group_map):
    factory, mixed, stride = OPS[name]
    module = factory().double()
    groups = MAPS[group_map](3)
    x = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    in_one = (groups == 1)[:, None]
    x2 = x + torch.randn_like(x) * in_one

    out = mixed(module, x, groups)
    out2 = mixed(module, x2, groups)
    out_zero = (downsample_groups(groups, out.shape[-2:], stride) == 0)[:, None].expand_as(out)
    assert out_zero.any() and not out_zero.all()
    assert torch.equal(out[out_zero], out2[out_zero])
    assert not torch.equal(out[~out_zero], out2[~out_zero])  # the perturbation does reach group 1

    x = x.requires_grad_()
    (mixed(module, x, groups) * out_zero).sum().backward()
    grad_one = x.grad[in_one.expand_as(x)]
    assert torch.equal(grad_one, torch.zeros_like(grad_one))
    assert x.grad[~in_one.expand_as(x)].abs().sum() > 0


def test_plain_ops_do_mix_groups():
    # the perturbation test above is able to fail: a plain conv does see across a cell border
    conv = nn.Conv2d(4, 6, 3, 1, 1).double()
    groups = MAPS["two_groups"](1)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    x2 = x + torch.randn_like(x) * (groups == 1)[:, None]
    zero = (groups == 0)[:, None].expand(2, 6, 16, 16)
    assert not torch.equal(conv(x)[zero], conv(x2)[zero])


def test_partial_conv_rescaling_by_hand():
    conv = nn.Conv2d(1, 1, 3, 1, 1, bias=False)
    nn.init.ones_(conv.weight)
    groups = torch.zeros(1, 6, 6, dtype=torch.long)
    groups[:, :, 3:] = 1  # columns 0-2 are image 0, columns 3-5 image 1
    x = torch.ones(1, 1, 6, 6)
    out = mixed_conv2d(conv, x, groups)[0, 0]
    assert out[2, 2] == 9  # 6 own positions of 9, scaled by 9 / 6
    assert out[2, 3] == 9  # the same seen from image 1
    assert out[0, 0] == 4  # 4 in-bounds positions, all its own: 4 * 4 / 4, padding counts for nobody
    assert out[0, 2] == 6  # 6 in-bounds, 4 its own: 4 * 6 / 4
    # values of the other image do not enter, and the bias is added after rescaling, not scaled with it
    x[..., 3:] = 100.0
    conv.bias = nn.Parameter(torch.tensor([5.0]))
    out = mixed_conv2d(conv, x, groups)[0, 0]
    assert out[2, 2] == 9 + 5 and out[0, 0] == 4 + 5 and out[2, 3] == 900 + 5


@pytest.mark.parametrize("fixed_pad", [False, True])
def test_max_pool_by_hand(fixed_pad):
    # all values negative: masking other images with 0 instead of -inf would show up as 0
    torch.manual_seed(2)
    x = -1 - torch.rand(1, 1, 6, 6)
    groups = torch.zeros(1, 6, 6, dtype=torch.long)
    groups[:, :, 2:4] = 1
    pad, pool = nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 1, padding=0 if fixed_pad else 1)
    out = mixed_max_pool2d(pool, x, groups, pad=pad if fixed_pad else None)[0, 0]
    for i in range(6):
        for j in range(6):
            rows, cols = slice(max(i - 1, 0), i + 2), slice(max(j - 1, 0), j + 2)
            own = x[0, 0, rows, cols][groups[0, rows, cols] == groups[0, i, j]].max()
            at_border = i in (0, 5) or j in (0, 5)
            assert out[i, j] == (0.0 if fixed_pad and at_border else own)  # the pad's zeros are everyone's


@pytest.mark.parametrize("kernel,padding", [(3, 1), (7, 3), (1, 0)])
def test_downsample_groups_is_the_kernel_centre(kernel, padding):
    torch.manual_seed(1)
    groups = torch.randint(0, 3, (2, 8, 8)).repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2x2 cells
    out_hw = nn.Conv2d(1, 1, kernel, 2, padding)(torch.zeros(1, 1, 16, 16)).shape[-2:]
    out = downsample_groups(groups, out_hw, 2)
    assert out.shape == (2, *out_hw)
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            ci, cj = 2 * i - padding + kernel // 2, 2 * j - padding + kernel // 2
            assert torch.equal(out[:, i, j], groups[:, ci, cj])
    assert downsample_groups(groups, (5, 6), (2, 2)).shape == (2, 5, 6)  # cropped
    with pytest.raises(ValueError, match="smaller than the output size"):
        downsample_groups(groups, (9, 8), 2)


@pytest.mark.parametrize("per_sample", [False, True])
def test_group_norm_by_hand(per_sample):
    norm = _randomise_affine(nn.GroupNorm(2, 4)).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    groups = torch.zeros(2 if per_sample else 1, 4, 4, dtype=torch.long)
    groups[0, :, 1:3] = 1
    if per_sample:
        groups[1, 3] = 1
    expected = torch.empty_like(x)
    for b in range(2):
        g_map = groups[b % groups.shape[0]]
        for channels in (slice(0, 2), slice(2, 4)):
            for g in (0, 1):
                values = x[b, channels][:, g_map == g]
                mean, var = values.mean(), values.var(unbiased=False)
                expected[b, channels][:, g_map == g] = (values - mean) / torch.sqrt(var + norm.eps)
    expected = expected * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(mixed_group_norm(norm, x, groups), expected, rtol=1e-12, atol=1e-12)


def test_group_norm_single_group_float64():
    norm = _randomise_affine(GroupNormAct(4, 2)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = mixed_group_norm(norm, x, torch.zeros(2, 8, 8, dtype=torch.long))
    torch.testing.assert_close(out, norm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["std_conv_same_s2", "conv3x3_bias", "max_pool", "group_norm_act"])
def test_bf16_autocast_matches_float32(name):
    factory, mixed, _ = OPS[name]
    module = factory()
    groups = MAPS["two_groups"](1)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, plain_low = mixed(module, x, groups, num_groups=2), module(x)
    assert low.dtype == plain_low.dtype
    torch.testing.assert_close(low.float(), mixed(module, x, groups).detach(), rtol=0.05, atol=0.05)
    low.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_missing_group_and_bad_map():
    conv = nn.Conv2d(4, 6, 3, 1, 1)
    x = torch.randn(2, 4, 8, 8)
    groups = torch.zeros(1, 8, 8, dtype=torch.long)
    # an absent group (num_groups larger than needed) costs a wasted conv but changes nothing
    torch.testing.assert_close(mixed_conv2d(conv, x, groups, num_groups=3), conv(x), rtol=1e-5, atol=1e-5)
    norm = nn.GroupNorm(2, 4)
    torch.testing.assert_close(mixed_group_norm(norm, x, groups, num_groups=2), norm(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        mixed_conv2d(conv, x, torch.zeros(3, 8, 8, dtype=torch.long))
