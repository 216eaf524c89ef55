"""Labelled data for fine-tuning, probing, k-NN and the pretraining monitor: an image folder with one
sub-folder per class, WebDataset shards with ``.cls`` members (or ImageNet's tar of per-class tars),
a local Hugging Face dataset, or Fashion-MNIST; timm's transforms and Mixup/CutMix (MixMIM section 8,
Table 12).

Layouts: ``DATA/<class>/*.jpg`` (a fraction held out per class for evaluation, seeded), or
``DATA/train/<class>/...`` with ``DATA/val/<class>/...`` (or ``test``); shards alike (one shard set, or
``train/`` and ``val/`` shard sets); a Hugging Face dataset's own splits, else a held-out fraction.

Items are seeded like pretraining's: ``ds[(index, seed)]`` is ``{"image", "label", "index", "skipped"}``
with the augmentation a pure function of (index, seed) -- timm's transforms draw from Python's
``random``, NumPy's and torch's global generators, so all three are seeded per sample and restored.
``ds[index]`` (a plain int, what torchvision-style loaders pass) is the pair ``(image, label)`` with
seed = index. An unreadable image is replaced by the next readable one, listed in the item's
``skipped`` and in ``ds.skipped`` (warned once per file).

- :mod:`~mixmim.data.labelled.transforms`: timm's transforms and Mixup/CutMix;
- :mod:`~mixmim.data.labelled.datasets`: the seeded items and their collate;
- :mod:`~mixmim.data.labelled.splits`: train and evaluation splits, subsets;
- :mod:`~mixmim.data.labelled.cache`: a set decoded once.
"""

from mixmim.data.labelled.cache import CachedLabelled, cached
from mixmim.data.labelled.datasets import LabelledDataset, collate_labelled
from mixmim.data.labelled.splits import (
    FASHION_MNIST,
    Splits,
    balanced_subset,
    check_classes,
    labelled_sources,
    load_splits,
)
from mixmim.data.labelled.transforms import RAND_AUGMENT, eval_transform, make_mixup, train_transform

__all__ = ["FASHION_MNIST", "RAND_AUGMENT", "CachedLabelled", "LabelledDataset", "Splits", "balanced_subset", "cached",
           "check_classes", "collate_labelled", "eval_transform", "labelled_sources", "load_splits", "make_mixup",
           "train_transform"]
