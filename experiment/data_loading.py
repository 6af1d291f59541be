"""Datasets and their loaders: the images of every task, read safely, in batches.

``<data_dir>/`` holds the files in the layouts torchvision reads (``cifar-10-batches-py/``,
``cifar-100-python/``, ``MNIST/raw/``, ``FashionMNIST/raw/``, ``train_32x32.mat`` ...);
``DIGITS`` is scikit-learn's bundled 8x8 digits and needs no files. ``build_datasets`` gives a
task's train and test splits (files already there are used without the network; local
archives are unpacked; copies without the official checksums are read only after their
pickles are checked to hold data), ``make_loader`` their seeded loaders (``run_loaders``
those of a run, with its probe batch), ``task_info`` the image shape and classes of a task,
``input_normalization`` its pixel normalisation.
"""

from __future__ import annotations

import errno
import os
import pickle
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets.utils import check_integrity, extract_archive

from experiment.entry import UsageError, first_line

# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

TASKS = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN", "DIGITS")

_TASK_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "MNIST": (1, 28, 28, 10),
    "FashionMNIST": (1, 28, 28, 10),
    "CIFAR10": (3, 32, 32, 10),
    "CIFAR100": (3, 32, 32, 100),
    "SVHN": (3, 32, 32, 10),
    "DIGITS": (1, 8, 8, 10),
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (3 * 0.2023, 3 * 0.1994, 3 * 0.2010)


def canonical_task(task: str) -> str:
    """The spelling in :data:`TASKS` of ``task``, matched ignoring case; UsageError if unknown."""
    for name in TASKS:
        if name.lower() == str(task).lower():
            return name
    raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def task_info(task: str) -> tuple[int, int, int, int]:
    """``(in_channels, height, width, num_classes)`` of the images of ``task``."""
    return _TASK_SHAPES[canonical_task(task)]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes), one split.

    The split is fixed: ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``,
    1437 train / 360 test images.

    Attributes:
        data: float32 (N, 1, 8, 8), the 0..16 pixel counts divided by 16, so in [0, 1].
        targets: int64 (N,), class labels 0..9.
        indices: int64 (N,), positions of these images in ``sklearn.datasets.load_digits()``.
        transform: optional callable applied to each (1, 8, 8) image tensor.
    """

    def __init__(self, train: bool, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        labels = np.asarray(digits.target, dtype=np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
        )
        idx = train_idx if train else test_idx
        self.indices = torch.as_tensor(idx, dtype=torch.int64)
        images = np.asarray(digits.images, dtype=np.float32)[idx] / 16.0
        self.data = torch.from_numpy(images).unsqueeze(1)
        self.targets = torch.as_tensor(labels[idx], dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.data[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


@dataclass(frozen=True)
class _Source:
    """The files torchvision reads for one task, relative to ``data_dir``.

    ``archives`` are local archives torchvision downloads and then unpacks; each is unpacked into
    its own folder when the files are missing, so a manually downloaded archive also works offline.
    """

    folder: str
    files: tuple[str, ...]
    archives: tuple[str, ...]


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_SOURCES: dict[str, _Source] = {
    "MNIST": _Source("MNIST/raw", _MNIST_FILES, tuple(f"MNIST/raw/{f}.gz" for f in _MNIST_FILES)),
    "FashionMNIST": _Source(
        "FashionMNIST/raw", _MNIST_FILES, tuple(f"FashionMNIST/raw/{f}.gz" for f in _MNIST_FILES)
    ),
    "CIFAR10": _Source(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        ("cifar-10-python.tar.gz",),
    ),
    "CIFAR100": _Source(
        "cifar-100-python", ("train", "test", "meta"), ("cifar-100-python.tar.gz",)
    ),
    "SVHN": _Source(".", ("train_32x32.mat", "test_32x32.mat"), ()),
}


class _UncheckedCIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR10 reader that checks its files exist but not their md5 sums."""

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR10.test_list]
    meta = {**tv_datasets.CIFAR10.meta, "md5": None}


class _UncheckedCIFAR100(tv_datasets.CIFAR100):
    """torchvision's CIFAR100 reader that checks its files exist but not their md5 sums."""

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR100.test_list]
    meta = {**tv_datasets.CIFAR100.meta, "md5": None}


