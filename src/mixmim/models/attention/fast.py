"""The ``fast`` path of group-restricted window attention (MixMIM section 2.3), exact and cheaper.

Every non-empty (window, group) of a stage is gathered into a dense sequence (with one mask per
batch these are the same token sets for every image, so the plan is built once per stage and the
batch axis stays), sequences are bucketed by length and padded with a -inf key bias, and no
query-key pair across groups is computed. Where gathering would remove too few pairs (windows that
straddle few cells) one 0/-inf mask per window, shared by the batch, is used instead (see
:mod:`mixmim.models.attention.layout`). :class:`GatheredCalls` is the one place that cuts a stage's
windows into those attention calls and puts the results back.

On CPU attention runs through the fused flash kernel, which keeps no (L, L) matrix; the backward
recomputes it in chunks and also returns the relative-position-bias gradient
(:class:`_BiasedAttention`). In eager CPU training without dropout or autocast the ``qkv``
projection joins the same autograd node (:class:`_FusedWindowAttention`), which keeps only the
block's input, its output and the log-sum-exps and recomputes the rest.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmim.models.attention.layout import GroupLayout, GroupPlan

# Per-call budget (elements) for the attention matrices materialised in the backward recompute.
_RECOMPUTE_BUDGET = 1 << 23


class _BiasedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with a learnable bias shared over the leading axis.

    Forward: on the CPU PyTorch's fused flash kernel, which keeps only the output and the log-sum-exp
    (no (L, L) matrix survives the forward); elsewhere SDPA with the bias as a constant (a kernel
    asked for the bias gradient allocates it at the whole batch's size: CUDA's memory-efficient
    kernel writes a (B, heads, L, L) gradient for a (1, heads, L, L) bias, 3.4 GiB at mixmim_base's
    batch 128). Backward: the attention matrix is recomputed in chunks (from the log-sum-exp, or
    with it where the kernel did not return it), which also yields the bias gradient, summed over
    the batch as it goes (the same recompute as FlashAttention's backward, Dao 2022, section 3.1)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
        if _flash_kernel_applies(q):
            out, lse = _flash_cpu(q, k, v, bias, scale)
        else:
            out, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), q.new_empty(0)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = _attention_grads(q, k, v, bias, out, lse if lse.numel() else None, grad_out, ctx.scale)
        return dq, dk, dv, dbias.to(bias.dtype) if ctx.needs_input_grad[3] else None, None


def _flash_kernel_applies(q: Tensor) -> bool:
    """Whether PyTorch's fused CPU kernel (which returns the log-sum-exp) computes the forward."""
    return q.device.type == "cpu"


def _recompute_budget(device: torch.device) -> int:
    """Elements of the attention matrices one backward chunk materialises: 8 Mi on the CPU (cache
    sized), 64 Mi elsewhere (fewer, larger kernels; 256 MiB of float32 scores per chunk)."""
    return _RECOMPUTE_BUDGET if device.type == "cpu" else _RECOMPUTE_BUDGET * 8


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU attention kernel: the output and the log-sum-exp of every query."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                      scale=scale)


def _attention_grads(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor, lse: Tensor | None,
                     grad_out: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of softmax(q k^T * scale + bias) v from the output and its log-sum-exp (None: taken
    from the recomputed scores): the attention matrix is recomputed in chunks of at most
    :func:`_recompute_budget` elements. ``out`` and ``grad_out`` may be strided views. Returns dq,
    dk, dv and the float32 bias gradient (1, H, L, L)."""
    b, h, n, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    grad_out = grad_out.contiguous()
    qs = q * scale  # scale the (L, d) queries once instead of every (L, L) score
    rows = max(1, _recompute_budget(q.device) // (n * n))
    step_b, step_h = (max(1, rows // h), h) if rows >= h else (1, rows)
    for i in range(0, b, step_b):
        for j in range(0, h, step_h):
            sl = (slice(i, i + step_b), slice(j, j + step_h))
            whole = step_b >= b and step_h >= h
            qc, ks, vs, gs = (t if whole else t[sl] for t in (qs, k, v, grad_out))
            p = torch.matmul(qc, ks.transpose(-1, -2)).float().add_(bias[:, sl[1]])
            p = p.sub_(lse[sl].unsqueeze(-1) if lse is not None else p.logsumexp(-1, keepdim=True)).exp_()
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
    never a whole row). Without dropout: :class:`_BiasedAttention`, whose bias gradient is summed over
    the batch as it is computed (never the batch's size); with dropout SDPA (its own backward)."""
    bias = bias.to(q.dtype)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout == 0.0:
        # bf16 on a CPU: matmuls (bf16 kernels at twice float32's rate) beat the fused flash kernel, which
        # runs bf16 slower than float32 (benchmarks/README.md, CPU bf16); the probabilities are kept.
        return torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)) + bias, dim=-1) @ v
    if dropout == 0.0 and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _BiasedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous(), scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


