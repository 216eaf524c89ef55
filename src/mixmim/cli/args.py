"""Command-line options of the transfer verbs (finetune, linprobe, knn, segment): the config system's
``--config`` / ``key=value`` / ``--print-config`` / ``--resume``, and the short-hands users rely on,
each one a dotted override (``--epochs 5`` is ``train.epochs=5``). A short-hand given on the command
line wins over the recipe; an option not given changes nothing."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

# flag -> (dest, config key, type, help); the value is written as key=value
COMMON: list[tuple[str, str, Any, str]] = [
    ("--checkpoint", "checkpoint", str, "run folder, training checkpoint, export or release checkpoint; omitted: a "
                                        "randomly initialised --model (a baseline)"),
    ("--model", "model.name", str, "registry name (mixmim_tiny ... mixmim_huge, vit_base, ...): needed for release "
                                   "checkpoints and random initialisation"),
    ("--img-size", "model.img_size", int, "input size (default: the checkpoint's)"),
    ("--window-size", "model.window_size", "windows", "windows per stage, e.g. 16,16,24,12; '+' lists one per block"),
    ("--batch-size", "train.batch_size", int, "global batch (split over torchrun's processes)"),
    ("--accum-steps", "train.accum_steps", int, "micro-batches per optimiser step"),
    ("--epochs", "train.epochs", int, "training epochs"),
    ("--crop-pct", "data.crop_pct", float, "evaluation resize = img-size / crop-pct"),
    ("--limit-train", "data.limit_train", int, "a seeded subset of N training images"),
    ("--limit-test", "data.limit_test", int, "a seeded subset of N evaluation images"),
    ("--val-fraction", "data.val_fraction", float, "held out per class when the data has no evaluation split"),
    ("--val-data", "data.val_path", str, "evaluation folder of the same layout (default: DATA/val or DATA/test, "
                                         "else --val-fraction of DATA)"),
    ("--num-workers", "train.num_workers", int, "data loader processes"),
    ("--device", "train.device", str, "auto, cpu, cuda, cuda:1, ..."),
    ("--seed", "train.seed", int, "seed of the data order, augmentation, subsets and initialisation"),
]
OPTIM: list[tuple[str, str, Any, str]] = [
    ("--base-lr", "optim.base_lr", float, "lr = base lr x batch / 256"),
    ("--lr", "optim.lr", float, "absolute learning rate (overrides --base-lr)"),
    ("--min-lr", "optim.min_lr", float, "floor of the cosine"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay"),
    ("--warmup-epochs", "optim.warmup_epochs", float, "linear warm-up epochs"),
    ("--clip-grad", "optim.clip_grad", float, "gradient norm clipping"),
]


def windows(text: str) -> Any:
    from mixmim.interop.pretrained import parse_windows

    return parse_windows(text)


def add_options(parser: argparse.ArgumentParser, specs: list[tuple[str, str, Any, str]], title: str) -> None:
    group = parser.add_argument_group(title)
    for flag, key, kind, text in specs:
        group.add_argument(flag, dest=_dest(flag), default=None, type=str if kind == "windows" else kind,
                           help=f"{text} ({key})")


def add_config_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """What every verb of the config system takes."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    parser.add_argument("--config", "-c",
                        help=f"YAML recipe or recipe name (`mixmim recipes --filter {verb}/` lists them)")
    parser.add_argument("--data", help="folder with class sub-folders, or 'fashion_mnist' (data.source/data.path)")
    parser.add_argument("--output", help="the run folder (output_dir/name)")
    parser.add_argument("--name", help="run name (folder under output_dir); same as name=...")
    add_run_folder_options(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if verb != "pretrain":
        parser.add_argument("--sweep", action="append", default=None, metavar="KEY=V1,V2",
                            help="run a grid: one run per combination of the values (repeat for more keys; a YAML "
                                 "list for values with commas), each cached and resumed in the folder of --output, "
                                 "then a report of every cell and the best (sweep.json, sweep.md)")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (train.amp=fp32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (train.progress=false)")


def add_run_folder_options(parser: argparse.ArgumentParser) -> None:
    """``--resume``, ``--resume-with-changes`` and ``--overwrite``, the same for every training verb."""
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint of this run "
                        "(refused when the config changes what the run computes)")
    parser.add_argument("--resume-with-changes", action="store_true",
                        help="--resume with a config that alters the trajectory (a longer schedule, another lr, ...): "
                             "the changes are logged and recorded in the run's checkpoints")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again: delete the earlier run's checkpoints, metrics and events (only files a run "
                             "wrote; nothing is deleted before the new run has checked its settings and data)")


