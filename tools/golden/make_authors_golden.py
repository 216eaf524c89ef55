"""Golden cases from the authors' code: MAE (facebookresearch/mae, ``models_mae.py``) and SimMIM
(microsoft/SimMIM, ``models/simmim.py`` with its Swin and ViT), run in float64 on small
configurations; the fixtures land in ``tests/fixtures/golden/`` and ``tests/test_golden_authors.py``
compares this project's methods with them (loss, predictions, gradients).

    python tools/golden/make_authors_golden.py --mae <mae repo> --simmim <SimMIM repo> \
        --out tests/fixtures/golden

A repository is a checkout or a bare git directory (the fetch tool's ``.../repo``: its HEAD is read
with ``git show``). The authors' files are copied to a scratch folder outside this repository (the
default: a fresh temporary folder) and run from there; nothing of theirs is committed, only the
numbers their code produced. Their code is run as it is except for these edits, which today's
NumPy, timm and the scratch layout require (each must match as often as listed, or the script stops):

- ``mae/models_mae.py``: ``Block(..., qk_scale=None, ...)`` -> without ``qk_scale``, twice (encoder and
  decoder blocks; timm >= 0.9's ``Block`` has no such argument; it was ``None``, i.e. the default
  scale, anyway).
- ``mae/util/pos_embed.py``: ``np.float`` -> ``np.float64`` (the alias was removed in NumPy 1.24;
  ``np.float`` was ``float``, i.e. float64).
- SimMIM: ``models/simmim.py``, ``models/swin_transformer.py`` and ``models/vision_transformer.py`` are
  copied into a package of their own without ``models/__init__.py`` (which imports the fine-tuning
  builders and the whole config system); ``data/data_simmim.py`` is copied for ``MaskGenerator``. No
  line of them changes.

How the cases are made: the authors' model is built at the given size with dropout and drop path 0
and cast to float64; every trainable parameter is then perturbed by N(0, 0.1^2) noise (so that
LayerNorm affines, biases, the mask and class tokens and the relative position tables all matter);
MAE's fixed sine-cosine tables are left as built; every weight is then rounded to a float32 value
(stored in float32, run in float64). Images are N(0, 1), float32 values. MAE draws its masking noise
with ``torch.rand`` inside ``forward``: the global seed is set, the same noise is drawn once to be
stored, the seed is set again and the model runs. SimMIM's masks come from its ``MaskGenerator``
after ``np.random.seed``. The loss is backpropagated in eval mode (no dropout anywhere) and the
gradients of a few parameters are stored.

Cases (B images each):

- ``mae_normpix.pt``: ViT 32 px, patch 8 (4x4 patches), width 24, 2 blocks, 2 heads; decoder 16 wide,
  2 blocks, 2 heads; mask ratio 0.75; ``norm_pix_loss=True`` (MAE's recommended recipe); B = 3.
- ``mae_plain.pt``: ViT 24 px, patch 8 (3x3), width 32, 1 block, 4 heads; decoder 24 wide, 1 block,
  3 heads; mask ratio 0.5 (4 of 9 kept); ``norm_pix_loss=False``; B = 2.
- ``simmim_swin.pt``: Swin 32 px, patch 2, width 6, depths (2, 2, 1), heads (1, 2, 2), window 4
  (16x16, 8x8 and 4x4 tokens: shifted windows in stages 1-2, two patch mergings), encoder stride 8;
  masks of 8-px cells at 0.6; B = 2.
- ``simmim_vit.pt``: SimMIM's ViT 48 px, patch 8, width 24, 2 blocks, 2 heads, learnable absolute
  positions, no relative position bias and no layer scale (``init_values=None``: the configuration
  this project's timm ViT has); masks of 16-px cells at 0.6; B = 2.

Each file holds: ``config``, ``state_dict`` (the authors' parameter names, float32, no buffers),
``images`` (float32), the mask (``mask`` and, for MAE, the ``noise``), ``loss``, the predictions
(MAE: ``pred`` (B, L, p*p*3); SimMIM: ``x_rec`` (B, 3, H, W)), ``grads`` (a few parameters, the
authors' names) and ``provenance`` (the repositories' commits, torch/timm/NumPy versions).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

MAE_EDITS = {
    # (old, new, how many times old occurs)
    "models_mae.py": [("qkv_bias=True, qk_scale=None, norm_layer=norm_layer)",
                       "qkv_bias=True, norm_layer=norm_layer)", 2)],  # encoder and decoder blocks
    "util/pos_embed.py": [("np.arange(embed_dim // 2, dtype=np.float)", "np.arange(embed_dim // 2, dtype=np.float64)",
                           1)],
}
SIMMIM_FILES = {"models/simmim.py": "simmim_models/simmim.py",
                "models/swin_transformer.py": "simmim_models/swin_transformer.py",
                "models/vision_transformer.py": "simmim_models/vision_transformer.py",
                "data/data_simmim.py": "simmim_data.py"}


def _read(repo: Path, path: str) -> str:
    if (repo / path).is_file():
        return (repo / path).read_text()
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _commit(repo: Path) -> str:
    git_dir = ["--git-dir", str(repo)] if not (repo / ".git").exists() else ["-C", str(repo)]
    return subprocess.run(["git", *git_dir, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def _edited(text: str, edits: list[tuple[str, str, int]], name: str) -> str:
    for old, new, times in edits:
        count = text.count(old)
        if count != times:
            raise SystemExit(f"{name}: the edit {old!r} matches {count} times (expected {times}); the authors' code "
                             "changed, update MAE_EDITS")
        text = text.replace(old, new)
    return text


def stage(mae: Path, simmim: Path, scratch: Path) -> None:
    """Copy the authors' files into ``scratch`` (the edits above applied)."""
    for path in ("models_mae.py", "util/pos_embed.py"):
        target = scratch / "mae" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_edited(_read(mae, path), MAE_EDITS.get(path, []), path))
    (scratch / "mae" / "util" / "__init__.py").write_text("")
    for source, target in SIMMIM_FILES.items():
        out = scratch / "simmim" / target
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_read(simmim, source))
    (scratch / "simmim" / "simmim_models" / "__init__.py").write_text("")


