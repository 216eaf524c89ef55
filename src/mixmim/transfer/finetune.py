"""Supervised fine-tuning of a pretrained encoder for classification, as a task of the training loop
(MixMIM section 3 and Table 12; MixMAE appendix A.1; MAE's and SimMIM's fine-tuning recipes in
configs/finetune/).

AdamW with layer-wise lr decay, RandAug, Mixup/CutMix, label smoothing, random erasing, drop path,
warm-up then cosine per iteration: every value from the run config (``mixmim finetune --config
<recipe>``), on the loop's machinery (torchrun DDP/FSDP, accumulation, resume, NaN skip, bf16).
Evaluated every ``eval.every_epochs`` epochs on the held-out split, the counts summed over processes;
``eval.select`` says which weights are reported and kept (``last`` by default).

Files in the run folder, besides the loop's (checkpoints, metrics.csv, TensorBoard, log.txt,
config.yaml): ``model.pt`` (format ``mixmim-classifier/1``: the reported weights, the constructor
arguments, the classes), ``best.pt`` with ``eval.select=best``, ``results.json``,
``confusion_matrix.csv/.png``, ``per_class_accuracy.csv``.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from mixmim.config import ConfigError, FinetuneRunConfig
from mixmim.data.labelled import eval_transform, make_mixup, train_transform
from mixmim.evaluation.metrics import write_classification_report, write_json
from mixmim.evaluation.sharded import Scores, evaluate_classifier
from mixmim.interop.torch_files import load_torch_file
from mixmim.training.task import RunContext, StepOutput, Task, every_epochs
from mixmim.transfer.classifier import (
    Classifier,
    build_classifier,
    classifier_groups,
    classifier_payload,
    resolve_model,
)
from mixmim.transfer.data import LabelledData, collate_labelled, data_stats, load_labelled
from mixmim.utils.files import atomic_write

log = logging.getLogger("mixmim")


def check_auto_augment(policy: str | None) -> str | None:
    """A timm augmentation policy, or None for none (``none``/empty accepted); an unknown one is a
    one-line error naming it instead of timm's AssertionError."""
    if policy is None or str(policy).strip().lower() in ("", "none", "null", "off"):
        return None
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    builders = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}
    try:
        builders.get(policy.split("-")[0], auto_augment_transform)(policy, {"translate_const": 100})
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"config key 'finetune.auto_augment': {policy!r} is not a timm augmentation policy "
                          f"({exc.__class__.__name__}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, "
                          "or none") from None
    return policy


class ClassificationTask(Task):
    """What fine-tuning and linear probing share: the labelled splits, evaluation at epoch ends with
    the counts summed over processes, the best or last weights, the report at the end."""

    score_key = "acc1"
    # Set by each task: the labelled splits, their class names, which weights the encoder started
    # from, and the model build_model made.
    data: LabelledData
    classes: list[str]
    weights: str
    model: nn.Module

    def __init__(self, config: Any):
        self.config = config
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.last_scores: Scores | None = None  # of the last evaluation, and of the best one
        self.best_scores: Scores | None = None

    @property
    def columns(self) -> list[str]:
        return ["test_loss", "acc1", "acc5"]

    def evaluation_steps(self, total_steps: int, steps_per_epoch: int) -> set[int]:
        return every_epochs(self.config.eval.every_epochs, total_steps, steps_per_epoch)

    def collate(self, items: list[dict]) -> dict:
        return collate_labelled(items)

    def checkpoint_extras(self) -> dict[str, Any]:
        """The encoder as built, so open_weights rebuilds it from this run's checkpoints."""
        encoder = getattr(self, "model", None)
        encoder = getattr(encoder, "encoder", None)
        if encoder is None or not hasattr(encoder, "config"):
            return {}
        return {"encoder_family": getattr(encoder, "family", "mixmim"), "encoder_config": encoder.config()}

    def score(self, run: RunContext) -> Scores:
        batch = self.config.eval.batch_size or run.micro_batch
        with run.full_module() as model:
            return evaluate_classifier(model, self.data.test, run.device, len(self.classes), batch,
                                       self.config.train.num_workers, run.autocast)

    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        scores = self.last_scores = self.score(run)
        epoch = step / run.steps_per_epoch
        row = {"step": step, "epoch": epoch, **scores.as_dict()}
        self.history.append(row)
        log.info("epoch %.2f (step %d): test loss %.4f, top-1 %.2f%%, top-5 %.2f%%", epoch, step, scores.loss,
                 scores.acc1, scores.acc5)
        if self.config.eval.select == "best" and scores.acc1 > self.best.get("acc1", -1.0):
            self.best = {"step": step, "epoch": epoch, "acc1": scores.acc1, "acc5": scores.acc5}
            self.best_scores = scores
            self._save_model(run, "best.pt", {"step": step, "metrics": self.best})
        return {"test_loss": scores.loss, "acc1": scores.acc1, "acc5": scores.acc5}

    def _save_model(self, run: RunContext, name: str, extra: dict[str, Any]) -> None:
        state = run.full_state_dict()  # every process (FSDP gathers)
        if run.is_main:
            model = cast(Classifier, self.model)  # fine-tuning's (linear probing saves its own)
            payload = classifier_payload(model, self.classes, extra)
            payload["model"] = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
            atomic_write(run.run_dir / name, lambda tmp: torch.save(payload, tmp))

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "best": self.best, "history": self.history}

    def load_state_dict(self, state: dict[str, Any], path: Any = None) -> None:
        saved = state.get("classes")
        if saved is not None and list(saved) != self.classes:
            raise ConfigError(f"--resume: {path} was trained on {len(saved)} classes ({', '.join(saved[:6])}"
                              f"{', ...' if len(saved) > 6 else ''}), the data now has {len(self.classes)} "
                              f"({', '.join(self.classes[:6])}{', ...' if len(self.classes) > 6 else ''}); resume "
                              "with the same data or start a new run (another name=...)")
        self.best = dict(state.get("best") or {})
        self.history = list(state.get("history") or [])

    def finish(self, run: RunContext, summary: dict[str, Any]) -> None:
        """Report on the weights ``eval.select`` keeps, the last ones or the best epoch's (a stopped run
        reports nothing: ``--resume`` finishes it)."""
        if run.stopped is not None:
            return
        scores = self._kept_scores(run)
        self._save_model(run, "model.pt", {"step": run.step, "select": self.config.eval.select})
        if not run.is_main:
            return
        files = write_classification_report(run.run_dir, scores.confusion, self.classes)
        last = self.history[-1]["acc1"] if self.history else scores.acc1
        results = {"acc1": scores.acc1, "acc5": scores.acc5, "loss": scores.loss, "select": self.config.eval.select,
                   "step": run.step, "last_acc1": last, "best": self.best or None, "history": self.history,
                   "test_samples": scores.samples, "train_samples": len(self.data.train), "classes": self.classes,
                   "weights": self.weights, "checkpoint": self.config.checkpoint,
                   "files": {k: str(v) for k, v in files.items()}, **self.report_extras()}
        write_json(run.run_dir / "results.json", results)
        summary["results"] = results

    def _kept_scores(self, run: RunContext) -> Scores:
        """The scores of the kept weights, which are loaded into the model (best: from best.pt)."""
        best_file = run.run_dir / "best.pt"
        if self.config.eval.select == "best" and self.best and best_file.is_file():
            self.load_kept(run, load_torch_file(best_file))
            return self.best_scores if self.best_scores is not None else self.score(run)
        return self.last_scores if self.last_scores is not None else self.score(run)

    def load_kept(self, run: RunContext, payload: dict[str, Any]) -> None:
        run.load_full_state_dict({f"encoder.{k}": v for k, v in payload["model"].items()})

    def report_extras(self) -> dict[str, Any]:
        return {}


