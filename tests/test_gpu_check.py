"""The GPU check (``benchmarks/gpu_check.py``) without a GPU: its dry run (``--device cpu --tiny``)
runs every section from a copy of the repository with nothing beside it and nothing installed
(``PYTHONPATH=src``), a section that fails or runs out of time leaves the others' results written,
and it refuses in one line where CUDA is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _bare_checkout(tmp_path: Path) -> Path:
    """What the check needs of a checkout, alone in a folder (no ../shared, no tests but the fixture)."""
    repo = tmp_path / "bare" / "mixmim"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "benchmarks", repo / "benchmarks", ignore=shutil.ignore_patterns("__pycache__", "results"))
    fixture = repo / "tests" / "fixtures" / "golden"
    fixture.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "fixtures" / "golden" / "mixmim_release.pt", fixture)
    return repo


def _check(repo: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH="src", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out),
                           *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_exercises_every_section_from_a_bare_checkout(tmp_path):
    repo = _bare_checkout(tmp_path)
    assert not (repo.parent / "shared").exists()
    done = _check(repo, tmp_path / "out")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "cpu_tiny_summary.json").read_text())
    assert {name: s["status"] for name, s in summary["sections"].items()} == dict.fromkeys(
        ("env", "correctness", "syncs", "throughput", "loop"), "ok")
    env = json.loads((tmp_path / "out" / "cpu_tiny_env.json").read_text())
    assert Path(env["mixmim_path"]) == (repo / "src" / "mixmim").resolve()  # the checkout's code, not an install
    correctness = json.loads((tmp_path / "out" / "cpu_tiny_correctness.json").read_text())
    assert set(correctness["golden"]) == {"reference", "fast", "auto"}
    assert all(r["pass"] for r in correctness["golden"].values())
    assert {"fast/shared", "fast/per_sample", "auto/shared", "auto/per_sample"} <= set(correctness["attention"])
    syncs = json.loads((tmp_path / "out" / "cpu_tiny_syncs.json").read_text())
    assert not any("mixmim/" in place for place in syncs["by_place"] if "(cpu)" in place or "(item)" in place)
    throughput = json.loads((tmp_path / "out" / "cpu_tiny_throughput.json").read_text())
    rows = {r["variant"]: r for r in throughput["rows"]}
    assert set(rows) == {"reference", "fast", "fast+compile", "simmim", "mae"}
    assert all(r["images_per_s"] > 0 and r["flops_per_image"] > 0 and r["loss_finite"] for r in rows.values())
    assert throughput["measured_peak"]["tflops"] > 0
    loop = json.loads((tmp_path / "out" / "cpu_tiny_loop.json").read_text())
    assert set(loop["runs"]) == {"cpu", "gpu"} and all(r["loss_fell"] for r in loop["runs"].values())


def test_a_failing_section_leaves_the_others_written(tmp_path):
    repo = _bare_checkout(tmp_path)
    done = _check(repo, tmp_path / "out", "--sections", "env", "correctness", "syncs", "--fail-section", "correctness")
    assert done.returncode == 1
    statuses = {name: json.loads((tmp_path / "out" / f"cpu_tiny_{name}.json").read_text())["status"]
                for name in ("env", "correctness", "syncs")}
    assert statuses == {"env": "ok", "correctness": "error", "syncs": "ok"}
    assert "failure planted in section 'correctness'" in done.stdout


def test_a_section_past_its_cap_is_stopped_and_written(tmp_path, monkeypatch):
    import gpu_check

    def slow(ck):
        ck.result["started"] = True
        time.sleep(30)
        return ck.result

    monkeypatch.setitem(gpu_check.RUNNERS, "env", slow)
    ck = gpu_check.Check(device=torch.device("cpu"), tiny=True, out=tmp_path, prefix="t")
    start = time.perf_counter()
    outcome = gpu_check.run_section(ck, "env", cap=1)
    assert outcome["status"] == "timeout" and time.perf_counter() - start < 10
    written = json.loads((tmp_path / "t_env.json").read_text())
    assert written["status"] == "timeout" and written["started"] is True


def test_nominal_peaks_by_device_name():
    import gpu_check

    assert gpu_check.nominal_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_check.nominal_bf16_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu_check.nominal_bf16_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_check.nominal_bf16_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert gpu_check.nominal_bf16_tflops("NVIDIA L40S") == pytest.approx(362.05)
    assert gpu_check.nominal_bf16_tflops("Some Future GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_check_refuses_without_cuda_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=dict(env, PYTHONPATH=str(ROOT / "src")))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "CUDA" in done.stderr


def test_summary_table_reads_every_result_file_and_extrapolates_gpu_hours(tmp_path, capsys):
    import json

    import summarize_results

    assert summarize_results.gpu_hours(1_281_167 * 300 / 3600) == pytest.approx(1.0)
    (tmp_path / "t.json").write_text(json.dumps({"results": [
        {"model": "mixmim_base", "variant": "fast", "batch": 128, "images_per_s": 1000.0, "speed_vs_baseline": 1.6,
         "peak_memory_bytes": 2**30, "mfu": 0.41}]}))
    (tmp_path / "c.json").write_text(json.dumps({"section": "throughput", "status": "ok", "rows": [
        {"model": "mixmim_base", "variant": "flex", "batch": 128, "images_per_s": 2000.0, "speed_vs_reference": 2.0,
         "peak_memory_bytes": 2**31, "mfu_nominal": 0.45}, {"model": "vit_base", "variant": "mae", "batch": 128,
                                                           "error": "OutOfMemoryError: ..."}],
        "measured_peak": {"tflops": 700.0}, "nominal_bf16_tflops": 989.4}))
    (tmp_path / "k.json").write_text(json.dumps({"section": "correctness", "status": "failed",
                                                 "failed": ["attention/flex/per_sample"]}))
    assert summarize_results.main([str(tmp_path / n) for n in ("t.json", "c.json", "k.json")]) == 0
    out = capsys.readouterr().out
    assert "| mixmim_base | fast | 128 | 1000.0 | 1.60 | 1.00 GiB | 41.0% | 107 |" in out
    assert "| mixmim_base | flex | 128 | 2000.0 | 2.00 | 2.00 GiB | 45.0% | 53 |" in out
    assert "| vit_base | mae | 128 | OutOfMemoryError: ... | | | | |" in out
    assert "700 TFLOP/s (nominal 989.4)" in out
    assert "gpu_check correctness: failed; failed: attention/flex/per_sample" in out


def test_flop_count_takes_a_batch_every_method_accepts():
    """The throughput benchmark counts FLOPs on a small batch; MixedAE refuses batches that do not split
    into its groups of 1/r = 4 images, which made its row fail (FLOPs per image must still match
    an explicit count on a batch of 4)."""
    import argparse

    import pretrain_throughput as bench
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = argparse.Namespace(model="vit_tiny", img_size=64, amp="fp32")
    per_image = bench._count_flops("mixedae", args, torch.device("cpu"))
    model = bench._build("mixedae", "vit_tiny", 64)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(4, 3, 64, 64)).loss.backward()
    assert per_image == pytest.approx(counter.get_total_flops() / 4, rel=1e-6)
