"""Compare attention_impl="flex" (and "fast") with "reference" on CUDA: outputs and gradients.

Runs a small MixMIM encoder at 224 in float32 with one mask per batch and per-sample masks, k = 2..5
groups, and prints the largest absolute and relative errors of the output, the input gradient and
every parameter gradient (relative-position-bias tables included). Exits non-zero above --tol.

    python benchmarks/check_flex_cuda.py --tol 1e-4
"""

from __future__ import annotations

import argparse
import sys

import torch

from mixmim.methods.masking import random_groups
from mixmim.models.mixmim_vit import MixMIMTransformer


def run(enc, x, groups, k):
    enc.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = enc.forward_tokens(xi, groups, num_groups=k)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y * w).sum().backward()
    return {"output": y.detach(), "input grad": xi.grad,
            **{n: p.grad for n, p in enc.named_parameters() if p.grad is not None}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tol", type=float, default=1e-4, help="max error relative to the tensor's max magnitude")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", help="write the per-case errors here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: FlexAttention is only used on CUDA")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = dict(img_size=224, embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    ref = MixMIMTransformer(**cfg, attention_impl="reference").cuda()
    for prm in ref.parameters():
        prm.data.add_(torch.randn_like(prm) * 0.02)
    worst = 0.0
    cases = []
    for impl in ("flex", "fast"):
        other = MixMIMTransformer(**cfg, attention_impl=impl).cuda()
        other.load_state_dict(ref.state_dict())
        for k in (2, 3, 4, 5):
            for per_sample in (False, True):
                groups = random_groups(ref.grids[-1], 0.5, num_groups=k, count=args.batch if per_sample else 1).cuda()
                x = torch.randn(args.batch, ref.grids[0][0] * ref.grids[0][1], ref.embed_dim, device="cuda")
                want, got = run(ref, x, groups, k), run(other, x, groups, k)
                errs = {n: ((got[n] - want[n]).abs().max().item(), want[n].abs().max().item()) for n in want}
                name, (err, scale) = max(errs.items(), key=lambda e: e[1][0] / max(e[1][1], 1e-12))
                rel = err / max(scale, 1e-12)
                worst = max(worst, rel)
                out_err = errs["output"][0]
                cases.append({"impl": impl, "k": k, "per_sample": per_sample, "output_abs": out_err,
                              "worst_tensor": name, "worst_rel": rel})
                print(f"{impl:<5} k={k} per_sample={per_sample!s:<5}  output max abs err {out_err:.3g}  "
                      f"worst tensor {name}: abs {err:.3g}, rel {rel:.3g}")
    print(f"worst relative error {worst:.3g} (tolerance {args.tol:g}) on {torch.cuda.get_device_name()}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tolerance": args.tol, "worst_rel": worst,
                       "pass": worst <= args.tol, "cases": cases}, f, indent=2)
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
