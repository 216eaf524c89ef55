"""Masked self-attention (MixMIM section 2.3): no information crosses images, at any stage."""

import pytest
import torch

from conftest import TINY_ENCODER
from mixmim.methods.masking import random_groups
from mixmim.models.mixmim_vit import MixMIMTransformer


def _encoder(impl):
    enc = MixMIMTransformer(**TINY_ENCODER, attention_impl=impl)
    # Non-zero relative bias so that the bias gradients are exercised as well.
    for p in enc.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    return enc


def _stage_ids(enc, groups, stage):
    ids = enc.stage_groups(groups, stage)
    return ids.reshape(ids.shape[0], -1)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("num_groups", [2, 3])
def test_no_gradient_crosses_groups_at_any_stage(impl, per_sample, num_groups):
    enc = _encoder(impl)
    b = 3
    groups = random_groups(enc.grids[-1], 0.5, num_groups=num_groups, count=b if per_sample else 1)
    x = torch.randn(b, enc.grids[0][0] * enc.grids[0][1], enc.embed_dim, requires_grad=True)
    outs = enc.forward_stages(x, groups, num_groups=num_groups)
    in_ids = _stage_ids(enc, groups, 0).expand(b, -1)
    for stage, out in enumerate(outs):
        ids = _stage_ids(enc, groups, stage).expand(b, -1)
        for g in range(num_groups):
            (grad,) = torch.autograd.grad((out * (ids == g).unsqueeze(-1)).sum(), x, retain_graph=True)
            other = grad.abs().sum(-1)[in_ids != g]
            own = grad.abs().sum(-1)[in_ids == g]
            assert torch.count_nonzero(other) == 0, f"stage {stage + 1}: group {g} sees other groups"
            assert own.sum() > 0


def test_gradient_does_cross_without_restriction():
    """The check above can fail: with plain attention information flows between the images."""
    enc = _encoder("fast")
    groups = random_groups(enc.grids[-1], 0.5, count=1)
    x = torch.randn(2, enc.grids[0][0] * enc.grids[0][1], enc.embed_dim, requires_grad=True)
    out = enc.forward_stages(x, groups, restrict_attention=False)[-1]
    ids = _stage_ids(enc, groups, 3).expand(2, -1)
    (grad,) = torch.autograd.grad((out * (ids == 0).unsqueeze(-1)).sum(), x)
    in_ids = _stage_ids(enc, groups, 0).expand(2, -1)
    assert grad.abs().sum(-1)[in_ids == 1].sum() > 0


def assert_close_scaled(actual, expected, tol, msg=""):
    """|a - b| <= tol * max|b|: float32 gradients are sums of thousands of terms."""
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{msg}: max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("num_groups", [2, 3, 4, 5])
def test_fast_path_matches_reference_outputs_and_gradients(per_sample, num_groups, dtype, tol):
    ref = _encoder("reference").to(dtype)
    fast = _encoder("fast").to(dtype)
    fast.load_state_dict(ref.state_dict())
    b = 5
    groups = random_groups(ref.grids[-1], 0.5, num_groups=num_groups, count=b if per_sample else 1)
    x = torch.randn(b, ref.grids[0][0] * ref.grids[0][1], ref.embed_dim, dtype=dtype)
    outs = {}
    for name, enc in [("ref", ref), ("fast", fast)]:
        xi = x.clone().requires_grad_(True)
        y = enc.forward_tokens(xi, groups, num_groups=num_groups)
        w = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        (y * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        outs[name] = (y.detach(), xi.grad, grads)
    assert_close_scaled(outs["fast"][0], outs["ref"][0], tol, "output")
    assert_close_scaled(outs["fast"][1], outs["ref"][1], tol, "input gradient")
    assert outs["fast"][2].keys() == outs["ref"][2].keys()
    for n in outs["ref"][2]:
        assert_close_scaled(outs["fast"][2][n], outs["ref"][2][n], tol, n)


def test_fast_path_without_groups_matches_reference():
    ref, fast = _encoder("reference"), _encoder("fast")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
