"""Dense prediction on the encoder: torchvision Mask R-CNN + FPN and UperNet train one step."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_ENCODER
from mixmim.evaluation.layer_decay import dense_param_groups
from mixmim.models.dense import MixMIMBackbone
from mixmim.models.detection import build_detector
from mixmim.models.mixmim_vit import MixMIMTransformer
from mixmim.models.segmentation import UperNet


def _encoder():
    return MixMIMTransformer(**TINY_ENCODER)


def test_backbone_returns_four_normed_nchw_maps_and_crops_padding():
    backbone = MixMIMBackbone(_encoder())
    assert backbone.out_channels == [16, 32, 64, 128] and backbone.strides == [4, 8, 16, 32]
    feats = backbone(torch.randn(2, 3, 128, 128))
    assert [tuple(f.shape) for f in feats.values()] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8),
                                                        (2, 128, 4, 4)]
    small = backbone(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape[-2:]) for f in small.values()] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    with pytest.raises(ValueError, match="larger than"):
        backbone(torch.randn(1, 3, 160, 128))


def test_mask_rcnn_forward_backward_on_two_images():
    model = build_detector(_encoder(), num_classes=2, fpn_channels=32, rpn_batch_size_per_image=32,
                           box_batch_size_per_image=16)
    model.train()
    images = [torch.rand(3, 128, 112), torch.rand(3, 96, 128)]
    targets = []
    for img in images:
        h, w = img.shape[-2:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:50, 20:60] = 1
        masks[1, 40:90, 5:45] = 1
        targets.append({"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [5.0, 40.0, 45.0, 90.0]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone.body.encoder.layers[0].blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([images[0]])
    assert {"boxes", "labels", "scores", "masks"} <= set(out[0])


def test_upernet_trains_one_step():
    model = UperNet(_encoder(), num_classes=4, channels=32, aux_channels=8)
    opt = torch.optim.AdamW(dense_param_groups(model, model.encoder, 0.05, 0.85), lr=1e-3)
    weight = model.head.classifier.weight
    head_scale = {g["lr_scale"] for g in opt.param_groups if any(p is weight for p in g["params"])}
    assert head_scale == {1.0}
    x = torch.randn(2, 3, 128, 128)
    y = torch.randint(0, 4, (2, 128, 128))
    y[:, :8] = 255
    logits, aux = model(x)  # training: the main and the auxiliary head's logits
    assert logits.shape == aux.shape == (2, 4, 128, 128)
    assert model.eval()(x).shape == (2, 4, 128, 128) and model.train().training
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255) + 0.4 * torch.nn.functional.cross_entropy(
        aux, y, ignore_index=255)
    before = model.head.classifier.weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.head.classifier.weight)


def test_segment_cli_on_tiny_folder(tmp_path, capsys):
    from mixmim.cli import main
    from mixmim.interop.export import save_encoder

    rng = np.random.default_rng(0)
    (tmp_path / "seg" / "images").mkdir(parents=True)
    (tmp_path / "seg" / "masks").mkdir()
    for i in range(4):
        mask = np.zeros((80, 80), np.uint8)
        mask[20:60, 10 + 5 * i:50] = 1 + i % 2
        mask[:4] = 255
        image = rng.integers(0, 60, (80, 80, 3)).astype(np.uint8) + (mask[..., None] % 255 * 80).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "seg" / "images" / f"img{i}.jpg")
        Image.fromarray(mask).save(tmp_path / "seg" / "masks" / f"img{i}.png")
    save_encoder(MixMIMTransformer(**{**TINY_ENCODER, "img_size": 64, "window_size": (8, 8, 4, 2)}),
                 tmp_path / "enc")
    code = main(["segment", "--checkpoint", str(tmp_path / "enc.safetensors"), "--data", str(tmp_path / "seg"),
                 "--epochs", "1", "--batch-size", "2", "--channels", "16", "--num-workers", "0", "--crop-size", "64",
                 "--stride", "43", "segment.scale=[256,64]", "segment.aux_channels=8",
                 "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    assert "mIoU" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "model.pt").is_file()


@pytest.mark.parametrize("name", ["mixmim_tiny", "vit_tiny", "swin_tiny", "pvt_v2_b2", "resnetv2_50"])
def test_backbone_maps_are_the_stage_outputs_of_every_family(name):
    """The backbone reads timm's feature API (forward_intermediates); its maps are the encoder's
    stage outputs (forward_stages, the method-facing path), each through its own norm."""
    from conftest import TINY_ENCODERS
    from mixmim.models.registry import create_encoder

    encoder = create_encoder(name, **TINY_ENCODERS[name]).eval()
    backbone = MixMIMBackbone(encoder)
    for p in backbone.norms.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got = list(backbone(x).values())
        stages = encoder.forward_stages(encoder.embed(x))
        maps = [s.reshape(2, *encoder.grids[i], -1).permute(0, 3, 1, 2) for i, s in enumerate(stages)]
        if backbone.pyramid is not None:
            maps = backbone.pyramid(maps[-1])
        want = [norm(maps[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                for i, norm in zip(backbone.out_indices, backbone.norms)]
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert a.shape == b.shape
        # exact but for the ViT's transposed convolutions, which see another memory layout
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
