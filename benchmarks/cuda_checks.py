"""Correctness checks that need a GPU, run by ``benchmarks/gpu_suite.sh`` (each also runs on the CPU
with ``--device cpu`` and small sizes, which is how the test suite keeps them honest).

- ``golden``: the release's golden case (``../shared/reference/golden_tiny_s0.pt``) on the device in
  float32 with TF32 off, every attention path the device offers (reference, fast, flex, auto):
  loss, reconstruction and classifier logits against the stored release values.
- ``train``: ``--steps`` steps of MixMIM pretraining (``--model``, default mixmim_base at 224) on the
  photos bundled with scikit-image, under ``--amp`` (bf16 on CUDA), fused AdamW; passes when the mean
  loss of the last fifth of the steps is below that of the first fifth.
- ``peak``: the device's measured dense matmul peak in TFLOP/s at ``--amp`` precision (the
  denominator of MFU in the throughput table).

    python benchmarks/cuda_checks.py golden train peak --device cuda --json benchmarks/results/cuda_checks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "reference" / "golden_tiny_s0.pt"


def golden(device: torch.device, path: Path = GOLDEN) -> dict:
    """Largest differences from the release's stored outputs, per attention path."""
    import mixmim

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    case = torch.load(path, weights_only=True)
    cfg = dict(case["config"])
    images, mask = case["images"].to(device), case["mask_stage4"].to(device)
    impls = ["reference", "fast", "auto"] + (["flex"] if device.type == "cuda" else [])
    out = {}
    for impl in impls:
        model = mixmim.create_pretrainer("mixmim", "mixmim_base", attention_impl=impl, **cfg)
        model.load_state_dict(mixmim.convert_official(case["pretrain_state_dict"]), strict=True)
        model.to(device).eval()
        encoder_cfg = {k: v for k, v in cfg.items() if not k.startswith("decoder")}
        classifier = mixmim.create_classifier("mixmim_base", num_classes=10, attention_impl=impl, **encoder_cfg)
        state = mixmim.convert_official(case["pretrain_state_dict"], target="encoder")
        state.update(case["finetune_head"])
        classifier.load_state_dict(state, strict=True)
        classifier.to(device).eval()
        with torch.no_grad():
            result = model(images, mask=mask, picture=True)
            logits = classifier(images)
        out[impl] = {
            "loss_rel": float((result.loss.cpu() - case["loss"]).abs() / case["loss"].abs()),
            "reconstruction_abs": float((result.picture.reconstruction.cpu() - case["reconstruction"]).abs().max()),
            "logits_abs": float((logits.cpu() - case["logits"]).abs().max()),
        }
        out[impl]["pass"] = (out[impl]["loss_rel"] < 1e-5 and out[impl]["reconstruction_abs"] < 1e-4
                             and out[impl]["logits_abs"] < 1e-4)
    return out


def train(device: torch.device, model_name: str = "mixmim_base", img_size: int = 224, steps: int = 30,
          batch: int = 64, amp: str = "bf16", lr: float = 5e-4, overrides: dict | None = None) -> dict:
    """Pretraining steps on the bundled photos; the loss must fall."""
    import mixmim
    from mixmim.data import BundledPhotos, pretrain_transform
    from mixmim.training.schedule import lr_at, set_lr

    torch.manual_seed(0)
    options = {**(overrides or {}), "img_size": img_size}
    method = mixmim.create_pretrainer("mixmim", model_name, **options).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05, **fused)
    data = BundledPhotos(pretrain_transform(img_size), epoch_size=steps * batch)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[amp]
    losses, start = [], time.perf_counter()
    for step in range(steps):
        images = torch.stack([data[(step * batch + i, step * batch + i)]["image"] for i in range(batch)]).to(device)
        set_lr(optimizer, lr_at(step, steps, max(1, steps // 6), lr))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = method(images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    fifth = max(1, steps // 5)
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    return {"model": model_name, "img_size": img_size, "steps": steps, "batch": batch, "amp": amp, "losses": losses,
            "first_mean": first, "last_mean": last, "seconds": time.perf_counter() - start,
            "pass": bool(all(v == v for v in losses) and last < first)}


def peak(device: torch.device, amp: str = "bf16", size: int = 8192, repeats: int = 20) -> dict:
    """Measured dense matmul throughput (TFLOP/s) at ``amp`` precision."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[amp]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"amp": amp, "size": size, "tflops": 2 * size**3 * repeats / seconds / 1e12}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checks", nargs="+", choices=("golden", "train", "peak"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="mixmim_base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--amp", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--peak-size", type=int, default=8192)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_checks: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"device": name, "torch": torch.__version__}
    if "golden" in args.checks:
        report["golden"] = golden(device)
    if "train" in args.checks:
        report["train"] = train(device, args.model, args.img_size, args.steps, args.batch, args.amp)
    if "peak" in args.checks:
        report["peak"] = peak(device, args.amp, args.peak_size)
    text = json.dumps(report, indent=2)
    print(text if "train" not in report else json.dumps({**report, "train": {k: v for k, v in report["train"].items()
                                                                          if k != "losses"}}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    failed = [k for k in ("train",) if k in report and not report[k]["pass"]]
    failed += [f"golden/{impl}" for impl, r in report.get("golden", {}).items() if not r["pass"]]
    if failed:
        print(f"cuda_checks: FAILED {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