class GatheredCalls:
    """How one stage's windows are cut into attention calls, and put back: the gather/scatter of
    the plan (or the whole windows with one mask per window, or windows without groups), the
    relative-position bias of every call and the way back to the bias table.

    Shapes: the stage's windows are (B, nW, N, k * C) for k tensors of width C side by side (k = 3
    for a fused ``qkv`` projection, 1 for an output or its gradient); a call holds
    (k, lead, count * heads, L, d), where ``lead`` is B when the plan is shared by the batch (or
    there are no groups) and 1 when each image has its own plan (its sequences then span the batch).
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], heads: int, rel_index: Tensor,
                 layout: GroupLayout | None):
        self.b, self.nw, self.n, self.c = shape
        self.h, self.d = heads, self.c // heads
        self.rel_index = rel_index
        self.plan: GroupPlan | None = layout.plan() if layout is not None else None
        self.additive = self.plan.additive if self.plan is not None else None
        self.gathered = self.plan is not None and self.plan.gathered
        self.lead = self.b if (layout is None or layout.shared) else 1

    def split(self, t: Tensor, zero_pads: bool = False) -> list[Tensor]:
        """(B, nW, N, k * C), any strides -> per call (k, lead, count * heads, L, d), contiguous.
        Padded positions repeat token 0, or hold zeros with ``zero_pads`` (output gradients: padded
        queries must not send gradient to the keys of their sequence)."""
        b, nw, n, h, d = self.b, self.nw, self.n, self.h, self.d
        k = t.shape[-1] // self.c
        if not self.gathered:
            t = t.reshape(b, nw, n, k, h, d).permute(3, 0, 1, 4, 2, 5)  # (k, B, nW, heads, N, d)
            return [t.reshape(k, b * nw, h, n, d) if self.plan is None else t.reshape(k, b, nw * h, n, d)]
        plan = cast(GroupPlan, self.plan)  # gathered: there is a plan
        tokens = t.reshape(self.lead, -1, k * self.c).index_select(1, plan.gather)
        if zero_pads:
            pad = torch.ones(tokens.shape[1], dtype=torch.bool, device=tokens.device)
            tokens.masked_fill_(pad.index_fill_(0, plan.scatter, False)[:, None], 0)
        parts = tokens.split([count * length for count, length in plan.buckets], dim=1)
        return [part.reshape(self.lead, count, length, k, h, d).permute(3, 0, 1, 4, 2, 5)
                .reshape(k, self.lead, count * h, length, d)
                for (count, length), part in zip(plan.buckets, parts)]

    def merge(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`: per call (k, lead, count * heads, L, d) -> (B, nW, N, k * C), contiguous."""
        b, nw, n, h, d = self.b, self.nw, self.n, self.h, self.d
        k = parts[0].shape[0]
        if not self.gathered:
            return parts[0].reshape(k, b, nw, h, n, d).permute(1, 2, 4, 0, 3, 5).reshape(b, nw, n, k * self.c)
        plan = cast(GroupPlan, self.plan)
        outs = [o.reshape(k, self.lead, count, h, length, d).permute(1, 2, 4, 0, 3, 5)
                .reshape(self.lead, count * length, k * self.c) for (count, length), o in zip(plan.buckets, parts)]
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return out.index_select(1, plan.scatter).reshape(b, nw, n, k * self.c)

    def biases(self, table: Tensor) -> list[Tensor]:
        """Per call (1, count * heads, L, L): relative position bias (+ the window's 0/-inf mask)."""
        n, h = self.n, self.h
        if not self.gathered:
            bias = table.index_select(0, self.rel_index.reshape(-1)).reshape(n, n, h).permute(2, 0, 1)
            if self.additive is None:
                return [bias.unsqueeze(0).contiguous()]
            return [(self.additive + bias).reshape(1, self.nw * h, n, n)]
        plan = cast(GroupPlan, self.plan)
        # One spare table row of -inf: padded keys look it up and drop out of the softmax.
        table = torch.cat([table, table.new_full((1, h), float("-inf"))])
        return [table.index_select(0, rel.reshape(-1)).reshape(count, length, length, h).permute(0, 3, 1, 2)
                .reshape(1, count * h, length, length) for (count, length), rel in zip(plan.buckets, plan.rel_index)]

    def table_grad(self, dbiases: list[Tensor], rows: int) -> Tensor:
        """Gradient of the (rows, heads) table from the per-call bias gradients."""
        n, h = self.n, self.h
        grad = torch.zeros(rows + 1, h, dtype=torch.float32, device=dbiases[0].device)
        if not self.gathered:
            dbias = dbiases[0].reshape(-1, h, n, n).sum(0)
            return grad[:rows].index_add_(0, self.rel_index.reshape(-1), dbias.permute(1, 2, 0).reshape(-1, h))
        plan = cast(GroupPlan, self.plan)
        for (count, length), rel, dbias in zip(plan.buckets, plan.rel_index, dbiases):
            grad.index_add_(0, rel.reshape(-1), dbias.reshape(count, h, length, length).permute(0, 2, 3, 1)
                            .reshape(-1, h))
        return grad[:rows]