def perturb_(model, seed: int) -> None:
    """N(0, 0.1^2) added to every trainable parameter, then every floating tensor rounded to a value
    float32 holds exactly (so the fixture stores weights in float32 and loses nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.float().double())


def float32_state(model) -> dict:
    """The parameters (buffers such as Swin's shift masks and index tables are rebuilt by any
    implementation) with floating tensors in float32 (exact: see :func:`perturb_`)."""
    import torch

    state = {}
    for k, v in model.named_parameters():
        v = v.detach().clone()
        if v.is_floating_point():
            assert torch.equal(v.float().double(), v), k
            v = v.float()
        state[k] = v
    return state


def images_for(batch: int, size: int, seed: int):
    """N(0, 1) images of float32 values, in float64."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).double()


def grads_of(model, names: list[str]) -> dict:
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


def mae_case(config: dict, batch: int, seed: int) -> dict:
    import torch

    models_mae = importlib.import_module("models_mae")
    from functools import partial

    torch.manual_seed(seed)
    model = models_mae.MaskedAutoencoderViT(
        img_size=config["img_size"], patch_size=config["patch_size"], in_chans=3, embed_dim=config["embed_dim"],
        depth=config["depth"], num_heads=config["num_heads"], decoder_embed_dim=config["decoder_dim"],
        decoder_depth=config["decoder_depth"], decoder_num_heads=config["decoder_num_heads"], mlp_ratio=4.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=config["norm_pix_loss"]).double().eval()
    perturb_(model, seed + 1)
    images = images_for(batch, config["img_size"], seed + 2)
    side = config["img_size"] // config["patch_size"]
    torch.manual_seed(seed + 3)
    noise = torch.rand(batch, side * side)
    torch.manual_seed(seed + 3)  # forward draws the same noise in random_masking
    loss, pred, mask = model(images, mask_ratio=config["mask_ratio"])
    loss.backward()
    names = ["cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
             f"blocks.{config['depth'] - 1}.norm2.bias",
             "norm.weight", "decoder_embed.weight", "mask_token", "decoder_blocks.0.attn.proj.weight",
             "decoder_norm.bias", "decoder_pred.bias"]
    return dict(config=config, state_dict=float32_state(model),
                images=images.float(), noise=noise, mask=mask.detach().long().reshape(batch, side, side),
                loss=loss.detach(),
                pred=pred.detach(), grads=grads_of(model, names))


