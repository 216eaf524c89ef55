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
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
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


def _compare_fast_to_reference(num_groups, per_sample, ratio=0.5, b=3):
    ref = _encoder("reference")
    fast = _encoder("fast")
    fast.load_state_dict(ref.state_dict())
    groups = random_groups(ref.grids[-1], ratio, num_groups=num_groups, count=b if per_sample else 1)
    x = torch.randn(b, ref.grids[0][0] * ref.grids[0][1], ref.embed_dim)
    outs = {}
    for name, enc in [("ref", ref), ("fast", fast)]:
        xi = x.clone().requires_grad_(True)
        y = enc.forward_tokens(xi, groups, num_groups=num_groups)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)).sum().backward()
        outs[name] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert_close_scaled(outs["fast"][0], outs["ref"][0], 1e-5, "output")
    assert_close_scaled(outs["fast"][1], outs["ref"][1], 1e-5, "input gradient")
    for n, g in outs["ref"][2].items():
        assert_close_scaled(outs["fast"][2][n], g, 1e-5, n)


@pytest.mark.parametrize("mode", ["gather", "window_mask"])
@pytest.mark.parametrize("num_groups,ratio", [(2, 0.5), (2, 0.3), (4, 0.5)])
def test_both_fast_strategies_match_reference(monkeypatch, mode, num_groups, ratio):
    """Force the dense-gather plan (padded buckets, -inf key bias) or the shared per-window mask in
    every stage; uneven ratios make buckets with padding."""
    import mixmim.models.attention.layout as layout

    monkeypatch.setattr(layout, "_GATHER_MIN_SAVING", 0.0 if mode == "gather" else 2.0)
    _compare_fast_to_reference(num_groups, per_sample=False, ratio=ratio)


def test_gather_plan_covers_every_token_once():
    from mixmim.models.attention import GroupLayout

    ids = random_groups((4, 4), 0.5, num_groups=3).repeat_interleave(4, 1).repeat_interleave(4, 2)
    plan = GroupLayout.from_grid(ids, 8, 3).plan()
    assert plan.additive is None or plan.buckets == []
    if plan.additive is None:
        assert sorted(plan.gather[plan.scatter].tolist()) == list(range(ids.numel()))


def test_biased_attention_bias_gradient_matches_autograd():
    from mixmim.models.attention import biased_attention

    q, k, v = (torch.randn(3, 4, 10, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 10, 10, requires_grad=True)
    with torch.no_grad():
        bias[..., -2:] = float("-inf")  # padded keys
    out = biased_attention(q, k, v, bias, 0.3)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + bias, -1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, bias))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-5, atol=1e-5)


def test_flex_on_cpu_falls_back_to_fast_with_a_warning(monkeypatch):
    """The dispatcher, not FlexAttention, chooses the fast path off CUDA (warning once)."""
    import mixmim.models.attention as A

    ref, flx = _encoder("reference"), _encoder("flex")
    flx.load_state_dict(ref.state_dict())
    groups = random_groups(ref.grids[-1], 0.5, count=1)
    x = torch.randn(2, ref.grids[0][0] * ref.grids[0][1], ref.embed_dim)
    monkeypatch.setattr(A, "_warned", False)
    with pytest.warns(UserWarning, match="needs CUDA"):
        y = flx.forward_tokens(x, groups, num_groups=2)
    assert_close_scaled(y, ref.forward_tokens(x, groups, num_groups=2), 1e-5, "output")


@pytest.mark.parametrize("mode", ["masked", "gathered", "none"])
def test_fused_fast_attention_keeps_only_input_output_and_lse(monkeypatch, mode):
    """The CPU fast path keeps the block's input windows, its output and the log-sum-exps for the
    backward (q, k, v and the projection are recomputed), and still matches the reference."""
    import mixmim.models.attention as A
    import mixmim.models.attention.layout as layout

    monkeypatch.setattr(layout, "_GATHER_MIN_SAVING", 1.0 if mode == "masked" else 0.0)
    torch.manual_seed(0)
    fast, ref = A.WindowAttention(32, 2, 8, impl="fast"), A.WindowAttention(32, 2, 8, impl="reference")
    ref.load_state_dict(fast.state_dict())
    ids = random_groups((4, 4), 0.5, num_groups=2).repeat_interleave(4, 1).repeat_interleave(4, 2)
    layout = None if mode == "none" else A.GroupLayout.from_grid(ids, 8, 2)
    x = torch.randn(3, 4, 64, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fast(x, layout)
    assert A.fused_attention_applies(x, 0.0)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}
    assert len(big) <= 2  # x and the attention output (kept by the output projection too)
    want = ref(x, layout)
    assert_close_scaled(out, want, 1e-5, "output")
    w = torch.randn_like(out)
    params = [p for _, p in sorted(fast.named_parameters())]
    got = torch.autograd.grad((out * w).sum(), [x, *params])
    exp = torch.autograd.grad((want * w).sum(), [x, *[p for _, p in sorted(ref.named_parameters())]])
    for a, b in zip(got, exp):
        assert_close_scaled(a, b, 1e-5, "gradient")


