"""What the CUDA paths need, checked on the CPU (issue 33): a training step reads nothing back from
the device (run on PyTorch's ``meta`` device, where any read of a device value raises), the attention
plan is built in tensor code whose work does not grow per sequence, and the plan equals the plain
per-sequence construction it replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import mixmim
from conftest import TINY
from mixmim.models.attention import layout as layout_module
from mixmim.models.attention.layout import relative_position_index, window_partition
from mixmim.models.base import host_groups, upload_groups


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_a_training_step_reads_nothing_back_from_the_device(impl, per_sample):
    """Forward and backward of a MixMIM step with the model and images on ``meta``: a ``.cpu()``,
    ``.item()``, ``.tolist()`` or data-dependent shape of a device tensor raises there (on a GPU each
    would wait for all queued work). The masks are drawn on the host and the attention plans built
    from the host copy (before the fix every stage copied its group ids back)."""
    model = mixmim.create_pretrainer("mixmim", "mixmim_tiny", attention_impl=impl, mask_per_sample=per_sample,
                                     **TINY).to("meta")
    images = torch.empty(4, 3, TINY["img_size"], TINY["img_size"], device="meta")
    out = model(images)
    assert out.loss.device.type == "meta"
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None


def test_uploaded_group_maps_keep_their_host_copy():
    groups = torch.randint(0, 2, (3, 4, 4))
    assert host_groups(groups) is groups
    moved = upload_groups(groups, torch.device("meta"))
    assert moved.device.type == "meta" and host_groups(moved) is groups
    assert host_groups(torch.empty(1, 4, 4, device="meta")) is None  # a map made on the device has none


def _plain_plan(ids: torch.Tensor, window: int, n: int) -> tuple[list, torch.Tensor, list]:
    """The per-sequence construction the plan had (a Python loop over every sequence): buckets,
    gather index and per-bucket relative-position rows, from the same bucket cuts."""
    g, nw, _ = ids.shape
    flat = ids.reshape(-1)
    key = torch.arange(g * nw).repeat_interleave(n) * (int(flat.max()) + 1) + flat
    order = torch.sort(key, stable=True).indices
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    seqs = sorted(zip(counts.tolist(), starts.tolist()), key=lambda c: -c[0])
    ends = layout_module._bucket_lengths([c for c, _ in seqs], overhead=n * n / 2)
    rpi = relative_position_index(window)
    pad_row = (2 * window - 1) ** 2
    buckets, gather, rel_index, begin = [], [], [], 0
    for end in ends:
        length = seqs[begin][0]
        tokens = torch.stack([F.pad(order[s:s + c], (0, length - c)) for c, s in seqs[begin:end]])
        valid = torch.arange(length) < torch.tensor([c for c, _ in seqs[begin:end]])[:, None]
        local = tokens % n
        rel = rpi[local[:, :, None], local[:, None, :]]
        rel_index.append(torch.where(valid[:, None, :], rel, pad_row))
        gather.append(tokens.reshape(-1))
        buckets.append((end - begin, length))
        begin = end
    return buckets, torch.cat(gather), rel_index


def test_vectorised_plan_equals_the_per_sequence_construction():
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(150):
        window = int(torch.randint(2, 8, (1,), generator=g))
        side = window * int(torch.randint(1, 4, (1,), generator=g))
        cell = int(torch.randint(1, 4, (1,), generator=g))
        cells = torch.randint(0, int(torch.randint(1, 4, (1,), generator=g)),
                              (int(torch.randint(1, 5, (1,), generator=g)), -(-side // cell), -(-side // cell)),
                              generator=g)
        ids = window_partition(cells.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :side, :side], window)
        plan = layout_module._build_plan(ids, window, torch.device("cpu"))
        if not plan.gathered:
            continue
        buckets, gather, rel_index = _plain_plan(ids, window, window * window)
        assert plan.buckets == buckets
        assert torch.equal(plan.gather, gather)
        for ours, theirs in zip(plan.rel_index, rel_index):
            assert torch.equal(ours.long(), theirs)
        checked += 1
    assert checked > 50


class _CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [16, 128])
def test_per_sample_plan_does_tensor_work_per_bucket_not_per_sequence(batch):
    """Per-sample masks at batch 128 give thousands of sequences; the plan's torch calls are bounded by
    its buckets (at most N + 1 lengths), so its cost is linear in the batch (the sizes of a few
    tensor ops), where the per-sequence loop made two calls for every sequence."""
    g = torch.Generator().manual_seed(1)
    cells = torch.randint(0, 2, (batch, 7, 7), generator=g)
    ids = window_partition(cells.repeat_interleave(8, 1).repeat_interleave(8, 2), 14)  # mixmim_base stage 1
    with _CountOps() as counter:
        plan = layout_module._build_plan(ids, 14, torch.device("cpu"))
    sequences = sum(count for count, _ in plan.buckets)
    assert sequences > 1000 * batch // 128
    assert counter.calls <= 40 + 25 * len(plan.buckets), (counter.calls, len(plan.buckets))


def _naive(q, k, v, bias, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1) @ v


@pytest.mark.parametrize("kernel_lse", [True, False])
def test_biased_attention_matches_autograd_with_and_without_the_kernels_log_sum_exp(monkeypatch, kernel_lse):
    """The CPU route (fused kernel, its log-sum-exp) and the route every other device takes (SDPA with a
    constant bias, the log-sum-exp recomputed in the backward) give autograd's outputs and gradients."""
    from mixmim.models.attention import fast

    monkeypatch.setattr(fast, "_flash_kernel_applies", lambda q: kernel_lse)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 20, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 20, 20, generator=g)
    bias[..., 5:9] = float("-inf")  # padded keys, as the plan's spare row gives them
    bias.requires_grad_(True)
    weights = torch.randn(3, 4, 20, 8, generator=g)
    ours = fast.biased_attention(q, k, v, bias, 8**-0.5)
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v, bias))
    want = _naive(q, k, v, bias, 8**-0.5)
    expected = torch.autograd.grad((want * weights).sum(), (q, k, v, bias))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(exp), rtol=1e-4, atol=1e-5)


