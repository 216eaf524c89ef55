"""The GPU check: every GPU measurement and check of mixmim in one command on a bare machine.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR          # one CUDA GPU, about 8 minutes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --device cpu --tiny --out DIR   # the dry run (CI)

It needs nothing but this checkout and a Python with torch, timm, torchvision, safetensors, pyyaml,
pillow, matplotlib, scikit-image and tqdm (nothing installed, no ``../shared``, no network). Sections
run in this one process (the model of a variant is built once and compiled once), each under its own
time cap (SIGALRM), and each writes ``<prefix>_<section>.json`` in ``--out`` the moment it ends, so a
section that fails or runs out of time loses nothing of the others; ``<prefix>_summary.json`` lists
every section's status and duration. ``<prefix>`` is ``cuda_<device>`` (``cpu_tiny`` for the dry run).

1. ``env``: device, memory, torch / timm / cuDNN / Python versions, this checkout's commit, the
   device's nominal dense bf16 peak (a table of data-sheet values), and the attention kernels SDPA
   runs at a stage-1 shape of mixmim_base (from the profiler's kernel names).
2. ``correctness``: the release's golden case (``tests/fixtures/golden/mixmim_release.pt``, made from
   the release's code) on the device in float32 with TF32 off, every attention path; then each path's
   window attention against the release's maths at stage-1 shapes, shared and per-sample masks: in
   float32 (output and gradients) and under bf16 autocast against float32 (output, finite gradients,
   direction of the relative-position-table gradient).
3. ``syncs``: one training step (after a warm-up step) under ``torch.cuda.set_sync_debug_mode("warn")``,
   the synchronising calls counted by the line of Python that made them. On the CPU (no such thing as
   a sync) the ``.item()`` / ``.tolist()`` / ``.cpu()`` calls are counted instead, which exercises the
   same code.
4. ``throughput``: mixmim_base at 224 in bf16 at batch 128 for the release's maths (``reference``),
   ``fast``, ``flex`` and ``fast+compile``, SimMIM on the same encoder, MAE on ViT-B: images/s, peak
   memory, model FLOPs, MFU against the nominal peak and against a measured one (bf16 matmuls over at
   least half a second), and the profiler's split of one step (matmuls, attention, elementwise,
   optimiser, idle).
5. ``loop``: ``mixmim pretrain`` for 40 steps on generated JPEGs with 14 loader workers, CPU decoding
   and ``data.decode=gpu`` (``attention_impl=fast``: the loop, not flex's compilation): images/s from
   the run's metrics and whether the loss fell.

The exit status is 0 when every section passed, 1 otherwise (the JSON is written either way).
``--sections`` runs some of them; ``--budget`` caps the whole run (a section that would start with
less than its minimum left is skipped and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "mixmim_release.pt"
SECTIONS = ("env", "correctness", "syncs", "throughput", "loop")
# Seconds each section may take on one H100 (the dry run takes a fraction), and the least it needs.
CAPS = {"env": 30, "correctness": 75, "syncs": 60, "throughput": 200, "loop": 115}
MINIMUM = {"env": 5, "correctness": 20, "syncs": 10, "throughput": 60, "loop": 40}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched in order
# against the lower-cased device name: MFU's denominator.
NOMINAL_BF16_TFLOPS = (
    ("gh200", 989.4), ("h200", 989.4), ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.4), ("h800", 989.4),
    ("b200", 2250.0), ("b100", 1750.0), ("a100", 312.0), ("a800", 312.0), ("l40s", 362.05), ("l40", 181.0),
    ("l4", 121.0), ("a10g", 70.0), ("a10", 125.0), ("a6000", 154.8), ("rtx 4090", 165.2), ("rtx 3090", 71.0),
)


def nominal_bf16_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a device by its name, or None when the name is not listed."""
    name = device_name.lower()
    return next((value for key, value in NOMINAL_BF16_TFLOPS if key in name), None)


class SectionTimeout(Exception):
    """Raised in the main thread by SIGALRM when a section reaches its cap."""


