"""The pretraining loop as a user runs it: files written, loss falls, resume replays, bad configs stop."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from conftest import tiny_run
from mixmim.cli import main as cli
from mixmim.config import ConfigError, load_config
from mixmim.training.pretrain import run_pretraining
from mixmim.training.schedule import lr_at


def losses(run_dir) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle)}


def test_run_writes_everything_a_user_looks_at(tmp_path):
    summary = run_pretraining(load_config(None, tiny_run(tmp_path)))
    run = tmp_path / "t"
    assert summary["step"] == 6 and summary["stopped"] is None
    for name in ("config.yaml", "metrics.csv", "loss.png", "reconstruction.png", "reconstruction_raw.png",
                 "encoder.safetensors",
                 "encoder.json", "log.txt"):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert steps == ["step_00000003.pt", "step_00000006.pt"]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    # the exported encoder rebuilds and matches the trained one
    from mixmim.interop.checkpoint import load_checkpoint
    from mixmim.interop.export import load_encoder

    encoder = load_encoder(run / "encoder.safetensors")
    state = load_checkpoint(run / "checkpoints" / "step_00000006.pt")["model"]
    assert torch.equal(encoder.state_dict()["patch_embed.proj.weight"], state["encoder.patch_embed.proj.weight"])


def test_loss_falls_on_bundled_images(tmp_path):
    """Same images, same mask, before and after 24 steps: the reconstruction error must drop."""
    from mixmim.data import build_pretrain_dataset
    from mixmim.interop.checkpoint import load_checkpoint
    from mixmim.methods.factory import build_method

    config = load_config(None, tiny_run(tmp_path, "train.max_steps=24", "train.batch_size=8", "optim.lr=3e-3",
                                        "train.checkpoint_every=100", "optim.warmup_steps=5"))
    dataset = build_pretrain_dataset(config.data, config.model.img_size)
    images = torch.stack([dataset[(i, 1000 + i)]["image"] for i in range(8)])

    def fixed_loss(method):
        torch.manual_seed(7)
        with torch.no_grad():
            return float(method.eval()(images).loss)

    torch.manual_seed(config.train.seed)  # the loop's initial weights
    before = fixed_loss(build_method(config))
    run_pretraining(config)
    trained = build_method(config)
    trained.load_state_dict(load_checkpoint(tmp_path / "t" / "checkpoints" / "step_00000024.pt")["model"])
    after = fixed_loss(trained)
    assert after < before - 0.05, (before, after)


def test_resume_after_crash_replays_the_same_trajectory(tmp_path):
    straight = tmp_path / "straight"
    run_pretraining(load_config(None, tiny_run(straight)))

    crashed = tmp_path / "crashed"
    config = load_config(None, tiny_run(crashed))
    from conftest import crashing_step

    with crashing_step(5), pytest.raises(RuntimeError, match="simulated crash"):  # after the step-3 checkpoint
        run_pretraining(config)
    assert sorted(losses(crashed / "t")) == [1, 2, 3, 4]
    summary = run_pretraining(config, resume=True)
    assert summary["step"] == 6
    a, b = losses(straight / "t"), losses(crashed / "t")
    with open(crashed / "t" / "metrics.csv", newline="") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the orphan step-4 row was replaced, not duplicated
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_unknown_key_and_wrong_type_fail_at_start_naming_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'train.batchsize'"):
        load_config(None, ["train.batchsize=4"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  name: mixmim_tiny\n  img_size: big\n")
    with pytest.raises(ConfigError, match="'model.img_size': expected int, got 'big'"):
        load_config(recipe)
    recipe.write_text("optim:\n  base_lr: 1e-3\n  momentun: 0.9\n")
    assert cli(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'optim.momentun'" in err[0]


@pytest.mark.parametrize("override, key", [
    ("model.img_size=100", "model.img_size"), ("method.mask_ratio=1.2", "mask_ratio"),
    ("model.name=mixmim_giant", "model.name"), ("method.name=byol", "method.name"),
    ("train.accum_steps=3", "train.batch_size"),
])
def test_invalid_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["train.batch_size=16", override])


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    config = load_config(None, tiny_run(tmp_path, "train.max_steps=3"))
    run_pretraining(config)
    with pytest.raises(ConfigError, match="--resume"):
        run_pretraining(config)
    assert run_pretraining(config, overwrite=True)["step"] == 3


def test_schedule_warms_up_then_follows_the_cosine():
    peak = 1e-3
    assert lr_at(0, 100, 10, peak) == 0.0  # MAE's lr_sched, kept by the release: the warm-up starts at 0
    assert lr_at(9, 100, 10, peak) == pytest.approx(0.9 * peak)
    assert lr_at(10, 100, 10, peak) == pytest.approx(peak)
    assert lr_at(55, 100, 10, peak) == pytest.approx(peak / 2)
    assert lr_at(100, 100, 10, peak, min_lr=1e-5) == pytest.approx(1e-5)


def test_optimizer_is_adamw_with_the_papers_lr_rule_and_betas():
    from conftest import TINY
    from mixmim import create_pretrainer
    from mixmim.config import OptimConfig
    from mixmim.training.optim import build_optimizer
    from mixmim.training.schedule import peak_lr

    model = create_pretrainer("mixmim", "mixmim_tiny", **TINY)
    optimizer = build_optimizer(model, OptimConfig(), peak_lr(OptimConfig(), 512), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4 * 512 / 256)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_command_line_runs_and_reconstructs(tmp_path):
    env_python = sys.executable
    done = subprocess.run([env_python, "-m", "mixmim", "pretrain", *tiny_run(tmp_path, "train.max_steps=2")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "grid.png"
    import skimage

    photos = __import__("pathlib").Path(skimage.__file__).parent / "data"
    assert cli(["reconstruct", "--checkpoint", str(tmp_path / "t"), "--images", str(photos / "astronaut.png"),
                str(photos / "coffee.png"), str(photos / "chelsea.png"), str(photos / "rocket.jpg"),
                "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    # Named sets instead of files: the photos bundled with scikit-image, drawn without borrowed statistics.
    raw = tmp_path / "raw.png"
    assert cli(["reconstruct", "--checkpoint", str(tmp_path / "t"), "--images", "bundled", "--max-images", "4",
                "--raw-prediction", "--output", str(raw)]) == 0
    assert raw.stat().st_size > 10_000
    # A folder with an unreadable file: skipped with one line, the others drawn.
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    done = subprocess.run([env_python, "-m", "mixmim", "reconstruct", "--checkpoint", str(tmp_path / "t"), "--images",
                           str(folder), "--output", str(tmp_path / "folder.png")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "skipping unreadable image" in done.stderr and "broken.jpg" in done.stderr


def test_info_lists_models_with_counts(capsys):
    assert cli(["info", "--models", "mixmim_tiny", "mixmim_base"]) == 0
    text = capsys.readouterr().out
    assert "mixmim_base" in text and "87.32" in text and "114.67" in text
