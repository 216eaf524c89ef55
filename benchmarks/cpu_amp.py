"""fp32 against bf16 autocast on this CPU, per method on one encoder, interleaved in one process (issue 35).

A training step (forward, backward, AdamW) of each (method, precision) is timed in alternating rounds, so
that a busier or quieter stretch of the machine falls on both precisions alike; images/s is the median
over rounds. The step's model FLOPs (counted once in fp32 with ``torch.utils.flop_counter``) divided by its
time give GFLOP/s, reported as a fraction of the measured bf16 and fp32 matmul peaks of the same threads
(2048 x 2048 products for at least half a second each): the share of what the processor can do that the
step uses. Whether the CPU computes bf16 natively (``avx512_bf16`` / AMX, from torch's CPU capability) is
written beside the numbers: without it bf16 is emulated and slower.

    python benchmarks/cpu_amp.py --json benchmarks/results/cpu_amp.json            # MixMIM and MAE, 2 threads
    python benchmarks/cpu_amp.py --methods mixmim simmim mae --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (encoder, encoder options, batch): MixMIM's hierarchical encoder in a tiny shape at 224, and a ViT-Ti/16
# for the methods that need a plain ViT (MAE, MixedAE) -- the shapes of issue 35's measurement.
SETTINGS = {
    "mixmim": ("mixmim_base", dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)), 16),
    "simmim": ("mixmim_base", dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)), 16),
    "mae": ("vit_tiny", {}, 8),
    "mixedae": ("vit_tiny", {}, 8),
}


def native_bf16() -> dict:
    """What torch reports of the CPU's bf16 arithmetic."""
    import torch

    cpu = torch.cpu
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()),
            "amx_tile": bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())}


def matmul_peak(dtype, seconds: float = 0.5, size: int = 2048) -> float:
    """GFLOP/s of size x size matmuls in ``dtype`` on the current threads, over at least ``seconds``."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def build(method: str):
    import torch

    import mixmim

    name, options, batch = SETTINGS[method]
    torch.manual_seed(0)
    decoder = dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4) if method != "simmim" else {}
    model = mixmim.create_pretrainer(method, name, img_size=224, **options, **decoder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    return model, optimizer, images


def step(model, optimizer, images, bf16: bool) -> None:
    """One training step as the loop runs it: bf16 on the CPU turns the fused SDPA kernels off
    (``use_matmul_attention``, what the Trainer does), fp32 keeps them."""
    import torch

    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = not bf16

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(images).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def profile_step(model, optimizer, images, bf16: bool, top: int) -> list[dict]:
    """The ``top`` operators by self CPU time of one step, with their share of the step's operator time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, optimizer, images, bf16)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in ranked]


def flops_per_step(model, images) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(images).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=["mixmim", "mae"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating fp32 / bf16 rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one step in each precision and print the N operators with the most "
                             "self time (torch.profiler), kept in the JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    info = native_bf16()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"capability {info['capability']}, avx512_bf16 {info['avx512_bf16']}, AMX {info['amx_tile']}; "
          f"matmul peak fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"({peaks['bf16'] / peaks['fp32']:.2f}x)", flush=True)
    rows = []
    for method in args.methods:
        model, optimizer, images = build(method)
        flops = flops_per_step(model, images)
        for bf16 in (False, True):  # warm-up: allocations, autocast caches, oneDNN primitives
            step(model, optimizer, images, bf16)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(model, optimizer, images, precision == "bf16")
                times[precision].append((time.perf_counter() - start) / args.steps)
        batch = images.shape[0]
        row = {"method": method, "encoder": SETTINGS[method][0], "batch": batch, "gflop_per_step": flops / 1e9}
        for precision, values in times.items():
            seconds = statistics.median(values)
            row[precision] = {"step_s": values, "images_per_s": batch / seconds,
                              "gflops": flops / seconds / 1e9,
                              "of_bf16_peak": flops / seconds / 1e9 / peaks["bf16"],
                              "of_fp32_peak": flops / seconds / 1e9 / peaks["fp32"]}
        row["bf16_speedup"] = row["bf16"]["images_per_s"] / row["fp32"]["images_per_s"]
        if args.profile:
            for precision in ("fp32", "bf16"):
                row[precision]["top_ops"] = profile_step(model, optimizer, images, precision == "bf16", args.profile)
        rows.append(row)
        for precision in ("fp32", "bf16") if args.profile else ():
            print(f"    {method} {precision}: " + ", ".join(f"{op['name']} {100 * op['share']:.0f}%"
                                                       for op in row[precision]["top_ops"]), flush=True)
        print(f"  {method:<8} {SETTINGS[method][0]:<12} b{batch:<3} fp32 {row['fp32']['images_per_s']:6.2f} img/s "
              f"({100 * row['fp32']['of_fp32_peak']:4.1f}% of fp32 peak) | bf16 {row['bf16']['images_per_s']:6.2f} "
              f"img/s ({100 * row['bf16']['of_bf16_peak']:4.1f}% of bf16 peak) | x{row['bf16_speedup']:.2f}",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cpu = platform.processor() or platform.machine()
        args.json.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
                                         "torch": torch.__version__, "native_bf16": info,
                                         "matmul_peak_gflops": peaks, "rounds": args.rounds, "steps": args.steps,
                                         "loadavg": _loadavg(), "rows": rows}, indent=2) + "\n")
    return 0


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
