"""Reconstruction pictures: what the encoder saw and what the decoder made of it (MixMIM Fig. 1),
drawn from a method's :class:`~mixmim.methods.base.Picture` (``method(images, picture=True)``).

Rows: original images; what the encoder saw (MixMIM: the mixed input, cells of two or more images;
SimMIM / MAE: the masked cells in the mean colour); each image's reconstruction; the reconstruction
with the cells the image kept replaced by the original pixels.

With the normalised-pixel target (norm_pix_loss, the default) the model predicts each cell at zero
mean and unit variance. To draw it in colour, each predicted cell is by default given the mean and
variance of the *true* cell, as MAE's visualisation does: the brightness and contrast of every
cell then come from the original, not from the model, and the picture says so in its title. With
``raw=True`` nothing is borrowed: the prediction is drawn as it is (normalised-image units), which
shows the structure the model predicts inside each cell but no brightness or contrast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mixmim.methods.base import Picture, PretrainOutput
from mixmim.methods.patches import patchify, unpatchify

BORROWED_NOTE = "hidden cells drawn with the true cell's mean and variance"
RAW_NOTE = "raw prediction: per-cell normalised, no brightness or contrast"


def picture_note(norm_pix: bool, raw: bool) -> str | None:
    """What a picture's title must say about where the reconstruction's colours come from."""
    if not norm_pix:
        return None
    return RAW_NOTE if raw else BORROWED_NOTE


def _predicted_pixels(picture: Picture, images: Tensor, raw: bool = False) -> Tensor:
    """(S, L, P) predictions back in normalised-image space; a norm-pix prediction is rescaled by
    the statistics of the true patch it stands for (as MAE's visualisation does) unless ``raw``."""
    pred = picture.reconstruction.detach().float()
    if not picture.norm_pix or raw:
        return pred
    target = patchify(images.float(), picture.cell)[picture.sources]
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1e-6).sqrt() + mean


def reconstruction_rows(out: PretrainOutput, images: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, raw: bool = False) -> list[Tensor]:
    """Four (B, C, H, W) tensors in [0, 1] from ``out.picture`` (call the method with
    ``picture=True``): originals, what the encoder saw, reconstructions, reconstructions with the
    cells each image kept pasted back. ``mean``/``std``: the data normalisation to undo; ``raw``:
    draw a normalised-pixel prediction without the true cells' statistics."""
    picture = out.picture
    if picture is None:
        raise ValueError("this output carries no picture: call the method with picture=True (in eval mode, under "
                         "torch.no_grad()) to draw it")
    b, channels, h, w = images.shape
    cell, grid = picture.cell, (h // picture.cell, w // picture.cell)
    pred = _predicted_pixels(picture, images, raw)
    sources = picture.sources
    truth = patchify(images.float(), cell)
    recon, pasted = images.float().clone(), images.float().clone()
    for i in range(b):
        rows = (sources == i).nonzero()
        if not len(rows):
            continue
        s = int(rows[0])  # the first sequence that reconstructs image i (MixMIM: from its own cells)
        recon[i] = unpatchify(pred[s:s + 1], cell, grid, channels)[0]
        hidden = picture.hidden[s].unsqueeze(-1)
        pasted[i] = unpatchify(torch.where(hidden, pred[s], truth[i]).unsqueeze(0), cell, grid, channels)[0]
    shown = picture.inputs.detach().float()
    return [denormalize(x, mean, std).cpu() for x in (images, shown, recon, pasted)]


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
    rows = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows]  # one channel: grey
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