def simmim_case(kind: str, config: dict, batch: int, seed: int) -> dict:
    import numpy as np
    import torch

    simmim = importlib.import_module("simmim_models.simmim")
    data = importlib.import_module("simmim_data")
    torch.manual_seed(seed)
    common = dict(img_size=config["img_size"], patch_size=config["patch_size"], in_chans=3, num_classes=0,
                  embed_dim=config["embed_dim"], mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, drop_path_rate=0.0)
    if kind == "swin":
        encoder = simmim.SwinTransformerForSimMIM(depths=config["depths"], num_heads=config["num_heads"],
                                                  window_size=config["window_size"], ape=False, patch_norm=True,
                                                  **common)
        names = ["mask_token", "patch_embed.proj.weight", "patch_embed.norm.weight",
                 "layers.0.blocks.1.attn.relative_position_bias_table", "layers.0.blocks.1.attn.qkv.weight",
                 "layers.0.downsample.reduction.weight", "layers.1.downsample.norm.bias",
                 "layers.2.blocks.0.mlp.fc1.weight",
                 "norm.weight"]
    else:
        from functools import partial

        encoder = simmim.VisionTransformerForSimMIM(depth=config["depth"], num_heads=config["num_heads"],
                                                    norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), init_values=None,
                                                    use_abs_pos_emb=True, use_rel_pos_bias=False,
                                                    use_shared_rel_pos_bias=False, use_mean_pooling=False, **common)
        names = ["mask_token", "cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.attn.qkv.weight",
                 "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.1.mlp.fc2.bias", "norm.weight"]
    model = simmim.SimMIM(encoder=encoder, encoder_stride=config["encoder_stride"]).double().eval()
    perturb_(model, seed + 1)
    images = images_for(batch, config["img_size"], seed + 2)
    generator = data.MaskGenerator(input_size=config["img_size"], mask_patch_size=config["mask_patch_size"],
                                   model_patch_size=config["patch_size"], mask_ratio=config["mask_ratio"])
    np.random.seed(seed + 3)
    mask = torch.from_numpy(np.stack([generator() for _ in range(batch)])).long()  # (B, H/patch, W/patch)
    loss = model(images, mask)
    loss.backward()
    with torch.no_grad():
        x_rec = model.decoder(model.encoder(images, mask))  # what forward compares with the images
    scale = config["mask_patch_size"] // config["patch_size"]
    return dict(config=config, state_dict=float32_state(model),
                images=images.float(), patch_mask=mask, mask=mask[:, ::scale, ::scale].contiguous(), loss=loss.detach(),
                x_rec=x_rec, grads={"encoder." + n: g for n, g in grads_of(model.encoder, names).items()})


MAE_CASES = {
    "mae_normpix": (dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, decoder_dim=16, decoder_depth=2,
                         decoder_num_heads=2, mask_ratio=0.75, norm_pix_loss=True), 3, 10),
    "mae_plain": (dict(img_size=24, patch_size=8, embed_dim=32, depth=1, num_heads=4, decoder_dim=24, decoder_depth=1,
                       decoder_num_heads=3, mask_ratio=0.5, norm_pix_loss=False), 2, 20),
}
SIMMIM_CASES = {
    "simmim_swin": ("swin", dict(img_size=32, patch_size=2, embed_dim=6, depths=[2, 2, 1], num_heads=[1, 2, 2],
                                 window_size=4, encoder_stride=8, mask_patch_size=8, mask_ratio=0.6), 2, 30),
    "simmim_vit": ("vit", dict(img_size=48, patch_size=8, embed_dim=24, depth=2, num_heads=2, encoder_stride=8,
                               mask_patch_size=16, mask_ratio=0.6), 2, 40),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mae", type=Path, required=True, help="facebookresearch/mae: a checkout or a bare git dir")
    parser.add_argument("--simmim", type=Path, required=True, help="microsoft/SimMIM: a checkout or a bare git dir")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/golden"))
    parser.add_argument("--scratch", type=Path, default=None, help="where the authors' code is copied (default: a "
                        "new temporary folder)")
    args = parser.parse_args(argv)

    import numpy as np
    import timm
    import torch

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="mixmim-authors-"))
    stage(args.mae, args.simmim, scratch)
    provenance = dict(mae=_commit(args.mae), simmim=_commit(args.simmim), torch=str(torch.__version__),
                      timm=timm.__version__, numpy=np.__version__, script="tools/golden/make_authors_golden.py")
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(scratch / "mae"))
    for name, (config, batch, seed) in MAE_CASES.items():
        case = mae_case(config, batch, seed)
        torch.save(dict(case, provenance=provenance), args.out / f"{name}.pt")
        print(f"{name}: loss {float(case['loss']):.12g}")
    sys.path.remove(str(scratch / "mae"))
    sys.modules.pop("util", None)
    sys.path.insert(0, str(scratch / "simmim"))
    for name, (kind, config, batch, seed) in SIMMIM_CASES.items():
        case = simmim_case(kind, config, batch, seed)
        torch.save(dict(case, provenance=provenance), args.out / f"{name}.pt")
        print(f"{name}: loss {float(case['loss']):.12g}")
    for path in sorted(args.out.glob("*.pt")):
        print(f"{path}: {path.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
