"""Every encoder family keeps the promise of mixmim.models.base: given a group map, no output position
receives anything from another image (MixMIM section 2.3; supplement section 9 for ConvNets), with
timm's weights it gives timm's logits, and every method runs on it unchanged."""

from __future__ import annotations

import pytest
import torch

import mixmim
from conftest import TINY_DECODER, TINY_ENCODERS
from mixmim.methods.masking import random_groups
from mixmim.models.base import resize_groups
from mixmim.models.registry import MODELS, family_of

NAMES = list(TINY_ENCODERS)


ENCODERS = list(NAMES)


def _tiny(name: str, **extra):
    return _mixing(mixmim.create_encoder(name, **TINY_ENCODERS[name], **extra))


def _mixing(model: torch.nn.Module) -> torch.nn.Module:
    """Weights under which every block mixes its tokens. SwinV2 initialises its post-norms to zero (each
    block the identity at the start, timm's _init_respostnorm), under which no attention could leak
    and a leak test would pass whatever the masks: give every LayerNorm a trained-like scale."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
    return model


def _maps(kind: str, k: int, batch: int, grid=(4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    if kind == "shared":
        return random_groups(grid, 0.5, num_groups=k, count=1, generator=g)
    return random_groups(grid, 0.5, num_groups=k, count=batch, generator=g)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("k,kind", [(2, "shared"), (2, "per_sample"), (4, "shared"), (4, "per_sample")])
def test_no_information_crosses_images(name, k, kind):
    """float64: the gradient of the outputs of one (sample, group) with respect to every input pixel of
    another group, or of another sample, is exactly zero."""
    torch.manual_seed(0)
    encoder = _tiny(name).double().eval()
    b = 4
    x = torch.randn(b, 3, 128, 128, dtype=torch.float64, requires_grad=True)
    groups = _maps(kind, k, b)
    out = encoder.forward_tokens(encoder.embed(x, groups), groups, num_groups=k)
    ids = resize_groups(groups, encoder.grids[-1]).reshape(groups.shape[0], -1).expand(b, -1)
    pixels = resize_groups(groups, (128, 128)).expand(b, -1, -1)
    weights = torch.randn_like(out)  # a random read-out: a plain sum of normalised tokens is constant
    for sample in (0, 2):
        for g in range(k):
            if not (ids[sample] == g).any():
                continue
            x.grad = None
            (out[sample] * weights[sample] * (ids[sample] == g).unsqueeze(-1)).sum().backward(retain_graph=True)
            grad = x.grad.abs().sum(1)  # (B, H, W)
            own = torch.zeros_like(grad, dtype=torch.bool)
            own[sample] = pixels[sample] == g
            assert grad[~own].max() == 0, (name, k, kind, sample, g)
            assert grad[own].max() > 0, "the test must see some gradient"


@pytest.mark.parametrize("name", ENCODERS)
def test_stage_geometry(name):
    encoder = _tiny(name)
    assert encoder.stride in (16, 32)
    assert encoder.grids[-1] == (128 // encoder.stride, 128 // encoder.stride)
    tokens = encoder.embed(torch.randn(2, 3, 128, 128))
    assert tokens.shape == (2, encoder.grids[0][0] * encoder.grids[0][1], encoder.embed_dim)
    stages = encoder.forward_stages(tokens)
    assert [s.shape[1:] for s in stages] == [(h * w, d) for (h, w), d in zip(encoder.grids, encoder.dims)]
    assert encoder.forward_tokens(tokens).shape == (2, encoder.grids[-1][0] * encoder.grids[-1][1],
                                                     encoder.num_features)


@pytest.mark.parametrize("name", ENCODERS)
def test_reconstruction_of_an_image_ignores_every_other_image(name):
    """Through the public API: ``out.picture.reconstruction[i]`` (i < B) is image i rebuilt from its own
    cells; changing any other image of the batch leaves it unchanged (same ``mask=out.mask``)."""
    torch.manual_seed(0)
    model = _mixing(mixmim.create_pretrainer("mixmim", name, **TINY_ENCODERS[name], **TINY_DECODER)).eval()
    images = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        out = model(images, picture=True)
        changed = images.clone()
        changed[1:] = torch.randn(3, 3, 128, 128)
        again = model(changed, mask=out.mask, picture=True)
    torch.testing.assert_close(again.picture.reconstruction[0], out.picture.reconstruction[0], rtol=0, atol=1e-5)
    assert not torch.allclose(again.picture.reconstruction[1], out.picture.reconstruction[1])


@pytest.mark.parametrize("method", ["mixmim", "simmim"])
@pytest.mark.parametrize("name", ENCODERS)
def test_two_pretraining_steps(name, method):
    torch.manual_seed(0)
    options = dict(TINY_DECODER) if method == "mixmim" else {}
    model = mixmim.create_pretrainer(method, name, **TINY_ENCODERS[name], **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(4, 3, 128, 128)
    losses = []
    for _ in range(2):
        loss = model(images).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))


TIMM_PAIRS = [(name, spec["timm"]) for name, spec in MODELS.items() if spec.get("timm")]


@pytest.mark.parametrize("name,timm_name", TIMM_PAIRS)
def test_timm_weights_give_timm_logits(name, timm_name):
    """create_classifier(NAME, 1000) loads the timm model's state dict with strict=True and gives its
    logits (float32, relative error 1e-4); randomly initialised weights, as none can be downloaded."""
    import timm

    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False).eval()
    ours = mixmim.create_classifier(name, num_classes=reference.num_classes).eval()  # swinv2_large: 21841
    ours.load_state_dict(reference.state_dict(), strict=True)
    side = reference.pretrained_cfg["input_size"][-1]  # 224, or a SwinV2's 256 / 192
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


SMALL_NAMED = ["mixmim_tiny", "vit_tiny", "swin_tiny", "swinv2_tiny", "pvt_v2_b2", "twins_svt_small",
               "resnetv2_50"]


@pytest.mark.parametrize("name", SMALL_NAMED)
def test_export_reloads_and_timm_loads_it_unchanged(name, tmp_path):
    """An export is this project's encoder again (load_encoder) and, for timm families, a plain timm
    checkpoint: timm.create_model(<the JSON's timm_model>) loads it and computes the same features."""
    import json

    import timm

    import mixmim.interop.timm_models  # noqa: F401  (registers the mixmim_* models with timm)
    from mixmim.interop.export import load_encoder, save_encoder

    torch.manual_seed(0)
    encoder = mixmim.create_encoder(name).eval()
    save_encoder(encoder, tmp_path / "enc")
    info = json.loads((tmp_path / "enc.json").read_text())
    assert info["architecture"] == family_of(name) and info["timm_model"]
    size = encoder.img_size if isinstance(encoder.img_size, (tuple, list)) else (encoder.img_size,) * 2
    x = torch.randn(1, 3, *size)  # a SwinV2's 256
    again = load_encoder(tmp_path / "enc.safetensors").eval()
    reference = timm.create_model(info["timm_model"], pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "enc.safetensors"))).eval()
    with torch.no_grad():
        want = encoder(x)
        assert torch.equal(again(x), want)
        torch.testing.assert_close(reference(x), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():
        (root / name).mkdir()
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("name", ENCODERS)
def test_finetune_probe_and_knn_accept_every_family(name, class_folder, tmp_path):
    import json

    from mixmim.cli import main
    from mixmim.interop.export import save_encoder

    torch.manual_seed(0)
    save_encoder(_tiny(name), tmp_path / "enc")
    common = ["--checkpoint", str(tmp_path / "enc.safetensors"), "--data", str(class_folder), "--num-workers", "0",
              "--no-progress", "--val-fraction", "0.34", "--batch-size", "4"]
    assert main(["knn", *common, "--output", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", *common, "--output", str(tmp_path / "lp"), "--epochs", "2"]) == 0
    assert main(["finetune", *common, "--output", str(tmp_path / "ft"), "--epochs", "1", "--warmup-epochs", "0"]) == 0
    for out in ("knn", "lp", "ft"):
        assert 0.0 <= json.loads((tmp_path / out / "results.json").read_text())["acc1"] <= 100.0


def _repeated_blocks(encoder):
    return encoder.repeated_blocks()


@pytest.mark.parametrize("name", ENCODERS)
def test_repeated_blocks_are_every_block_once_in_the_order_they_run(name):
    """What FSDP shards one by one: every module under a ``blocks`` container, no other parameter,
    each once, none inside another, in the order forward_stages runs them (with and without groups)."""
    encoder = _tiny(name)
    blocks = _repeated_blocks(encoder)
    config = encoder.config()
    depth = config.get("depth") or sum(config.get("depths") or config.get("layers"))
    assert len(blocks) == depth and len({id(b) for b in blocks}) == depth
    inside = {id(p) for b in blocks for p in b.parameters()}
    named = {id(p) for n, p in encoder.named_parameters() if n.startswith("blocks.") or ".blocks." in n}
    assert inside == named
    for i, outer in enumerate(blocks):
        assert not any(inner is outer for j, other in enumerate(blocks) if j != i for inner in other.modules())
    order = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: order.append(i)) for i, b in enumerate(blocks)]
    tokens = encoder.embed(torch.randn(2, 3, 128, 128))
    groups = _maps("shared", 2, 2)
    with torch.no_grad():
        encoder.forward_stages(tokens)
        encoder.forward_stages(tokens, groups, num_groups=2)
    for h in hooks:
        h.remove()
    assert order == list(range(depth)) * 2


@pytest.mark.parametrize("name", ENCODERS)
def test_grad_checkpointing_runs_every_block_through_checkpoint_with_the_same_gradients(name, monkeypatch):
    """set_grad_checkpointing(True): every repeated block of the group-restricted path goes through
    torch.utils.checkpoint (run_block), and the gradients do not change."""
    import torch.utils.checkpoint as checkpoint_module

    torch.manual_seed(0)
    encoder = _tiny(name).double()
    blocks = _repeated_blocks(encoder)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    groups = _maps("per_sample", 2, 2)

    def grads():
        encoder.zero_grad()
        out = encoder.forward_tokens(encoder.embed(x, groups), groups, num_groups=2)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)).sum().backward()
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    plain = grads()
    calls = []
    original = checkpoint_module.checkpoint
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda fn, *a, **k: calls.append(fn) or original(fn, *a, **k))
    encoder.set_grad_checkpointing(True)
    again = grads()
    assert [id(fn) for fn in calls] == [id(b) for b in blocks]
    assert len(plain) == len(again)
    for a, b in zip(plain, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ENCODERS)
def test_compile_blocks_compiles_every_repeated_block(name):
    """compile_blocks() marks every repeated block for torch.compile (compilation itself is lazy)."""
    encoder = _tiny(name)
    blocks = _repeated_blocks(encoder)
    encoder.compile_blocks()
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    others = [m for m in encoder.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert {id(m) for m in others} == {id(b) for b in blocks}


def test_compile_blocks_asks_for_static_shapes(monkeypatch):
    """Every stage's blocks compile with static shapes (automatic dynamic shapes made a graph that
    Inductor failed to generate under bf16 autocast); ``dynamic`` may still be given."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: seen.append(kw))
    encoder = _tiny("mixmim_tiny")
    encoder.compile_blocks()
    assert seen and all(kw == {"dynamic": False} for kw in seen)
    seen.clear()
    encoder.compile_blocks(dynamic=True, mode="max-autotune")
    assert all(kw == {"dynamic": True, "mode": "max-autotune"} for kw in seen)
