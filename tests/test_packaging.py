"""Dependencies are ranges (so installing mixmim keeps a compatible torch), CI installs the exact set the suite
passed with (constraints.txt), and the lower bounds are a set the suite passed with too (constraints-lower.txt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    lines = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        lines += [r for r in PYPROJECT["project"]["optional-dependencies"][extra] if not r.startswith("mixmim")]
    return [Requirement(r) for r in lines]


def test_every_dependency_is_a_range_from_a_tested_lower_bound_to_the_next_major():
    lower, ci = _pins(ROOT / "constraints-lower.txt"), _pins(ROOT / "constraints.txt")
    for req in _requirements(("test", "wandb", "mlflow", "hf", "dense")):
        name = canonicalize_name(req.name)
        ops = {s.operator: Version(s.version) for s in req.specifier}
        assert set(ops) == {">=", "<"}, f"{req}: want '>=lower,<next major'"
        major = ci[name].major
        assert ops["<"] == Version(str(major + 1 if major else 1)), f"{req}: the cap is the major after {ci[name]}"
        if name in lower:  # the runtime dependencies: the suite ran with each lower bound
            assert lower[name] == ops[">="], f"{req.name}: the suite ran with {lower[name]}, not {ops['>=']}"
    assert set(lower) >= {canonicalize_name(r.name) for r in _requirements()}


def test_constraints_pin_what_ci_installs_and_fit_the_ranges():
    pins = _pins(ROOT / "constraints.txt")
    assert "mixmim" not in pins
    for req in _requirements(("test", "wandb", "mlflow", "hf", "dense")):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert pins[name] in req.specifier, f"constraints.txt has {req.name}=={pins[name]}, outside {req.specifier}"


def test_ci_installs_with_the_constraints_and_runs_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert "-c constraints.txt" in command and "pytest -n 2 tests" in command
    readme = (ROOT / "README.md").read_text()
    assert command in readme.splitlines(), "the README's test command and .ci/run differ"


def _fake_installed(site, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """What pip reads of an installed distribution: its dist-info METADATA (the resolver never looks inside
    the package itself)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *[f"Requires-Dist: {r}" for r in requires]]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _project(tmp_path, pyproject: str):
    """The project as pip builds its metadata: pyproject.toml, the README it names, the package folder
    (a copy, so that the build writes nothing into the checkout)."""
    project = tmp_path / "project"
    (project / "src" / "mixmim").mkdir(parents=True)
    (project / "src" / "mixmim" / "__init__.py").write_text("")
    (project / "README.md").write_text("mixmim\n")
    (project / "pyproject.toml").write_text(pyproject)
    return project


def _dry_run(env_python, project) -> list[str]:
    report = project.parent / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_python), "install", "--dry-run",
                           "--quiet", "--report", str(report), str(project)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="pip resolves every dependency against the package "
                    "indexes (about a minute): CI only")
def test_installing_mixmim_keeps_the_torch_an_environment_has(tmp_path):
    """A venv that has torch 2.13.0 with its torchvision 0.28.0 (as pip's resolver sees installed packages:
    their metadata) gets mixmim without either being replaced. With the exact pins mixmim had before
    (torch==2.14.1, torchvision==0.29.1) the same dry run replaces both, which is what this guards against.
    (A venv with torch alone gets a newer torch all the same: the newest torchvision pins the newest torch.)"""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = next((env / "lib").glob("python3*/site-packages"))
    _fake_installed(site, "torch", "2.13.0", ("filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3",
                                              "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5"))
    _fake_installed(site, "torchvision", "0.28.0", ("numpy", "torch==2.13.0", "pillow!=8.3.*,>=5.3.0"))
    installs = _dry_run(env / "bin" / "python", _project(tmp_path, (ROOT / "pyproject.toml").read_text()))
    assert "mixmim" in installs
    assert "torch" not in installs and "torchvision" not in installs, installs
