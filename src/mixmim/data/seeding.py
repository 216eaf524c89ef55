"""Per-sample seeding that costs nothing and leaves the caller's random state as it was.

A sample's augmentation is a pure function of (index, seed) (see :mod:`mixmim.data.sampler`), so
every draw is made from a generator seeded with the sample's seed, and the state of the generators
is restored afterwards: the training loop re-seeds the global RNG for its masks and drop path, and a
data set read in the main process (``num_workers=0``) must not move it.

``torch.manual_seed`` is not used: on a CUDA build of torch it also queues the seeding of every CUDA
device (and records a Python stack trace while CUDA is not initialised), 0.5 ms per call; only the
CPU generator draws augmentation parameters.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def torch_seeded(seed: int):
    """Seed torch's default CPU generator (the one torchvision's transforms draw from) for the block;
    restore its state after."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    try:
        yield
    finally:
        generator.set_state(state)


@contextlib.contextmanager
def all_seeded(seed: int):
    """Seed torch's CPU generator, Python's ``random`` and NumPy's global generator for the block (timm's
    RandAugment, RandomResizedCropAndInterpolation and RandomErasing draw from all three); restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed((seed ^ (seed >> 32)) & 0xFFFF_FFFF)
    try:
        with torch_seeded(seed):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def augment(transform, image, seed: int):
    """``transform(image)`` as a pure function of ``seed``. Our transforms take the seed themselves
    (``takes_seed``); any other callable runs with every global generator seeded and restored."""
    if getattr(transform, "takes_seed", False):
        return transform(image, seed=seed)
    with all_seeded(seed):
        return transform(image)