def _largest_square(batch: int, monkeypatch) -> int:
    """The largest (..., L, L) tensor the backward of biased attention on ``batch`` images creates, on
    the route the GPU takes, with a recompute budget of one image per chunk (the forward is SDPA's
    fused kernel on a GPU; on the CPU under a dispatch mode it is decomposed, so it is not measured)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mixmim.models.attention import fast

    heads, length = 2, 24
    monkeypatch.setattr(fast, "_flash_kernel_applies", lambda q: False)
    monkeypatch.setattr(fast, "_RECOMPUTE_BUDGET", heads * length * length)
    largest = [0]

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (length, length):
                    largest[0] = max(largest[0], t.numel())
            return out

    q, k, v = (torch.randn(batch, heads, length, 4, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, heads, length, length, requires_grad=True)
    out = fast.biased_attention(q, k, v, bias, 0.5).sum()
    with Sizes():
        out.backward()
    assert bias.grad is not None and bias.grad.shape == bias.shape
    return largest[0]


def test_bias_memory_does_not_grow_with_the_batch(monkeypatch):
    """The relative-position bias is shared by the batch and so is its gradient: no (B, heads, L, L)
    tensor exists on the route CUDA takes (SDPA's memory-efficient kernel, asked for the bias
    gradient, writes one: 3.4 GiB at mixmim_base's batch 128, and as much again for the bias)."""
    assert _largest_square(2, monkeypatch) == _largest_square(16, monkeypatch) == 2 * 24 * 24


def test_bf16_attention_on_the_cpu_is_the_matmul_path_with_the_same_function():
    """bf16 on a CPU: biased attention runs as matmuls (the fused flash kernel is slower in bf16 there),
    the same function as the float32 kernel path to bf16's resolution, bias gradient included."""
    from mixmim.models.attention import fast

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 20, 20, generator=g)
    bias[..., 15:] = float("-inf")
    want = fast.biased_attention(q, k, v, bias, 8**-0.5)  # float32: the fused kernel's route
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    tb = bias.bfloat16().requires_grad_(True)
    called = []
    original = fast._flash_cpu
    try:
        fast._flash_cpu = lambda *a, **kw: called.append(1) or original(*a, **kw)
        got = fast.biased_attention(qb, kb, vb, tb, 8**-0.5)
    finally:
        fast._flash_cpu = original
    assert not called and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.03)
    got.float().sum().backward()
    assert tb.grad is not None and torch.isfinite(tb.grad).all()


def test_bf16_training_on_the_cpu_turns_the_fused_kernels_off(tmp_path, capsys):
    """The loop gives timm's attention layers the matmul path for bf16 on the CPU, and says so."""
    from mixmim.models.base import use_matmul_attention

    model = mixmim.create_pretrainer("mae", "vit_tiny", img_size=32, patch_size=8, embed_dim=16, depth=2,
                                     num_heads=2, decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    assert len(fused) == 3 and use_matmul_attention(model) == 3  # 2 encoder + 1 decoder blocks
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    from mixmim.cli import main

    assert main(["pretrain", f"output_dir={tmp_path}", "name=r", "method.name=mae", "model.name=vit_tiny",
                 "model.img_size=32", "model.options={patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2}",
                 "method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_num_heads=2",
                 "data.source=bundled", "data.bundled_epoch_size=8", "train.batch_size=4", "train.max_steps=2",
                 "train.num_workers=0", "train.progress=false", "train.amp=bf16", "train.device=cpu"]) == 0
    assert "3 attention layers use matmuls" in (tmp_path / "r" / "log.txt").read_text()
