"""`mixmim study --profile quick` end to end on a small stand-in for Fashion-MNIST (same file format),
its caching, and the report's arithmetic; the representation monitor of the pretraining loop."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from conftest import tiny_run
from mixmim.cli import main as cli


def write_fashion_mnist(folder, n_train: int = 300, n_test: int = 100, seed: int = 0):
    """IDX files like Debian's: 28x28 grey images whose class (0-9) sets a bright bar's row, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def images_and_labels(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 5 + 2 * c, 4:24] = 230
        return images, labels.astype(np.uint8)

    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = images_and_labels(n)
        header = (0x0803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in images.shape)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((0x0801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return folder




def test_quick_study_runs_end_to_end_caches_and_reports(fake_fashion_mnist, tmp_path, capsys):
    out, report = tmp_path / "study", tmp_path / "report"
    assert cli(["study", "--profile", "quick", "--output", str(out), "--report", str(report)]) == 0
    payload = json.loads((report / "results.json").read_text())
    assert set(payload) == {"commit", "command", "profile", "results"} and payload["command"].startswith("mixmim")
    got = {(r["arm"], r["seed"], r["metric"]) for r in payload["results"]}
    metrics = {"knn", "linprobe", "finetune_1pct", "finetune_10pct"}
    want = {(arm, seed, m) for arm, seeds in (("random", (0, 1)), ("mixmim", (0, 1)), ("simmim", (0,)))
            for seed in seeds for m in metrics}
    assert got == want
    assert all(0.0 <= r["value"] <= 1.0 for r in payload["results"])
    table = (report / "results.md").read_text()
    assert "| `mixmim` | 2 |" in table and "pretraining pays" in table
    for picture in ("accuracy_vs_time.png", "loss_curves.png", "monitor_knn.png"):
        assert (report / picture).stat().st_size > 5000, picture
    # Cached: a second run recomputes nothing (the result files keep their contents and times).
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    assert cli(["study", "--profile", "quick", "--output", str(out), "--report", str(report)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")} == stamps
    # The report's reconstruction grid of the MixMIM arm, drawn from the Fashion-MNIST test split.
    grid = report / "reconstruction_fashion_mnist.png"
    assert cli(["reconstruct", "--checkpoint", str(out / "runs" / "mixmim" / "seed0"), "--images", "fashion_mnist",
                "--max-images", "4", "--output", str(grid)]) == 0
    assert grid.stat().st_size > 5000 and "(4 images" in capsys.readouterr().out


def test_summary_spread_and_paper_orderings():
    from mixmim.study import orderings, summarise

    rows = [{"arm": "mixmim", "seed": s, "metric": "knn", "value": v} for s, v in enumerate((0.80, 0.82, 0.84))]
    rows += [{"arm": "random", "seed": s, "metric": "knn", "value": v} for s, v in enumerate((0.70, 0.71, 0.72))]
    rows += [{"arm": "mixmim_single", "seed": 0, "metric": "knn", "value": 0.81}]
    summary = summarise(rows)
    assert summary["mixmim"]["knn"]["mean"] == pytest.approx(0.82)
    assert summary["mixmim"]["knn"]["std"] == pytest.approx(0.02)  # sample standard deviation
    assert summary["mixmim_single"]["knn"]["std"] == 0.0 and summary["mixmim_single"]["knn"]["n"] == 1
    verdicts = {c["table"]: c["verdicts"] for c in orderings(summary)}
    assert verdicts["pretraining pays"] == ["holds"]
    assert verdicts["MixMIM Table 7 (dual reconstruction)"] == ["within spread"]  # 0.82 vs 0.81, spread 0.02


def test_paper_orderings_with_tied_tiers_and_missing_arms():
    """Table 6 ties zero and learnable: each is compared with the tiers around it, not with each other;
    arms that did not run are left out of the ordering instead of hiding it."""
    from mixmim.study import orderings, summarise

    values = {"mixmim": 0.80, "mixmim_zero": 0.70, "mixmim_learnable": 0.85, "mixmim_shuffle": 0.60}
    summary = summarise([{"arm": a, "seed": 0, "metric": "linprobe", "value": v} for a, v in values.items()])
    (table6,) = [c for c in orderings(summary) if c["table"].startswith("MixMIM Table 6")]
    assert table6["order"] == "mixmim > mixmim_zero = mixmim_learnable > mixmim_shuffle"  # no zoomin ran
    assert dict(zip(table6["pairs"], table6["verdicts"])) == {
        "mixmim > mixmim_zero": "holds", "mixmim > mixmim_learnable": "reversed",
        "mixmim_zero > mixmim_shuffle": "holds", "mixmim_learnable > mixmim_shuffle": "holds"}
    assert not [c for c in orderings(summarise([{"arm": "mixmim", "seed": 0, "metric": "knn", "value": 0.5}]))]


def test_one_seed_arms_borrow_the_spread_of_the_multi_seed_arms():
    """Two one-seed arms 0.01 apart are not an ordering when the seeds of another arm spread by 0.02."""
    from mixmim.study import orderings, summarise

    rows = [{"arm": "random", "seed": s, "metric": "knn", "value": v} for s, v in enumerate((0.50, 0.52, 0.54))]
    rows += [{"arm": "mixmim", "seed": 0, "metric": "knn", "value": 0.70},
             {"arm": "mixmim_mix_embedding", "seed": 0, "metric": "knn", "value": 0.69},
             {"arm": "mixmim_no_unmixing", "seed": 0, "metric": "knn", "value": 0.60}]
    (table10,) = [c for c in orderings(summarise(rows)) if c["table"].startswith("MixMIM Table 10")]
    assert table10["yardstick"] == pytest.approx(0.02)
    assert table10["verdicts"] == ["within spread", "holds"]


def test_monitor_logs_knn_from_the_start_and_draws_it(tmp_path):
    from PIL import Image

    from mixmim.config import load_config
    from mixmim.training.pretrain import run_pretraining
    from mixmim.utils.metrics_csv import read_metrics

    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():
        (tmp_path / "labelled" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "labelled" / name / f"{i}.png")
    config = load_config(None, tiny_run(tmp_path, f"train.monitor.data={tmp_path / 'labelled'}",
                                        "train.monitor.every=3", "train.monitor.linprobe=true",
                                        "train.monitor.linprobe_epochs=2"))
    summary = run_pretraining(config)
    m = read_metrics(tmp_path / "t" / "metrics.csv")
    steps_with_knn = [int(s) for s, v in zip(m["step"], m["knn"]) if v == v]
    assert steps_with_knn == [0, 3, 6]
    assert all(0 <= v <= 100 for v in m["knn"] if v == v) and any(v == v for v in m["linprobe"])
    assert [h["step"] for h in summary["monitor"]] == [0, 3, 6] and summary["monitor_seconds"] > 0
    assert (tmp_path / "t" / "loss.png").stat().st_size > 10_000


def test_monitor_warns_when_features_fall_below_the_starting_encoder(caplog):
    from mixmim.training.monitor import RepresentationMonitor

    monitor = RepresentationMonitor.__new__(RepresentationMonitor)
    monitor.baseline, monitor.warned = None, False
    monitor._check(0, 70.0)
    monitor._check(10, 69.0)  # within 2 points: noise
    assert not monitor.warned
    monitor._check(20, 60.0)
    assert monitor.warned


def test_the_monitor_reports_top1_of_the_weighted_knn(monkeypatch):
    """With the votes fixed so that every test image's class comes second, k-NN top-1 is 0% (top-5
    would be 100%)."""
    import torch

    import mixmim.training.monitor as monitor_module
    from mixmim.config import MonitorConfig
    from mixmim.training.monitor import RepresentationMonitor

    monitor = RepresentationMonitor.__new__(RepresentationMonitor)
    monitor.cfg, monitor.device, monitor.classes = MonitorConfig(data="x"), torch.device("cpu"), ["a", "b", "c"]
    monitor.train = monitor.test = None
    monitor.history, monitor.seconds, monitor.baseline, monitor.warned = [], 0.0, None, False
    labels = torch.tensor([0, 1, 2, 0])
    monkeypatch.setattr(monitor_module, "extract_features", lambda *a, **k: (torch.randn(4, 8), labels))
    second = torch.nn.functional.one_hot((labels + 1) % 3, 3) * 2.0 + torch.nn.functional.one_hot(labels, 3)
    monkeypatch.setattr(monitor_module, "knn_scores", lambda *a, **k: second)
    assert monitor(torch.nn.Identity(), 0) == {"knn": 0.0}


def test_the_monitor_decodes_its_images_once(class_folder, monkeypatch):
    """The k-NN bank and test images are decoded when the monitor is built and kept: evaluating reads no
    file, and the kept items equal freshly decoded ones bit for bit."""
    import torch

    from mixmim.config import MonitorConfig
    from mixmim.data.labelled import eval_transform, load_splits
    from mixmim.data.sources import FolderSource
    from mixmim.training.monitor import RepresentationMonitor

    cfg = MonitorConfig(data=str(class_folder), train_size=8, test_size=4, batch_size=4)
    monitor = RepresentationMonitor(cfg, 32, torch.device("cpu"))
    fresh = load_splits(cfg.data, eval_transform(32, cfg.crop_pct), eval_transform(32, cfg.crop_pct), 8, 4,
                        seed=0, balanced=True)
    assert all(torch.equal(monitor.train[i][0], fresh.train[i][0]) for i in range(len(fresh.train)))
    reads = []
    real = FolderSource.load
    monkeypatch.setattr(FolderSource, "load", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    encoder.pooled_features = encoder.forward  # what extract_features asks of an encoder
    for step in (0, 10):
        assert 0.0 <= monitor(encoder, step)["knn"] <= 100.0
    assert reads == []


def test_gpu_profile_resolves_with_every_arm(fake_fashion_mnist, tmp_path):
    """The GPU profile (not run on a CPU) resolves, names only arms that exist, and builds every arm's
    config; its encoder is the ViT-S it documents, with an 8 x 8 mixing grid."""
    from mixmim.study import STUDY_CONFIGS, Study, load_profile

    study = Study(load_profile("gpu"), tmp_path / "study")
    config = study.run_config(study.arms[1], 0)
    assert config.model.name == "vit_small" and config.model.img_size == 64
    assert config.model.img_size // config.method.mask_cell == 8
    assert config.train.max_steps * config.train.batch_size <= study.profile.images
    assert {a.name for a in study.arms} == {p.stem for p in (STUDY_CONFIGS / "arms").glob("*.yaml")}


def test_every_arm_builds_on_the_cpu_profile_and_takes_a_step(fake_fashion_mnist, tmp_path):
    """Every YAML in configs/study/arms resolves on the CPU profile (the study refuses a bad one before
    any work), every pretraining arm's method computes a finite loss with gradients on the encoder, and
    every arm but the pos/ diagnostics learns its position table, MAE's and MixedAE's included."""
    import torch

    from mixmim.methods.factory import build_method
    from mixmim.study import STUDY_CONFIGS, Study, load_profile

    names = sorted(str(p.relative_to(STUDY_CONFIGS / "arms").with_suffix("")) for p in
                   (STUDY_CONFIGS / "arms").rglob("*.yaml"))
    assert {"random", "mixmim", "mixmim_learnable", "mixmim_zoomin", "mixmim_shuffle"} <= set(names)
    study = Study(load_profile("cpu"), tmp_path / "study", names)
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    for arm in study.arms:
        if not arm.pretrain or arm.name.startswith("lr/"):
            continue
        method = build_method(study.run_config(arm, 0))
        loss = method(images).loss
        loss.backward()
        grads = [p.grad for n, p in method.named_parameters() if n.startswith("encoder.") and p.grad is not None]
        assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads), arm.name
        # One position table for every arm (the profile's learnable one); only the pos/ diagnostics differ.
        table = dict(method.named_parameters())["encoder.pos_embed"]
        assert table.requires_grad == (not arm.name.endswith("_fixed_pos")), arm.name


def test_the_study_runs_seed_major(fake_fashion_mnist, tmp_path):
    """Each arm's seed 0 before any arm's seed 1: a study stopped part-way has every arm's first seeds."""
    from mixmim.study import Study, load_profile

    study = Study(load_profile("cpu"), tmp_path / "study", arms=["random", "mixmim", "mae"])
    order = [(arm.name, seed) for arm, seed in study.schedule()]
    assert order[:3] == [("random", 0), ("mixmim", 0), ("mae", 0)]
    assert order[3:] == [(a, s) for s in range(1, 5) for a in ("random", "mixmim")]


def test_reused_results_need_no_run_on_disk(fake_fashion_mnist, tmp_path, monkeypatch):
    """Rows of an earlier report (its runs and checkpoints deleted) are taken with their commit and not
    pretrained again; a seed with a metric missing still is; rows of other arms or profiles are not taken."""
    from mixmim.config import ConfigError
    from mixmim.study import METRICS, Study, load_profile

    study = Study(load_profile("quick"), tmp_path / "study", arms=["mixmim"])
    arm = study.arms[0]
    measured = study.metrics_of(arm)  # the quick profile's: the classification metrics
    rows = [{"arm": a, "seed": 0, "metric": m, "value": 0.5, "commit": "abc"} for a in ("mixmim", "mae")
            for m in METRICS]  # the dense metrics' rows are not this profile's: not taken
    report = tmp_path / "results.json"
    report.write_text(json.dumps({"commit": "abc", "command": "mixmim study", "results": rows}))
    assert study.reuse(report) == len(measured) == 4
    assert study.reuse(report) == 0  # never over a cached result
    assert {r["commit"] for r in study.collect()} == {"abc"} and len(study.collect()) == len(measured)
    pretrained = []
    monkeypatch.setattr(Study, "_pretrain", lambda self, config: pretrained.append(config.name) or (None, 0.0))
    monkeypatch.setattr(Study, "_evaluate", lambda self, config, weights, seed, todo: iter(()))
    study.run_arm(arm, 0)
    assert pretrained == []
    study.result_path(arm, 0, "knn").unlink()
    study.run_arm(arm, 0)
    assert pretrained == ["mixmim/seed0"]
    report.write_text(json.dumps({"profile": "cpu", "results": rows}))
    with pytest.raises(ConfigError, match="profile 'cpu'"):
        study.reuse(report)


def test_report_curves_take_each_arms_first_seed_on_disk(fake_fashion_mnist, tmp_path):
    """A study continued with --reuse may have lost seed 0's run: its curves come from the next seed,
    labelled so, or from the copy an earlier report kept; an arm with neither, or not pretrained, has no
    curve. The kept copy holds the drawn columns of the run's rows and is preferred only when the run
    is gone."""
    from mixmim.study import Study, curve_runs, keep_curves, load_profile

    study = Study(load_profile("cpu"), tmp_path / "study", arms=["random", "mixmim", "mae", "simmim"])
    for arm, seed in (("mixmim", 3), ("mixmim", 4), ("random", 0), ("simmim", 0)):
        run = tmp_path / "study" / "runs" / arm / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("step,epoch,loss,lr,img_per_s,knn\n0,0.0,,,,49.5\n1,0.1,1.0,0.1,9,\n"
                                         "2,0.2,,,,\n")
    kept = tmp_path / "report" / "curves"
    runs = tmp_path / "study" / "runs"
    assert curve_runs(study, kept) == {"mixmim (seed 3)": runs / "mixmim" / "seed3" / "metrics.csv",
                                       "simmim": runs / "simmim" / "seed0" / "metrics.csv"}
    keep_curves(curve_runs(study, kept), study, kept)
    assert (kept / "simmim" / "seed0.csv").read_text() == "step,loss,knn\n0,,49.5\n1,1.0,\n"
    (kept / "mae").mkdir()
    (kept / "mae" / "seed0.csv").write_text("step,loss,knn\n0,,50\n")
    (runs / "mixmim" / "seed3" / "metrics.csv").write_text("step,loss\n0,2.0\n")  # the run wins over its copy
    assert curve_runs(study, kept) == {"mixmim (seed 3)": runs / "mixmim" / "seed3" / "metrics.csv",
                                       "mae": kept / "mae" / "seed0.csv",
                                       "simmim": runs / "simmim" / "seed0" / "metrics.csv"}
    for run in runs.iterdir():
        if run.name != "random":
            for f in run.rglob("*"):
                f.unlink() if f.is_file() else None
    assert curve_runs(study, kept) == {"mixmim (seed 3)": kept / "mixmim" / "seed3.csv",
                                       "mae": kept / "mae" / "seed0.csv", "simmim": kept / "simmim" / "seed0.csv"}
    assert curve_runs(study) == {}


def test_accuracy_plot_legend_lists_arms_missing_from_the_last_panel(tmp_path, monkeypatch):
    """An arm measured on k-NN and the probe only has no dot on the fine-tuning panel; the legend
    still names it."""
    from mixmim.viz import study as viz

    legends = []
    monkeypatch.setattr(viz, "_save", lambda fig, path: legends.append(
        [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]) or path)
    rows = [{"arm": "mixmim", "metric": m, "value": 0.7} for m in ("knn", "linprobe", "finetune_10pct")]
    rows += [{"arm": "pos/mixmim_fixed_pos", "metric": m, "value": 0.8} for m in ("knn", "linprobe")]
    viz.accuracy_vs_time(rows, tmp_path / "a.png")
    assert legends == [["mixmim", "pos/mixmim_fixed_pos"]]


def test_results_are_keyed_by_the_settings_that_made_them(fake_fashion_mnist, tmp_path, monkeypatch):
    """A cached result records a fingerprint of the arm's settings: an arm whose YAML changed (MAE given
    the study's learnable positions) does not silently take the old result, --reuse skips such rows,
    and a metric's fingerprint ignores the settings of the other metrics."""
    from mixmim.config import ConfigError
    from mixmim.study import Study, load_profile

    study = Study(load_profile("quick"), tmp_path / "study", arms=["mixmim"])
    arm = study.arms[0]
    METRICS = study.metrics_of(arm)  # noqa: N806 (the quick profile's metrics)
    before = {m: study.settings(arm, m) for m in METRICS}
    assert len(set(before.values())) == len(METRICS)  # each metric its own
    study.profile.evaluation.finetune[1].overrides.append("train.epochs=2")
    assert study.settings(arm, "knn") == before["knn"] and study.settings(arm,
                                                                          "finetune_1pct") == before["finetune_1pct"]
    assert study.settings(arm, "finetune_10pct") != before["finetune_10pct"]

    monkeypatch.setattr(Study, "_pretrain", lambda self, config: (None, 0.0))
    monkeypatch.setattr(Study, "_evaluate", lambda self, config, weights, seed, todo: (
        (m, 0.5, 1.0, {}) for m in todo))
    study.run_arm(arm, 0)
    rows = study.collect()
    assert {r["settings"] for r in rows} == {study.settings(arm, m) for m in METRICS}
    old = {m: study.settings(arm, m) for m in METRICS}
    arm.run = {"model": {"options": {"fixed_pos_embed": True}}, **arm.run}  # the arm's YAML changed
    with pytest.raises(ConfigError, match="other settings of arm 'mixmim'"):
        study.run_arm(arm, 0)
    for path in (tmp_path / "study" / "results").rglob("*.json"):
        path.unlink()
    report = tmp_path / "results.json"
    legacy = {"arm": "mixmim", "seed": 0, "metric": "knn", "value": 0.5}  # from before the fingerprint
    report.write_text(json.dumps({"results": [legacy] + [
        {"arm": "mixmim", "seed": 0, "metric": m, "value": 0.5, "settings": old[m]} for m in METRICS[1:]]}))
    assert study.reuse(report) == 1
    assert [r["metric"] for r in study.collect()] == ["knn"]