def test_auto_attention_is_fast_on_cpu_and_checks_flex_before_trusting_it(monkeypatch):
    """attention_impl="auto" (the default) runs the fast path on the CPU; on CUDA it uses FlexAttention
    only after a self-check, and falls back to the fast path when the check fails or errors. The
    self-check runs here on the CPU with stand-ins for FlexAttention (the real one raises off CUDA)."""
    import mixmim.models.attention as A

    assert A.resolve_auto(torch.device("cpu")) == "fast"
    assert A.resolve_auto(torch.device("cuda"), dropout=0.1) == "fast"
    assert A.choose_impl("reference", torch.device("cpu")) == "reference"
    monkeypatch.setattr(A, "flex_window_attention", A.fast_window_attention)  # a flex that agrees
    assert A._flex_self_check(torch.device("cpu"))

    def off(*args, **kwargs):
        return A.fast_window_attention(*args, **kwargs) + 1e-2

    monkeypatch.setattr(A, "flex_window_attention", off)
    with pytest.warns(UserWarning, match="differs from the fast path"):
        assert not A._flex_self_check(torch.device("cpu"))

    def broken(*args, **kwargs):
        raise RuntimeError("no triton")

    monkeypatch.setattr(A, "flex_window_attention", broken)
    with pytest.warns(UserWarning, match="FlexAttention failed"):
        assert not A._flex_self_check(torch.device("cpu"))


def test_flex_itself_refuses_a_cpu_tensor():
    """FlexAttention never falls back by itself: the dispatcher (choose_impl) does."""
    from mixmim.models.attention import flex_window_attention, relative_position_index

    q = torch.randn(1, 1, 1, 16, 8)
    with pytest.raises(ValueError, match="CUDA only"):
        flex_window_attention(q, q, q, torch.zeros(49, 1), relative_position_index(4), None, 0.3)


def test_auto_self_check_under_bf16_autocast_trusts_a_correct_flex_and_refuses_a_wrong_one(monkeypatch):
    """Issue 33: the self-check runs inside the first forward, under the run's autocast. In bf16 two
    correct implementations differ by about 1e-2, above the check's 1e-3, so every bf16 run fell back to
    the fast path. The check now runs in float32 outside autocast: a flex that computes the same maths
    another way (here the reference path) passes under bf16 autocast, a planted error still fails."""
    import mixmim.models.attention as A

    def same_maths(q, k, v, table, rel_index, layout, scale, dropout=0.0):
        n = q.shape[-2]
        bias = table[rel_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        return A.reference_window_attention(q, k, v, bias, layout, scale)

    monkeypatch.setattr(A, "flex_window_attention", same_maths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A._flex_self_check(torch.device("cpu"))

    def off(*args, **kwargs):
        return same_maths(*args, **kwargs) + 2e-3

    monkeypatch.setattr(A, "flex_window_attention", off)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="differs from the fast path"):
        assert not A._flex_self_check(torch.device("cpu"))


class _NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: what PyTorch reports of some flex backward passes."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_auto_self_check_refuses_a_flex_whose_gradients_are_wrong_or_not_finite(monkeypatch):
    """The self-check backpropagates too: a flex with the right outputs and NaN gradients (PyTorch has
    reported them for lengths that are not multiples of 128 with a score_mod), or a wrong bias-table
    gradient, sends "auto" to the fast path."""
    import mixmim.models.attention as A

    def nan_backward(*args, **kwargs):
        return _NaNGradient.apply(A.fast_window_attention(*args, **kwargs))

    monkeypatch.setattr(A, "flex_window_attention", nan_backward)
    with pytest.warns(UserWarning, match="differs from the fast path by inf"):
        assert not A._flex_self_check(torch.device("cpu"))

    def table_twice(q, k, v, table, *args, **kwargs):  # the table's gradient doubled, the output the same
        return A.fast_window_attention(q, k, v, 2 * table - table.detach(), *args, **kwargs)

    monkeypatch.setattr(A, "flex_window_attention", table_twice)
    with pytest.warns(UserWarning, match="output or gradients"):
        assert not A._flex_self_check(torch.device("cpu"))


def test_bucket_plan_is_the_same_optimum_over_runs_of_equal_lengths():
    """Issue 33: the plan's buckets, computed over the runs of equal lengths, have the cost of the
    optimum over every cut (the quadratic programme it replaced, kept here as the reference), and a
    per-sample plan's 20 000 sequences take a programme over at most window^2 + 1 runs."""
    import random

    from mixmim.models.attention.layout import _bucket_lengths

    def reference(lengths, overhead):
        n = len(lengths)
        best = [0.0] + [float("inf")] * n
        for j in range(1, n + 1):
            for i in range(j):
                best[j] = min(best[j], best[i] + (j - i) * lengths[i] ** 2 + overhead)
        return best[n]

    def cost(lengths, ends, overhead):
        starts = [0] + ends[:-1]
        return sum((e - s) * lengths[s] ** 2 + overhead for s, e in zip(starts, ends))

    rng = random.Random(0)
    for _ in range(200):
        n, window = rng.randint(1, 60), rng.choice([2, 4, 7])
        lengths = sorted((rng.randint(1, window * window) for _ in range(n)), reverse=True)
        overhead = rng.choice([0.0, 1.0, window**4 / 2, 1e6])
        ends = _bucket_lengths(lengths, overhead)
        assert ends[-1] == n and ends == sorted(set(ends))
        assert cost(lengths, ends, overhead) == pytest.approx(reference(lengths, overhead))
    many = sorted((rng.randint(1, 49) for _ in range(20000)), reverse=True)
    ends = _bucket_lengths(many, 49 * 49 / 2)
    assert ends[-1] == 20000 and len(ends) <= 50
