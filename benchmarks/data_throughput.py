"""Data loading throughput per worker process (issue 20's acceptance): images/s of one process producing
pretraining items (RandomResizedCrop 224 + flip + normalise), for

- (a) ``torchvision``: ``torchvision.datasets.ImageFolder`` + the same augmentation as torchvision v2
  transforms (``v2_pretrain_transform``: the loader every anchor uses; unseeded);
- (b) ``ours_folder``: :class:`mixmim.data.SourceDataset` on the folder, ``(index, seed)`` items;
- (c) ``ours_shards``: the same on the folder's WebDataset shards (``mixmim shards``), read through the index;
- (d) ``bare``: the same operations as ours (open, draft, decode, crop + resize, flip, normalise) called
  directly, with no data set, seeding or skip handling: the limit;
- ``base_cfc46db``: the code at the base commit cfc46db (decode fully with ``load_rgb``, then the v2
  transform under ``fork_rng`` + ``torch.manual_seed``), reproduced here so that one run measures both.

on two synthetic folders the script creates (:mod:`synthetic_photos`): ImageNet-like JPEGs (~500x375,
q90) and camera-like photos (4000x3000, q90). Every variant reads the same items in the same order,
one torch thread, variants interleaved over ``--rounds`` rounds (median kept), after one untimed pass
that puts the files in the page cache. The load average (``/proc/loadavg``) at the start and end is
kept in the JSON, with the commit the code ran at.

    python benchmarks/data_throughput.py --json benchmarks/results/data_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_photos import write_folder  # noqa: E402

VARIANTS = ("torchvision", "ours_folder", "ours_shards", "bare", "base_cfc46db")


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def _base_load_rgb(path):
    """``mixmim.data.images.load_rgb`` at cfc46db: full decode, then exif_transpose (a copy) and RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as handle:
        handle.load()
        image = ImageOps.exif_transpose(handle)
    return image if image.mode == "RGB" else image.convert("RGB")


def variants(folder: Path, shards: Path, size: int):
    """name -> (items: (index, seed) -> tensor, number of images)."""
    import torch
    from torchvision.datasets import ImageFolder

    from mixmim.data.datasets import SourceDataset
    from mixmim.data.shards import ShardSource
    from mixmim.data.sources import FolderSource
    from mixmim.data.transforms import pretrain_transform, v2_pretrain_transform

    v2 = v2_pretrain_transform(size)
    ours = pretrain_transform(size)
    tv = ImageFolder(str(folder), transform=v2)
    on_folder = SourceDataset(FolderSource(folder), ours)
    on_shards = SourceDataset(ShardSource(shards), ours)
    files = on_folder.source.files

    def base(key):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key[1])
            return v2(_base_load_rgb(files[key[0]]))

    return {"torchvision": lambda key: tv[key[0]][0],
            "ours_folder": lambda key: on_folder[key]["image"],
            "ours_shards": lambda key: on_shards[key]["image"],
            "bare": lambda key: ours(files[key[0]], seed=key[1]),
            "base_cfc46db": base}, len(files)


def measure(folder: Path, shards: Path, size: int, items: int, rounds: int) -> dict:
    from mixmim.data.sampler import ResumableSampler

    runs, n = variants(folder, shards, size)
    keys = list(ResumableSampler(n, 1, seed=0))[:items]
    for run in runs.values():  # the page cache, lazy imports, file descriptors: not measured
        for key in keys[: min(len(keys), 4)]:
            run(key)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for key in keys:
                run(key)
            times[name].append(time.perf_counter() - start)
    result = {name: {"images_per_s": len(keys) / float(np.median(t)), "seconds": t} for name, t in times.items()}
    for name in result:
        for ref in ("torchvision", "bare", "base_cfc46db"):
            result[name][f"x_{ref}"] = result[name]["images_per_s"] / result[ref]["images_per_s"]
    return {"images": n, "items_per_round": len(keys), "rounds": rounds, "variants": result}