def check_run_folder_options(args: argparse.Namespace) -> tuple[bool, bool]:
    """(resume, allow_changes) from the flags; contradictory ones are one line."""
    resume = bool(args.resume or args.resume_with_changes)
    if resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    return resume, bool(args.resume_with_changes)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def data_overrides(value: str) -> list[str]:
    """``--data X``: a named set or a folder."""
    if value in ("fashion_mnist", "bundled"):
        return [f"data.source={value}"]
    return ["data.source=folder", f"data.path={value}"]


def shorthand_overrides(args: argparse.Namespace, specs: list[tuple[str, str, Any, str]],
                        extra: Callable[[argparse.Namespace], list[str]] | None = None) -> list[str]:
    """The dotted overrides the short-hands given on the command line stand for (then the positional
    ``key=value`` ones, which win)."""
    out: list[str] = []
    for flag, key, kind, _ in specs:
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        if kind == "windows":
            value = windows(value)
        out.append(f"{key}={_yaml(value)}")
    if getattr(args, "data", None):
        out += data_overrides(args.data)
    if getattr(args, "output", None):
        path = Path(args.output)
        out += [f"output_dir={path.parent}", f"name={path.name}"]
    if getattr(args, "name", None):
        out.append(f"name={args.name}")
    if getattr(args, "no_amp", False):
        out.append("train.amp=fp32")
    if getattr(args, "no_progress", False):
        out.append("train.progress=false")
    if extra is not None:
        out += extra(args)
    return out + list(args.overrides)


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def run_transfer_verb(args: argparse.Namespace, verb: str, specs: list[tuple[str, str, Any, str]],
                      extra: Callable[[argparse.Namespace], list[str]] | None = None):
    """Resolve the config (``--print-config`` prints it and returns None), then run the verb: its summary."""
    from mixmim.transfer.run import load_transfer_config, run_transfer

    resume, allow_changes = check_run_folder_options(args)
    overrides = shorthand_overrides(args, specs, extra)
    if getattr(args, "sweep", None) and not args.print_config:
        return _run_sweep(args, verb, overrides)
    if args.print_config:
        print(_printable_config(verb, args.config, overrides), end="")
        return None
    config = load_transfer_config(verb, args.config, overrides)
    return run_transfer(config, resume=resume, overwrite=args.overwrite, allow_changes=allow_changes)


def _run_sweep(args: argparse.Namespace, verb: str, overrides: list[str]) -> dict | None:
    """``--sweep``: every cell (cached, resumed or run), then the table; a stopped sweep says how to go on."""
    from mixmim.transfer.sweep import parse_axes, run_sweep

    if args.resume or args.resume_with_changes:
        raise ValueError("--sweep resumes by itself (the same command again): leave out --resume")
    report = run_sweep(verb, args.config, overrides, parse_axes(args.sweep), overwrite=args.overwrite)
    if report.get("stopped"):
        print(f"sweep stopped by {report['stopped']} in cell {report['cell']}; run the same command again to go on "
              "(finished cells are kept)")
        return None
    print((Path(report["folder"]) / "sweep.md").read_text(), end="")
    best = report["best"]
    if best is not None:
        print(f"best: {best['cell']} ({report['score']} {best[report['score']]:.2f}); report in {report['folder']}")
    return None


def _printable_config(verb: str, recipe: str | None, overrides: list[str]) -> str:
    """The resolved config as YAML; a recipe printed before its data is chosen shows ``data.path: null``
    and a last line saying it is still to be given (the run itself refuses without it)."""
    from mixmim.config import ConfigError, dump_config
    from mixmim.transfer.run import load_transfer_config

    try:
        return dump_config(load_transfer_config(verb, recipe, overrides))
    except ConfigError as exc:
        if "'data.path'" not in str(exc) or any(o.startswith("data.path=") for o in overrides):
            raise
    config = load_transfer_config(verb, recipe, [*overrides, "data.path=DIR"])
    config.data.path = None
    return dump_config(config) + "# data.path is still to be given: --data DIR (or data.path=DIR)\n"


def finished_results(summary: dict | None) -> dict | None:
    """The results of a transfer run that finished; None (after saying how to resume) for a stopped one,
    or for ``--print-config``."""
    if summary is None:
        return None
    if summary.get("results") is None:
        # Processes other than the first finish without results (the first writes them): nothing to say.
        if summary.get("stopped"):
            print(f"stopped by {summary['stopped']} at step {summary['step']}; resume with the same command plus "
                  "--resume")
        return None
    return summary["results"]
