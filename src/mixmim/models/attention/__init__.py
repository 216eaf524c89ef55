"""Window self-attention that never lets tokens of different images (groups) see each other.

MixMIM section 2.3, "masked self-attention": each token aggregates only from tokens of its own image,
with the mixing mask upsampled to every stage. Three implementations compute the same function:

- ``reference`` (:mod:`.reference`): the public release's maths, the ground truth the faster paths
  are tested against;
- ``fast`` (:mod:`.fast`): each (window, group) gathered into a dense sequence, or one shared mask
  per window; no (L, L) matrix kept on CPU;
- ``flex`` (:mod:`.flex`): FlexAttention block masks, CUDA only.

The geometry they share (windows, relative positions, the group layout and its plan) is
:mod:`.layout`. This module holds the :class:`WindowAttention` layer and the one place that decides
which implementation serves a call:

- ``auto`` (the default): the fastest correct path for the device of each call: ``flex`` on CUDA,
  once a small self-check of its output against ``fast`` has passed there (a failing or erroring
  check falls back to ``fast`` with a warning), and ``fast`` everywhere else or with attention
  dropout (which FlexAttention does not take);
- ``flex`` asked for on a device other than CUDA: ``fast`` (the same function) with a one-time
  warning, so a configuration written for a GPU still runs on a laptop.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from mixmim.models.attention.fast import (
    _FusedWindowAttention,
    biased_attention,
    fast_qkv_attention,
    fast_window_attention,
    fused_attention_applies,
)
from mixmim.models.attention.flex import flex_window_attention
from mixmim.models.attention.layout import (
    GroupLayout,
    GroupPlan,
    relative_position_index,
    window_partition,
    window_reverse,
)
from mixmim.models.attention.reference import reference_window_attention

__all__ = ["ATTENTION_IMPLS", "AttentionImpl", "GroupLayout", "GroupPlan", "WindowAttention", "biased_attention",
           "choose_impl", "fast_qkv_attention", "fast_window_attention", "flex_window_attention",
           "reference_window_attention", "relative_position_index", "resolve_auto", "window_partition",
           "window_reverse"]

AttentionImpl = Literal["auto", "reference", "fast", "flex"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "reference", "fast", "flex")

_AUTO_CHOICE: dict[str, str] = {}  # device -> implementation chosen by "auto"
_warned = False  # the one-time warning of "flex" asked for off CUDA


@torch.compiler.disable
def resolve_auto(device: torch.device, dropout: float = 0.0) -> str:
    """What ``attention_impl="auto"`` runs on ``device``: ``flex`` on CUDA after a self-check, else ``fast``."""
    if device.type != "cuda" or dropout > 0:
        return "fast"
    key = str(device)
    if key not in _AUTO_CHOICE:
        _AUTO_CHOICE[key] = "flex" if _flex_self_check(device) else "fast"
    return _AUTO_CHOICE[key]


@torch.compiler.disable
def _flex_off_cuda(device: torch.device) -> str:
    """``flex`` asked for on a device without FlexAttention: ``fast``, with a warning once per process."""
    global _warned
    if not _warned:
        warnings.warn(f"attention_impl='flex' needs CUDA; using the equivalent 'fast' path on {device.type}",
                      stacklevel=3)
        _warned = True
    return "fast"


def choose_impl(impl: str, device: torch.device, dropout: float = 0.0) -> str:
    """The implementation that serves a call asked to run ``impl`` on ``device`` (the dispatcher):
    ``auto`` resolved by :func:`resolve_auto`, ``flex`` off CUDA replaced by ``fast`` (warned once);
    ``reference`` and ``fast`` as asked."""
    if impl == "auto":
        return resolve_auto(device, dropout)
    if impl == "flex" and device.type != "cuda":
        return _flex_off_cuda(device)
    return impl


def _flex_self_check(device: torch.device, tol: float = 1e-3) -> bool:
    """FlexAttention against the fast path on a small grouped window problem, on ``device``, in float32
    outside any autocast: the check runs inside the first forward, and under a bf16 autocast two correct
    implementations differ by about 1e-2 (bf16's resolution), which would send every bf16 run to the
    fast path. Whether flex is *correct* is a float32 question; the tolerance is float32's."""
    with torch.autocast(device_type=device.type, enabled=False):
        return _compare_flex(device, tol)


def _compare_flex(device: torch.device, tol: float) -> bool:
    """Outputs and gradients (q, k, v and the bias table) of flex against the fast path on 64 tokens
    (not a multiple of FlexAttention's 128-token blocks, where PyTorch has reported NaN gradients of a
    score_mod): every gradient finite and within ``tol`` relative to its largest value."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        window, heads, dim = 4, 2, 16
        inputs = [torch.randn(2, 4, heads, window * window, dim, generator=g) for _ in range(3)]
        inputs.append(torch.randn((2 * window - 1) ** 2, heads, generator=g))
        weights = torch.randn(2, 4, heads, window * window, dim, generator=g).to(device)
        ids = (torch.arange(64).reshape(8, 8) // 4 % 2).unsqueeze(0).to(device)  # 4x4-token cells, two groups
        index = relative_position_index(window).to(device)
        results = []
        for attention in (flex_window_attention, fast_window_attention):
            q, k, v, table = (t.to(device).requires_grad_(True) for t in inputs)
            out = attention(q, k, v, table, index, GroupLayout.from_grid(ids, window, 2), dim**-0.5)
            grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v, table))
            results.append((out.detach().float(), [t.float() for t in grads]))
        (flex, flex_grads), (fast, fast_grads) = results
        error = float((flex - fast).abs().max())
        for got, want in zip(flex_grads, fast_grads):
            if not bool(torch.isfinite(got).all()):
                error = float("inf")
                break
            error = max(error, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
        if error <= tol:
            return True
        warnings.warn(f"attention_impl='auto': FlexAttention differs from the fast path by {error:.2e} on {device} "
                      "(output or gradients); using 'fast'", stacklevel=3)
    except Exception as exc:  # a missing or broken compiler stack must not stop training
        warnings.warn(f"attention_impl='auto': FlexAttention failed on {device} ({exc.__class__.__name__}: {exc}); "
                      "using 'fast'", stacklevel=3)
    return False


class WindowAttention(nn.Module):
    """Multi-head self-attention in square windows with a learned relative position bias
    (Swin Transformer), optionally restricted to tokens of the same group (MixMIM section 2.3)."""

    relative_position_index: Tensor  # buffer

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: AttentionImpl = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        self.dim, self.num_heads, self.window_size, self.impl = dim, num_heads, window_size, impl
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Rebuilt from the window size, so checkpoints need not carry it and windows can change.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, layout: GroupLayout | None = None) -> Tensor:
        """``x``: (B, nW, N, C) windows of B images; returns the same shape."""
        b, nw, n, c = x.shape
        drop = self.attn_drop if self.training else 0.0
        impl = self.impl if self.impl in ("reference", "fast") else choose_impl(self.impl, x.device, drop)
        table, index = self.relative_position_bias_table, self.relative_position_index
        if impl == "fast" and fused_attention_applies(x, drop):
            out = _FusedWindowAttention.apply(x, self.qkv.weight, self.qkv.bias, table, index, layout,
                                              self.num_heads, self.scale)
            return self.proj_drop(self.proj(out))
        qkv = self.qkv(x)
        if impl == "fast":
            out = fast_qkv_attention(qkv, self.num_heads, table, index, layout, self.scale, drop)
            return self.proj_drop(self.proj(out))
        q, k, v = qkv.reshape(b, nw, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
        if impl == "flex":
            out = flex_window_attention(q, k, v, table, index, layout, self.scale, drop)
        else:
            out = reference_window_attention(q, k, v, self.relative_bias().to(q.dtype), layout, self.scale,
                                             self.attn_drop, self.training)
        return self.proj_drop(self.proj(out.transpose(2, 3).reshape(b, nw, n, c)))
