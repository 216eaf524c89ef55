"""What a study is: a *profile* (``configs/study/profiles/<name>.yaml``: the encoder, the pretraining
recipe, the budget of images, the seeds, the evaluation) and its *arms* (``configs/study/arms/<arm>.yaml``:
a method and its options merged onto the profile's run config; ``pretrain: false`` is the random
floor). Reading them needs no torch."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixmim.config import RECIPES, ConfigError, build_dataclass, read_recipe, read_yaml

STUDY_CONFIGS = RECIPES / "study"  # profiles and arms, shipped with the package
CLASSIFICATION = ("knn", "linprobe", "finetune_1pct", "finetune_10pct")
# Dense transfer on the benchmark of mixmim.study.dense_benchmark: box and mask AP of ``mixmim detect``,
# mIoU of ``mixmim segment`` (issue 32).
DENSE = ("box_ap", "mask_ap", "miou")
METRICS = CLASSIFICATION + DENSE


@dataclass
class FinetuneSettings:
    """Full fine-tuning of the encoder on a labelled fraction of the training set, as ``mixmim finetune``
    runs it without a recipe (the small-data rule, :mod:`mixmim.transfer.small_data`); ``overrides``
    are dotted config overrides on top (none by default)."""

    fraction: float
    overrides: list[str] = field(default_factory=list)


@dataclass
class DenseSettings:
    """The dense benchmark's canvases (:func:`mixmim.study.dense_benchmark.write_dense_benchmark`) and the
    dotted overrides of ``mixmim detect`` / ``mixmim segment`` on them."""

    train: int = 2000
    val: int = 300
    size: int = 64
    detect: list[str] = field(default_factory=list)
    segment: list[str] = field(default_factory=list)


@dataclass
class EvaluationSettings:
    """How every arm is measured."""

    bank_size: int = 10000  # class-balanced training images for the k-NN bank and the probe
    test_size: int | None = None  # None: the full test split
    knn_k: int = 20
    knn_temperature: float = 0.07
    linprobe_epochs: int = 50
    linprobe_batch_size: int = 256
    finetune: list[FinetuneSettings] = field(default_factory=list)
    batch_size: int = 256  # feature extraction
    dense: DenseSettings = field(default_factory=DenseSettings)


@dataclass
class Profile:
    """A study's fixed parts: run config tree for pretraining, budget, seeds, evaluation, arms."""

    name: str = ""
    description: str = ""
    run: dict[str, Any] = field(default_factory=dict)  # a mixmim run config tree (model, method, data, optim, train)
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> run tree merged under every arm of it
    images: int = 100_000  # pretraining budget per arm, in images seen
    seeds: int = 3  # for arms with ``seeds: all``
    arms: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(CLASSIFICATION))  # what this profile measures
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)


@dataclass
class Arm:
    """One row of the study: a method and its options (merged onto the profile's ``run``)."""

    name: str
    description: str = ""
    paper: str = ""  # the table row it stands for
    pretrain: bool = True
    seeds: str = "one"  # "all": the profile's seeds; "one": seed 0
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # a subset for cheap sweeps (and the
    # profile's metrics: an arm measures those of its list that its profile measures)
    run: dict[str, Any] = field(default_factory=dict)


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDY_CONFIGS / "profiles" / f"{name_or_path}.yaml"
    tree = read_recipe(path)  # a profile may name a base profile (base: cpu.yaml)
    return build_dataclass(Profile, {"name": path.stem, **tree})


def load_arm(name: str, folder: Path | None = None) -> Arm:
    path = (folder or STUDY_CONFIGS / "arms") / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (folder or STUDY_CONFIGS / "arms").glob("*.yaml"))
        raise ConfigError(f"study arm {name!r}: {path} does not exist; known arms: {', '.join(known)}")
    return build_dataclass(Arm, {"name": name, **read_yaml(path)})


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def seeds_of(arm: Arm, profile: Profile) -> list[int]:
    return list(range(profile.seeds)) if arm.seeds == "all" else [0]


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(obj)))
