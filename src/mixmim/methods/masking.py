"""Mask samplers of the mixing and masking methods (SimMIM's strategies: :mod:`simmim_masks`).

MixMIM (on the last-stage grid, one cell = 32x32 pixels for the MixMIM encoders): a mask is a
tensor of integer group ids of shape (G, h, w): G is 1 when the whole batch shares one mask (the
release's choice) and B when every sample draws its own. For two images, group 1 marks the cells
taken from the partner image, exactly the release's 0/1 mixing mask (MixMIM eq. 1).

MAE (:func:`random_patch_masks`: 1 = hidden patch, one draw per image) and MixedAE
(:func:`balanced_assignment`: the member of its group each cell of a mixed sample comes from).
All samplers draw on the CPU (optionally from a ``generator``) so that runs replay on any device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixmim.methods.options import check_ratio  # noqa: F401 - re-exported for the methods


def as_grid_masks(mask: Tensor, grid: tuple[int, int], batch: int, where: str) -> Tensor:
    """Accept (h, w), (1, h, w) or (B, h, w) masks on ``grid``; return them as (G, h, w)."""
    h, w = grid
    given = tuple(mask.shape)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (h, w) or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask of shape {given} does not fit: expected ({h}, {w}), (1, {h}, {w}) "
                         f"or ({batch}, {h}, {w}) {where}")
    return mask


def sample_ratio(ratio: float, ratio_range: tuple[float, float] | None, generator: torch.Generator | None) -> float:
    """The masking ratio of one draw: fixed, or uniform in ``ratio_range`` (the release's
    ``range_mask_ratio``: ratio + U(0, range))."""
    if ratio_range is None:
        return ratio
    low, high = ratio_range
    return low + (high - low) * torch.rand((), generator=generator).item()


def random_groups(grid: tuple[int, int], ratio: float = 0.5, *, num_groups: int = 2, count: int = 1,
                  ratio_range: tuple[float, float] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Random masking (MixMIM section 2.2): ``count`` masks of shape ``grid`` with values in
    ``0..num_groups-1``.

    Two groups: exactly ``floor(L * ratio)`` cells in group 1 (taken from the partner), the rest in
    group 0, as the release draws it. k groups (MixMAE supplement Table 4, "k (1/k)"): every image
    supplies 1/k of the cells; when k does not divide L the ``L mod k`` spare cells go to groups drawn
    at random, so counts differ by at most one cell and no group is favoured (``ratio`` is unused).
    """
    h, w = grid
    length = h * w
    masks = torch.zeros(count, length, dtype=torch.long)
    for c in range(count):
        order = torch.randperm(length, generator=generator)
        if num_groups == 2:
            r = sample_ratio(ratio, ratio_range, generator)
            check_ratio(r)
            sizes = [length - int(length * r), int(length * r)]
        else:
            sizes = [length // num_groups] * num_groups
            for g in torch.randperm(num_groups, generator=generator)[: length % num_groups].tolist():
                sizes[g] += 1
        start = 0
        for g in range(1, num_groups):  # group 0 keeps what is left: sizes[0] cells
            masks[c, order[start:start + sizes[g]]] = g
            start += sizes[g]
    return masks.reshape(count, h, w)


def block_groups(grid: tuple[int, int], ratio: float = 0.5, *, count: int = 1, min_cells: int = 1,
                 min_aspect: float = 0.3, ratio_range: tuple[float, float] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Block-wise masking in the style of BEiT on the cell grid (MixMIM Table 8, "Block"): random
    rectangles of log-uniform aspect ratio are added to group 1 until ``floor(L * ratio)`` cells are
    covered; the last rectangle is trimmed cell by cell (a staircase cut from its far corner, so it
    stays connected) and the count is exact. ``ratio_range`` draws the ratio per mask, as for
    :func:`random_groups`."""
    check_ratio(ratio)
    h, w = grid
    length = h * w
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masks = torch.zeros(count, h, w, dtype=torch.long)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    for c in range(count):
        r = sample_ratio(ratio, ratio_range, generator)
        check_ratio(r)
        target = int(length * r)
        mask = masks[c]
        tries = 0
        while int(mask.sum()) < target and tries < 1000:
            tries += 1
            remaining = target - int(mask.sum())
            area = uniform(min_cells, max(min_cells, remaining))
            aspect = math.exp(uniform(*log_aspect))
            bh = max(1, min(h, int(round(math.sqrt(area * aspect)))))
            bw = max(1, min(w, int(round(math.sqrt(area / aspect)))))
            top = int(torch.randint(0, h - bh + 1, (), generator=generator))
            left = int(torch.randint(0, w - bw + 1, (), generator=generator))
            block = torch.zeros(h, w, dtype=torch.bool)
            block[top:top + bh, left:left + bw] = True
            new = block & (mask == 0)
            excess = int(new.sum()) - remaining
            if excess > 0:
                # Trim the cells of the block farthest from its first corner, keeping it connected.
                cells = new.nonzero()
                distance = (cells[:, 0] - top) + (cells[:, 1] - left)
                drop = cells[distance.argsort(descending=True)[:excess]]
                new[drop[:, 0], drop[:, 1]] = False
            mask[new] = 1
        if int(mask.sum()) < target:  # pathological grids: fill the rest at random
            free = (mask == 0).flatten().nonzero().flatten()
            pick = free[torch.randperm(len(free), generator=generator)[: target - int(mask.sum())]]
            mask.view(-1)[pick] = 1
    return masks


def token_cells(groups: Tensor, ratio: float, num_groups: int = 2,
                generator: torch.Generator | None = None) -> Tensor:
    """Cells to fill with the [MASK] token, (G, h, w) bool ("2 images with [MASK]", MixMAE supplement
    Table 4): in every group ``floor(n_g * ratio)`` of its n_g cells are drawn at random.

    Drawing within each group keeps the groups the same size, so with two groups of 50% and
    ``ratio=0.5`` each image keeps 25% of the cells and the other 50% hold the mask token. A
    mask-token cell stays in its attention group: that image sees it as its own [MASK] position,
    as in SimMIM/BEiT, while the other image never sees it (masked self-attention, section 2.3).
    """
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"mask_token_ratio={ratio} is outside [0, 1)")
    flat = groups.reshape(groups.shape[0], -1)
    out = torch.zeros(flat.shape, dtype=torch.bool)
    for c in range(flat.shape[0]):
        for g in range(num_groups):
            members = (flat[c] == g).nonzero().flatten().cpu()
            pick = members[torch.randperm(len(members), generator=generator)[: int(len(members) * ratio)]]
            out[c, pick] = True
    return out.reshape(groups.shape).to(groups.device)


def partner_sources(batch: int, num_groups: int, device: torch.device | None = None) -> Tensor:
    """(num_groups, B): ``sources[g, i]`` is the image whose tokens fill the group-g cells of sample i.

    Group 0 is the sample's own image. With two groups the partner is the batch reversed (image
    B-1-i), as in the release; with k groups, group g comes from image (i + g) mod B.
    """
    if num_groups > batch:
        raise ValueError(f"mixing {num_groups} images needs a batch of at least {num_groups}, got {batch}")
    index = torch.arange(batch, device=device)
    if num_groups == 2:
        return torch.stack([index, index.flip(0)])
    return torch.stack([(index + g) % batch for g in range(num_groups)])


def kept_count(length: int, mask_ratio: float) -> int:
    """Patches MAE keeps of ``length``: ``int(L * (1 - ratio))`` (49 of 196 at 0.75), at least one."""
    return max(1, int(length * (1.0 - mask_ratio)))


def random_patch_masks(batch: int, grid: tuple[int, int], mask_ratio: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """MAE's masking: (B, h, w) long, 1 = hidden, per image a uniformly random set of
    ``L - kept_count`` patches (the kept ones: the lowest of L uniform draws, as MAE's code)."""
    h, w = grid
    length = h * w
    keep = kept_count(length, mask_ratio)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    masks = torch.ones(batch, length, dtype=torch.long)
    masks.scatter_(1, order[:, :keep], 0)
    return masks.reshape(batch, h, w)


def balanced_assignment(grid: tuple[int, int], k: int, count: int,
                        generator: torch.Generator | None = None) -> Tensor:
    """MixedAE's mixing masks (eq. 1-2): ``count`` masks (count, h, w) with values 0..k-1; every member
    gets ``n // k`` of the n cells, exactly ``r n`` when k divides n; otherwise the ``n mod k`` spare
    cells go to members drawn at random, so counts differ by at most one and no member is favoured."""
    h, w = grid
    n = h * w
    base = torch.arange(k).repeat(n // k).expand(count, -1)
    spare = torch.rand(count, k, generator=generator).argsort(dim=1)[:, : n % k]
    labels = torch.cat([base, spare], dim=1)
    order = torch.rand(count, n, generator=generator).argsort(dim=1)
    return labels.gather(1, order).reshape(count, h, w)
