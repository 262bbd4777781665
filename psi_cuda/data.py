"""The built-in dataset of the demo: 8x8 handwritten digits (``psi_cuda/data/digits.csv.gz``).

``load_digits()`` reads the packaged copy (1797 images, see ``psi_cuda/data/README.md``) with the
standard library and numpy only; ``train_test_split()`` makes a deterministic split with the
same fraction of every class in the test set.
"""
from __future__ import annotations

import gzip
import io
from importlib import resources

import numpy as np
import torch
from torch import Tensor

DIGITS_FILE = "digits.csv.gz"
NUM_CLASSES = 10
IMAGE_SIZE = 8
MAX_PIXEL = 16.0


def load_digits() -> tuple[Tensor, Tensor]:
    """The digits data set: ``(images, labels)``.

    ``images`` is float32 of shape ``(1797, 1, 8, 8)`` with values in ``[0, 1]`` (the pixel
    counts 0..16 divided by 16); ``labels`` is int64 of shape ``(1797,)`` with values 0..9.
    """
    raw = resources.files("psi_cuda").joinpath("data", DIGITS_FILE).read_bytes()
    with gzip.open(io.BytesIO(raw), "rt", encoding="ascii") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    if table.shape[1] != pixels + 1:
        raise ValueError(f"{DIGITS_FILE}: expected {pixels + 1} columns (pixels then label), "
                         f"got {table.shape[1]}")
    images = torch.from_numpy(table[:, :pixels] / MAX_PIXEL).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.from_numpy(table[:, pixels].astype(np.int64))
    return images.contiguous(), labels


def split_indices(labels: Tensor, test_fraction: float = 0.2,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic stratified split: ``(train_indices, test_indices)``, both sorted.

    Every class contributes ``round(test_fraction * count)`` of its samples to the test set,
    chosen by a permutation drawn from ``torch.Generator().manual_seed(seed)`` (the same on every
    machine and torch build, since ``torch.randperm`` on CPU is).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    test = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        take = int(round(test_fraction * members.numel()))
        test.append(members[torch.randperm(members.numel(), generator=gen)[:take]])
    is_test = torch.zeros(labels.numel(), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def train_test_split(images: Tensor, labels: Tensor, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_images, train_labels, test_images, test_labels)`` from :func:`split_indices`."""
    train, test = split_indices(labels, test_fraction, seed)
    return images[train], labels[train], images[test], labels[test]
