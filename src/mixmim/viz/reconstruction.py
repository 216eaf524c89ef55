"""Reconstruction pictures: what the encoder saw and what the decoder made of it (MixMIM Fig. 1).

Rows: original images; the mixed input (cells of two or more images); each image's reconstruction;
the reconstruction with the cells the image kept replaced by the original pixels.

With the normalised-pixel target (norm_pix_loss, the default) the model predicts each cell at zero
mean and unit variance. To draw it in colour, each predicted cell is by default given the mean and
variance of the *true* cell, as MAE's visualisation does: the brightness and contrast of every
cell then come from the original, not from the model, and the picture says so in its title. With
``raw=True`` nothing is borrowed: the prediction is drawn as it is (normalised-image units), which
shows the structure the model predicts inside each cell but no brightness or contrast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mixmim.methods.base import PretrainOutput
from mixmim.methods.patches import patchify, unpatchify


BORROWED_NOTE = "hidden cells drawn with the true cell's mean and variance"
RAW_NOTE = "raw prediction: per-cell normalised, no brightness or contrast"


def picture_note(norm_pix: bool, raw: bool) -> str | None:
    """What a picture's title must say about where the reconstruction's colours come from."""
    if not norm_pix:
        return None
    return RAW_NOTE if raw else BORROWED_NOTE


def _predicted_pixels(out: PretrainOutput, images: Tensor, cell: int, norm_pix: bool, raw: bool = False) -> Tensor:
    """(S, L, P) predictions back in normalised-image space; a norm-pix prediction is rescaled by
    the statistics of the true patch it stands for (as MAE's visualisation does) unless ``raw``."""
    pred = out.reconstruction.detach().float()
    if not norm_pix or raw:
        return pred
    target = patchify(images.float(), cell)[out.sources]
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1e-6).sqrt() + mean


def _mixed_inputs(out: PretrainOutput, images: Tensor, cell: int) -> Tensor:
    """The encoder's input in pixels: the method's own picture when it gives one, else built from the
    group map (cell of group g in sample i comes from the image sequence g*B+i reconstructs)."""
    if out.inputs is not None:
        return out.inputs.detach().float()
    b = images.shape[0]
    groups = out.mask.to(images.device)
    if out.sources is None or out.sources.numel() % b:
        return images
    sources = out.sources.view(-1, b)
    up = groups.repeat_interleave(cell, -2).repeat_interleave(cell, -1).unsqueeze(1)  # (G|1, 1, H, W)
    mixed = images.clone()
    for g in range(1, sources.shape[0]):
        mixed = torch.where(up == g, images[sources[g]], mixed)
    return mixed


def reconstruction_rows(out: PretrainOutput, images: Tensor, cell: int, norm_pix: bool,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                        raw: bool = False) -> list[Tensor]:
    """Four (B, 3, H, W) tensors in [0, 1]: originals, mixed inputs, reconstructions, pasted.
    ``raw``: draw a normalised-pixel prediction without the true cells' statistics."""
    b, _, h, w = images.shape
    pred = _predicted_pixels(out, images, cell, norm_pix, raw)
    sources = out.sources if out.sources is not None else torch.arange(pred.shape[0], device=images.device)
    rows_for = [int((sources == i).nonzero()[0]) if (sources == i).any() else None for i in range(b)]
    truth = patchify(images.float(), cell)
    recon, pasted = images.float().clone(), images.float().clone()
    for i, s in enumerate(rows_for):
        if s is None:
            continue
        recon[i] = unpatchify(pred[s:s + 1], cell, (h // cell, w // cell))[0]
        hidden = out.hidden[s].unsqueeze(-1) if out.hidden is not None else torch.ones_like(pred[s, :, :1], dtype=torch.bool)
        pasted[i] = unpatchify(torch.where(hidden, pred[s], truth[i]).unsqueeze(0), cell, (h // cell, w // cell))[0]
    mixed = _mixed_inputs(out, images.float(), cell)
    return [denormalize(x, mean, std).cpu() for x in (images, mixed, recon, pasted)]


ROW_TITLES = ("original", "mixed input", "reconstruction", "reconstruction + visible")


def save_reconstruction_grid(rows: list[Tensor], path: str | Path, title: str | None = None,
                             cell: int | None = None, note: str | None = None) -> Path:
    """One figure: a row per stage, a column per image; thin lines at the cell grid on the mixed row.
    ``note`` (see :func:`picture_note`) is added to the title as a second line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixmim.utils.files import atomic_write

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 1.2, 1.7 * len(rows)), squeeze=False)
    for r, (row, name) in enumerate(zip(rows, ROW_TITLES)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(row[c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if cell and r == 1:
                size = row.shape[-1]
                for t in range(cell, size, cell):
                    ax.axhline(t - 0.5, color="white", lw=0.3, alpha=0.6)
                    ax.axvline(t - 0.5, color="white", lw=0.3, alpha=0.6)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    text = "\n".join(t for t in (title, note) if t)
    if text:
        fig.suptitle(text, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path