class _UncheckedSVHN(tv_datasets.SVHN):
    """torchvision's SVHN reader that checks its files exist but not their md5 sums."""

    split_list = {k: [url, name, None] for k, (url, name, _) in tv_datasets.SVHN.split_list.items()}


_CHECKED = {
    "MNIST": tv_datasets.MNIST,
    "FashionMNIST": tv_datasets.FashionMNIST,
    "CIFAR10": tv_datasets.CIFAR10,
    "CIFAR100": tv_datasets.CIFAR100,
    "SVHN": tv_datasets.SVHN,
}
# MNIST-style raw files carry no checksums in torchvision, so they have no unchecked variant.
_UNCHECKED = {"CIFAR10": _UncheckedCIFAR10, "CIFAR100": _UncheckedCIFAR100, "SVHN": _UncheckedSVHN}

# The only globals a CIFAR batch pickle (numpy arrays, lists, strings) needs.
_DATA_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those that rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _DATA_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _transforms(task: str, data_aug: bool, randaugment: int = 0) -> tuple[Callable, Callable]:
    """(train_transform, test_transform) for ``task``.

    CIFAR10/100: ToTensor + Normalize(CIFAR_MEAN, CIFAR_STD); with ``data_aug`` the train
    transform first flips horizontally (p=0.5) and takes a random 32x32 crop of the image padded
    by 4 edge pixels. SVHN: the same normalisation, augmentation without the flip (digits).
    MNIST/FashionMNIST: ToTensor + Normalize(0, 1); augmentation is a random 28x28 crop of the
    image padded by 2 edge pixels. DIGITS: tensors already, augmentation a random 8x8 crop of the
    image padded by 1 edge pixel. ``randaugment N`` (CIFAR10/100 with ``data_aug``): RandAugment
    with N operations of magnitude 9 between the flip and the crop (the Hopfield-ResNet's
    augmentation).
    """
    if task == "DIGITS":
        shift = transforms.RandomCrop(8, padding=1, padding_mode="edge")
        return (shift if data_aug else None), None
    if task in ("CIFAR10", "CIFAR100", "SVHN"):
        to_tensor = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
        augment = [transforms.RandomCrop(32, padding=4, padding_mode="edge")]
        if task != "SVHN":
            augment.insert(0, transforms.RandomHorizontalFlip(0.5))
        if randaugment and task != "SVHN":
            augment.insert(1, transforms.RandAugment(num_ops=randaugment, magnitude=9))
    else:
        to_tensor = [transforms.ToTensor(), transforms.Normalize((0.0,), (1.0,))]
        augment = [transforms.RandomCrop(28, padding=2, padding_mode="edge")]
    train = transforms.Compose((augment if data_aug else []) + to_tensor)
    return train, transforms.Compose(to_tensor)


