"""Write tiny CIFAR-10 and MNIST copies in the exact on-disk formats torchvision reads.

CIFAR-10 (python version): ``<root>/cifar-10-batches-py/`` holds ``data_batch_1`` .. ``_5`` and
``test_batch``, each a pickled dict with ``data`` (uint8 N x 3072: the 1024 red values of the
32x32 image row by row, then green, then blue) and ``labels`` (list of N ints), and
``batches.meta`` with ``label_names``. SVHN: ``<root>/train_32x32.mat`` and ``test_32x32.mat``,
MATLAB files with ``X`` uint8 (32, 32, 3, N) and ``y`` uint8 (N, 1) where digit 0 is stored as 10.
MNIST: ``<root>/MNIST/raw/`` holds the four uncompressed
IDX files: images are a big-endian header (magic 2051, N, 28, 28) then N*28*28 uint8 pixels,
labels a header (magic 2049, N) then N uint8 labels.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(
    root: str | Path, n_train_per_batch: int = 4, n_test: int = 6, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write random CIFAR-10 batches under ``root``; return what was written.

    Returns ``train_images`` uint8 (5 * n_train_per_batch, 3, 32, 32) in batch order,
    ``train_labels`` int64 (5 * n_train_per_batch,), ``test_images`` uint8 (n_test, 3, 32, 32)
    and ``test_labels`` int64 (n_test,). Labels cycle through the 10 classes from a random start.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int, title: str) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = (int(rng.integers(10)) + np.arange(n)) % 10
        _dump(
            {
                "batch_label": title,
                "labels": [int(v) for v in labels],
                "data": images.reshape(n, 3072),
                "filenames": [f"fake_{name}_{i}.png" for i in range(n)],
            },
            folder / name,
        )
        return images, labels.astype(np.int64)

    train = [
        batch(f"data_batch_{i}", n_train_per_batch, f"training batch {i} of 5") for i in range(1, 6)
    ]
    test_images, test_labels = batch("test_batch", n_test, "testing batch 1 of 1")
    _dump(
        {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": n_train_per_batch, "num_vis": 3072},
        folder / "batches.meta",
    )
    return {
        "train_images": np.concatenate([im for im, _ in train]),
        "train_labels": np.concatenate([lb for _, lb in train]),
        "test_images": test_images,
        "test_labels": test_labels,
    }


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(
    root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0, name: str = "MNIST"
) -> dict[str, np.ndarray]:
    """Write random MNIST-format IDX files under ``root/<name>/raw`` (``name="FashionMNIST"``
    gives a Fashion-MNIST copy); return what was written.

    Returns ``train_images`` uint8 (n_train, 28, 28), ``train_labels`` int64 (n_train,),
    ``test_images`` uint8 (n_test, 28, 28), ``test_labels`` int64 (n_test,).
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def write_fake_svhn(
    root: str | Path, n_train: int = 6, n_test: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write random SVHN ``.mat`` files under ``root``; return what was written.

    Returns ``train_images`` uint8 (n_train, 3, 32, 32), ``train_digits`` int64 (n_train,) in
    0..9 (stored as 10 for digit 0), and the same for ``test_``. Digits start at 0 so each split
    has a 0.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        digits = np.arange(n, dtype=np.int64) % 10
        stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(Path(root) / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": stored})
        out[f"{split}_images"], out[f"{split}_digits"] = images, digits
    return out


class CodeRunningPickle:
    """Unpickling this calls os.mkdir(path): stands for a pickle that runs code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))
