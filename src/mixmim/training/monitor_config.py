"""``train.monitor``: the options of the representation monitor (:mod:`mixmim.training.monitor`), kept
apart so that reading a config does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MonitorConfig:
    """``train.monitor``: what to evaluate and how often (``data`` None: off)."""

    data: str | None = None  # "fashion_mnist" or a folder with one sub-folder per class
    every: int = 0  # steps between evaluations; 0: ten evaluations over the run
    train_size: int = 5000  # labelled images of the k-NN bank and the probe's training set
    test_size: int = 1000  # held-out images scored
    k: int = 20
    temperature: float = 0.07
    linprobe: bool = False
    linprobe_epochs: int = 20
    batch_size: int = 256
    at_start: bool = True  # evaluate the initial (random) encoder as the baseline
    crop_pct: float = 1.0  # Fashion-MNIST and small images: no centre crop