def input_normalization(task: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel that the test transform of ``task`` applies to pixels in
    [0, 1] (``(x - mean) / std``): CIFAR's for CIFAR10/100 and SVHN, ``(0, 1)`` for the others."""
    name = canonical_task(task)
    channels = task_info(name)[0]
    if name in ("CIFAR10", "CIFAR100", "SVHN"):
        return CIFAR_MEAN, CIFAR_STD
    return (0.0,) * channels, (1.0,) * channels


def _open_split(cls: type, root: Path, train: bool, transform: Callable, download: bool) -> Dataset:
    """One split of a torchvision dataset class; SVHN names its splits, the others use ``train``."""
    if issubclass(cls, tv_datasets.SVHN):
        split = "train" if train else "test"
        return cls(str(root), split=split, transform=transform, download=download)
    return cls(str(root), train=train, transform=transform, download=download)


def _missing_message(task: str, root: Path, missing: Sequence[str], reason: str) -> str:
    """One line: which files are missing where, and the three ways out."""
    src = _SOURCES[task]
    folder = (root / src.folder).resolve()
    archives = ", ".join(str(root / a) for a in src.archives)
    archives = f" or the archive {archives} (unpacked on first use)" if archives else ""
    return (
        f"{task} data not found in {root} ({reason}): put {', '.join(missing)} in {folder}"
        f"{archives}, or run offline with --task DIGITS (bundled with scikit-learn)"
    )


# Errors of the disk or its permissions, as opposed to the network or the files' contents.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _extract_tar(archive: Path, destination: Path) -> None:
    """Unpack the tar ``archive`` into ``destination``, refusing it whole (before writing
    anything) if a member would land outside, is absolute, is a link pointing outside or is
    a device: tarfile's ``data`` filter, applied to every member first."""
    if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4
        raise UsageError(f"this Python cannot unpack {archive} safely: unpack it yourself")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            try:
                if os.path.isabs(member.name):  # the filter would only strip the leading /
                    raise tarfile.AbsolutePathError(member)
                tarfile.data_filter(member, str(destination))
            except tarfile.FilterError as error:
                raise UsageError(
                    f"refusing to unpack {archive}: member {member.name!r} is unsafe "
                    f"({first_line(error)}); download the archive again from its source"
                ) from error
        tar.extractall(destination, members=members, filter="data")


def _unpack_local_archives(task: str, root: Path) -> None:
    """Unpack archives already in ``root`` for files that are missing (no network)."""
    src = _SOURCES[task]
    if all((root / src.folder / f).is_file() for f in src.files):
        return
    for rel in src.archives:
        archive = root / rel
        target = root / src.folder / Path(rel).name.removesuffix(".gz")
        if archive.is_file() and (rel.endswith(".tar.gz") or not target.is_file()):
            try:
                if rel.endswith(".tar.gz"):
                    _extract_tar(archive, archive.parent)
                else:  # a single gzipped file, unpacked to its own name without .gz
                    extract_archive(str(archive), str(archive.parent))
            except UsageError:
                raise
            except Exception as e:
                if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
                    raise  # the disk failed (full, read-only), not the archive
                raise UsageError(f"cannot unpack {archive}, it is corrupt: {first_line(e)}") from e


def _corrupt_message(task: str, folder: Path, error: BaseException) -> str:
    return (
        f"{task} files in {folder} are corrupt or not in the format torchvision reads "
        f"({first_line(error)}); delete them and download them again."
    )


def _official_md5(task: str) -> dict[str, str]:
    """The md5 sum of every file of the official release of a task with an unchecked reader."""
    cls = _CHECKED[task]
    if task == "SVHN":
        return {name: md5 for _, name, md5 in cls.split_list.values()}
    return {name: md5 for name, md5 in cls.train_list + cls.test_list} | {
        cls.meta["filename"]: cls.meta["md5"]
    }


def _is_pristine(task: str, folder: Path) -> bool:
    """Whether every file of ``task`` in ``folder`` has its official checksum."""
    return all(
        check_integrity(str(folder / name), md5) for name, md5 in _official_md5(task).items()
    )


def _open_local(
    task: str, root: Path, train_tf: Callable, test_tf: Callable
) -> tuple[Dataset, Dataset]:
    """Open both splits from files that exist; UsageError if they are unreadable.

    Files with the official checksums are read by torchvision as they are. Copies whose
    checksums differ (e.g. rebuilt or trimmed files) are read without them, and only after
    every pickled batch has been checked to hold nothing but arrays, lists and strings (before
    torchvision's unrestricted ``pickle.load`` sees them); a warning says so.
    """
    folder = (root / _SOURCES[task].folder).resolve()
    pristine = task not in _UNCHECKED or _is_pristine(task, folder)
    reader = _CHECKED[task] if pristine else _UNCHECKED[task]
    try:
        if not pristine and task.startswith("CIFAR"):
            for name in _SOURCES[task].files:
                with open(folder / name, "rb") as f:
                    _DataOnlyUnpickler(f, encoding="latin1").load()
        sets = (
            _open_split(reader, root, True, train_tf, False),
            _open_split(reader, root, False, test_tf, False),
        )
    except Exception as e:
        raise UsageError(_corrupt_message(task, folder, e)) from e
    if not pristine:
        warnings.warn(
            f"{task} files in {folder} do not match the official checksums; loaded them anyway",
            stacklevel=3,
        )
    return sets


def build_datasets(
    task: str,
    data_dir: str | Path = "./data",
    data_aug: bool = False,
    download: bool = True,
    randaugment: int = 0,
) -> tuple[Dataset, Dataset]:
    """``(train_set, test_set)`` of ``task``; items are ``(float32 image (C, H, W), int label)``.

    Files already in ``data_dir`` are used without touching the network (local archives are
    unpacked); only when they are missing and ``download`` is True does torchvision download
    them. Augmentation (``data_aug``, ``randaugment``) only affects the train set; see
    :func:`_transforms`.

    Raises:
        UsageError: unknown task; data missing and not downloadable (the message names the
            folder and files torchvision expects); files corrupt.
    """
    name = canonical_task(task)
    train_tf, test_tf = _transforms(name, data_aug, randaugment)
    if name == "DIGITS":
        return DigitsDataset(True, train_tf), DigitsDataset(False, test_tf)
    root = Path(data_dir).expanduser().resolve()
    _unpack_local_archives(name, root)
    src = _SOURCES[name]
    missing = [f for f in src.files if not (root / src.folder / f).is_file()]
    if not missing:
        return _open_local(name, root, train_tf, test_tf)
    if not download:
        raise UsageError(_missing_message(name, root, missing, "downloading is off"))
    try:
        cls = _CHECKED[name]
        root.mkdir(parents=True, exist_ok=True)
        return _open_split(cls, root, True, train_tf, True), _open_split(
            cls, root, False, test_tf, True
        )
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            raise  # the data folder cannot be written: a storage failure, not missing data
        reason = f"the download failed: {first_line(e)}"
        raise UsageError(_missing_message(name, root, missing, reason)) from e


def dataset_labels(dataset: Dataset) -> torch.LongTensor:
    """int64 (len(dataset),) labels of every item, read from ``targets``/``labels`` attributes
    (through any :class:`Subset` nesting) without loading images; other datasets are iterated."""
    if isinstance(dataset, Subset):
        base = dataset_labels(dataset.dataset)
        return base[torch.as_tensor(list(dataset.indices), dtype=torch.int64)]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return torch.as_tensor(np.asarray(values), dtype=torch.int64).reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


# Loader workers on CUDA when --num-workers is not given (at most the CPU count): the CPU
# transforms (crop, flip, normalise) then run in parallel with the GPU's phases.
CUDA_LOADER_WORKERS = 4


def loader_workers(requested: int | None, device: torch.device) -> int:
    """``--num-workers`` when given; else ``CUDA_LOADER_WORKERS`` on CUDA and 0 on the CPU."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    return min(CUDA_LOADER_WORKERS, os.cpu_count() or 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    num_workers: int = 0,
    indices: Sequence[int] | Tensor | np.ndarray | None = None,
) -> DataLoader:
    """DataLoader over ``dataset`` (or ``Subset(dataset, indices)``), last batch kept.

    With ``shuffle`` and a ``seed`` the order of every epoch comes from a ``torch.Generator``
    seeded with it (exposed as ``loader.generator``), so it is the same on every run; memory is
    pinned when CUDA is available (so that ``.to(device, non_blocking=True)`` overlaps the copy
    with the GPU's work). Workers are not persistent: each epoch's workers are seeded from the
    loader's generator, whose state the checkpoint keeps, so a resumed run augments exactly as
    an uninterrupted one would; a persistent worker's own RNG stream is in no checkpoint.
    """
    if indices is not None:
        idx = indices.tolist() if isinstance(indices, (Tensor, np.ndarray)) else list(indices)
        dataset = Subset(dataset, [int(i) for i in idx])
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


@dataclass
class RunData:
    """What a run reads: the training and test loaders and a fixed batch for the plots."""

    train_loader: DataLoader
    test_loader: DataLoader
    probe: tuple[Tensor, Tensor]  # first test images and labels, for the plots


def run_loaders(
    train_set: Dataset,
    test_set: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None,
    num_workers: int,
    indices: Tensor | None,
    probe_images: int,
) -> RunData:
    """The loader of the training images ``indices`` (None: all), shuffled with ``seed`` when
    ``shuffle``; the test loader in order; and the first ``probe_images`` test images and
    labels (read by indexing the set, which draws nothing from the RNGs)."""
    train_loader = make_loader(
        train_set, batch_size, shuffle, seed=seed, num_workers=num_workers, indices=indices
    )
    test_loader = make_loader(test_set, batch_size, False, num_workers=num_workers)
    items = [test_set[i] for i in range(min(probe_images, len(test_set)))]
    probe = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    return RunData(train_loader, test_loader, probe)
