"""The layout is the architecture (issue 22; docs/architecture.md): no package imports one above it, no
two modules import each other at load time, and the loop's functions stay short (``mixmim --help``
without torch: tests/test_wheel.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mixmim"

# Bottom to top; a package imports only from layers below its own (docs/architecture.md draws them).
LAYERS = [
    {"utils"},
    {"models", "data"},
    {"methods", "interop"},
    {"config", "viz", "evaluation", "_timm_hook"},
    {"training"},
    {"transfer", "launch"},
    {"study"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The mixmim modules ``path`` imports (``top_level_only``: at load time, not inside functions)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixmim"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mixmim"))
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(package: Path) -> list[str]:
    found = []
    for module, path in modules(package).items():
        mine = package_of(module)
        for target in imports(path) if mine != "__init__" else ():
            theirs = package_of(target)
            if theirs not in (mine, "__init__") and theirs in LAYER and LAYER[theirs] >= LAYER[mine]:
                found.append(f"{module} -> {target}")
    return found


def import_cycles(package: Path) -> list[list[str]]:
    """Files that import each other, at load time or inside a function (a deferred import still ties
    the two files together: hiding it in a function only hides it from a load-time check)."""
    known = modules(package)
    # A package's __init__ importing its own modules is how packages work: those edges are left out.
    graph = {m: {t for t in imports(p) if t in known and t != m and not t.startswith(m + ".")}
             for m, p in known.items()}
    seen: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
        elif node not in seen:
            seen.add(node)
            stack.append(node)
            for nxt in sorted(graph[node]):
                visit(nxt)
            stack.pop()

    for node in sorted(graph):
        visit(node)
    return cycles


def test_every_package_has_a_layer():
    assert {package_of(m) for m in modules()} - {"__init__"} == set(LAYER)


def test_no_package_imports_one_above_it():
    assert not upward_imports(PACKAGE)


def test_no_two_modules_import_each_other_even_inside_functions():
    assert not import_cycles(PACKAGE)


def task_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """The modules that define a task of the training loop (a subclass of Task, directly or not)."""
    bases = {"Task"}
    found: dict[str, Path] = {}
    changed = True
    while changed:  # subclasses of subclasses (ClassificationTask -> FinetuneTask)
        changed = False
        for module, path in modules(package).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", None)) in bases
                                                          for b in node.bases):
                    found[module] = path
                    if node.name not in bases:
                        bases.add(node.name)
                        changed = True
    found.pop("mixmim.training.task", None)
    return found


def test_tasks_see_the_loop_only_through_its_run_context():
    """No task names the Trainer or drives DDP/FSDP itself (training/task.py's RunContext is what it gets)."""
    tasks = task_modules()
    assert {"mixmim.training.pretrain", "mixmim.transfer.finetune", "mixmim.transfer.linprobe",
            "mixmim.transfer.segmentation"} <= set(tasks)
    banned = ("mixmim.training.loop.Trainer", "mixmim.training.distributed")
    found = [f"{m} -> {t}" for m, p in tasks.items() for t in imports(p) if t.startswith(banned)]
    found += [f"{m} uses trainer.{a}" for m, p in tasks.items() for a in ("wrapped", "fsdp", "info")
              if f"trainer.{a}" in p.read_text()]
    assert not found


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    fake = tmp_path / "mixmim"
    (fake / "models").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "models" / "bad.py").write_text("def f():\n    from mixmim.training.loop import train\n")
    (fake / "training" / "loop.py").write_text("import mixmim.models.bad\n")
    assert sorted(upward_imports(fake)) == ["mixmim.models.bad -> mixmim.training.loop",
                                    "mixmim.models.bad -> mixmim.training.loop.train"]
    assert import_cycles(fake) == [["mixmim.models.bad", "mixmim.training.loop", "mixmim.models.bad"]]
    (fake / "training" / "task.py").write_text("class Task:\n    pass\n")
    (fake / "training" / "mine.py").write_text("from mixmim.training.task import Task\n"
                                               "from mixmim.training.loop import Trainer\n"
                                               "class Mine(Task):\n    pass\n")
    assert list(task_modules(fake)) == ["mixmim.training.mine"]


def test_the_training_functions_stay_short():
    longest = []
    for path in sorted((PACKAGE / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
    assert max(longest)[0] < 60, sorted(longest)[-3:]


def test_the_fine_tuning_setup_enters_each_interop_file_from_one_place():
    """docs/scripts/setup_walk.py: from a run folder to the classifier, no interop file is entered from two
    different files (the weights file is detected and read once, by one reader)."""
    import runpy

    walk = runpy.run_path(str(PACKAGE.parents[1] / "docs" / "scripts" / "setup_walk.py"))["walk"]
    report = walk()
    assert {"interop/weights.py", "interop/checkpoint.py", "interop/torch_files.py"} <= set(report["interop_files"])
    assert report["interop_entered_from_several"] == [], report["entered_from"]


def test_one_way_from_a_run_config_to_a_method():
    """build_method is the only builder that reads a run config: the other builders are called only
    where there is no run config (a release file, the model table) or inside the factory itself."""
    allowed = {"create_pretrainer": {"mixmim.methods.factory", "mixmim.cli.reconstruct", "mixmim.cli.convert",
                                     "mixmim.cli.info"},
               "build_pretrainer": {"mixmim.methods.factory"}}
    calls: dict[str, set[str]] = {"create_pretrainer": set(), "build_pretrainer": set(), "build_method": set()}
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in calls:
                    calls[name].add(module)
    for name, where in allowed.items():
        assert calls[name] <= where, (name, sorted(calls[name] - where))
    assert {"mixmim.config.validation", "mixmim.training.pretrain", "mixmim.cli.reconstruct",
            "mixmim.study.runner"} <= \
        calls["build_method"]


def test_the_loop_the_check_and_reconstruct_build_the_same_method(tmp_path, monkeypatch):
    """Every path from a run config goes through build_method (a planted second builder would be seen)."""
    from conftest import tiny_run
    from mixmim.cli import main
    from mixmim.methods import factory

    seen = []
    real = factory.build_method

    def counting(config):
        seen.append(config.method.name)
        return real(config)

    monkeypatch.setattr(factory, "build_method", counting)
    monkeypatch.setattr("mixmim.training.pretrain.build_method", counting)
    args = tiny_run(tmp_path, "train.max_steps=1", "train.checkpoint_every=1", "train.trackers=[csv]",
                    "data.channels=1")
    assert main(["pretrain", *args]) == 0
    assert len(seen) == 2  # the config check (meta device) and the loop
    assert main(["reconstruct", "--checkpoint", str(tmp_path / "t"), "--images", "bundled", "--max-images", "2",
                 "--output", str(tmp_path / "r.png")]) == 0
    assert len(seen) == 3  # reconstruct: the run's method, built from its saved config
