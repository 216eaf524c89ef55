"""What JPEG draft mode (decoding at 1/2, 1/4 or 1/8 scale) changes in the pretraining crops, against
what decoding in full gives, compared with the noise JPEG itself adds. Decides ``data.draft``'s default
and ``data.draft_margin`` (docs/data.md).

For each photo (scikit-image's bundled photos, lossless PNGs mostly, at output sizes 64 and 112 since
they are small; synthetic 4000x3000 camera-like photos at 224), encoded as JPEG quality 90, and each
seed, the crop of :class:`mixmim.data.transforms.PretrainTransform` is taken

- from the full decode (the reference: what the code did without draft mode),
- from the lossless original (the noise of JPEG q90 itself),
- from the full decode with PIL's resampler instead of torchvision's (the noise of swapping two
  antialiased bicubic resamplers),
- from a draft decode, the reduction chosen so that the crop keeps ``margin`` x the output resolution,
  for margins 1, 1.5 and 2.

Differences are mean absolute differences of the uint8 crops (grey levels, 0-255), before normalisation.

    python benchmarks/draft_fidelity.py --json benchmarks/results/draft_fidelity.json
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_photos import photo_like  # noqa: E402

MARGINS = (1.0, 1.5, 2.0)


def measure(sources, size: int, seeds: int) -> dict:
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from mixmim.data.images import decode, open_image
    from mixmim.data.transforms import pretrain_transform

    full = pretrain_transform(size, draft=False)
    drafts = {m: pretrain_transform(size, draft_margin=m) for m in MARGINS}
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for source in sources:
        buffer = io.BytesIO()
        source.save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        decoded = decode(data)
        for seed in range(seeds):
            d = full.draw(*decoded.size, seed)
            reference = full.pixels(decoded, d).float()
            add("jpeg_q90_vs_lossless", (full.pixels(source, d).float() - reference).abs().mean().item())
            box = (d.left, d.top, d.left + d.width, d.top + d.height)
            pil = F.pil_to_tensor(decoded.resize((size, size), Image.Resampling.BICUBIC, box=box))
            pil = pil.flip(-1) if d.flip else pil
            add("pil_vs_torchvision_resampler", (pil.float() - reference).abs().mean().item())
            for m, t in drafts.items():
                add(f"draft_margin_{m:g}", (t.pixels(open_image(data), d).float() - reference).abs().mean().item())
                add(f"draft_scale_margin_{m:g}", float(t.draft_scale(d)))
    return {k: float(np.mean(v)) for k, v in rows.items()} | {"crops": len(next(iter(rows.values())))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--camera-photos", type=int, default=4)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from mixmim.data.datasets import bundled_photo_paths

    torch.set_num_threads(1)
    start = time.time()
    bundled = [Image.open(path).convert("RGB") for path in bundled_photo_paths()]
    camera = [photo_like(4000, 3000, seed) for seed in range(args.camera_photos)]
    sets = {"bundled_photos@64": measure(bundled, 64, args.seeds),
            "bundled_photos@112": measure(bundled, 112, args.seeds),
            "camera_like_4000x3000@224": measure(camera, 224, args.seeds)}
    print(f"{'set':<28}{'JPEG q90':>10}{'resampler':>11}" + "".join(f"{'m=' + format(m, 'g'):>9}" for m in MARGINS)
          + "   mean draft scale per margin")
    for name, r in sets.items():
        print(f"{name:<28}{r['jpeg_q90_vs_lossless']:>10.3f}{r['pil_vs_torchvision_resampler']:>11.3f}"
              + "".join(f"{r[f'draft_margin_{m:g}']:>9.3f}" for m in MARGINS)
              + "   " + " / ".join(f"{r[f'draft_scale_margin_{m:g}']:.2f}" for m in MARGINS))
    print("mean absolute difference to the full decode, grey levels (0-255)")
    within = {f"{m:g}": all(r[f"draft_margin_{m:g}"] <= r["jpeg_q90_vs_lossless"] for r in sets.values())
              for m in MARGINS}
    print("draft change no larger than JPEG q90's own, on every set: "
          + ", ".join(f"margin {m}: {'yes' if ok else 'no'}" for m, ok in within.items()))
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        out = {"command": " ".join(["python", "benchmarks/draft_fidelity.py", *(argv or sys.argv[1:])]),
               "commit": commit, "seconds": round(time.time() - start, 1), "units": "mean |difference|, grey levels",
               "sets": sets, "draft_within_jpeg_noise": within}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
