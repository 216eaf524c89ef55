"""Window self-attention that never lets tokens of different images (groups) see each other.

MixMIM section 2.3, "masked self-attention": each token aggregates only from tokens of its own image,
with the mixing mask upsampled to every stage. Three implementations compute the same function:

- ``reference``: the public release's maths. The full attention matrix is built and ``1e30`` is
  subtracted across groups, with a mask rebuilt for every image and window. Kept as the ground
  truth the faster paths are tested against.
- ``fast``: every non-empty (window, group) of a stage is gathered into a dense sequence (with one
  mask per batch these are the same token sets for every image, so the plan is built once per stage
  and the batch axis stays), sequences are bucketed by length and padded with a -inf key bias, and
  no query-key pair across groups is computed. Where gathering would remove too few pairs (windows
  that straddle few cells) one 0/-inf mask per window, shared by the batch, is used instead. On CPU
  attention runs through the fused flash kernel, which keeps no (L, L) matrix; the backward
  recomputes it in chunks and also returns the relative-position-bias gradient.
  In eager CPU training without dropout or autocast the ``qkv`` projection joins the same autograd
  node, which keeps only the block's input, its output and the log-sum-exps and recomputes the rest.
- ``flex``: FlexAttention block masks (CUDA only), see :mod:`mixmim.models.flex`.
- ``auto`` (the default): the fastest correct path for the device of each call: ``flex`` on CUDA,
  once a small self-check of its output against ``fast`` has passed there (a failing or erroring
  check falls back to ``fast`` with a warning), and ``fast`` everywhere else or with attention
  dropout (which FlexAttention does not take).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["auto", "reference", "fast", "flex"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "reference", "fast", "flex")

_AUTO_CHOICE: dict[str, str] = {}  # device type -> implementation chosen by "auto"


@torch.compiler.disable
def resolve_auto(device: torch.device, dropout: float = 0.0) -> str:
    """What ``attention_impl="auto"`` runs on ``device``: ``flex`` on CUDA after a self-check, else ``fast``."""
    if device.type != "cuda" or dropout > 0:
        return "fast"
    key = str(device)
    if key not in _AUTO_CHOICE:
        _AUTO_CHOICE[key] = "flex" if _flex_self_check(device) else "fast"
    return _AUTO_CHOICE[key]


def _flex_self_check(device: torch.device, tol: float = 1e-3) -> bool:
    """FlexAttention against the fast path on a small grouped window problem, on ``device``."""
    import warnings

    try:
        from mixmim.models.flex import flex_window_attention

        g = torch.Generator(device="cpu").manual_seed(0)
        window, heads, dim = 4, 2, 16
        q, k, v = (torch.randn(2, 4, heads, window * window, dim, generator=g).to(device) for _ in range(3))
        table = torch.randn((2 * window - 1) ** 2, heads, generator=g).to(device)
        ids = (torch.arange(64).reshape(8, 8) // 4 % 2).unsqueeze(0)  # 4x4-token cells, two groups
        layout = GroupLayout.from_grid(ids.to(device), window, 2)
        index = relative_position_index(window).to(device)
        flex = flex_window_attention(q, k, v, table, index, layout, dim**-0.5)
        fast = fast_window_attention(q, k, v, table, index, GroupLayout.from_grid(ids.to(device), window, 2),
                                     dim**-0.5)
        error = float((flex.float() - fast.float()).abs().max())
        if error <= tol:
            return True
        warnings.warn(f"attention_impl='auto': FlexAttention differs from the fast path by {error:.2e} on {device}; "
                      "using 'fast'", stacklevel=3)
    except Exception as exc:  # a missing or broken compiler stack must not stop training
        warnings.warn(f"attention_impl='auto': FlexAttention failed on {device} ({exc.__class__.__name__}: {exc}); "
                      "using 'fast'", stacklevel=3)
    return False


def relative_position_index(window: int) -> Tensor:
    """(N, N) index into a ((2w - 1)^2, heads) table of the relative offset between two tokens of a
    w x w window, row-major; the Swin Transformer layout used by the release."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, ...) -> (B, nW, window*window, ...), windows and tokens in row-major order."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // window, window, w // window, window, *rest)
    x = x.transpose(2, 3)
    return x.reshape(b, (h // window) * (w // window), window * window, *rest)


def window_reverse(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B, nW, window*window, C) -> (B, H, W, C)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(b, h, w, c)


# Per-call budget (elements) for the attention matrices materialised in the backward recompute.
_RECOMPUTE_BUDGET = 1 << 23


@dataclass(eq=False)
class GroupPlan:
    """Dense per-(window, group) sequences of one stage, bucketed by length.

    Every non-empty (image, window, group) triple becomes one sequence of the tokens it holds; the
    sequences are sorted by length and cut into buckets, each padded to its longest member. With a
    shared mask the sequences are the same for every image, so the leading batch axis stays and the
    bias of a bucket is built once for the whole batch.
    """

    gather: Tensor  # (P,) flat token index of every padded sequence position (pads point at token 0)
    scatter: Tensor  # (T,) position of every flat token in the gathered order
    buckets: list[tuple[int, int]]  # (number of sequences, padded length) per bucket, in gather order
    rel_index: list[Tensor]  # per bucket (n, L, L) row of the bias table; padded keys -> the extra row
    additive: Tensor | None = None  # (nW, 1, N, N) 0 / -inf: set when gathering would not pay off


# Gather into dense sequences only when it removes at least this share of the query-key pairs; below
# that the copies cost more than the saved pairs and one mask per window (shared by the batch) wins.
_GATHER_MIN_SAVING = 0.4


@dataclass(eq=False)
class GroupLayout:
    """Which group (source image) each token of one stage belongs to, windowed for attention.

    ``ids`` is (G, nW, N) with G == 1 when the whole batch shares one mask and G == B otherwise.
    The derived plan is computed once per stage and reused by all of its blocks.
    """

    ids: Tensor
    num_groups: int
    window: int = 0
    _plan: GroupPlan | None = field(default=None, repr=False)

    @classmethod
    def from_grid(cls, ids: Tensor, window: int, num_groups: int) -> "GroupLayout":
        """``ids``: (G, H, W) group ids on this stage's grid."""
        return cls(window_partition(ids, window), num_groups, window)

    @property
    def shared(self) -> bool:
        return self.ids.shape[0] == 1

    @torch.compiler.disable
    def plan(self) -> GroupPlan:
        """Built on first use (data dependent, host side; kept out of compiled graphs)."""
        if self._plan is None:
            self._plan = _build_plan(self.ids, self.window or int(round(self.ids.shape[-1] ** 0.5)))
        return self._plan


def _bucket_lengths(lengths: list[int], overhead: float) -> list[int]:
    """Cut lengths sorted in descending order into contiguous buckets minimising
    sum(count * longest^2) + overhead per bucket (attention work plus a fixed cost per kernel call)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[i] ** 2 + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


def _build_plan(ids: Tensor, window: int) -> GroupPlan:
    device = ids.device
    ids = ids.cpu()
    g, nw, n = ids.shape
    flat = ids.reshape(-1)
    # Stable sort by (image, window, group) keeps the row-major token order inside every sequence.
    key = torch.arange(g * nw).repeat_interleave(n) * (int(flat.max()) + 1) + flat
    order = torch.sort(key, stable=True).indices
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    seqs = sorted(zip(counts.tolist(), starts.tolist()), key=lambda c: -c[0])
    ends = _bucket_lengths([c for c, _ in seqs], overhead=n * n / 2)
    rpi = relative_position_index(window)
    pad_row = (2 * window - 1) ** 2
    gather, real, buckets, rel_index, begin = [], [], [], [], 0
    for end in ends:
        length = seqs[begin][0]
        sizes = torch.tensor([c for c, _ in seqs[begin:end]])
        tokens = torch.stack([F.pad(order[start:start + count], (0, length - count))
                              for count, start in seqs[begin:end]])  # (n_b, L) flat token index
        valid = torch.arange(length) < sizes[:, None]
        local = tokens % n
        rel = rpi[local[:, :, None], local[:, None, :]]
        rel_index.append(torch.where(valid[:, None, :], rel, pad_row).to(device))
        gather.append(tokens.reshape(-1))
        real.append(valid.reshape(-1))
        buckets.append((end - begin, length))
        begin = end
    if g == 1 and sum(c * length**2 for c, length in buckets) > (1 - _GATHER_MIN_SAVING) * nw * n * n:
        same = ids[0, :, :, None] == ids[0, :, None, :]
        additive = torch.zeros(same.shape).masked_fill_(~same, float("-inf")).unsqueeze(1)
        return GroupPlan(torch.empty(0), torch.empty(0), [], [], additive.to(device))
    gather_all, is_real = torch.cat(gather), torch.cat(real)
    scatter = torch.empty(g * nw * n, dtype=torch.long)
    scatter[gather_all[is_real]] = torch.nonzero(is_real).flatten()
    return GroupPlan(gather_all.to(device), scatter.to(device), buckets, rel_index)


class _BiasedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with a learnable bias shared over the leading axis.

    Forward: PyTorch's fused CPU flash kernel, which keeps only the output and the log-sum-exp
    (no (L, L) matrix survives the forward). Backward: the attention matrix is recomputed in chunks
    from the log-sum-exp, which also yields the bias gradient that the fused backward does not
    provide (the same recompute as FlashAttention's backward, Dao 2022, section 3.1)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                             attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = _attention_grads(q, k, v, bias, out, lse, grad_out, ctx.scale)
        return dq, dk, dv, dbias.to(bias.dtype) if ctx.needs_input_grad[3] else None, None


def _attention_grads(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                     scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of softmax(q k^T * scale + bias) v from the output and its log-sum-exp: the
    attention matrix is recomputed in chunks of at most ``_RECOMPUTE_BUDGET`` elements. ``out`` and
    ``grad_out`` may be strided views. Returns dq, dk, dv and the float32 bias gradient (1, H, L, L)."""
    b, h, n, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    grad_out = grad_out.contiguous()
    qs = q * scale  # scale the (L, d) queries once instead of every (L, L) score
    rows = max(1, _RECOMPUTE_BUDGET // (n * n))
    step_b, step_h = (max(1, rows // h), h) if rows >= h else (1, rows)
    for i in range(0, b, step_b):
        for j in range(0, h, step_h):
            sl = (slice(i, i + step_b), slice(j, j + step_h))
            whole = step_b >= b and step_h >= h
            qc, ks, vs, gs = (t if whole else t[sl] for t in (qs, k, v, grad_out))
            p = torch.matmul(qc, ks.transpose(-1, -2)).float().add_(bias[:, sl[1]])
            p = p.sub_(lse[sl].unsqueeze(-1)).exp_()
            gv = torch.matmul(p.to(vs.dtype).transpose(-1, -2), gs)
            ds = torch.matmul(gs, vs.transpose(-1, -2)).float().sub_(delta[sl]).mul_(p)
            del p
            dbias[:, sl[1]] += ds.sum(0, keepdim=True)
            ds = ds.to(qc.dtype)
            gq, gk = torch.matmul(ds, ks).mul_(scale), torch.matmul(ds.transpose(-1, -2), qc)
            if whole:
                return gq, gk, gv, dbias
            dq[sl], dk[sl], dv[sl] = gq, gk, gv
    return dq, dk, dv, dbias


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, dropout: float = 0.0) -> Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v (B, H, L, d) and bias (1, H, L, L) (-inf allowed,
    never a whole row). CPU without dropout: :class:`_BiasedAttention`; elsewhere SDPA, whose CUDA
    memory-efficient kernel already returns the bias gradient."""
    bias = bias.to(q.dtype)
    if q.device.type == "cpu" and dropout == 0.0 and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _BiasedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous(), scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


class WindowAttention(nn.Module):
    """Multi-head self-attention in square windows with a learned relative position bias
    (Swin Transformer), optionally restricted to tokens of the same group (MixMIM section 2.3)."""

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
        impl = resolve_auto(x.device, drop) if self.impl == "auto" else self.impl
        if impl == "fast" and fused_attention_applies(x, drop):
            out = _FusedWindowAttention.apply(x, self.qkv.weight, self.qkv.bias, self.relative_position_bias_table,
                                              self.relative_position_index, layout, self.num_heads, self.scale)
            return self.proj_drop(self.proj(out))
        qkv = self.qkv(x)
        if impl == "fast":
            out = fast_qkv_attention(qkv, self.num_heads, self.relative_position_bias_table,
                                     self.relative_position_index, layout, self.scale, drop)
            return self.proj_drop(self.proj(out))
        q, k, v = qkv.reshape(b, nw, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
        if impl == "flex":
            from mixmim.models.flex import flex_window_attention

            out = flex_window_attention(q, k, v, self.relative_position_bias_table, self.relative_position_index,
                                        layout, self.scale, drop)
        else:
            out = self._reference(q, k, v, self.relative_bias().to(q.dtype), layout)
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))

    def _reference(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, layout: GroupLayout | None) -> Tensor:
        b, nw, h, n, d = q.shape
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias
        if layout is not None:
            # As the release does in every block: repeat the mask for each image, compare every
            # pair of tokens, and push cross-group logits down by 1e30.
            ids = layout.ids.expand(b, -1, -1).reshape(b * nw, 1, 1, n).to(attn.dtype)
            different = (ids != ids.transpose(2, 3)).to(attn.dtype)
            attn = (attn.reshape(b * nw, h, n, n) - 1e30 * different).reshape(b, nw, h, n, n)
        attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        return attn @ v


def fast_window_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, rel_index: Tensor,
                          layout: GroupLayout | None, scale: float, dropout: float = 0.0) -> Tensor:
    """The ``fast`` path on (B, nW, heads, N, d) tensors; returns the same shape."""
    b, nw, h, n, d = q.shape
    qkv = torch.stack([q, k, v], 3).permute(0, 1, 4, 3, 2, 5).reshape(b, nw, n, 3 * h * d)
    out = fast_qkv_attention(qkv, h, table, rel_index, layout, scale, dropout)
    return out.reshape(b, nw, n, h, d).transpose(2, 3)


def fast_qkv_attention(qkv: Tensor, heads: int, table: Tensor, rel_index: Tensor, layout: GroupLayout | None,
                       scale: float, dropout: float = 0.0) -> Tensor:
    """Group-restricted window attention from the fused projection ``qkv`` (B, nW, N, 3C) to
    (B, nW, N, C). Either each (window, group) is gathered into a dense sequence and attended per
    length bucket, so no cross-group pair is computed and no per-image mask is built, or (when that
    would not remove enough pairs) one 0/-inf mask per window, shared by the batch, is used."""
    if layout is None:
        return _masked_windows(qkv, heads, table, rel_index, None, scale, dropout)
    plan = layout.plan()
    if plan.additive is not None:
        return _masked_windows(qkv, heads, table, rel_index, plan.additive, scale, dropout)
    b, nw, n, c3 = qkv.shape
    h, d = heads, c3 // (3 * heads)
    lead = b if layout.shared else 1  # a shared plan indexes the tokens of one image
    tokens = qkv.reshape(lead, -1, c3).index_select(1, plan.gather)
    # One spare table row of -inf: padded keys look it up and drop out of the softmax.
    table = torch.cat([table, table.new_full((1, h), float("-inf"))])
    outs = []
    # split, not slicing: its backward is one concatenation, not a full-size zero tensor per bucket.
    parts = tokens.split([count * length for count, length in plan.buckets], dim=1)
    for (count, length), rel, part in zip(plan.buckets, plan.rel_index, parts):
        part = part.reshape(lead, count, length, 3, h, d)
        q, k, v = part.permute(3, 0, 1, 4, 2, 5).reshape(3, lead, count * h, length, d).unbind(0)
        bias = table.index_select(0, rel.reshape(-1)).reshape(count, length, length, h).permute(0, 3, 1, 2)
        out = biased_attention(q, k, v, bias.reshape(1, count * h, length, length), scale, dropout)
        outs.append(out.reshape(lead, count, h, length, d).transpose(2, 3).reshape(lead, count * length, h * d))
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return out.index_select(1, plan.scatter).reshape(b, nw, n, h * d)


def _masked_windows(qkv: Tensor, h: int, table: Tensor, rel_index: Tensor, additive: Tensor | None, scale: float,
                    dropout: float) -> Tensor:
    """All pairs of every window; ``additive`` (nW, 1, N, N), shared by the batch, removes the
    cross-group ones. Windows are folded into the head axis so the mask broadcasts over images."""
    b, nw, n, c3 = qkv.shape
    d = c3 // (3 * h)
    bias = table.index_select(0, rel_index.reshape(-1)).reshape(n, n, h).permute(2, 0, 1)
    if additive is None:
        q, k, v = qkv.reshape(b * nw, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = biased_attention(q, k, v, bias.unsqueeze(0), scale, dropout)
        return out.transpose(1, 2).reshape(b, nw, n, c3 // 3)
    q, k, v = qkv.reshape(b, nw, n, 3, h, d).permute(3, 0, 1, 4, 2, 5).reshape(3, b, nw * h, n, d).unbind(0)
    out = biased_attention(q, k, v, (additive + bias).reshape(1, nw * h, n, n), scale, dropout)
    return out.reshape(b, nw, h, n, d).transpose(2, 3).reshape(b, nw, n, c3 // 3)


class _Groups:
    """How one stage's fast path cuts (B, nW, N, C) windows into attention calls: the rearrangements
    both ways and the relative-position bias of every call (and the way back to the table)."""

    def __init__(self, shape: torch.Size, heads: int, rel_index: Tensor, layout: GroupLayout | None):
        self.b, self.nw, self.n, self.c = shape
        self.h, self.d = heads, self.c // heads
        self.rel_index = rel_index
        self.plan = layout.plan() if layout is not None else None
        self.additive = self.plan.additive if self.plan is not None else None
        self.gathered = self.plan is not None and self.additive is None
        self.lead = self.b if (layout is None or layout.shared) else 1

    def split(self, t: Tensor, zero_pads: bool = False) -> list[Tensor]:
        """(B, nW, N, C), any strides -> per call (lead, count * heads, L, d), contiguous. Padded
        positions repeat token 0, or hold zeros with ``zero_pads`` (output gradients: padded queries
        must not send gradient to the keys of their sequence)."""
        b, nw, n, h, d = self.b, self.nw, self.n, self.h, self.d
        if not self.gathered:
            t = t.reshape(b, nw, n, h, d).permute(0, 1, 3, 2, 4)
            return [t.reshape(b * nw, h, n, d) if self.plan is None else t.reshape(b, nw * h, n, d)]
        tokens = t.reshape(self.lead, -1, self.c).index_select(1, self.plan.gather)
        if zero_pads:
            pad = torch.ones(tokens.shape[1], dtype=torch.bool, device=tokens.device)
            tokens.masked_fill_(pad.index_fill_(0, self.plan.scatter, False)[:, None], 0)
        parts = tokens.split([count * length for count, length in self.plan.buckets], dim=1)
        return [part.reshape(self.lead, count, length, h, d).transpose(2, 3).reshape(self.lead, count * h, length, d)
                for (count, length), part in zip(self.plan.buckets, parts)]

    def merge(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`: per call (lead, count * heads, L, d) -> (B, nW, N, C), contiguous."""
        b, nw, n, h, d = self.b, self.nw, self.n, self.h, self.d
        if not self.gathered:
            return parts[0].reshape(b, nw, h, n, d).transpose(2, 3).reshape(b, nw, n, self.c)
        outs = [o.reshape(self.lead, count, h, length, d).transpose(2, 3).reshape(self.lead, count * length, self.c)
                for (count, length), o in zip(self.plan.buckets, parts)]
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return out.index_select(1, self.plan.scatter).reshape(b, nw, n, self.c)

    def biases(self, table: Tensor) -> list[Tensor]:
        """Per call (1, count * heads, L, L): relative position bias (+ the window's 0/-inf mask)."""
        n, h = self.n, self.h
        if not self.gathered:
            bias = table.index_select(0, self.rel_index.reshape(-1)).reshape(n, n, h).permute(2, 0, 1)
            if self.additive is None:
                return [bias.unsqueeze(0).contiguous()]
            return [(self.additive + bias).reshape(1, self.nw * h, n, n)]
        # One spare table row of -inf: padded keys look it up and drop out of the softmax.
        table = torch.cat([table, table.new_full((1, h), float("-inf"))])
        return [table.index_select(0, rel.reshape(-1)).reshape(count, length, length, h).permute(0, 3, 1, 2)
                .reshape(1, count * h, length, length) for (count, length), rel in zip(self.plan.buckets,
                                                                                      self.plan.rel_index)]

    def table_grad(self, dbiases: list[Tensor], rows: int) -> Tensor:
        """Gradient of the (rows, heads) table from the per-call bias gradients."""
        n, h = self.n, self.h
        grad = torch.zeros(rows + 1, h, dtype=torch.float32, device=dbiases[0].device)
        if not self.gathered:
            dbias = dbiases[0].reshape(-1, h, n, n).sum(0)
            return grad[:rows].index_add_(0, self.rel_index.reshape(-1), dbias.permute(1, 2, 0).reshape(-1, h))
        for (count, length), rel, dbias in zip(self.plan.buckets, self.plan.rel_index, dbiases):
            grad.index_add_(0, rel.reshape(-1), dbias.reshape(count, h, length, length).permute(0, 2, 3, 1)
                            .reshape(-1, h))
        return grad[:rows]


class _FusedWindowAttention(torch.autograd.Function):
    """``qkv`` projection and group-restricted window attention in one autograd node (CPU, no dropout,
    no autocast), for memory: only the block's input windows, the output (the same tensor the output
    projection keeps anyway) and the log-sum-exps are kept. The backward recomputes the projection
    and the gathered q, k, v, then the attention gradients in chunks as :class:`_BiasedAttention`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, qkv_bias: Tensor | None, table: Tensor, rel_index: Tensor,
                layout: GroupLayout | None, heads: int, scale: float) -> Tensor:
        groups = _Groups(x.shape, heads, rel_index, layout)
        with torch.no_grad():
            qkv = F.linear(x, weight, qkv_bias).unflatten(-1, (3, groups.c))
            qs, ks, vs = (groups.split(t) for t in qkv.unbind(-2))
            del qkv
            outs, lses = [], []
            for q, k, v, bias in zip(qs, ks, vs, groups.biases(table)):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, False, attn_mask=bias.to(q.dtype), scale=scale)
                outs.append(out)
                lses.append(lse)
            del qs, ks, vs
            out = groups.merge(outs)
        ctx.groups, ctx.scale, ctx.has_bias = groups, scale, qkv_bias is not None
        ctx.save_for_backward(x, weight, qkv_bias if qkv_bias is not None else x.new_empty(0), table, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, qkv_bias, table, out, *lses = ctx.saved_tensors
        groups, scale = ctx.groups, ctx.scale
        with torch.no_grad():
            qkv = F.linear(x, weight, qkv_bias if ctx.has_bias else None).unflatten(-1, (3, groups.c))
            qs, ks, vs = (groups.split(t) for t in qkv.unbind(-2))
            del qkv
            outs, grads = groups.split(out), groups.split(grad_out, zero_pads=True)
            dqs, dks, dvs, dbiases = [], [], [], []
            for q, k, v, bias, o, lse, g in zip(qs, ks, vs, groups.biases(table), outs, lses, grads):
                dq, dk, dv, dbias = _attention_grads(q, k, v, bias.to(q.dtype), o, lse, g, scale)
                dqs.append(dq)
                dks.append(dk)
                dvs.append(dv)
                dbiases.append(dbias)
            del qs, ks, vs, outs, grads
            dqkv = torch.stack([groups.merge(dqs), groups.merge(dks), groups.merge(dvs)], -2).flatten(-2)
            del dqs, dks, dvs
            flat, xf = dqkv.reshape(-1, dqkv.shape[-1]), x.reshape(-1, x.shape[-1])
            dx = torch.matmul(dqkv, weight) if ctx.needs_input_grad[0] else None
            dw = flat.t().mm(xf) if ctx.needs_input_grad[1] else None
            db = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            dtable = groups.table_grad(dbiases, table.shape[0]).to(table.dtype) if ctx.needs_input_grad[3] else None
        return dx, dw, db, dtable, None, None, None, None


def fused_attention_applies(x: Tensor, dropout: float) -> bool:
    """Whether :class:`_FusedWindowAttention` can serve this call (CPU, eager, no dropout, no autocast)."""
    return (x.device.type == "cpu" and dropout == 0.0 and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