def fast_qkv_attention(qkv: Tensor, heads: int, table: Tensor, rel_index: Tensor, layout: GroupLayout | None,
                       scale: float, dropout: float = 0.0) -> Tensor:
    """Group-restricted window attention from the fused projection ``qkv`` (B, nW, N, 3C) to
    (B, nW, N, C), differentiable by autograd: one :func:`biased_attention` per call of
    :class:`GatheredCalls` (gathered sequences per length bucket, or whole windows with one 0/-inf
    mask per window, shared by the batch)."""
    b, nw, n, c3 = qkv.shape
    calls = GatheredCalls((b, nw, n, c3 // 3), heads, rel_index, layout)
    outs = []
    for part, bias in zip(calls.split(qkv), calls.biases(table)):
        q, k, v = part.unbind(0)
        outs.append(biased_attention(q, k, v, bias, scale, dropout).unsqueeze(0))
    return calls.merge(outs)


def fast_window_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, rel_index: Tensor,
                          layout: GroupLayout | None, scale: float, dropout: float = 0.0) -> Tensor:
    """The ``fast`` path on (B, nW, heads, N, d) tensors; returns the same shape."""
    b, nw, h, n, d = q.shape
    qkv = torch.stack([q, k, v], 3).permute(0, 1, 4, 3, 2, 5).reshape(b, nw, n, 3 * h * d)
    out = fast_qkv_attention(qkv, h, table, rel_index, layout, scale, dropout)
    return out.reshape(b, nw, n, h, d).transpose(2, 3)


class _FusedWindowAttention(torch.autograd.Function):
    """``qkv`` projection and group-restricted window attention in one autograd node (CPU, no dropout,
    no autocast), for memory: only the block's input windows, the output (the same tensor the output
    projection keeps anyway) and the log-sum-exps are kept. The backward recomputes the projection
    and the gathered q, k, v, then the attention gradients in chunks as :class:`_BiasedAttention`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, qkv_bias: Tensor | None, table: Tensor, rel_index: Tensor,
                layout: GroupLayout | None, heads: int, scale: float) -> Tensor:
        calls = GatheredCalls(x.shape, heads, rel_index, layout)
        with torch.no_grad():
            parts = calls.split(F.linear(x, weight, qkv_bias))
            outs, lses = [], []
            for part, bias in zip(parts, calls.biases(table)):
                q, k, v = part.unbind(0)
                out, lse = _flash_cpu(q, k, v, bias.to(q.dtype), scale)
                outs.append(out.unsqueeze(0))
                lses.append(lse)
            del parts
            out = calls.merge(outs)
        ctx.calls, ctx.scale, ctx.has_bias = calls, scale, qkv_bias is not None
        ctx.save_for_backward(x, weight, qkv_bias if qkv_bias is not None else x.new_empty(0), table, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, qkv_bias, table, out, *lses = ctx.saved_tensors
        calls, scale = ctx.calls, ctx.scale
        with torch.no_grad():
            parts = calls.split(F.linear(x, weight, qkv_bias if ctx.has_bias else None))
            outs, grads = calls.split(out), calls.split(grad_out, zero_pads=True)
            dparts, dbiases = [], []
            for part, bias, o, lse, g in zip(parts, calls.biases(table), outs, lses, grads):
                q, k, v = part.unbind(0)
                dq, dk, dv, dbias = _attention_grads(q, k, v, bias.to(q.dtype), o[0], lse, g[0], scale)
                dparts.append(torch.stack([dq, dk, dv]))
                dbiases.append(dbias)
            del parts, outs, grads
            dqkv = calls.merge(dparts)
            del dparts
            flat, xf = dqkv.reshape(-1, dqkv.shape[-1]), x.reshape(-1, x.shape[-1])
            dx = torch.matmul(dqkv, weight) if ctx.needs_input_grad[0] else None
            dw = flat.t().mm(xf) if ctx.needs_input_grad[1] else None
            db = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            dtable = calls.table_grad(dbiases, table.shape[0]).to(table.dtype) if ctx.needs_input_grad[3] else None
        return dx, dw, db, dtable, None, None, None, None


def fused_attention_applies(x: Tensor, dropout: float) -> bool:
    """Whether :class:`_FusedWindowAttention` can serve this call (CPU, eager, no dropout, no autocast)."""
    return (x.device.type == "cpu" and dropout == 0.0 and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