def decode_ms_by_scale(paths: list[Path], rounds: int) -> dict[str, float]:
    """Milliseconds to decode the files in full and at 1/2, 1/4, 1/8 scale (PIL's draft): what draft mode can
    save (entropy decoding does not shrink with the scale)."""
    from PIL import Image

    out = {}
    for scale in (1, 2, 4, 8):
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for path in paths:
                with Image.open(path) as image:
                    if scale > 1:
                        image.draft("RGB", (image.width // scale, image.height // scale))
                    image.load()
            best = min(best, (time.perf_counter() - start) / len(paths) * 1e3)
        out[f"1/{scale}"] = best
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--imagenet-like", type=int, default=256, help="images in the ImageNet-like folder")
    p.add_argument("--camera", type=int, default=8, help="photos in the camera-like folder")
    p.add_argument("--items", type=int, default=256, help="items per variant per round (ImageNet-like)")
    p.add_argument("--camera-items", type=int, default=16, help="items per variant per round (camera-like)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", help="where to write the synthetic folders (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch

    from mixmim.data.shards import write_shards

    torch.set_num_threads(1)
    load_start, start = _loadavg(), time.time()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        sets = {"imagenet_like_500x375": (args.imagenet_like, (500, 375), 0.2, args.items),
                "camera_like_4000x3000": (args.camera, (4000, 3000), 0.0, args.camera_items)}
        results = {}
        for name, (count, size, jitter, items) in sets.items():
            paths = write_folder(root / name, count, size, seed=len(name), jitter=jitter)
            write_shards(root / name, root / f"{name}_shards", "64MB")
            mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
            results[name] = {"mean_file_kB": round(mean_kb, 1), **measure(root / name, root / f"{name}_shards",
                                                                           args.size, items, args.rounds),
                             "decode_ms_by_scale": decode_ms_by_scale(paths[:8], args.rounds)}
    load_end = _loadavg()
    print(f"images/s per worker process (one thread), RandomResizedCrop {args.size} + flip + normalise")
    header = f"{'set':<24}" + "".join(f"{v:>14}" for v in VARIANTS)
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:<24}" + "".join(f"{r['variants'][v]['images_per_s']:>14.1f}" for v in VARIANTS))
    im, cam = results["imagenet_like_500x375"]["variants"], results["camera_like_4000x3000"]["variants"]
    goals = {
        "imagenet_like: ours_folder >= torchvision": im["ours_folder"]["x_torchvision"] >= 1.0,
        "imagenet_like: ours_shards >= torchvision": im["ours_shards"]["x_torchvision"] >= 1.0,
        "imagenet_like: ours_folder within 1.25x of bare": im["ours_folder"]["x_bare"] >= 1 / 1.25,
        "imagenet_like: ours_shards within 1.25x of bare": im["ours_shards"]["x_bare"] >= 1 / 1.25,
        "camera_like: ours_folder >= 3x base_cfc46db": cam["ours_folder"]["x_base_cfc46db"] >= 3.0,
    }
    for name, r in results.items():
        v = r["variants"]
        print(f"{name}: ours_folder {v['ours_folder']['x_torchvision']:.2f}x torchvision, "
              f"{v['ours_folder']['x_bare']:.2f}x bare, {v['ours_folder']['x_base_cfc46db']:.2f}x base; "
              f"ours_shards {v['ours_shards']['x_torchvision']:.2f}x torchvision, "
              f"{v['ours_shards']['x_bare']:.2f}x bare")
    for name, r in results.items():
        print(f"{name}: decode ms (best of {args.rounds}) " + ", ".join(f"{k}: {v:.1f}"
                                                                      for k, v in r["decode_ms_by_scale"].items()))
    for goal, ok in goals.items():
        print(f"{'met' if ok else 'NOT met'}: {goal}")
    print(f"load average at start: {load_start}; at end: {load_end}")
    if args.json:
        git = ["git", "-C", str(Path(__file__).parent)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "src", "benchmarks"], capture_output=True,
                                    text=True).stdout.strip())
        out = {"command": " ".join(["python", "benchmarks/data_throughput.py", *(argv or sys.argv[1:])]),
               "commit": commit, "uncommitted_changes": dirty, "torch": torch.__version__,
               "cpu": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)",
               "loadavg_start": load_start, "loadavg_end": load_end, "seconds": round(time.time() - start, 1),
               "size": args.size, "sets": results, "goals": goals}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