class FinetuneTask(ClassificationTask):
    """``mixmim finetune``."""

    name = "finetune"
    model: Classifier

    def __init__(self, config: FinetuneRunConfig):
        super().__init__(config)
        f = config.finetune
        self.auto_augment = check_auto_augment(f.auto_augment)
        self.pretrained = resolve_model(config)
        side = cast(int, config.model.img_size)  # resolve_model set it
        stats = data_stats(config.data)
        self.data = load_labelled(config.data, train_transform(side, self.auto_augment, f.re_prob,
                                                               config.data.crop_scale, *stats, f.color_jitter,
                                                               config.data.hflip),
                                  eval_transform(side, config.data.crop_pct, *stats), config.train.seed)
        self.classes = self.data.classes
        self.weights = self.pretrained.source
        self.mixup = make_mixup(len(self.classes), f.mixup, f.cutmix, f.smoothing)
        self.criterion = (SoftTargetCrossEntropy() if self.mixup is not None
                          else LabelSmoothingCrossEntropy(f.smoothing) if f.smoothing > 0 else nn.CrossEntropyLoss())

    def build_model(self) -> Classifier:
        self.model = build_classifier(self.pretrained, self.config, len(self.classes))
        # timm's head: a Linear (a 1x1 Conv2d for ResNet-v2), whose weight and bias torch types loosely
        head: Any = self.model.encoder.get_classifier()
        f = self.config.finetune
        if f.head_init == "probe":
            from mixmim.transfer.head_init import probe_head_init

            probe_head_init(self.model.encoder, self.data, self.config)
        else:
            # A near-zero head leaves the pretrained features in charge at the start (MAE's fine-tuning init).
            nn.init.trunc_normal_(head.weight, std=f.head_init_std)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        return self.model

    def dataset(self):
        return self.data.train

    def batch_multiple(self) -> int:
        return 2 if self.mixup is not None else 1  # Mixup pairs each image with its mirror in the batch

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return classifier_groups(cast(Classifier, model), self.config.optim)  # the model build_model made

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)  # draws from NumPy, seeded per micro-batch by the loop
        return StepOutput(self.criterion(model(images).float(), targets))

    def describe(self, run: RunContext) -> str:
        c = self.config
        return (f"{c.name}: fine-tuning {self.weights} weights of {c.model.name or self.pretrained.family} "
                f"({c.model.img_size} px) on "
                f"{c.data.path or c.data.source}: {len(self.data.train)} training / {len(self.data.test)} evaluation "
                f"images, {len(self.classes)} classes")

    def report_extras(self) -> dict[str, Any]:
        return {"model": self.config.model.name, "img_size": self.config.model.img_size}
