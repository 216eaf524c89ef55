"""The wheel works without the repository (issue 22): built from this checkout, installed (not editable)
into a fresh virtual environment, and run from an empty folder with no PYTHONPATH: the demo, a recipe
by name, the quick study, ``mixmim recipes``. ``mixmim --help`` and ``import mixmim`` load no torch.

The fresh environment borrows this one's dependencies (torch, timm, ...) through a path file instead of
reinstalling them, so the test takes seconds of setup; only mixmim itself is installed, from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from mixmim.config import RECIPES, list_recipes
from test_study import write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm")
# Prints the heavy packages loaded by `mixmim --help` (argparse exits after printing the help).
NO_TORCH = ("import sys\nfrom mixmim.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")


def _can_build_offline() -> bool:
    """setuptools builds wheels itself from 70.1 on; before, it needs the wheel package."""
    try:
        major, minor = (int(p) for p in metadata.version("setuptools").split(".")[:2])
    except metadata.PackageNotFoundError:
        return False
    try:
        metadata.version("wheel")
        return True
    except metadata.PackageNotFoundError:
        return (major, minor) >= (70, 1)


def _run(args, cwd, env=None, timeout=300):
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_import_mixmim_and_the_recipes_verb_load_no_torch():
    code = ("import sys, mixmim, mixmim.config, mixmim.cli\nfrom mixmim.cli import main\nmain(['recipes'])\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = _run([sys.executable, "-c", code], cwd=ROOT)
    assert out.splitlines()[-1] == "[]", out.splitlines()[-1]
    assert len(out.splitlines()) == len(list_recipes()) + 1


@pytest.mark.skipif(sys.platform == "win32", reason="the fresh environment's layout is POSIX's (bin/)")
@pytest.mark.skipif(not _can_build_offline(), reason="building a wheel offline needs setuptools >= 70.1 or wheel")
def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    timings = {}

    # Build from a copy of the sources, so that the build's egg-info and build/ stay out of the checkout.
    start = time.perf_counter()
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          source], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mixmim-*.whl")
    timings["build"] = time.perf_counter() - start
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mixmim/configs/")}
    shipped = {f"mixmim/{p.relative_to(RECIPES.parent).as_posix()}" for p in RECIPES.rglob("*.yaml")}
    assert packed == shipped and "mixmim/configs/study/profiles/quick.yaml" in packed

    # A fresh environment without pip; this environment's pip installs the wheel into it.
    start = time.perf_counter()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python, mixmim = venv / "bin" / "python", venv / "bin" / "mixmim"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    # Plain path lines: this environment's own .pth files (an editable install of mixmim) are not run.
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (purelib / "_borrowed_dependencies.pth").write_text("\n".join(ours) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)
    timings["install"] = time.perf_counter() - start

    empty = tmp_path / "empty"
    empty.mkdir()
    fashion = write_fashion_mnist(tmp_path / "fashion_mnist")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MIXMIM_FASHION_MNIST=str(fashion))

    start = time.perf_counter()
    where = _run([python, "-c", "import mixmim; print(mixmim.__file__)"], empty, env).strip()
    assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not the checkout
    assert _run([python, "-c", NO_TORCH, "--help"], empty, env).splitlines()[-1] == "[]"
    assert "recipes" in _run([mixmim, "--help"], empty, env)
    listed = _run([mixmim, "recipes"], empty, env).splitlines()
    assert [line.split()[0] for line in listed] == list_recipes()
    assert len(_run([mixmim, "recipes", "--filter", "table6_"], empty, env).splitlines()) == 5
    timings["help, recipes"] = time.perf_counter() - start

    # A recipe by name resolves through its base inside the installed package.
    start = time.perf_counter()
    config = yaml.safe_load(_run([mixmim, "pretrain", "--config", "ablations/table6_filling_zero", "--print-config"],
                                 empty, env))
    assert config["name"] == "table6_filling_zero" and (config["method"]["name"], config["method"]["filling"]) == \
        ("mixmim", "zero")
    assert (config["model"]["name"], config["optim"]["base_lr"], config["train"]["epochs"]) == ("mixmim_base", 1.5e-4,
                                                                                               300)
    timings["--config name"] = time.perf_counter() - start

    # The demo (no --config) on the photos bundled with scikit-image, shortened: 2 steps of a tiny
    # encoder and decoder. Its files go to runs/demo under the current folder.
    start = time.perf_counter()
    _run([mixmim, "pretrain", "train.max_steps=2", "train.checkpoint_every=1", "train.picture_every=0",
          "train.num_workers=0", "train.progress=false", "train.batch_size=4", "model.embed_dim=16",
          "model.depths=[1,1,2,1]", "model.num_heads=[1,2,2,4]", "method.decoder_dim=32", "method.decoder_depth=1",
          "method.decoder_num_heads=2"], empty, env)
    run = empty / "runs" / "demo"
    for name in ("config.yaml", "metrics.csv", "encoder.safetensors", "checkpoints/step_00000002.pt"):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["source"] == "bundled"
    timings["demo"] = time.perf_counter() - start

    # The quick study, its profile and arm found by name in the installed package; one arm (SimMIM, one
    # seed) of the three keeps this under a minute: `mixmim study --arms` runs a part of a study.
    start = time.perf_counter()
    _run([mixmim, "study", "--profile", "quick", "--arms", "simmim", "--output", "study"], empty, env)
    results = json.loads((empty / "study" / "report" / "results.json").read_text())["results"]
    assert {(r["arm"], r["metric"]) for r in results} == {("simmim", m) for m in
                                                          ("knn", "linprobe", "finetune_1pct", "finetune_10pct")}
    timings["study"] = time.perf_counter() - start
    print("wheel test timings (s):", {k: round(v, 1) for k, v in timings.items()})
    assert timings["build"] < 60, timings  # seconds, not minutes: no dependency is built or fetched