@dataclass
class Check:
    """What every section sees: where it runs, how big, and where its partial results go."""

    device: object  # torch.device
    tiny: bool
    out: Path
    prefix: str
    fail: str | None = None  # a section that raises on purpose (the test of section isolation)
    section: str = ""  # the running section
    result: dict = field(default_factory=dict)  # the running section's results so far

    def write_partial(self) -> None:
        """The running section's results so far, in its JSON (marked running)."""
        _write(self.out / f"{self.prefix}_{self.section}.json", {"section": self.section, "status": "running",
                                                                  **self.result})

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- shapes
def mixmim_overrides(tiny: bool) -> dict:
    """mixmim_base as it is, or a tiny configuration of the same family (128 px, every attention kind)."""
    if not tiny:
        return {}
    return dict(img_size=128, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=(16, 8, 8, 4),
                decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


def vit_overrides(tiny: bool) -> dict:
    return dict(img_size=64, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1,
                decoder_num_heads=2) if tiny else {}


# ------------------------------------------------------------------------------------------------- env
def section_env(ck: Check) -> dict:
    import timm
    import torch

    import mixmim

    r = ck.result
    r["python"] = platform.python_version()
    r["torch"] = torch.__version__
    r["timm"] = timm.__version__
    r["mixmim_path"] = str(Path(mixmim.__file__).resolve().parent)
    r["commit"] = _git_commit()
    if ck.device.type == "cuda":
        props = torch.cuda.get_device_properties(ck.device)
        r["device"] = torch.cuda.get_device_name(ck.device)
        r["capability"] = f"{props.major}.{props.minor}"
        r["memory_gib"] = props.total_memory / 2**30
        r["cuda"] = torch.version.cuda
        r["cudnn"] = torch.backends.cudnn.version()
        r["nominal_bf16_tflops"] = nominal_bf16_tflops(r["device"])
    else:
        r["device"] = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores visible)"
        r["nominal_bf16_tflops"] = None
    r["sdpa_kernels"] = sdpa_kernels(ck)
    return r


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _stage1_attention(ck: Check, impl: str):
    """A stage-1 WindowAttention of mixmim_base (width 128, 4 heads, 14x14 windows over 56x56 tokens)
    or its tiny counterpart, with a per-batch mask of 32-px cells; returns (layer, x, layout)."""
    import torch

    from mixmim.models.attention import GroupLayout, WindowAttention, window_partition

    width, heads, window, grid, batch, cell = (16, 2, 8, 16, 2, 8) if ck.tiny else (128, 4, 14, 56, 32, 8)
    g = torch.Generator().manual_seed(0)
    layer = WindowAttention(width, heads, window, impl=impl)
    cells = (torch.rand(grid // cell, grid // cell, generator=g) < 0.5).long()
    ids = cells.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None]
    layout = GroupLayout.from_grid(ids.to(ck.device), window, 2, host=ids)  # as the encoder builds it
    x = window_partition(torch.randn(batch, grid, grid, width, generator=g), window)
    return layer.to(ck.device), x.to(ck.device), layout


def sdpa_kernels(ck: Check) -> dict:
    """The kernels one forward and backward of a stage-1 attention layer (``fast``, bf16 autocast)
    launches, by kind: which SDPA backend the device actually runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    layer, x, layout = _stage1_attention(ck, "fast")
    x.requires_grad_(True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ck.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.autocast(ck.device.type, dtype=torch.bfloat16):
            out = layer(x, layout)
        out.float().sum().backward()
        ck.sync()
    names = sorted({e.key for e in prof.key_averages()
                    if any(s in e.key.lower() for s in ("attention", "fmha", "flash", "cudnn", "efficient", "sdpa"))})
    kinds = sorted({kind for kind in ("flash", "efficient", "cudnn", "fmha") if any(kind in n.lower() for n in names)})
    return {"names": names[:20], "kinds": kinds or ["math (no fused attention kernel seen)"]}


# ----------------------------------------------------------------------------------------- correctness
def section_correctness(ck: Check) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    r = ck.result
    r["golden"] = golden_case(ck)
    r["attention"] = attention_paths(ck)
    failed = [f"golden/{k}" for k, v in r["golden"].items() if not v["pass"]]
    failed += [f"attention/{k}" for k, v in r["attention"].items() if not v["pass"]]
    r["pass"] = not failed
    r["failed"] = failed
    return r


def impls_for(ck: Check) -> list[str]:
    return ["reference", "fast", "auto"] + (["flex"] if ck.device.type == "cuda" else [])


def golden_case(ck: Check) -> dict:
    """The release's golden case (float64 values from the release's code) on the device in float32."""
    import torch

    import mixmim

    case = torch.load(GOLDEN, weights_only=True)
    cfg = dict(case["config"])
    images, mask = case["images"].to(ck.device), case["mask_stage4"].to(ck.device)
    out = {}
    for impl in impls_for(ck):
        model = mixmim.create_pretrainer("mixmim", "mixmim_base", attention_impl=impl, **cfg)
        model.load_state_dict(mixmim.convert_official(case["pretrain_state_dict"]), strict=True)
        model.to(ck.device).eval()
        encoder_cfg = {k: v for k, v in cfg.items() if not k.startswith("decoder")}
        classifier = mixmim.create_classifier("mixmim_base", num_classes=10, attention_impl=impl, **encoder_cfg)
        state = mixmim.convert_official(case["pretrain_state_dict"], target="encoder")
        state.update(case["finetune_head"])
        classifier.load_state_dict(state, strict=True)
        classifier.to(ck.device).eval()
        with torch.no_grad():
            result = model(images, mask=mask, picture=True)
            logits = classifier(images)
        row = {
            "loss_rel": float((result.loss.double().cpu() - case["loss"]).abs() / case["loss"].abs()),
            "reconstruction_abs": float((result.picture.reconstruction.float().cpu()
                                         - case["reconstruction"]).abs().max()),
            "logits_abs": float((logits.double().cpu() - case["logits"]).abs().max()),
        }
        row["pass"] = row["loss_rel"] < 1e-5 and row["reconstruction_abs"] < 1e-4 and row["logits_abs"] < 1e-4
        out[impl] = row
        print(f"  golden {impl:<9} loss rel {row['loss_rel']:.1e}  reconstruction {row['reconstruction_abs']:.1e}  "
              f"logits {row['logits_abs']:.1e}  {'ok' if row['pass'] else 'FAIL'}", flush=True)
    return out


def attention_paths(ck: Check) -> dict:
    """Each attention path's layer against the release's maths at a stage-1 shape, shared and
    per-sample masks: float32 (output, input and table gradients) and bf16 autocast against float32."""
    import torch

    from mixmim.models.attention import GroupLayout

    out = {}
    for masks in ("shared", "per_sample"):
        ref, x, layout = _stage1_attention(ck, "reference")
        if masks == "per_sample":
            g = torch.Generator().manual_seed(1)
            b = x.shape[0]
            side = int(round((layout.ids.shape[1] * layout.ids.shape[2]) ** 0.5))
            cell = 8
            cells = (torch.rand(b, side // cell, side // cell, generator=g) < 0.5).long()
            grid = cells.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
            layout = GroupLayout.from_grid(grid.to(ck.device), layout.window, 2, host=grid)

        def fresh(source: GroupLayout = layout) -> GroupLayout:  # each path builds its own plan / block mask
            return GroupLayout(source.ids, source.num_groups, source.window, source.host_ids)

        want, want_dx, want_dt = _run_attention(ref, x, fresh(), None)
        for impl in impls_for(ck)[1:]:
            layer = type(ref)(ref.dim, ref.num_heads, ref.window_size, impl=impl).to(ck.device)
            layer.load_state_dict(ref.state_dict())
            row: dict = {}
            got, dx, dt = _run_attention(layer, x, fresh(), None)
            row["fp32_out_abs"] = float((got - want).abs().max())
            row["fp32_dx_abs"] = float((dx - want_dx).abs().max())
            row["fp32_dtable_rel"] = float((dt - want_dt).norm() / want_dt.norm())
            got, dx, dt = _run_attention(layer, x, fresh(), torch.bfloat16)
            scale = float(want.abs().max())
            row["bf16_out_rel"] = float((got.float() - want).abs().max()) / scale
            row["bf16_finite_grads"] = bool(torch.isfinite(dx).all() and torch.isfinite(dt).all())
            row["bf16_dtable_cosine"] = float(torch.nn.functional.cosine_similarity(dt.flatten().float(),
                                                                                    want_dt.flatten(), dim=0))
            row["pass"] = (row["fp32_out_abs"] < 1e-4 and row["fp32_dx_abs"] < 1e-4 and row["fp32_dtable_rel"] < 1e-4
                           and row["bf16_out_rel"] < 5e-2 and row["bf16_finite_grads"]
                           and row["bf16_dtable_cosine"] > 0.99)
            out[f"{impl}/{masks}"] = row
            print(f"  attention {impl:<5} {masks:<10} fp32 out {row['fp32_out_abs']:.1e} dx {row['fp32_dx_abs']:.1e} "
                  f"dtable {row['fp32_dtable_rel']:.1e} | bf16 out {row['bf16_out_rel']:.1e} "
                  f"dtable cos {row['bf16_dtable_cosine']:.4f}  {'ok' if row['pass'] else 'FAIL'}", flush=True)
    return out


def _run_attention(layer, x, layout, dtype):
    import torch

    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = layer(x, layout)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)  # a gradient that is not flat
    (out.float() * weights).sum().backward()
    return out.detach().float(), x.grad.detach().float(), layer.relative_position_bias_table.grad.detach().float()


# ----------------------------------------------------------------------------------------------- syncs
def section_syncs(ck: Check) -> dict:
    """Synchronising calls of one training step, by the line of Python that made them."""
    import torch

    import mixmim

    r = ck.result
    torch.manual_seed(0)
    batch = 4 if ck.tiny else 64
    size = 128 if ck.tiny else 224
    model = mixmim.create_pretrainer("mixmim", "mixmim_base", **mixmim_overrides(ck.tiny)).to(ck.device).train()
    step = training_step(ck, model, batch, size)
    step()  # the first step resolves "auto", compiles and allocates: not what every step pays
    ck.sync()
    places: dict[str, int] = {}
    if ck.device.type == "cuda":
        r["mode"] = "torch.cuda.set_sync_debug_mode('warn'), one step after a warm-up step"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                place = f"{_short(w.filename)}:{w.lineno}"
                places[place] = places.get(place, 0) + 1
    else:
        r["mode"] = "cpu: .item() / .tolist() / .cpu() calls of one step after a warm-up step (no syncs on a CPU)"
        with _count_host_reads(places):
            step()
    r["total"] = sum(places.values())
    r["by_place"] = dict(sorted(places.items(), key=lambda kv: -kv[1]))
    for place, count in list(r["by_place"].items())[:12]:
        print(f"  {count:>4}  {place}", flush=True)
    return r


def training_step(ck: Check, model, batch: int, size: int):
    """A closure running one bf16 training step (forward, backward, AdamW, fused on CUDA) on a fixed
    random batch; it returns the loss (not read back)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ck.device.type == "cuda")
    images = torch.randn(batch, 3, size, size, device=ck.device)

    def step():
        with torch.autocast(ck.device.type, dtype=torch.bfloat16):
            loss = model(images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _short(filename: str) -> str:
    for marker in ("/mixmim/", "/torch/", "/timm/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return filename


@contextlib.contextmanager
def _count_host_reads(places: dict[str, int]):
    """Count Tensor.item / tolist / cpu calls by the Python line that made them."""
    import torch

    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "cpu")}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            place = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} ({name})"
            places[place] = places.get(place, 0) + 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# ------------------------------------------------------------------------------------------ throughput
