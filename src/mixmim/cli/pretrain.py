"""``mixmim pretrain``: YAML config + ``key.sub=value`` overrides -> a run in ``runs/<name>/``.

With no arguments it pretrains ``mixmim_tiny`` on the photos bundled with scikit-image, on the CPU,
for a few minutes. Under ``torchrun`` it trains on every process (DDP; ``train.distributed=fsdp``).
"""

from __future__ import annotations

import argparse

from mixmim.cli.args import add_run_folder_options, check_run_folder_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.name=mixmim_base train.batch_size=256 method.mask_ratio=0.5")
    parser.add_argument("--config", "-c", help="YAML recipe, e.g. configs/mixmim_base_in1k.yaml")
    parser.add_argument("--name", help="run name (folder under output_dir); same as name=...")
    parser.add_argument("--data", help="image folder to pretrain on (sets data.source=folder and data.path), "
                        "or 'bundled' / 'fashion_mnist'")
    parser.add_argument("--monitor-data", help="labelled images to watch representation quality on during training "
                        "(k-NN every train.monitor.every steps): 'fashion_mnist' or a folder with class sub-folders")
    add_run_folder_options(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mixmim.config import DEMO, dump_config, load_config

    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.data:
        if args.data in ("bundled", "fashion_mnist"):
            overrides.append(f"data.source={args.data}")
        else:
            overrides += ["data.source=folder", f"data.path={args.data}"]
    if args.monitor_data:
        overrides.append(f"train.monitor.data={args.monitor_data}")
    config = load_config(args.config, overrides, base=None if args.config else DEMO)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    resume, allow_changes = check_run_folder_options(args)

    from mixmim.training.pretrain import run_pretraining

    summary = run_pretraining(config, resume=resume, overwrite=args.overwrite, allow_changes=allow_changes)
    if summary["stopped"]:
        print(f"stopped by {summary['stopped']} at step {summary['step']}; resume with: "
              f"mixmim pretrain {' '.join(_argv_without_resume())} --resume")
    return 0


def _argv_without_resume() -> list[str]:
    import sys

    args = sys.argv[1:]
    if args and args[0] == "pretrain":
        args = args[1:]
    return [a for a in args if a not in ("--resume", "--resume-with-changes", "--overwrite")]
