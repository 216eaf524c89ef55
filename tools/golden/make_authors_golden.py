"""Golden cases from the authors' code: MAE (facebookresearch/mae, ``models_mae.py``) and SimMIM
(microsoft/SimMIM, ``models/simmim.py`` with its Swin and ViT), run in float64 on small
configurations; the fixtures land in ``tests/fixtures/golden/`` and ``tests/test_golden_authors.py``
compares this project's methods with them (loss, predictions, gradients).

    python tools/golden/make_authors_golden.py --mae <mae repo> --simmim <SimMIM repo> \
        --mixmim <MixMIM repo> --out tests/fixtures/golden

Each repository is optional: only the cases of the ones given are written.

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
- MixMIM (Sense-X/MixMIM, the MixMIM/MixMAE release: ``models_mixmim.py``, ``models_mixmim_ft.py``):
  ``util/pos_embed.py``'s ``np.float`` as MAE's; the two lines importing ``PatchMerging`` and
  ``window_partition, window_reverse`` from ``timm.models.swin_transformer`` import them from
  ``release_timm.py`` instead (once per model file), a module of ours written into the scratch folder:
  the release was written against timm 0.3-0.5, whose ``PatchMerging(input_resolution, dim)`` took
  (B, L, C) tokens and whose window functions took an integer window; today's timm changed both
  signatures. ``release_timm.py`` restates timm 0.5's three functions (the same arithmetic: the 2x2
  neighbours concatenated as (0,0), (1,0), (0,1), (1,1), LayerNorm, a linear map without bias).

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
- ``mixmim_release.pt``: the release's MixMIM 96 px, patch 4, width 8, depths (1, 1, 2, 1), heads
  (1, 2, 2, 4), windows (12, 6, 3, 3) (24x24, 12x12, 6x6 and 3x3 tokens: every window of stages 1-3
  straddles cells of the 3x3 mask), decoder 16 wide, 1 block, 2 heads; ``norm_pix_loss`` on; the
  release's own ``random_masking`` (ratio 0.5, one mask per batch) drawn inside ``forward`` after
  ``torch.manual_seed``; B = 4 (so the partner rule, image B-1-i, is pinned); plus the release's
  fine-tuning model (``models_mixmim_ft.py``) with a 10-class head on the same encoder and its logits.
  The reconstruction is stored in float32 (1.8 MB in float64; the float64 loss and gradients pin it).
  The golden case of the GPU check (``benchmarks/gpu_check.py``), small enough to commit.
- ``simmim_vit.pt``: SimMIM's ViT 48 px, patch 8, width 24, 2 blocks, 2 heads, learnable absolute
  positions, no relative position bias and no layer scale (``init_values=None``: the configuration
  this project's timm ViT has); masks of 16-px cells at 0.6; B = 2.

Each file holds: ``config``, ``state_dict`` (the authors' parameter names, float32, no buffers),
``images`` (float32), the mask (``mask`` and, for MAE, the ``noise``), ``loss``, the predictions
(MAE: ``pred`` (B, L, p*p*3); SimMIM: ``x_rec`` (B, 3, H, W); MixMIM: ``reconstruction``
(2B, L, 32*32*3), ``finetune_head`` and ``logits``), ``grads`` (a few parameters, the
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
MIXMIM_TIMM = ("from timm.models.swin_transformer import PatchMerging\n"
               "from timm.models.swin_transformer import window_partition, window_reverse\n")
MIXMIM_EDITS = {
    "models_mixmim.py": [(MIXMIM_TIMM, "from release_timm import PatchMerging, window_partition, window_reverse\n", 1)],
    "models_mixmim_ft.py": [(MIXMIM_TIMM, "from release_timm import PatchMerging, window_partition, window_reverse\n",
                             1)],
    "util/pos_embed.py": MAE_EDITS["util/pos_embed.py"],
}
# timm 0.5's PatchMerging and window functions, which the release was written against (see above).
RELEASE_TIMM = '''"""timm 0.5's PatchMerging, window_partition and window_reverse, restated for the MixMIM release."""
import torch
import torch.nn as nn


def window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class PatchMerging(nn.Module):
    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
        return self.reduction(self.norm(x))