def section_throughput(ck: Check) -> dict:
    """Images/s, peak memory and MFU of each variant, built and compiled once each, in this process."""
    import torch

    r = ck.result
    r["measured_peak"] = measured_peak(ck)
    env = _read_json(ck.out / f"{ck.prefix}_env.json")
    name = env.get("device") or (torch.cuda.get_device_name(ck.device) if ck.device.type == "cuda" else "cpu")
    nominal = nominal_bf16_tflops(name) if ck.device.type == "cuda" else None
    r["nominal_bf16_tflops"] = nominal
    batch = 4 if ck.tiny else 128
    # The variants that compile come last: when the cap stops the section, what was measured is kept.
    variants = [("mixmim_base", "reference"), ("mixmim_base", "fast"), ("mixmim_base", "simmim"),
                ("vit_base", "mae"), ("mixmim_base", "flex"), ("mixmim_base", "fast+compile")]
    if ck.device.type != "cuda":
        variants = [v for v in variants if v[1] != "flex"]
    r["batch"], r["rows"] = batch, []
    for model_name, variant in variants:
        row = {"model": model_name, "variant": variant, "batch": batch}
        r["rows"].append(row)
        try:
            row.update(_measure_with_flops(ck, model_name, variant, batch, nominal, r["measured_peak"]["tflops"]))
        except SectionTimeout:
            row["error"] = "timed out"
            raise
        except Exception as exc:  # one variant (an OOM, a compiler error) must not take the others
            row["error"] = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            if ck.device.type == "cuda":
                torch.cuda.empty_cache()
        _print_row(row)
        ck.write_partial()
    base = next((x for x in r["rows"] if x["variant"] == "reference" and "images_per_s" in x), None)
    for row in r["rows"]:
        if base is not None and "images_per_s" in row and row["model"] == "mixmim_base":
            row["speed_vs_reference"] = row["images_per_s"] / base["images_per_s"]
            if row["peak_memory_bytes"] and base["peak_memory_bytes"]:  # CUDA only
                row["memory_vs_reference"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
    return r


def measured_peak(ck: Check) -> dict:
    """bf16 matmul throughput over at least half a second (0.05 s in the dry run)."""
    import torch

    size = 512 if ck.tiny else 8192
    a = torch.randn(size, size, device=ck.device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=ck.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ck.sync()
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < (0.05 if ck.tiny else 0.5):
        for _ in range(10):
            a @ b
        repeats += 10
        ck.sync()
    seconds = time.perf_counter() - start
    return {"size": size, "repeats": repeats, "seconds": seconds, "tflops": 2 * size**3 * repeats / seconds / 1e12}


def _build(ck: Check, model_name: str, variant: str):
    import mixmim

    if model_name == "vit_base":
        return mixmim.create_pretrainer(variant, "vit_base", **vit_overrides(ck.tiny))
    options = mixmim_overrides(ck.tiny)
    if variant == "simmim":
        options = {k: v for k, v in options.items() if not k.startswith("decoder")}
        return mixmim.create_pretrainer("simmim", model_name, **options)
    return mixmim.create_pretrainer("mixmim", model_name, attention_impl=variant.split("+")[0], **options)


def _flops_per_image(ck: Check, model_name: str, variant: str, size: int) -> float:
    """Forward + backward model FLOPs per image, counted on the release's maths for every MixMIM path
    (the function they all compute), on a batch of two."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counted = "reference" if variant in ("fast", "flex", "fast+compile") else variant
    model = _build(ck, model_name, counted).to(ck.device)
    images = torch.randn(2, 3, size, size, device=ck.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(ck.device.type, dtype=torch.bfloat16):
        model(images).loss.backward()
    return counter.get_total_flops() / 2


def _measure(ck: Check, model_name: str, variant: str, batch: int) -> dict:
    """Images/s over timed steps after a warm-up that ends when a step compiles nothing new, peak
    memory over the timed steps, and the profiler's split of one more step."""
    import torch
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _build(ck, model_name, variant).to(ck.device).train()
    size = model.encoder.img_size if hasattr(model.encoder, "img_size") else (128 if ck.tiny else 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    if variant.endswith("+compile"):
        # The dry run traces the blocks with Dynamo but skips Inductor's code generation (a minute of C++
        # compilation on two cores); on a GPU the blocks compile as `model.compile=true` compiles them.
        model.encoder.compile_blocks(**({"backend": "eager"} if ck.tiny else {}))
    step = training_step(ck, model, batch, size)

    def compiled_so_far() -> int:
        return counters["frames"]["total"] + counters["aot_autograd"]["total"]

    start = time.perf_counter()
    warm, limit = 0, (2 if ck.tiny else 12)
    while True:  # until a step compiles nothing (at least two steps: the first allocates and resolves "auto")
        before = compiled_so_far()
        step()
        ck.sync()
        warm += 1
        if (warm >= 2 and compiled_so_far() == before) or warm >= limit:
            break
    warm_s = time.perf_counter() - start
    if ck.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ck.device)
    times, losses = [], []
    for _ in range(2 if ck.tiny else 10):
        t0 = time.perf_counter()
        losses.append(step())
        ck.sync()
        times.append(time.perf_counter() - t0)
    row: dict = {"images_per_s": batch * len(times) / sum(times), "step_s": times, "warmup_steps": warm,
                 "warmup_s": warm_s, "loss_finite": bool(all(torch.isfinite(v).item() for v in losses))}
    row["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(ck.device) if ck.device.type == "cuda" else None)
    row["split"] = _step_split(ck, step)
    row["img_size"] = size
    return row


def _measure_with_flops(ck: Check, model_name: str, variant: str, batch: int, nominal: float | None,
                        peak: float) -> dict:
    """:func:`_measure`, then (its model freed) the FLOPs per image and the MFUs."""
    import torch

    row = _measure(ck, model_name, variant, batch)
    if ck.device.type == "cuda":
        torch.cuda.empty_cache()
    row["flops_per_image"] = _flops_per_image(ck, model_name, variant, row["img_size"])
    achieved = row["flops_per_image"] * row["images_per_s"] / 1e12
    row["tflops"] = achieved
    row["mfu_nominal"] = achieved / nominal if nominal else None
    row["mfu_measured_peak"] = achieved / peak
    return row


# Kernel (CUDA) or operator (CPU) names by kind, for the split of a step's device time.
_KINDS = (
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("attention", re.compile(r"attention|fmha|flash|flex|sdpa|triton_tem_fused", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|bmm|addmm|matmul|linear|baddbmm)$|sm\d+_", re.I)),
)


def _step_split(ck: Check, step) -> dict:
    """Share of one step's device time per kind of work (CUDA kernels; CPU operators' self time), and
    the idle share of the wall clock (CUDA: time no kernel ran)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ck.device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        ck.sync()
    wall_us = (time.perf_counter() - start) * 1e6
    totals = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "elementwise": 0.0}
    for event in prof.key_averages():
        if ck.device.type == "cuda":
            spent = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
        else:
            if not event.key.startswith("aten::"):
                continue
            spent = event.self_cpu_time_total
        if not spent:
            continue
        kind = next((k for k, pattern in _KINDS if pattern.search(event.key)), "elementwise")
        totals[kind] += spent
    busy = sum(totals.values())
    split = {k: v / max(wall_us, 1e-9) for k, v in totals.items()}
    split["idle"] = max(0.0, 1 - busy / max(wall_us, 1e-9)) if ck.device.type == "cuda" else None
    split["wall_ms"] = wall_us / 1e3
    return split


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"  {row['model']:<12} {row['variant']:<13} {row['error']}", flush=True)
        return
    mem = row["peak_memory_bytes"]
    mfu = row["mfu_nominal"]
    print(f"  {row['model']:<12} {row['variant']:<13} {row['images_per_s']:>8.1f} img/s  "
          f"{(f'{mem / 2**30:.1f} GiB' if mem else '-'):>9}  {row['tflops']:>7.1f} TFLOP/s  "
          f"MFU {(f'{100 * mfu:.1f}%' if mfu else '-'):>6} (measured peak {100 * row['mfu_measured_peak']:.1f}%)",
          flush=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ loop
def section_loop(ck: Check) -> dict:
    """``mixmim pretrain`` as a user runs it, from this checkout, with CPU and GPU JPEG decoding."""
    r = ck.result
    work = Path(tempfile.mkdtemp(prefix="mixmim-gpu-check-"))
    images = work / "images"
    count = 32 if ck.tiny else 512
    started = time.perf_counter()
    write_jpegs(images, count, (96, 72) if ck.tiny else (320, 240))
    r["images"], r["jpeg_s"] = count, time.perf_counter() - started
    r["runs"] = {}
    for decode in ("cpu", "gpu"):
        r["runs"][decode] = run_pretrain(ck, images, work / "runs", decode)
        ck.write_partial()
    r["pass"] = all(run.get("loss_fell") for run in r["runs"].values())
    return r


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` photo-like JPEGs (benchmarks/synthetic_photos.py), written in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_one, [(folder / f"{i:05d}.jpg", size, i) for i in range(count)], chunksize=16))


def _write_one(job) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic_photos import photo_like

    path, (width, height), seed = job
    photo_like(width, height, seed).save(path, quality=90)


def run_pretrain(ck: Check, images: Path, runs: Path, decode: str) -> dict:
    steps = 6 if ck.tiny else 40
    workers = 2 if ck.tiny else 14
    overrides = [f"output_dir={runs}", f"name=decode_{decode}", f"data.decode={decode}", "data.source=folder",
                 f"data.path={images}", f"train.max_steps={steps}", "train.epochs=1000", f"train.num_workers={workers}",
                 "train.log_every=1", "train.progress=false", "train.checkpoint_every=100000", "optim.warmup_steps=5",
                 "train.amp=" + ("fp32" if ck.device.type == "cpu" else "bf16")]
    if ck.tiny:
        overrides += ["model.name=mixmim_tiny", "model.img_size=128", "model.embed_dim=16", "model.depths=[1,1,2,1]",
                      "model.num_heads=[1,2,2,4]", "model.window_size=[16,8,8,4]", "method.decoder_dim=32",
                      "method.decoder_depth=1", "method.decoder_num_heads=2", "train.batch_size=4", "optim.lr=2e-3"]
    else:
        # attention_impl=fast: the 40 steps measure the loop and its data, not FlexAttention's compilation
        # (the throughput section measures flex).
        overrides += ["model.name=mixmim_base", "model.attention_impl=fast", "train.batch_size=128", "optim.lr=1.5e-4"]
    command = [sys.executable, "-m", "mixmim", "pretrain", *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT),
                              timeout=max(10, CAPS["loop"] // 2 - 5))
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:  # what it logged until then is still read below
        returncode = "timeout"
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    run: dict = {"command": " ".join(command[1:]), "seconds": time.perf_counter() - started,
                 "returncode": returncode, "stderr_tail": stderr[-1500:]}
    metrics = runs / f"decode_{decode}" / "metrics.csv"
    if metrics.exists():
        rows = [line.split(",") for line in metrics.read_text().splitlines()]
        values = [dict(zip(rows[0], row)) for row in rows[1:]]
        losses = [float(v["loss"]) for v in values]
        speeds = [float(v["img_per_s"]) for v in values]
        fifth = max(1, len(losses) // 5)
        run["steps"] = len(values)
        run["images_per_s"] = sum(speeds[fifth:]) / max(1, len(speeds[fifth:]))  # past the first steps
        run["loss_first"] = sum(losses[:fifth]) / fifth
        run["loss_last"] = sum(losses[-fifth:]) / fifth
        run["loss_fell"] = returncode == 0 and run["loss_last"] < run["loss_first"]
    print(f"  pretrain decode={decode}: rc {returncode}, {run.get('images_per_s', float('nan')):.1f} img/s, "
          f"loss {run.get('loss_first', float('nan')):.4f} -> {run.get('loss_last', float('nan')):.4f} "
          f"in {run['seconds']:.0f} s", flush=True)
    return run


# --------------------------------------------------------------------------------------------- driver
RUNNERS = {"env": section_env, "correctness": section_correctness, "syncs": section_syncs,
           "throughput": section_throughput, "loop": section_loop}


def _on_alarm(signum, frame):
    raise SectionTimeout()


def run_section(ck: Check, name: str, cap: float) -> dict:
    """One section under its cap; its JSON is written when it ends, however it ends."""
    ck.section, ck.result = name, {}
    status, started = "ok", time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, cap))
    try:
        if ck.fail == name:
            raise RuntimeError(f"failure planted in section {name!r} (--fail-section)")
        result = RUNNERS[name](ck)
        if result.get("pass") is False:
            status = "failed"
    except SectionTimeout:
        status, result = "timeout", dict(ck.result, error=f"stopped at its cap of {cap:.0f} s")
    except Exception as exc:
        status = "error"
        result = dict(ck.result, error=f"{exc.__class__.__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    _write(ck.out / f"{ck.prefix}_{name}.json", {"section": name, "status": status, "seconds": seconds, **result})
    return {"status": status, "seconds": seconds, **({"error": result["error"]} if "error" in result else {})}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", text.lower())).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON goes")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: the dry run)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: every section in seconds")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--fail-section", choices=SECTIONS, help="make this section raise at its start: shows that "
                        "the others still write their results")
    args = parser.parse_args(argv)

    try:
        import torch

        import mixmim  # noqa: F401  (the checkout's src/ on PYTHONPATH)
    except ImportError as exc:
        print(f"gpu_check: cannot import {exc.name!r}; run from the checkout as "
              "PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU and torch.cuda.is_available() is False here; for the dry run use "
              "--device cpu --tiny", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    prefix = f"{'cuda' if device.type == 'cuda' else 'cpu'}_{_slug(name) if device.type == 'cuda' else ''}"
    prefix = prefix.rstrip("_") + ("_tiny" if args.tiny else "")
    args.out.mkdir(parents=True, exist_ok=True)
    ck = Check(device=device, tiny=args.tiny, out=args.out, prefix=prefix, fail=args.fail_section)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2 if args.tiny else 16))
    print(f"gpu_check on {name} (torch {torch.__version__}); results: {args.out}/{prefix}_*.json", flush=True)
    summary: dict = {"device": name, "tiny": args.tiny, "budget_s": args.budget, "sections": {}}
    begun = time.perf_counter()
    for section in args.sections:
        left = args.budget - (time.perf_counter() - begun)
        cap = min(CAPS[section], left) if not args.tiny else min(CAPS[section] * 2, left)
        if left < (MINIMUM[section] if not args.tiny else 1):
            summary["sections"][section] = {"status": "skipped", "error": f"{left:.0f} s of the budget left"}
            print(f"== {section}: skipped ({left:.0f} s of the budget left)", flush=True)
            continue
        print(f"== {section} (cap {cap:.0f} s)", flush=True)
        summary["sections"][section] = outcome = run_section(ck, section, cap)
        print(f"== {section}: {outcome['status']} in {outcome['seconds']:.1f} s"
              + (f" ({outcome['error'].splitlines()[0][:200]})" if "error" in outcome else ""), flush=True)
        summary["seconds"] = time.perf_counter() - begun
        _write(args.out / f"{prefix}_summary.json", summary)
    bad = [s for s, o in summary["sections"].items() if o["status"] != "ok"]
    print(f"gpu_check: {len(summary['sections']) - len(bad)} of {len(summary['sections'])} sections ok"
          + (f"; not ok: {', '.join(bad)}" if bad else "") + f" ({time.perf_counter() - begun:.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
