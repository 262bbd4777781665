"""Data of the training runs: the built-in 8x8 handwritten digits
(``psi_cuda/apps/digits/digits.csv.gz``) and CIFAR-10 from a local folder.

``load_digits()`` reads the packaged copy (1797 images, see ``psi_cuda/apps/digits/README.md``)
with the standard library and numpy only; ``train_test_split()`` makes a deterministic split with
the same fraction of every class in the test set. ``load_cifar10()`` reads the standard python
version of CIFAR-10 from a folder and never downloads.
"""
from __future__ import annotations

import gzip
import io
import pickle
from importlib import resources
from pathlib import Path

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
    raw = resources.files(__package__).joinpath("digits", DIGITS_FILE).read_bytes()
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


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
DATASETS = ("digits", "cifar10")


def find_cifar10(folder: str | Path) -> Path:
    """The folder holding CIFAR-10's python version: ``folder`` or ``folder``/cifar-10-batches-py;
    FileNotFoundError saying what is missing."""
    folder = Path(folder).expanduser()
    for candidate in (folder, folder / CIFAR10_FOLDER):
        if all((candidate / name).is_file() for name in CIFAR10_TRAIN + (CIFAR10_TEST,)):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 in {folder}: expected the python version's files "
        f"({', '.join(CIFAR10_TRAIN)}, {CIFAR10_TEST}) there or in {folder / CIFAR10_FOLDER} "
        "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted); psi_cuda never "
        "downloads")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (data {data.shape}, "
                         f"labels {labels.shape})")
    return data, labels


def load_cifar10(folder) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 from a local copy of its standard python version (never downloads):
    ``(train_images, train_labels, test_images, test_labels)``, images float32 ``(N, 3, 32, 32)``
    normalized per channel with the training set's mean and standard deviation."""
    root = find_cifar10(folder)
    parts = [_read_cifar_batch(root / name) for name in CIFAR10_TRAIN]
    test_data, test_labels = _read_cifar_batch(root / CIFAR10_TEST)
    train = torch.from_numpy(np.concatenate([d for d, _ in parts])).view(-1, 3, 32, 32).float()
    test = torch.from_numpy(test_data).view(-1, 3, 32, 32).float()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    return ((train - mean) / std, torch.from_numpy(np.concatenate([l for _, l in parts])),
            (test - mean) / std, torch.from_numpy(test_labels))


def load_dataset(name: str = "digits", folder=None, split_seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)`` of ``"digits"`` (built in; the fixed stratified
    split of :func:`train_test_split`) or ``"cifar10"`` (from ``folder``; its own split)."""
    if name == "digits":
        return train_test_split(*load_digits(), seed=split_seed)
    if name == "cifar10":
        if folder is None:
            raise ValueError("cifar10 needs the folder holding its python version (--data-dir)")
        return load_cifar10(folder)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