'''
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


def stage(mae: Path | None, simmim: Path | None, scratch: Path, mixmim: Path | None = None) -> None:
    """Copy the authors' files into ``scratch`` (the edits above applied)."""
    if mae is not None:
        for path in ("models_mae.py", "util/pos_embed.py"):
            target = scratch / "mae" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_edited(_read(mae, path), MAE_EDITS.get(path, []), path))
        (scratch / "mae" / "util" / "__init__.py").write_text("")
    if simmim is not None:
        for source, target in SIMMIM_FILES.items():
            out = scratch / "simmim" / target
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_read(simmim, source))
        (scratch / "simmim" / "simmim_models" / "__init__.py").write_text("")
    if mixmim is not None:
        for path in ("models_mixmim.py", "models_mixmim_ft.py", "util/pos_embed.py"):
            target = scratch / "mixmim" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_edited(_read(mixmim, path), MIXMIM_EDITS.get(path, []), path))
        (scratch / "mixmim" / "util" / "__init__.py").write_text("")
        (scratch / "mixmim" / "release_timm.py").write_text(RELEASE_TIMM)


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


def mixmim_case(config: dict, batch: int, seed: int) -> dict:
    import torch

    models_mixmim = importlib.import_module("models_mixmim")
    models_mixmim_ft = importlib.import_module("models_mixmim_ft")
    torch.manual_seed(seed)
    model = models_mixmim.MixMIM(mlp_ratio=4, norm_pix_loss=True, qkv_bias=True, drop_path_rate=0.0,
                                 **config).double().eval()
    perturb_(model, seed + 1)
    images = images_for(batch, config["img_size"], seed + 2)
    torch.manual_seed(seed + 3)  # forward draws the mask (torch.rand) in random_masking
    loss, reconstruction, mask = model(images, mask_ratio=0.5)
    loss.backward()
    side = config["img_size"] // 32
    names = ["patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table",
             "layers.0.blocks.0.attn.qkv.weight", "layers.1.downsample.reduction.weight",
             "layers.2.blocks.1.attn.relative_position_bias_table", "layers.3.blocks.0.mlp.fc2.bias", "norm.weight",
             "mask_token", "decoder_embed.weight", "decoder_blocks.0.attn.qkv.weight", "decoder_pred.bias"]
    encoder_config = {k: v for k, v in config.items() if not k.startswith("decoder")}
    classifier = models_mixmim_ft.MixMIM(num_classes=10, mlp_ratio=4, qkv_bias=True, **encoder_config).double().eval()
    state = model.state_dict()
    missing, unexpected = classifier.load_state_dict({k: v for k, v in state.items() if k in classifier.state_dict()},
                                                     strict=False)
    assert missing == ["head.weight", "head.bias"] and not unexpected, (missing, unexpected)
    g = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for p in classifier.head.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).float().double())
        logits = classifier(images)
    return dict(config=config, pretrain_state_dict=float32_state(model), images=images.float(),
                mask_stage4=mask.detach().reshape(side, side).long(), loss=loss.detach(),
                reconstruction=reconstruction.detach().float(), grads=grads_of(model, names),
                finetune_head={f"head.{k}": v.detach().float() for k, v in classifier.head.state_dict().items()},
                logits=logits)


MIXMIM_CASES = {
    "mixmim_release": (dict(img_size=96, patch_size=4, embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                            window_size=[12, 6, 3, 3], decoder_dim=16, decoder_depth=1, decoder_num_heads=2), 4, 50),
}
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
    parser.add_argument("--mae", type=Path, help="facebookresearch/mae: a checkout or a bare git dir")
    parser.add_argument("--simmim", type=Path, help="microsoft/SimMIM: a checkout or a bare git dir")
    parser.add_argument("--mixmim", type=Path, help="Sense-X/MixMIM (the release): a checkout or a bare git dir")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/golden"))
    parser.add_argument("--scratch", type=Path, default=None, help="where the authors' code is copied (default: a "
                        "new temporary folder)")
    args = parser.parse_args(argv)

    import numpy as np
    import timm
    import torch

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="mixmim-authors-"))
    if args.mae is None and args.simmim is None and args.mixmim is None:
        parser.error("give at least one of --mae, --simmim, --mixmim")
    stage(args.mae, args.simmim, scratch, args.mixmim)
    provenance = dict(torch=str(torch.__version__), timm=timm.__version__, numpy=np.__version__,
                      script="tools/golden/make_authors_golden.py")
    args.out.mkdir(parents=True, exist_ok=True)

    def save(name: str, case: dict, repo: str, path: Path) -> None:
        torch.save(dict(case, provenance={repo: _commit(path), **provenance}), args.out / f"{name}.pt")
        print(f"{name}: loss {float(case['loss']):.12g}")

    if args.mae is not None:
        sys.path.insert(0, str(scratch / "mae"))
        for name, (config, batch, seed) in MAE_CASES.items():
            save(name, mae_case(config, batch, seed), "mae", args.mae)
        sys.path.remove(str(scratch / "mae"))
        sys.modules.pop("util", None)
        sys.modules.pop("util.pos_embed", None)
    if args.simmim is not None:
        sys.path.insert(0, str(scratch / "simmim"))
        for name, (kind, config, batch, seed) in SIMMIM_CASES.items():
            save(name, simmim_case(kind, config, batch, seed), "simmim", args.simmim)
        sys.path.remove(str(scratch / "simmim"))
    if args.mixmim is not None:
        sys.path.insert(0, str(scratch / "mixmim"))
        for name, (config, batch, seed) in MIXMIM_CASES.items():
            save(name, mixmim_case(config, batch, seed), "mixmim", args.mixmim)
    for path in sorted(args.out.glob("*.pt")):
        print(f"{path}: {path.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
