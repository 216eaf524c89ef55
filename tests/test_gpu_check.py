"""The GPU suite's parts that do not need a GPU: it refuses clearly without CUDA, and its checks run
on the CPU at small sizes (so a broken check is found before the lent GPU hour is spent)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GOLDEN, TINY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the suite would run")
def test_suite_refuses_without_cuda_in_one_line():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "CUDA" in done.stderr


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden case missing")
def test_golden_check_passes_on_cpu_for_every_path():
    import cuda_checks

    result = cuda_checks.golden(torch.device("cpu"))
    assert set(result) == {"reference", "fast", "auto"}
    assert all(r["pass"] for r in result.values()), result


def test_training_check_sees_the_loss_fall_and_peak_is_measured():
    import cuda_checks

    result = cuda_checks.train(torch.device("cpu"), "mixmim_tiny", img_size=128, steps=10, batch=8, amp="fp32",
                               lr=2e-3, overrides=TINY)
    assert result["pass"] and len(result["losses"]) == 10
    assert cuda_checks.peak(torch.device("cpu"), "fp32", size=128, repeats=2)["tflops"] > 0


def test_summary_table_reads_every_result_file_and_extrapolates_gpu_hours(tmp_path, capsys):
    import json

    import summarize_results

    assert summarize_results.gpu_hours(1_281_167 * 300 / 3600) == pytest.approx(1.0)
    (tmp_path / "t.json").write_text(json.dumps({"results": [
        {"model": "mixmim_base", "variant": "fast", "batch": 128, "images_per_s": 1000.0, "speed_vs_baseline": 1.6,
         "peak_memory_bytes": 2**30, "mfu": 0.41}]}))
    (tmp_path / "c.json").write_text(json.dumps({"train": {"model": "m", "amp": "bf16", "pass": True, "first_mean": 1.0,
                                                           "last_mean": 0.8, "steps": 30},
                                                 "peak": {"amp": "bf16", "tflops": 700.0}}))
    assert summarize_results.main([str(tmp_path / "t.json"), str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "| mixmim_base | fast | 128 | 1000.0 | 1.60 | 1.00 GiB | 41.0% | 107 |" in out
    assert "check train m bf16: pass" in out and "700 TFLOP/s" in out


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
