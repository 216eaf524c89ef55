"""`mixmim finetune`, `linprobe` and `knn` end to end on a tiny synthetic class folder."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_ENCODER
from mixmim.cli import main
from mixmim.data.fashion_mnist import DEFAULT_ROOT
from mixmim.evaluation.knn import knn_scores
from mixmim.interop.export import save_encoder
from mixmim.models.mixmim_vit import MixMIMTransformer

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
SMALL = {**TINY_ENCODER, "img_size": 64, "window_size": (8, 8, 4, 2)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    (root / "data" / "red" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")  # skipped, not fatal
    torch.manual_seed(0)
    save_encoder(MixMIMTransformer(**SMALL), root / "encoder")
    return root


def _common(ws, verb, out):
    return [verb, "--checkpoint", str(ws / "encoder.safetensors"), "--data", str(ws / "data"), "--output",
            str(ws / out), "--num-workers", "0", "--no-progress", "--val-fraction", "0.25"]


def test_finetune_two_epochs_reports_accuracy(workspace, capsys):
    code = main(_common(workspace, "finetune", "ft") + ["--epochs", "2", "--batch-size", "8", "--warmup-epochs",
                                                        "1", "--base-lr", "2e-2"])
    assert code == 0
    assert "test top-1" in capsys.readouterr().out
    out = workspace / "ft"
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["acc1"] <= 100.0 and results["acc5"] == 100.0  # 3 classes: top-5 is everything
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The loop's rows (one per logged step); the evaluation at each epoch's end in the same file.
    assert [float(r["epoch"]) for r in rows if r["acc1"]] == [1.0, 2.0]
    for name in ("model.pt", "confusion_matrix.csv", "confusion_matrix.png", "per_class_accuracy.csv",
                 "config.yaml"):
        assert (out / name).is_file(), name
    confusion = (out / "confusion_matrix.csv").read_text().splitlines()
    assert confusion[0].split(",")[1:] == ["blue", "green", "red"]
    kept = torch.load(out / "model.pt", weights_only=False)
    assert kept["format"] == "mixmim-classifier/1" and kept["model"]["head.weight"].shape == (3, 128)


def test_linprobe_and_knn(workspace, capsys):
    assert main(_common(workspace, "linprobe", "lp") + ["--epochs", "5", "--batch-size", "8"]) == 0
    assert main(_common(workspace, "knn", "knn") + ["--k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "k-NN" in printed
    lp = json.loads((workspace / "lp" / "results.json").read_text())
    kn = json.loads((workspace / "knn" / "results.json").read_text())
    # Colour is linearly decodable even from random features.
    assert kn["acc1"] >= 50.0 and lp["acc1"] >= 0.0 and kn["k"] == 5


def test_knn_votes_are_temperature_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_scores(bank, labels, torch.tensor([[1.0, 0.05]]), num_classes=2, k=3, temperature=0.07)
    assert scores.argmax(1).item() == 0 and scores[0, 1] > 0


def test_bad_inputs_are_single_line_errors(workspace, capsys):
    assert main(["finetune", "--data", str(workspace / "nope"), "--model", "mixmim_tiny"]) == 2
    assert main(["knn", "--data", str(workspace / "data"), "--checkpoint", str(workspace / "missing.pt")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "nope" in errors[0] and "missing.pt" in errors[1]


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Fashion-MNIST is not installed")
def test_knn_on_fashion_mnist_subset(workspace, capsys):
    assert main(["knn", "--checkpoint", str(workspace / "encoder.safetensors"), "--data", "fashion_mnist",
                 "--limit-train", "200", "--limit-test", "50", "--num-workers", "0", "--no-progress",
                 "--output", str(workspace / "fm")]) == 0
    assert "top-1" in capsys.readouterr().out


def test_randaugment_survives_zero_bit_posterize():
    from PIL import Image as PILImage

    from mixmim.data.labelled import train_transform

    transform = train_transform(32, "rand-m10-mstd1.0-inc1-n4")
    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(300):
        assert transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize("verb", ["knn", "linprobe", "finetune"])
def test_a_folder_with_one_class_is_one_line(workspace, tmp_path, capsys, verb):
    (tmp_path / "only" / "red").mkdir(parents=True)
    for i, src in enumerate(sorted((workspace / "data" / "red").glob("*.png"))[:4]):
        (tmp_path / "only" / "red" / f"{i}.png").write_bytes(src.read_bytes())
    args = _common(workspace, verb, "one")
    args[args.index("--data") + 1] = str(tmp_path / "only")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 class (red)" in err[0] and "at least two classes" in err[0], err


def test_an_unknown_augmentation_policy_is_one_line(workspace, capsys):
    args = _common(workspace, "finetune", "aa") + ["--epochs", "1", "--auto-augment", "fancy-m9"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fancy-m9" in err.strip().splitlines()[-1], err
    assert main(_common(workspace, "finetune", "aa_none") + ["train.max_steps=1", "--auto-augment", "none"]) == 0


def test_resume_with_another_class_count_is_one_line(workspace, tmp_path, capsys):
    assert main(_common(workspace, "finetune", "rc") + ["train.max_steps=2", "--batch-size", "4"]) == 0
    two = tmp_path / "two"
    for name in ("red", "green"):
        (two / name).mkdir(parents=True)
        for src in sorted((workspace / "data" / name).glob("*.png")):
            (two / name / src.name).write_bytes(src.read_bytes())
    args = _common(workspace, "finetune", "rc") + ["train.max_steps=4", "--batch-size", "4", "--resume"]
    args[args.index("--data") + 1] = str(two)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("mixmim finetune: error: --resume")
    assert "3 classes" in err.strip().splitlines()[-1], err
