"""The pretraining transform: torchvision's crop and flip drawn from the header, seeded per sample for
nothing, JPEG draft mode within JPEG's own noise, one channel, the normalisation a run uses."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mixmim.data import DataConfig, build_pretrain_dataset, normalization
from mixmim.data.images import decode, open_image
from mixmim.data.transforms import (
    IMAGENET_GREY_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    pretrain_transform,
    v2_pretrain_transform,
)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients + shapes + fine noise: JPEG sizes and detail like a photo's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = np.stack([120 + 80 * np.sin(xx / width * 3 + c) * np.cos(yy / height * 2 - c) for c in range(3)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    a += rng.normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def v2_reference(transform, data: bytes, seed: int) -> torch.Tensor:
    """What the code did before: decode fully, then the v2 pipeline under torch.manual_seed(seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(decode(data))


def test_same_crops_and_pixels_as_torchvision_v2_without_draft():
    data = jpeg(photo(160, 120))
    ours, v2 = pretrain_transform(64, draft=False), v2_pretrain_transform(64)
    flips = set()
    for seed in range(12):
        out = ours(data, seed=seed)
        assert out.shape == (3, 64, 64) and out.is_contiguous()
        assert (out - v2_reference(v2, data, seed)).abs().max() < 1e-5
        flips.add(ours.draw(160, 120, seed).flip)
    assert flips == {True, False}


def test_exif_rotation_crops_the_upright_image():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = jpeg(photo(160, 120), exif=exif)
    ours, v2 = pretrain_transform(48, draft=False), v2_pretrain_transform(48)
    assert ours.draw(120, 160, 3) != ours.draw(160, 120, 3)
    for seed in range(4):
        assert (ours(data, seed=seed) - v2_reference(v2, data, seed)).abs().max() < 1e-5


def test_seeding_is_a_pure_function_and_leaves_every_global_generator_alone(monkeypatch):
    data = jpeg(photo(96, 80))
    ours = pretrain_transform(32)
    first = {seed: ours(data, seed=seed) for seed in (5, 2**62 + 7, 0)}
    # torch.manual_seed would also seed CUDA (0.5 ms per call on a CUDA build): it must not be used.
    monkeypatch.setattr(torch, "manual_seed", lambda *_: (_ for _ in ()).throw(AssertionError("manual_seed")))
    torch.random.default_generator.manual_seed(123)
    random.seed(4)
    np.random.seed(4)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for seed in (0, 2**62 + 7, 5):  # another order, another "process"
        assert torch.equal(ours(data, seed=seed), first[seed])
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    assert not torch.equal(first[5], first[0])


def test_draft_scale_keeps_the_margin_and_takes_the_largest_reduction():
    t = pretrain_transform(224, draft_margin=2.0)
    draws = [t.draw(4000, 3000, seed) for seed in range(40)]  # a 12-megapixel camera photo
    for d in draws:
        scale = t.draft_scale(d)
        assert min(d.height, d.width) >= 2.0 * 224 * scale
        assert scale == 8 or min(d.height, d.width) < 2.0 * 224 * scale * 2
    assert {t.draft_scale(d) for d in draws} == {2, 4}
    assert {pretrain_transform(224, draft_margin=1.0).draft_scale(d) for d in draws} == {4, 8}


def test_draft_decoding_changes_pixels_less_than_jpeg_compression_does():
    source = photo(1280, 960, seed=1)
    data = jpeg(source)
    lossless = io.BytesIO()
    source.save(lossless, "PNG")
    draft, full = pretrain_transform(64), pretrain_transform(64, draft=False)
    scales, draft_err, jpeg_err = [], [], []
    for seed in range(6):
        d = full.draw(1280, 960, seed)
        scales.append(draft.draft_scale(d))
        reference = full(data, seed=seed)
        draft_err.append((draft(data, seed=seed) - reference).abs().mean().item())
        jpeg_err.append((full(lossless.getvalue(), seed=seed) - reference).abs().mean().item())
    assert max(scales) >= 2  # draft mode did apply
    # In normalised units (x ~ 1/(255*0.225)): measured here about 0.002 vs JPEG q90's 0.006.
    assert np.mean(draft_err) < np.mean(jpeg_err)


def test_draft_box_is_mapped_onto_the_reduced_image():
    # A horizontal ramp (grey level = column): a crop's mean level says where its box was. A box placed
    # wrongly on the reduced image (e.g. not divided by the scale) lands elsewhere on the ramp.
    ramp = np.broadcast_to(np.linspace(0, 255, 1280, dtype=np.float32), (960, 1280))
    data = jpeg(Image.fromarray(ramp.round().astype(np.uint8)).convert("RGB"), quality=95)
    t = pretrain_transform(32, hflip=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    checked = 0
    for seed in range(12):
        d = t.draw(1280, 960, seed)
        if t.draft_scale(d) < 2:
            continue
        expected = (d.left + d.width / 2) / 1280
        assert abs(t(data, seed=seed).mean().item() - expected) < 0.01, (seed, d)
        checked += 1
    assert checked >= 3


def test_one_channel_decodes_grey():
    data = jpeg(photo(120, 90))
    t = pretrain_transform(32, mean=(0.5,), std=(0.25,), channels=1)
    out = t(data, seed=1)
    assert out.shape == (1, 32, 32)
    rgb = pretrain_transform(32, mean=(0.0,) * 3, std=(1.0,) * 3, draft=False)(data, seed=1)
    grey = out * 0.25 + 0.5  # luma of the RGB crop, up to JPEG's own rounding
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * rgb).sum(0, keepdim=True)
    assert (grey - luma).abs().mean() < 0.01
    with pytest.raises(ValueError, match="need 1 value"):
        pretrain_transform(32, channels=1)  # ImageNet's three means for one channel


def test_normalization_of_a_run():
    cfg = DataConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert normalization(cfg, 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization(cfg, 1)[0] == IMAGENET_GREY_MEAN and abs(IMAGENET_GREY_MEAN[0] - 0.4589) < 1e-4
    assert normalization(DataConfig(normalize="none"), 1) == ((0.0,), (1.0,))
    assert normalization(DataConfig(mean=(0.3,), std=(0.2,)), 1) == ((0.3,), (0.2,))
    with pytest.raises(ValueError, match="one per channel"):
        normalization(DataConfig(mean=(0.3,), std=(0.2,)), 3)
    with pytest.raises(ValueError, match="pick one"):
        normalization(DataConfig(mean=(0.3,), std=(0.2,), normalize="none"), 1)
    # normalize=dataset with statistics: the measurement a run stored in its config, used as it is
    assert normalization(DataConfig(mean=(0.3,), std=(0.2,), normalize="dataset"), 1) == ((0.3,), (0.2,))
    with pytest.raises(ValueError, match="data.normalize='typo'"):
        normalization(DataConfig(normalize="typo"), 3)


def test_bundled_photos_in_one_channel_with_their_own_statistics():
    cfg = DataConfig(source="bundled", path=None, crop_scale=(0.2, 1.0), hflip=True, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, bundled_epoch_size=8, channels=1, normalize="dataset")
    ds = build_pretrain_dataset(cfg, 32)
    assert len(ds.mean) == 1 and 0.2 < ds.mean[0] < 0.7 and 0.1 < ds.std[0] < 0.4
    batch = torch.stack([ds[(i, i)]["image"] for i in range(8)])
    assert batch.shape == (8, 1, 32, 32)
    assert abs(batch.mean().item()) < 0.8  # roughly centred by the measured statistics


def test_open_image_reads_only_the_header():
    image = open_image(jpeg(photo(200, 100)))
    assert image.size == (200, 100) and image.tile  # nothing decoded yet
