"""Where the tokens of one stage sit: windows, relative positions and which group each token holds.

Everything here is geometry on integer tensors, shared by every attention implementation: the
window partition of Swin Transformer (row-major windows of row-major tokens), its relative position
index, and the group layout of a stage (MixMIM section 2.3: each token belongs to one source image)
with the plan the ``fast`` path derives from it once per stage: every non-empty (window, group) as
one dense sequence, sequences bucketed by length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mixmim.models.base import upload

# Gather into dense sequences only when it removes at least this share of the query-key pairs; below
# that the copies cost more than the saved pairs and one mask per window (shared by the batch) wins.
_GATHER_MIN_SAVING = 0.4


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
    rel_index: list[Tensor]  # per bucket (n, L, L) int32 row of the bias table; padded keys -> the extra row
    additive: Tensor | None = None  # (nW, 1, N, N) 0 / -inf: set when gathering would not pay off

    @property
    def gathered(self) -> bool:
        """Whether the stage runs as gathered sequences (else as whole windows with ``additive``)."""
        return self.additive is None


@dataclass(eq=False)
class GroupLayout:
    """Which group (source image) each token of one stage belongs to, windowed for attention.

    ``ids`` is (G, nW, N) with G == 1 when the whole batch shares one mask and G == B otherwise.
    The derived plans (the ``fast`` path's, FlexAttention's block mask) are computed once per stage
    and reused by all of its blocks.
    """

    ids: Tensor
    num_groups: int
    window: int = 0
    host_ids: Tensor | None = None  # the same ids in host memory, when the map came from there
    _plan: GroupPlan | None = field(default=None, repr=False)
    _flex_mask: tuple | None = field(default=None, repr=False)  # (key, BlockMask), see flex.py

    @classmethod
    def from_grid(cls, ids: Tensor, window: int, num_groups: int, host: Tensor | None = None) -> GroupLayout:
        """``ids``: (G, H, W) group ids on this stage's grid; ``host``: the same map in host memory
        (the plan is then built from it, without copying ``ids`` back from the device)."""
        if host is None and ids.device.type == "cpu":
            host = ids
        return cls(window_partition(ids, window), num_groups, window,
                   window_partition(host, window) if host is not None else None)

    @property
    def shared(self) -> bool:
        return self.ids.shape[0] == 1

    @torch.compiler.disable
    def plan(self) -> GroupPlan:
        """Built on first use (data dependent, on the host; kept out of compiled graphs) from the host
        copy of the ids, and uploaded once; without a host copy the ids are copied back first (which
        waits for the device)."""
        if self._plan is None:
            host = self.host_ids if self.host_ids is not None else self.ids.cpu()
            self._plan = _build_plan(host, self.window or int(round(self.ids.shape[-1] ** 0.5)), self.ids.device)
        return self._plan


def _bucket_lengths(lengths: list[int], overhead: float) -> list[int]:
    """Cut lengths sorted in descending order into contiguous buckets minimising
    sum(count * longest^2) + overhead per bucket (attention work plus a fixed cost per kernel call);
    returns each bucket's end. The dynamic programme runs over the runs of equal lengths (at most
    window^2 + 1 of them), not over the sequences: a cut inside a run never helps (moving it to the
    run's start costs no more), so the optimum is the same and the cost is linear in the number of
    sequences (per-sample masks at batch 128 give ~10^4 of them; over the sequences it was quadratic)."""
    runs: list[tuple[int, int, int]] = []  # (length, first index, end index)
    for index, length in enumerate(lengths):
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1], index + 1)
        else:
            runs.append((length, index, index + 1))
    m = len(runs)
    best = [0.0] + [float("inf")] * m  # best[j]: cost of the first j runs
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        end = runs[j - 1][2]
        for i in range(j):
            length, first, _ = runs[i]
            cost = best[i] + (end - first) * length**2 + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], m
    while j > 0:
        ends.append(runs[j - 1][2])
        j = cut[j]
    return ends[::-1]


def _build_plan(ids: Tensor, window: int, device: torch.device) -> GroupPlan:
    """The plan of host ids (G, nW, N), its index tensors uploaded to ``device``. Tensor code over
    all sequences at once: the Python work is per bucket (at most N + 1 of them), not per sequence
    (per-sample masks at batch 128 give ~12 500 sequences)."""
    g, nw, n = ids.shape
    flat = ids.reshape(-1)
    # Stable sort by (image, window, group) keeps the row-major token order inside every sequence.
    key = torch.arange(g * nw).repeat_interleave(n) * (int(flat.max()) + 1) + flat
    order = torch.sort(key, stable=True).indices
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    longest_first = torch.sort(counts, descending=True, stable=True).indices  # ties keep (image, window) order
    counts, starts = counts[longest_first], starts[longest_first]
    lengths = counts.tolist()
    ends = _bucket_lengths(lengths, overhead=n * n / 2)
    buckets = [(end - begin, lengths[begin]) for begin, end in zip([0, *ends[:-1]], ends)]
    if g == 1 and sum(c * length**2 for c, length in buckets) > (1 - _GATHER_MIN_SAVING) * nw * n * n:
        same = ids[0, :, :, None] == ids[0, :, None, :]
        additive = torch.zeros(same.shape).masked_fill_(~same, float("-inf")).unsqueeze(1)
        return GroupPlan(torch.empty(0), torch.empty(0), [], [], upload(additive, device))
    # relative_position_index(window)[a, b] == code[a] - code[b] + offset with code = row * (2w - 1) + col:
    # a broadcast difference instead of an (n_b, L, L) gather (the bulk of a per-sample plan).
    span = 2 * window - 1
    local_code = (torch.arange(n, dtype=torch.int32) // window) * span + torch.arange(n, dtype=torch.int32) % window
    offset, pad_row = (window - 1) * span + window - 1, span**2
    gather, real, rel_index = [], [], []
    for (count, length), begin in zip(buckets, [0, *ends[:-1]]):
        position = torch.arange(length)
        valid = position < counts[begin:begin + count, None]  # (n_b, L)
        at = (starts[begin:begin + count, None] + position).clamp_(max=order.numel() - 1)
        tokens = torch.where(valid, order[at], 0)  # (n_b, L) flat token index; pads -> token 0
        code = local_code[tokens % n]
        rel = (code[:, :, None] - code[:, None, :]).add_(offset).masked_fill_(~valid[:, None, :], pad_row)
        rel_index.append(upload(rel, device))  # int32: (2w - 1)^2 + 1 rows at most
        gather.append(tokens.reshape(-1))
        real.append(valid.reshape(-1))
    gather_all, is_real = torch.cat(gather), torch.cat(real)
    scatter = torch.empty(g * nw * n, dtype=torch.long)
    scatter[gather_all[is_real]] = torch.nonzero(is_real).flatten()
    return GroupPlan(upload(gather_all, device), upload(scatter, device), buckets, rel_index)
