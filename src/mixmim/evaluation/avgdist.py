"""AvgDist (SimMIM section 4.1.2, Figure 3): the mean Euclidean distance, in pixels, from each
masked pixel to the nearest visible pixel. SimMIM finds fine-tuning accuracy best for AvgDist
between 10 and 20 (about 15, appendix C.2, Figure 7).

Distances run between pixel centres; pixels outside the image are not visible, so a mask that
touches the border is measured inward only. Over several masks the value is the mean of the
per-mask AvgDists (an empty mask counts 0).

:func:`draw_pixel_masks` draws masks from any generator of the engine at pixel resolution: SimMIM's
``random`` / ``square`` / ``block`` (:mod:`mixmim.methods.simmim_masks`) and MixMIM's ``random`` /
``block`` (:mod:`mixmim.methods.masking`; the masked pixels of an image are its cells filled from
the partner image, group 1).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from mixmim.methods.masking import block_groups, random_groups
from mixmim.methods.simmim_masks import MASK_TYPES, sample_cells
from mixmim.models.base import resize_groups

GENERATORS: dict[str, tuple[str, ...]] = {"simmim": MASK_TYPES, "mixmim": ("random", "block")}


def avg_dist(mask_pixels: np.ndarray | torch.Tensor) -> float:
    """AvgDist of a pixel mask ``(H, W)`` or of masks ``(N, H, W)``; nonzero = masked."""
    masks = mask_pixels.detach().cpu().numpy() if isinstance(mask_pixels, torch.Tensor) else np.asarray(mask_pixels)
    masks = masks.astype(bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"expected a mask of shape (H, W) or (N, H, W), got {masks.shape}")
    values = []
    for mask in masks:
        if not mask.any():
            values.append(0.0)
            continue
        if mask.all():
            raise ValueError("every pixel is masked: no visible pixel to measure the distance to")
        # distance_transform_edt gives every nonzero (masked) element its distance to the nearest
        # zero (visible) element, which is exactly the quantity AvgDist averages.
        values.append(float(distance_transform_edt(mask)[mask].mean()))
    return float(np.mean(values))


def draw_pixel_masks(kind: str, ratio: float, cell: int = 32, img_size: int = 192, count: int = 100,
                     method: str = "simmim", seed: int = 0) -> torch.Tensor:
    """``count`` masks ``(count, img_size, img_size)`` bool (True = masked) from ``method``'s
    generator ``kind`` on a grid of ``cell``-pixel cells."""
    if method not in GENERATORS:
        raise ValueError(f"mask method {method!r}: expected one of {', '.join(GENERATORS)}")
    if kind not in GENERATORS[method]:
        raise ValueError(f"{method} has no {kind!r} masking; it has {', '.join(GENERATORS[method])}")
    if cell < 1 or img_size % cell:
        raise ValueError(f"mask cell {cell} px must divide the image size {img_size}")
    grid = (img_size // cell, img_size // cell)
    generator = torch.Generator().manual_seed(seed)
    if method == "simmim":
        cells = sample_cells(kind, grid, ratio, count, cell, generator)
    elif kind == "block":
        cells = block_groups(grid, ratio, count=count, generator=generator)
    else:
        cells = random_groups(grid, ratio, count=count, generator=generator)
    return resize_groups(cells, (img_size, img_size)).bool()


def mask_avg_dist(kind: str, ratio: float, cell: int = 32, img_size: int = 192, draws: int = 100,
                  method: str = "simmim", seed: int = 0) -> tuple[float, float]:
    """(AvgDist in pixels, masked fraction), both averaged over ``draws`` masks of one generator."""
    masks = draw_pixel_masks(kind, ratio, cell, img_size, draws, method, seed)
    return avg_dist(masks), float(masks.float().mean())
