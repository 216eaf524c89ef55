"""``mixmim study``: does pretraining pay, and which design choices matter? One command that pretrains
every *arm* of a study under the same budget of images, evaluates every arm the same way and writes
a report (``docs/study/`` for the committed one).

- Data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``): the 60 000 training images without labels
  for pretraining, labels only for evaluation; every reported accuracy on the full 10 000-image test
  split (a profile may cap it for quick runs).
- A *profile* (``configs/study/profiles/<name>.yaml``) fixes the encoder, the pretraining recipe, the
  budget (images seen per arm), the seeds and the evaluation; an *arm* (``configs/study/arms/<arm>.yaml``)
  is a method and its options merged onto the profile's run config, so adding a method is adding a
  file. ``pretrain: false`` is the random-initialisation floor.
- Evaluation per arm and seed: weighted k-NN (k = 20, T = 0.07) with a class-balanced bank of training
  images, MAE's linear probe on the same frozen features, and full fine-tuning with 1% and 10% of the
  training labels (seeded, class-balanced subsets). Accuracies are those of the last epoch, never an
  epoch picked on the test set.
- Every (arm, seed, metric) is cached as a JSON file as soon as it exists, and pretraining resumes
  from its checkpoints, so an interrupted study picks up where it stopped and a study can be run in
  parts (``--arms``). Each result carries ``settings``, a fingerprint of what the arm's YAML and the
  profile ask for that metric (:meth:`Study.settings`): a cached result of other settings is an error,
  not a silent hit, and ``--reuse`` skips such rows (results from before the fingerprint have none and
  are taken as they are).

The runner: :class:`Study` pretrains (or resumes) every arm and seed, evaluates each through the verbs a
user runs, and caches every result (:mod:`~mixmim.study.spec` reads the YAML, :mod:`~mixmim.study.statistics`
and :mod:`~mixmim.study.report` turn the rows into the report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mixmim.config import ConfigError, TrainConfig, load_config
from mixmim.study.spec import DENSE, METRICS, Arm, Profile, _merge, dataclass_dict, load_arm, seeds_of
from mixmim.utils.provenance import git_commit

log = logging.getLogger("mixmim")

class Study:
    """Runs (or resumes) a study in ``output``; results land in ``output/results/<arm>/seed<k>/*.json``."""

    def __init__(self, profile: Profile, output: str | Path, arms: list[str] | None = None, device: str = "auto",
                 command: str | None = None, progress: bool = False):
        self.profile, self.output, self.device, self.progress = profile, Path(output), device, progress
        self.arms = [load_arm(a) for a in (arms or profile.arms)]
        if not self.arms:
            raise ConfigError("the study has no arms: list them in the profile or with --arms")
        # --report-only redraws a report; the command that reproduces the results is the one without it.
        self.command = command or " ".join(["mixmim", *(a for a in sys.argv[1:] if a != "--report-only")])
        self.commit = git_commit()  # the code that runs; later commits (docs) do not change it
        from mixmim.data.fashion_mnist import read_fashion_mnist

        self.train_images = len(read_fashion_mnist("train")[1])
        unknown = sorted(set(profile.metrics) - set(METRICS))
        if unknown:
            raise ConfigError(f"study profile {profile.name!r}: unknown metric(s) {', '.join(unknown)}; known: "
                              f"{', '.join(METRICS)}")
        for arm in self.arms:  # fail before any work on an arm that does not build
            unknown = sorted(set(arm.metrics) - set(METRICS))
            if unknown:
                raise ConfigError(f"study arm {arm.name!r}: unknown metric(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(METRICS)}")
            self.run_config(arm, 0)

    def metrics_of(self, arm: Arm) -> list[str]:
        """What is measured of ``arm``: the metrics of its list that the profile measures, in the
        profile's order."""
        return [m for m in self.profile.metrics if m in arm.metrics]

    # ------------------------------------------------------------------ configs
    def run_config(self, arm: Arm, seed: int):
        method = str(arm.run.get("method", {}).get("name", self.profile.run.get("method", {}).get("name", "mixmim")))
        tree = _merge(_merge(self.profile.run, self.profile.methods.get(method, {})), arm.run)
        batch = int(tree.get("train", {}).get("batch_size", TrainConfig.batch_size))
        tree = _merge(tree, {"name": f"{arm.name}/seed{seed}", "output_dir": str(self.output / "runs"),
                             "train": {"seed": seed, "max_steps": max(1, self.profile.images // batch),
                                       "epochs": 10**6, "progress": self.progress}})
        return load_config(None, base=tree)

    def settings(self, arm: Arm, metric: str) -> str:
        """Fingerprint of what decides ``metric`` of ``arm``: the run tree as the YAML files merge it
        (profile, the method's section, the arm), the budget, whether it pretrains, and that metric's
        evaluation settings. Twelve hex digits of a SHA-256. The YAML trees rather than the resolved
        config, so that a new config field with a default does not invalidate every cached result."""
        method = str(arm.run.get("method", {}).get("name", self.profile.run.get("method", {}).get("name", "mixmim")))
        ev = dataclass_dict(self.profile.evaluation)
        if metric.startswith("finetune_"):
            evaluation = {"test_size": ev["test_size"], "finetune": next(
                (f for f in ev["finetune"] if f"finetune_{_percent(f['fraction'])}pct" == metric), None)}
        elif metric in DENSE:
            dense = ev["dense"]
            verb = "segment" if metric == "miou" else "detect"
            evaluation = {"canvases": {k: dense[k] for k in ("train", "val", "size")}, verb: dense[verb]}
        else:
            keys = {"knn": ("bank_size", "test_size", "knn_k", "knn_temperature", "batch_size"),
                    "linprobe": ("bank_size", "test_size", "linprobe_epochs", "linprobe_batch_size", "batch_size")}
            evaluation = {k: ev[k] for k in keys[metric]}
        tree = {"run": _merge(_merge(self.profile.run, self.profile.methods.get(method, {})), arm.run),
                "images": self.profile.images, "pretrain": arm.pretrain, "evaluation": evaluation}
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]

    def cached(self, arm: Arm, seed: int, metric: str) -> bool:
        """Whether the result is cached; a cached result of other settings is a ConfigError naming it."""
        path = self.result_path(arm, seed, metric)
        if not path.is_file():
            return False
        was, now = json.loads(path.read_text()).get("settings"), self.settings(arm, metric)
        if was is not None and was != now:
            raise ConfigError(f"{path}: computed with other settings of arm {arm.name!r} ({was}; the YAML files "
                              f"now give {now}): delete it to compute it again, or study into another --output")
        return True

    def result_path(self, arm: Arm, seed: int, metric: str) -> Path:
        return self.output / "results" / arm.name / f"seed{seed}" / f"{metric}.json"

    # ------------------------------------------------------------------ running
    def run(self) -> list[dict[str, Any]]:
        """Every arm's every seed, seed-major (each arm's seed 0, then each seed 1, ...): a study stopped
        part-way has every arm at its first seeds rather than some arms complete and others missing.
        SIGTERM, SIGUSR1 or Ctrl-C stop it cleanly wherever it is: a pretraining run checkpoints, an
        evaluation in progress finishes (or its transfer run checkpoints), and :attr:`stopped` says
        by what; running the study again continues."""
        from mixmim.training.signals import StopRequest

        self.stopped: str | None = None
        with StopRequest() as stop:
            self._stop = stop
            for arm, seed in self.schedule():
                done = self.run_arm(arm, seed)
                if not done or stop.requested():
                    self.stopped = stop.signal_name or "a signal"
                    log.warning("study: stopped by %s during %s seed %d", self.stopped, arm.name, seed)
                    break
        return self.collect()

    def schedule(self) -> list[tuple[Arm, int]]:
        """The (arm, seed) pairs in the order :meth:`run` takes them."""
        pairs = [(arm, seed) for arm in self.arms for seed in seeds_of(arm, self.profile)]
        return sorted(pairs, key=lambda pair: pair[1])  # stable: the arms' order within a seed

    def run_arm(self, arm: Arm, seed: int) -> bool:
        """Pretrain and evaluate one arm's seed; False when a stop request cut it short."""
        from mixmim.utils.files import atomic_write_text

        todo = [m for m in self.metrics_of(arm) if not self.cached(arm, seed, m)]
        if not todo:  # every result cached: the run (and its checkpoints) need not exist any more
            return True
        config = self.run_config(arm, seed)
        pretrain_seconds = 0.0
        if arm.pretrain:
            pretrained = self._pretrain(config)
            if pretrained is None:
                return False
            weights, pretrain_seconds = pretrained
        else:
            weights = self._random_encoder(config, seed)
        log.info("study: evaluating %s seed %d (%s)", arm.name, seed, ", ".join(todo))
        for metric, value, seconds, extra in self._evaluate(config, weights, seed, todo):
            if value is None:  # the transfer run was stopped: nothing to record
                return False
            images = config.train.max_steps * config.train.batch_size if arm.pretrain else 0
            record = {"arm": arm.name, "seed": seed, "metric": metric, "value": value, "seconds": seconds,
                      "pretrain_seconds": pretrain_seconds, "images_seen": images, "commit": self.commit,
                      "settings": self.settings(arm, metric), **extra}
            atomic_write_text(self.result_path(arm, seed, metric), json.dumps(record, indent=2) + "\n")
            log.info("study: %s seed %d %s = %.4f (%.0f s)", arm.name, seed, metric, value, seconds)
            if self._stopping():
                return False
        return True

    def _stopping(self) -> bool:
        stop = getattr(self, "_stop", None)
        return stop is not None and stop.requested()

    def _pretrain(self, config) -> tuple[Path, float] | None:
        """Pretrain (or resume, or reuse) the arm's run; returns its newest checkpoint and the wall time
        the pretraining took (kept in ``study.json`` of the run, across resumptions); None when the
        pretraining was stopped (it resumes at the next run of the study)."""
        from mixmim.interop.checkpoint import CheckpointManager
        from mixmim.training.pretrain import run_pretraining
        from mixmim.utils.files import atomic_write_text

        run_dir = config.run_dir
        timing = run_dir / "study.json"
        done = json.loads(timing.read_text()) if timing.is_file() else {"seconds": 0.0, "finished": False}
        manager = CheckpointManager(run_dir / "checkpoints")
        if not done["finished"]:
            start = time.perf_counter()
            summary = run_pretraining(config, resume=manager.latest() is not None)
            done["seconds"] += time.perf_counter() - start
            done["finished"] = summary["step"] >= summary["total_steps"] and summary["stopped"] is None
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(timing, json.dumps(done) + "\n")
            if not done["finished"]:
                return None
        latest = manager.latest()
        if latest is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint although its pretraining finished")
        return latest, float(done["seconds"])

    @staticmethod
    def _random_encoder(config, seed: int) -> Path:
        """The floor: the arm's encoder, randomly initialised with the seed, exported once."""
        import torch

        from mixmim.interop.export import save_encoder
        from mixmim.methods.factory import build_method

        stem = config.run_dir / "encoder"
        if not stem.with_suffix(".safetensors").is_file():
            torch.manual_seed(seed)
            # The arm's encoder exactly as its pretraining would build it (the one way from a config).
            save_encoder(build_method(config).encoder, stem, metadata={"method": "random", "seed": seed})
        return stem.with_suffix(".safetensors")

    def _evaluate(self, config, weights: Path, seed: int, todo: list[str]):
        """Yield (metric, value in [0, 1], seconds, extra) for the metrics in ``todo``: each one a run of
        the verb a user would run (``mixmim knn``, ``linprobe``, ``finetune``) on the arm's weights."""
        from mixmim.config import load_run_config
        from mixmim.transfer.run import load_transfer_config, run_transfer

        ev = self.profile.evaluation
        out_dir = self.output / "eval" / config.name
        common = {"checkpoint": str(weights), "output_dir": str(out_dir),
                  "model": {"img_size": config.model.img_size},
                  "data": {"source": "fashion_mnist", "crop_pct": 1.0, "limit_test": ev.test_size, "balanced": True},
                  "train": {"seed": seed, "device": self.device, "num_workers": 0, "progress": self.progress,
                            "checkpoint_every": 10**9, "keep_checkpoints": 1, "trackers": ["csv"]},
                  "eval": {"every_epochs": 0, "select": "last"}}
        if "knn" in todo:
            start = time.perf_counter()
            tree = _merge(common, {"name": "knn", "data": {"limit_train": ev.bank_size},
                                   "train": {"batch_size": ev.batch_size},
                                   "knn": {"k": ev.knn_k, "temperature": ev.knn_temperature}})
            tree.pop("eval")
            r = run_transfer(load_run_config("knn", tree=_merge(_verb_defaults("knn"), tree)))["results"]
            yield "knn", r["acc1"] / 100.0, time.perf_counter() - start, {"test_images": r["test_samples"]}
            if self._stopping():
                return
        if "linprobe" in todo:
            start = time.perf_counter()
            tree = _merge(common, {"name": "linprobe", "data": {"limit_train": ev.bank_size},
                                   "train": {"batch_size": min(ev.linprobe_batch_size, ev.bank_size),
                                             "epochs": ev.linprobe_epochs},
                                   "optim": {"warmup_epochs": min(5.0, ev.linprobe_epochs / 10)},
                                   "probe": {"features": "cached"}})
            r = run_transfer(load_run_config("linprobe", tree=_merge(_verb_defaults("linprobe"), tree)),
                             overwrite=True).get("results")
            if r is None:
                yield "linprobe", None, 0.0, {}
                return
            yield "linprobe", r["acc1"] / 100.0, time.perf_counter() - start, {"test_images": r["test_samples"]}
            if self._stopping():
                return
        for settings in ev.finetune:
            metric = f"finetune_{_percent(settings.fraction)}pct"
            if metric not in todo:
                continue
            start = time.perf_counter()
            labels = round(self.train_images * settings.fraction)
            tree = _merge(common, {"name": metric, "data": {"limit_train": labels}})
            # The tree as the base the user's keys sit on (the small-data rule fills the rest), the
            # profile's own overrides on top: no round trip through dotted strings.
            cfg = load_transfer_config("finetune", None, list(settings.overrides),
                                       base=_merge({"finetune": {"rule": "small_data"}}, tree))
            r = run_transfer(cfg, overwrite=True).get("results")
            if r is None:
                yield metric, None, 0.0, {}
                return
            yield metric, r["acc1"] / 100.0, time.perf_counter() - start, {
                "labels": labels, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                "steps": r["step"], "test_images": r["test_samples"]}
            if self._stopping():
                return
        if set(todo) & set(DENSE):
            yield from self._evaluate_dense(config, weights, seed, [m for m in todo if m in DENSE])

    def _evaluate_dense(self, config, weights: Path, seed: int, todo: list[str]):
        """Yield (metric, value in [0, 1], seconds, extra) for the dense metrics in ``todo``: ``mixmim
        detect`` (box and mask AP from one run) and ``mixmim segment`` (mIoU) on the benchmark's canvases,
        generated once into ``<output>/dense_data``."""
        from mixmim.study.dense_benchmark import write_dense_benchmark
        from mixmim.transfer.run import load_transfer_config, run_transfer

        dense = self.profile.evaluation.dense
        data = write_dense_benchmark(self.output / "dense_data", dense.train, dense.val, dense.size)
        common = {"checkpoint": str(weights), "output_dir": str(self.output / "eval" / config.name),
                  "train": {"seed": seed, "device": self.device, "num_workers": 0, "progress": self.progress,
                            "checkpoint_every": 10**9, "keep_checkpoints": 1, "trackers": ["csv"]},
                  "eval": {"every_epochs": 0, "every_steps": 0, "select": "last"}}
        if {"box_ap", "mask_ap"} & set(todo):
            start = time.perf_counter()
            tree = _merge(common, {"name": "detect", "data": {"path": str(data / "coco")}})
            cfg = load_transfer_config("detect", None, list(dense.detect), base=tree)
            r = run_transfer(cfg, overwrite=True).get("results")
            seconds = time.perf_counter() - start
            for metric, key in (("box_ap", "box_AP"), ("mask_ap", "mask_AP")):
                if metric in todo:
                    yield metric, (None if r is None else r[key] / 100.0), seconds, {
                        "steps": None if r is None else r["step"], "val_images": dense.val}
                    if r is None:
                        return
            if self._stopping():
                return
        if "miou" in todo:
            start = time.perf_counter()
            tree = _merge(common, {"name": "segment", "data": {"path": str(data / "ade")}})
            cfg = load_transfer_config("segment", None, list(dense.segment), base=tree)
            r = run_transfer(cfg, overwrite=True).get("results")
            yield "miou", (None if r is None else r["miou"]), time.perf_counter() - start, {
                "steps": None if r is None else r["step"], "val_images": dense.val}

    def reuse(self, report: str | Path) -> int:
        """Seed the cache with the rows of an earlier report's ``results.json`` (this study's arms and
        seeds only, never over a cached result), so a study deleted from disk is continued, not redone:
        each row keeps the commit it was computed at. A row whose ``settings`` differ from what the arm's
        YAML gives now is skipped with a warning. Returns the number of rows taken."""
        from mixmim.utils.files import atomic_write_text

        path = Path(report)
        try:
            payload = json.loads(path.read_text())
            rows = payload["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--reuse {path}: not a study results.json ({exc})") from None
        if payload.get("profile", self.profile.name) != self.profile.name:
            raise ConfigError(f"--reuse {path}: results of profile {payload['profile']!r}, this study runs "
                              f"profile {self.profile.name!r}")
        arms = {a.name: a for a in self.arms}
        taken, stale = 0, []
        for row in rows:
            arm = arms.get(row.get("arm"))
            if arm is None or row.get("seed") not in seeds_of(arm, self.profile) or row.get("metric") not in \
                    self.metrics_of(arm):
                continue
            if row.get("settings", self.settings(arm, row["metric"])) != self.settings(arm, row["metric"]):
                stale.append(f"{arm.name}/seed{row['seed']}/{row['metric']}")
                continue
            target = self.result_path(arm, row["seed"], row["metric"])
            if not target.is_file():
                atomic_write_text(target, json.dumps({**row, "reused_from": str(path)}, indent=2) + "\n")
                taken += 1
        if stale:
            log.warning("--reuse %s: %d row(s) computed with other settings, not taken: %s", path, len(stale),
                        ", ".join(stale))
        return taken

    # ------------------------------------------------------------------ results
    def collect(self) -> list[dict[str, Any]]:
        """Every cached result of this study's arms."""
        rows = []
        for arm in self.arms:
            for seed in seeds_of(arm, self.profile):
                for metric in self.metrics_of(arm):
                    path = self.result_path(arm, seed, metric)
                    if path.is_file():
                        rows.append(json.loads(path.read_text()))
        return rows


def _percent(fraction: float) -> str:
    value = fraction * 100
    return f"{value:g}"


def _verb_defaults(verb: str) -> dict[str, Any]:
    from mixmim.config import VERB_DEFAULTS

    return VERB_DEFAULTS[verb]
