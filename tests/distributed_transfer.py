"""Run under torchrun by tests/test_transfer_distributed.py (one launch for several checks, to keep the
suite short): fine-tuning on DDP and FSDP for a MixMIM and a ViT encoder, then the distributed
evaluation and k-NN of a fixed model, whose numbers rank 0 writes to ``<workspace>/distributed.json``.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_transfer.py WORKSPACE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def finetune_overrides(workspace: Path, encoder: str, name: str, *extra: str) -> list[str]:
    """The fine-tuning run the test compares across world sizes (shared with the test)."""
    return [f"checkpoint={workspace / f'{encoder}.safetensors'}", "data.source=folder",
            f"data.path={workspace / 'data'}",
            "data.val_fraction=0.2", f"output_dir={workspace}", f"name={name}", "train.batch_size=8",
            "train.epochs=2", "train.num_workers=0", "train.progress=false", "train.log_every=1",
            "train.checkpoint_every=3", "train.trackers=[csv]", "finetune.head_init=trunc_normal",
            "finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.auto_augment=rand-m9-mstd0.5-inc1",
            "finetune.re_prob=0.25", "optim.lr=2e-3", "optim.warmup_epochs=0.5", "model.drop_path_rate=0.1", *extra]


def main(workspace: Path) -> None:
    import torch
    import torch.distributed as dist

    from mixmim.evaluation.sharded import evaluate_classifier
    from mixmim.training import distributed as D
    from mixmim.transfer.classifier import build_classifier, resolve_model
    from mixmim.transfer.run import load_transfer_config, run_transfer

    dist.init_process_group("gloo")  # one group for every run below (train() leaves a caller's group alone)
    for encoder in ("mixmim", "vit"):
        for mode in ("ddp", "fsdp"):
            overrides = finetune_overrides(workspace, encoder, f"{encoder}_{mode}_2p", f"train.distributed={mode}")
            run_transfer(load_transfer_config("finetune", None, overrides))
    knn = run_transfer(load_transfer_config("knn", None, [
        f"checkpoint={workspace / 'vit.safetensors'}", "data.source=folder", f"data.path={workspace / 'data'}",
        "data.val_fraction=0.2", f"output_dir={workspace}", "name=knn_2p", "train.batch_size=4",
        "train.num_workers=0", "train.progress=false", "knn.k=5"]))["results"]

    info, device = D.setup("cpu")
    config = load_transfer_config("finetune", None, finetune_overrides(workspace, "vit", "eval"))
    torch.manual_seed(0)
    model = build_classifier(resolve_model(config), config, 3)
    from mixmim.data.labelled import eval_transform
    from mixmim.transfer.data import load_labelled

    odd = load_labelled(config.data, None, eval_transform(32, 1.0), 0).test  # 7 images: odd on purpose
    scores = evaluate_classifier(model, odd, device, 3, batch_size=2)
    if info.is_main:
        (workspace / "distributed.json").write_text(json.dumps({
            "samples": scores.samples, "correct1": scores.correct1, "correct5": scores.correct5,
            "confusion": scores.confusion.tolist(), "loss": scores.loss, "knn": knn}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
