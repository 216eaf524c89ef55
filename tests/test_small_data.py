"""The small-data fine-tuning rule (mixmim/transfer/small_data.py) and its LP-FT head
(mixmim/transfer/head_init.py): the rule's values as a function of the labelled set's size, the
probe folded into a plain linear head, the probe's minimum number of steps, and the training
transform the rule's runs get (no colour jitter unless asked for)."""

from __future__ import annotations

import torch
from torch import nn

from mixmim.data.labelled import train_transform
from mixmim.evaluation.probe import probe_head
from mixmim.transfer import small_data as S
from mixmim.transfer.head_init import fold_probe


def test_rule_batch_length_and_augmentation_follow_the_set_size():
    small = S.small_data_settings(600, 10)
    assert small["train"]["batch_size"] == 16  # 600 / 64 = 9 -> at least 16
    assert S.small_data_settings(6000, 10)["train"]["batch_size"] == 64  # 6000 / 64 = 93 -> 64
    steps = 600 // 16 * small["train"]["epochs"]
    assert steps >= S.MIN_STEPS and small["train"]["epochs"] >= S.MIN_EPOCHS
    assert small["optim"]["lr"] == S.PEAK_LR
    assert small["optim"]["warmup_epochs"] == round(0.1 * small["train"]["epochs"], 3)
    assert small["finetune"]["head_init"] == "probe"
    assert small["finetune"]["mixup"] == 0 and small["finetune"]["auto_augment"] is None
    assert small["data"]["crop_scale"] == list(S.SMALL_CROP_SCALE)
    large = S.small_data_settings(S.STRONG_AUGMENT_FROM, 1000)
    assert large["train"]["batch_size"] == 256 and large["finetune"]["mixup"] == 0.8
    assert large["finetune"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert large["data"]["crop_scale"] == [0.08, 1.0]
    assert S.batch_for(10) == 10 and S.batch_for(100) == 16 and S.batch_for(20000) == 256 and S.batch_for(10**6) == 256


def test_folded_probe_equals_batchnorm_then_linear():
    torch.manual_seed(0)
    probe = probe_head(12, 5)
    bn = probe[0]
    bn.running_mean.copy_(torch.randn(12))
    bn.running_var.copy_(torch.rand(12) + 0.1)
    probe.eval()
    head = nn.Linear(12, 5)
    fold_probe(probe, head)
    x = torch.randn(7, 12)
    torch.testing.assert_close(head(x), probe(x), rtol=1e-5, atol=1e-5)


def test_probe_head_init_runs_at_least_probe_steps(monkeypatch):
    """20 epochs of 600 images at batch 256 are 40 steps; the head must get ``probe_steps``."""
    from types import SimpleNamespace

    import mixmim.transfer.head_init as H

    seen = {}

    def fake_fit(x, y, tx, ty, classes, epochs, batch_size, **kw):
        seen.update(epochs=epochs, batch=batch_size, n=len(x))
        return SimpleNamespace(head=probe_head(x.shape[1], classes).eval(), rows=[{"train_acc1": 1.0}])

    monkeypatch.setattr(H, "fit_probe", fake_fit)
    monkeypatch.setattr(H, "extract_features", lambda *a, **k: (torch.randn(600, 8), torch.arange(600) % 3))
    encoder = nn.Sequential(nn.Linear(8, 3))
    encoder.get_classifier = lambda: encoder[0]
    data = SimpleNamespace(train=SimpleNamespace(transform=None), classes=["a", "b", "c"])
    config = SimpleNamespace(model=SimpleNamespace(img_size=32), train=SimpleNamespace(num_workers=0, seed=0),
                             data=SimpleNamespace(crop_pct=1.0, normalize="imagenet", mean=(0.5,) * 3, std=(0.5,) * 3,
                                                  channels=3),
                             finetune=SimpleNamespace(probe_epochs=20, probe_steps=1000))
    monkeypatch.setattr("mixmim.transfer.data.data_stats", lambda d: ((0.5,) * 3, (0.5,) * 3))
    H.probe_head_init(encoder, data, config)
    steps_per_epoch = 600 // seen["batch"]
    assert seen["epochs"] * steps_per_epoch >= 1000 and (seen["epochs"] - 1) * steps_per_epoch < 1000


def test_training_transform_has_no_colour_jitter_unless_asked():
    names = [type(t).__name__ for t in train_transform(32, None, 0.0, (0.5, 1.0)).transforms]
    assert "ColorJitter" not in names and "RandomResizedCropAndInterpolation" in names
    names = [type(t).__name__ for t in train_transform(32, None, 0.0, (0.5, 1.0), color_jitter=0.4).transforms]
    assert "ColorJitter" in names


def test_data_hflip_false_removes_the_flip_from_the_training_transform():
    names = [type(t).__name__ for t in train_transform(32, None, 0.0, (0.8, 1.0)).transforms]
    assert "RandomHorizontalFlip" in names
    names = [type(t).__name__ for t in train_transform(32, None, 0.0, (0.8, 1.0), hflip=False).transforms]
    assert "RandomHorizontalFlip" not in names
