"""Pretraining throughput: MixMIM vs SimMIM on the same encoder, for any encoder of the registry
(``mixmim_*``, ``vit_*``, ``swin_*``, ``pvt_v2_*``, ``resnetv2_*``).

Variants (``--variants``; by default every variant that exists for the model):

- ``fast`` / ``reference``: MixMIM with ``attention_impl="fast"`` / ``"reference"``; these
  attention implementations exist for the ``mixmim_*`` encoders only;
- ``mixmim``: MixMIM with the encoder as built by default (the default variants of a ``mixmim_*``
  model are ``fast``, ``reference``, ``simmim``, as before; of any other model ``mixmim``, ``simmim``);
- ``simmim``: SimMIM on the same encoder.

Ratios (``x base``) are to ``reference`` for ``mixmim_*`` models and to ``mixmim`` for the others.

Every (model, batch size, variant) runs a full training step (forward, backward, AdamW; fused AdamW
on CUDA) in its own fresh subprocess, so that peak memory is comparable between variants:
CUDA reports ``torch.cuda.max_memory_allocated``; CPU reports the growth of the peak resident set
size (``ru_maxrss``) over the resident size measured after the model, optimiser and inputs exist,
i.e. what the steps themselves add (activations, gradients, optimiser state, workspaces).

Model FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one
forward and backward of a small batch: for ``mixmim_*`` on the reference path (the function every
MixMIM path computes; the fast path skips cross-group pairs and recomputes in the backward, which
would otherwise change the count), for other encoders on the path that runs, and on SimMIM's own
path. MFU = FLOPs/image x images/s / peak, given for CUDA (H100 bf16 dense peak 989 TFLOP/s unless
``--peak-tflops`` says otherwise). The load average (``/proc/loadavg``) at the start and the end of
the invocation is printed and kept in the JSON: on a shared machine it says how far to trust the
speeds (memory does not depend on the load).

Compiled variants (``+compile``, ``--compile``) warm up until a whole step compiles nothing new
(torch.compile compiles every block on first use and again for every stage's shapes, and the backward
on its first call; counted with ``torch._dynamo.utils.counters``), at most ``--max-warmup`` steps; the
timed steps are the steady state, and ``compile_s`` (the warm-up less its steps at the steady-state
speed) is reported apart.

    python benchmarks/pretrain_throughput.py --models mixmim_tiny --batch-sizes 16 --img-size 224 \\
        --steps 3 --warmup 1 --amp fp32 --device cpu --threads 2 --json benchmarks/results/cpu.json
    python benchmarks/pretrain_throughput.py --models vit_tiny swin_tiny pvt_v2_b2 resnetv2_50 \\
        --batch-sizes 4 --steps 2 --warmup 1 --device cpu --json benchmarks/results/cpu_encoders.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("fast", "reference", "flex", "auto", "fast+compile", "mixmim", "simmim", "mae", "mixedae")
# MixMIM's attention implementations (mixmim_* encoders only); "+compile" adds torch.compile per block.
ATTENTION_VARIANTS = ("fast", "reference", "flex", "auto", "fast+compile")
VIT_ONLY = ("mae", "mixedae")  # methods that need a plain ViT


def _family(model: str) -> str:
    from mixmim.models.registry import family_of

    return family_of(model)


def default_variants(model: str) -> list[str]:
    """What runs for ``model`` when --variants is not given."""
    return ["fast", "reference", "simmim"] if _family(model) == "mixmim" else ["mixmim", "simmim"]


def baseline_variant(model: str) -> str:
    """The variant the ``x base`` ratios divide by."""
    return "reference" if _family(model) == "mixmim" else "mixmim"


def _unavailable(variant: str, model: str) -> str | None:
    """Why ``variant`` cannot run on ``model`` (None: it can)."""
    if variant in ATTENTION_VARIANTS and _family(model) != "mixmim":
        return f"attention_impl={variant!r} exists for the mixmim_* encoders only, not {model}"
    if variant in VIT_ONLY and _family(model) != "vit":
        return f"{variant} needs a plain ViT, not {model}"
    return None


def _build(variant: str, model: str, img_size: int, window_size: list[int] | None = None):
    from mixmim.methods.factory import create_pretrainer, method_names

    size = {"img_size": img_size, **({"window_size": window_size} if window_size else {})}
    if variant == "simmim":
        if "simmim" not in method_names():
            return None
        return create_pretrainer("simmim", model, **size)
    if variant in ("mixmim", "mae", "mixedae"):
        return create_pretrainer(variant, model, **size)
    return create_pretrainer("mixmim", model, attention_impl=variant.split("+")[0], **size)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """``aten.convolution_backward`` as FLOPs: the input gradient and the weight gradient each cost
    what the forward convolution costs. torch's own formula (2.14) counts the weight gradient of a
    grouped convolution as if it were dense, ``groups`` times too many (a depth-wise 3x3 conv over
    512 channels at 56x56: 14.8 GFLOP counted for a 0.03 GFLOP forward); PVT v2's MLPs are full of
    depth-wise convs. Equal to torch's count for ungrouped convolutions."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _count_flops(variant: str, args, device) -> float:
    """Forward + backward FLOPs per image on the smallest batch the method takes, at least 2 (FLOPs are
    linear in the batch; MixedAE mixes groups of 1/r images, so its batch is a multiple of 1/r)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if variant in ATTENTION_VARIANTS:  # every attention path computes the reference's function
        variant = "reference"
    model = _build(variant, args.model, args.img_size).to(device)
    count = max(2, int(getattr(model, "batch_multiple", 1)))
    images = torch.randn(count, 3, args.img_size, args.img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter, _autocast(args, device):
        model(images).loss.backward()
    return counter.get_total_flops() / count


def _autocast(args, device):
    import contextlib

    import torch

    if args.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def worker(args) -> dict:
    """One variant in this (fresh) process; returns its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _build(args.variant, args.model, args.img_size, args.window_size)
    if model is None:
        return {"skipped": "method 'simmim' is not registered in mixmim.methods.factory"}
    model = model.to(device).train()
    params = {"params": sum(p.numel() for p in model.parameters()),
              "encoder_params": sum(p.numel() for p in model.encoder.parameters())}
    if args.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    if args.compile or args.variant.endswith("+compile"):
        model.encoder.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    def step():
        with _autocast(args, device):
            loss = model(images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = _rss_bytes()
    compiled = args.compile or args.variant.endswith("+compile")
    warm_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_steps, recompiling = args.warmup, []
    if compiled:
        # torch.compile compiles each block's graph on first use and recompiles when a block sees new shapes
        # (every stage has its own): keep stepping until a whole step compiles nothing, so that no compilation
        # falls inside the timed steps. What the warm-up cost is reported apart (compile_s).
        while warmup_steps < args.max_warmup:
            before = _compile_events()
            step()
            sync()
            warmup_steps += 1
            recompiling.append(_compile_events() - before)
            if recompiling[-1] == 0:
                break
        else:
            print(f"warning: still compiling after {warmup_steps} warm-up steps (--max-warmup)", file=sys.stderr)
    warm_s = time.perf_counter() - warm_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    events_before = _compile_events() if compiled else 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        **params,
        "images_per_s": args.batch * len(times) / sum(times),
        "images_per_s_best_step": args.batch / min(times),
        "step_s": times,
        "warmup_steps": warmup_steps,
        "warmup_s": warm_s,
    }
    if compiled:
        # The warm-up less what its steps would have cost at the steady-state speed.
        result["compile_s"] = max(0.0, warm_s - warmup_steps * sum(times) / len(times))
        result["compile_events_per_warmup_step"] = recompiling
        result["compile_events_in_timed_steps"] = _compile_events() - events_before  # 0: nothing compiled there
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        # ru_maxrss is in KiB on Linux: the process peak, minus what existed before the first step.
        result["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    if not args.no_flops:
        result["flops_per_image"] = _count_flops(args.variant, args, device)
    return result


def _compile_events() -> int:
    """Graphs compiled so far by torch.compile (Dynamo frames, AOT autograd graphs, Inductor compilations:
    the backward is compiled on its first call)."""
    from torch._dynamo.utils import counters

    return (counters["frames"]["total"] + counters["aot_autograd"]["total"]
            + counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"])


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores visible)"


def _loadavg() -> str | None:
    """/proc/loadavg (1, 5 and 15 minute load averages, ...): how busy the machine was."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mixmim_tiny"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--window-size", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="windows per stage, e.g. 16,16,8,4 for mixmim_* at 128 px (default: the model's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-warmup", type=int, default=30,
                   help="compiled variants: warm-up steps allowed until a step compiles nothing new")
    p.add_argument("--amp", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every variant")
    p.add_argument("--compile", action="store_true", help="torch.compile every encoder block")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per stage")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="default: fast reference simmim for mixmim_* models, mixmim simmim for the others; "
                        "fast/reference are skipped with a note on other encoders")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 bf16 dense)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--json", help="write the results here")
    # Internal: run one variant and print its JSON (used for the per-variant subprocesses).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0

    from mixmim.models.registry import MODELS

    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    loadavg_start = _loadavg()
    rows = []
    for model in args.models:
        for batch in args.batch_sizes:
            for variant in args.variants or default_variants(model):
                why = _unavailable(variant, model)
                if why is not None:
                    print(f"note: {model} {variant} skipped: {why}")
                    rows.append(dict(model=model, family=_family(model), batch=batch, variant=variant, skipped=why))
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--batch", str(batch),
                       "--variant", variant, "--img-size", str(args.img_size), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--max-warmup", str(args.max_warmup), "--amp", args.amp,
                       "--device", args.device,
                       "--threads", str(args.threads)]
                cmd += ["--compile"] * args.compile + ["--grad-checkpointing"] * args.grad_checkpointing
                if args.window_size:
                    cmd += ["--window-size", ",".join(map(str, args.window_size))]
                cmd += ["--no-flops"] * args.no_flops
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{model} b{batch} {variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    res = {"error": proc.stderr[-2000:]}
                else:
                    res = json.loads(lines[-1][7:])
                if "skipped" in res:
                    print(f"note: {variant} skipped: {res['skipped']}")
                rows.append(dict(model=model, family=_family(model), batch=batch, variant=variant, **res))
    loadavg_end = _loadavg()

    for row in rows:
        base_name = baseline_variant(row["model"])
        base = next((r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                     and r["variant"] == base_name and "images_per_s" in r), None)
        if "images_per_s" in row and base is not None:
            row["baseline"] = base_name
            row["speed_vs_baseline"] = row["images_per_s"] / base["images_per_s"]
            row["memory_vs_baseline"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
            if base_name == "reference":  # the keys of earlier result files
                row["speed_vs_reference"] = row["speed_vs_baseline"]
                row["memory_vs_reference"] = row["memory_vs_baseline"]
        if args.device == "cuda" and "flops_per_image" in row and "images_per_s" in row:
            row["mfu"] = row["flops_per_image"] * row["images_per_s"] / (args.peak_tflops * 1e12)

    header = f"{'model':<16}{'batch':>6} {'variant':<10}{'img/s':>9}{'x base':>7}{'peak MiB':>10}{'x base':>7}" \
             f"{'GFLOP/img':>11}{'MFU':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "images_per_s" not in r:
            print(f"{r['model']:<16}{r['batch']:>6} {r['variant']:<10}  {'skipped' if 'skipped' in r else 'failed'}")
            continue
        flops = r.get("flops_per_image")
        print(f"{r['model']:<16}{r['batch']:>6} {r['variant']:<10}{r['images_per_s']:>9.2f}"
              f"{r.get('speed_vs_baseline', float('nan')):>7.2f}{r['peak_memory_bytes'] / 2**20:>10.0f}"
              f"{r.get('memory_vs_baseline', float('nan')):>7.2f}"
              f"{(flops / 1e9 if flops else float('nan')):>11.1f}"
              + (f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'-':>7}"))  # MFU on CUDA only
    for r in rows:
        if "compile_s" in r:
            print(f"{r['model']} b{r['batch']} {r['variant']}: compiled in {r['compile_s']:.1f} s over "
                  f"{r['warmup_steps']} warm-up steps (compilations per step {r['compile_events_per_warmup_step']}); "
                  "img/s above is the steady state after it")
    print("x base: ratio to the 'reference' variant for mixmim_* models, to 'mixmim' for the others")
    print(f"load average at start: {loadavg_start}; at end: {loadavg_end}")
    if args.json:
        import torch

        meta = {k: v for k, v in vars(args).items() if k not in ("worker", "model", "batch", "variant", "json")}
        out = {"device": _device_name(args.device), "torch": torch.__version__, "args": meta,
               "loadavg_start": loadavg_start, "loadavg_end": loadavg_end, "results": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
