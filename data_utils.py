"""Datasets, plotting and logging for the EP / LCA-RCNN experiments.

- Datasets: ``<data_dir>/`` in the layouts torchvision reads (``cifar-10-batches-py/``,
  ``cifar-100-python/``, ``MNIST/raw/``, ``FashionMNIST/raw/``, ``train_32x32.mat`` ...);
  ``DIGITS`` is scikit-learn's bundled 8x8 digits and needs no files. ``build_datasets`` and
  ``make_loader`` give the splits and their loaders.
- Plotting: every figure of the project is drawn here and returned as a matplotlib ``Figure``
  (``runs.save_figure`` writes it).
- Logging: the vocabulary the command-line scripts share: ``UsageError`` for problems the user
  can fix, one-line messages (``first_line``, ``one_line``, ``warn``, ``storage_message``), the
  exit statuses (``EXIT_*``), SIGTERM handled like Ctrl-C (``Terminated``,
  ``signals_as_interrupts``), range checks of number flags (``check_number``), flag spellings
  (``flag_spellings``) and the ``--device`` parser (``resolve_device``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import pickle
import signal
import sys
import tarfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets.utils import check_integrity, extract_archive
from torchvision.utils import make_grid

# --------------------------------------------------------------------------------------------
# Logging: errors, warnings and the flags the scripts share
# --------------------------------------------------------------------------------------------


# Exit statuses of both command-line scripts.
EXIT_OK = 0
EXIT_DIVERGED = 1  # training diverged to NaN/inf; the last good checkpoint is kept
EXIT_USAGE = 2  # bad input: a flag, a missing or corrupt file; nothing was written
EXIT_STORAGE = 74  # a file could not be written or read (disk full, read-only, permissions)
EXIT_BUSY = 75  # another live process writes the same run folder; try again later
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): weights saved, resume command printed
EXIT_TERMINATED = 143  # SIGTERM (preemption): the same as Ctrl-C


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing or corrupt file); the message says how."""


class UsageArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors, reported like the rest (one line)."""

    def error(self, message: str):
        raise UsageError(message)


def command_parser(prog: str, description: str) -> UsageArgumentParser:
    """The parser every script starts from: defaults shown in ``--help``, no abbreviations."""
    return UsageArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )


class StorageError(Exception):
    """A file could not be written or read (disk full, read-only folder, permissions); the
    message says which, what was kept and what to do (exit status 74)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, the signal a cluster scheduler sends before killing a job. A KeyboardInterrupt,
    so that everything that saves and cleans up on Ctrl-C does the same on SIGTERM."""


def exit_status_of(interrupt: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises ``Terminated``.

    Only the first SIGTERM raises: a second one (schedulers may repeat it) would cut short the
    saving that the first one started. The previous handlers come back on exit. Outside the
    main thread signals cannot be caught, and nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def terminate(signum, frame):
        if not raised:
            raised.append(signum)
            raise Terminated()

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def storage_message(error: OSError, fix: str) -> str:
    """One line for a failed read or write: what, which file, and ``fix``."""
    name = errno.errorcode.get(error.errno or 0, "")
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot write or read a file{where}: {reason}{f' [{name}]' if name else ''}; {fix}"


def check_numbers(args: Any, ranges: dict[str, tuple], flags: dict[str, str] | None = None) -> None:
    """:func:`check_number` on every value (a number, a list or None) of each float flag named
    in ``ranges``, ``{dest: (low, low_open, high, high_open)}``; ``args`` holds them by dest,
    and ``flags`` spells the flag of a dest in messages when it is not the dest itself."""
    for name, (low, low_open, high, high_open) in ranges.items():
        values = getattr(args, name)
        flag = (flags or {}).get(name, name)
        for value in values if isinstance(values, list) else [values]:
            check_number(flag, value, low, high, low_open, high_open)


def check_number(
    flag: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """UsageError unless ``value`` (of ``--flag``) is a number in its range: finite (or +inf
    when ``allow_inf``), >= ``low`` (> with ``low_open``), <= ``high`` (< with ``high_open``).
    None (an unset optional flag) passes."""
    if value is None:
        return
    bad = math.isnan(value) or (math.isinf(value) and not allow_inf)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        kind = "a number" if allow_inf else "a finite number"
        raise UsageError(f"--{flag} must be {kind} in {left}, {right}, got {value}")


def first_line(error: BaseException) -> str:
    """``"<ErrorType>: <first line of its message>"``, for one-line user messages."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def one_line(text: str) -> str:
    """A multi-line message joined into one line, its lines separated by '; ' unless they end
    in punctuation already."""
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    ended = [p if p.endswith((".", ";", ":")) else p + ";" for p in parts[:-1]]
    return " ".join(ended + parts[-1:])


def warn(message: str) -> None:
    """One ``warning:`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def flag_spellings(*names: str) -> list[str]:
    """Every spelling of the flags ``names`` (``--multi-word``): with dashes and with
    underscores, in order, each once."""
    spellings: list[str] = []
    for name in names:
        word = name[2:]
        for spelling in (word, word.replace("-", "_"), word.replace("_", "-")):
            if f"--{spelling}" not in spellings:
                spellings.append(f"--{spelling}")
    return spellings


def resolve_device(spec: str) -> torch.device:
    """``--device``: ``cpu``; a GPU index ``N``, ``cuda`` or ``cuda:N``; or ``auto`` (the first
    GPU). A GPU asked for where CUDA is absent falls back to the CPU with a notice."""
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    index = {"auto": "0", "cuda": "0"}.get(spec, spec.removeprefix("cuda:"))
    if not index.isdigit():
        raise UsageError(
            f"--device takes a GPU index or 'cpu' (or cuda, cuda:N, auto), got {spec!r}"
        )
    if not torch.cuda.is_available():
        print("notice: CUDA is not available, running on the CPU")
        return torch.device("cpu")
    if int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
    torch.backends.cudnn.benchmark = True
    return torch.device(f"cuda:{index}")


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


def _transforms(task: str, data_aug: bool) -> tuple[Callable, Callable]:
    """(train_transform, test_transform) for ``task``.

    CIFAR10/100: ToTensor + Normalize(CIFAR_MEAN, CIFAR_STD); with ``data_aug`` the train
    transform first flips horizontally (p=0.5) and takes a random 32x32 crop of the image padded
    by 4 edge pixels. SVHN: the same normalisation, augmentation without the flip (digits).
    MNIST/FashionMNIST: ToTensor + Normalize(0, 1); augmentation is a random 28x28 crop of the
    image padded by 2 edge pixels. DIGITS: tensors already, augmentation a random 8x8 crop of the
    image padded by 1 edge pixel.
    """
    if task == "DIGITS":
        shift = transforms.RandomCrop(8, padding=1, padding_mode="edge")
        return (shift if data_aug else None), None
    if task in ("CIFAR10", "CIFAR100", "SVHN"):
        to_tensor = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
        augment = [transforms.RandomCrop(32, padding=4, padding_mode="edge")]
        if task != "SVHN":
            augment.insert(0, transforms.RandomHorizontalFlip(0.5))
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
    task: str, data_dir: str | Path = "./data", data_aug: bool = False, download: bool = True
) -> tuple[Dataset, Dataset]:
    """``(train_set, test_set)`` of ``task``; items are ``(float32 image (C, H, W), int label)``.

    Files already in ``data_dir`` are used without touching the network (local archives are
    unpacked); only when they are missing and ``download`` is True does torchvision download
    them. Augmentation (``data_aug``) only affects the train set; see :func:`_transforms`.

    Raises:
        UsageError: unknown task; data missing and not downloadable (the message names the
            folder and files torchvision expects); files corrupt.
    """
    name = canonical_task(task)
    train_tf, test_tf = _transforms(name, data_aug)
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


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


# (file name, title, y label, which columns), for the metric plots made when the columns exist.
_METRIC_PLOTS: tuple[tuple[str, str, str, Callable[[str], bool]], ...] = (
    ("accuracy.png", "Accuracy", "accuracy", lambda c: c.endswith("_acc")),
    ("sparsity.png", "LCA sparsity", "fraction of LCA units active", lambda c: "frac_active" in c),
    (
        "recon_error.png",
        "LCA reconstruction error",
        "reconstruction error",
        lambda c: "recon_error" in c,
    ),
    ("dict_cosine.png", "Dictionary change", "cosine similarity", lambda c: "dict_cosine" in c),
    (
        "angles.png",
        "Angle between forward and backward weights",
        "angle (degrees)",
        lambda c: c.startswith("angle_"),
    ),
    ("phase_steps.png", "Steps per phase (--tol)", "mean steps", lambda c: c.endswith("_steps")),
    (
        "phases_at_cap.png",
        "Phases that hit their cap unsettled (--tol)",
        "fraction of phases",
        lambda c: c.endswith("_at_cap"),
    ),
)


def _series_label(column: str) -> str:
    """``train_acc`` -> ``train``, ``lca_frac_active`` -> ``lca_frac_active``."""
    return column.removesuffix("_acc") or column


def plot_metrics(rows: list[dict]) -> dict[str, Figure]:
    """Figures of a run's per-epoch ``rows`` (results.csv) against ``epoch`` (the row number
    without that column), by file name: ``accuracy.png`` (every ``*_acc`` column), and when such
    columns exist ``sparsity.png`` (``*frac_active*``), ``recon_error.png`` (``*recon_error*``),
    ``dict_cosine.png`` (``*dict_cosine*``), ``angles.png`` (``angle_*``, the vector-field
    models' forward/backward weight angles), and with ``--tol`` ``phase_steps.png``
    (``*_steps``) and ``phases_at_cap.png`` (``*_at_cap``). None without rows."""
    if not rows:
        return {}
    columns = list(rows[0])
    if "epoch" in columns:
        x, xlabel = [r["epoch"] for r in rows], "epoch"
    else:
        x, xlabel = list(range(1, len(rows) + 1)), "row"
    figures = {}
    for filename, title, ylabel, wanted in _METRIC_PLOTS:
        selected = [c for c in columns if c != "epoch" and wanted(c)]
        if not selected:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for c in selected:
            y = [r[c] if isinstance(r[c], float) else math.nan for r in rows]
            ax.plot(x, y, marker="o", markersize=3, label=_series_label(c))
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.4)
        ax.legend()
        figures[filename] = fig
    return figures


def plot_neural_activity(neurons: list[Tensor], names: list[str] | None = None) -> Figure:
    """One histogram per layer of the settled neuron values (any shape each)."""
    names = names or [f"layer {i + 1}" for i in range(len(neurons))]
    if len(names) != len(neurons):
        raise ValueError(f"{len(names)} names for {len(neurons)} layers")
    ncols = min(len(neurons), 4)
    nrows = math.ceil(len(neurons) / ncols)
    fig = Figure(figsize=(3.5 * ncols, 2.8 * nrows))
    for i, (layer, name) in enumerate(zip(neurons, names, strict=True)):
        values = layer.detach().float().cpu().reshape(-1).numpy()
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.hist(values, bins=50, color="tab:blue")
        ax.set(title=f"{name} (mean {values.mean():.3f})", xlabel="neuron value", ylabel="count")
        ax.grid(True, alpha=0.4)
    fig.suptitle("Settled neural activity")
    fig.tight_layout()
    return fig


def _rescale_each(images: Tensor) -> Tensor:
    """Each image of (N, ...) min-max rescaled to [0, 1] on its own (a constant image -> 0.5)."""
    flat = images.detach().float().cpu().reshape(images.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.full_like(flat, 0.5))
    return scaled.reshape(images.shape)


def dictionary_grid(weights: Tensor) -> Tensor:
    """A (F, C, k, k) dictionary (C = 1 gray or 3 RGB) tiled into one (H, W, 3) image in [0, 1]:
    ``ceil(sqrt(F))`` features per row, each rescaled to [0, 1] on its own, white borders."""
    if weights.dim() != 4 or weights.shape[1] not in (1, 3):
        raise ValueError(f"expected a (F, 1 or 3, k, k) dictionary, got {tuple(weights.shape)}")
    n = weights.shape[0]
    grid = make_grid(_rescale_each(weights), nrow=math.ceil(math.sqrt(n)), padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0)


def plot_dictionary(weights: Tensor, title: str | None = None) -> Figure:
    """The dictionary ``weights`` (F, C, k, k) as a grid of its F features (``dictionary_grid``)."""
    grid = dictionary_grid(weights)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or f"Dictionary: {weights.shape[0]} features of {tuple(weights.shape[1:])}")
    return fig


def plot_reconstructions(
    inputs: Tensor, recon_rows: dict[str, Tensor], n_images: int = 8
) -> Figure:
    """A grid: the first ``n_images`` inputs (N, C, H, W) on the first row, then one row per
    entry of ``recon_rows`` (same shape), each image rescaled to [0, 1] on its own."""
    rows = {"input": inputs, **recon_rows}
    if inputs.dim() != 4 or inputs.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) inputs, got {tuple(inputs.shape)}")
    for name, images in rows.items():
        if images.dim() != 4 or images.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"{name}: expected images shaped like the inputs {tuple(inputs.shape)}"
            )
    n = min(n_images, inputs.shape[0])
    fig = Figure(figsize=(1.4 * n + 1, 1.5 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        shown = _rescale_each(images[:n])
        for j in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + j + 1)
            if shown.shape[1] == 1:
                ax.imshow(shown[j, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(shown[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    fig.suptitle("Inputs and reconstructions")
    return fig


def plot_gdu(report: dict, n_entries: int = 5) -> Figure:
    """The GDU check of ``utils_ep_fast.gdu_check``: one panel per parameter,
    its ``n_entries`` entries of largest final BPTT gradient against the nudged-phase step, EP's
    update dashed and BPTT's gradient solid in the same colour per entry."""
    names = list(report)
    ncols = min(len(names), 2)
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.2 * nrows))
    for i, name in enumerate(names):
        entry = report[name]
        ep = entry["ep"].detach().float().cpu().flatten(1)
        bptt = entry["bptt"].detach().float().cpu().flatten(1)
        steps = range(1, ep.shape[0] + 1)
        picks = bptt[-1].abs().topk(min(n_entries, ep.shape[1])).indices
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, index in enumerate(picks.tolist()):
            color = f"C{j}"
            ax.plot(steps, ep[:, index].numpy(), linestyle="--", color=color)
            ax.plot(steps, bptt[:, index].numpy(), linestyle="-", color=color)
        ax.set(
            title=f"{name}: rel. RMSE {entry['rel_rmse']:.3f}, sign err. {entry['sign_error']:.2f}",
            xlabel="nudged-phase step t",
            ylabel="update",
        )
        ax.grid(True, alpha=0.4)
    fig.suptitle("GDU check: EP (dashed) vs BPTT (solid)")
    fig.tight_layout()
    return fig


def plot_dictlearning_curves(rows: list[dict[str, float]], metrics: Sequence[str]) -> Figure:
    """``cifar_dictlearning.py``'s per-epoch ``metrics`` against the epoch, one panel each, with
    a dotted line where lambda was raised."""
    epochs = [row["epoch"] for row in rows]
    raises = [
        row["epoch"]
        for prev, row in zip(rows, rows[1:], strict=False)
        if row["lambda"] != prev["lambda"]
    ]
    fig = Figure(figsize=(10, 7))
    for i, name in enumerate(metrics):
        ax = fig.add_subplot(2, math.ceil(len(metrics) / 2), i + 1)
        ax.plot(epochs, [row[name] for row in rows], marker="o", markersize=3)
        for epoch in raises:
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="epoch", ylabel=name.replace("_", " "))
        ax.grid(True, alpha=0.4)
    fig.suptitle("LCA dictionary learning (dotted: lambda raised)")
    fig.tight_layout()
    return fig


def plot_robustness(rows: list[dict]) -> Figure:
    """The rows of ``robustness.csv``: accuracy against epsilon for every attack, norm and input
    gradient (one panel per norm, the clean accuracy dotted), then accuracy per corruption and
    severity (one line per severity, the mean over corruptions dashed) when there are any."""
    attacked = [row for row in rows if row["norm"] in ("linf", "l2")]
    corrupted = [row for row in rows if row["norm"] == "none" and row["attack"] != "clean"]
    corrupted = [row for row in corrupted if row["attack"] != "corruption_mean"]
    clean = [row["accuracy"] for row in rows if row["attack"] == "clean"]
    norms = [norm for norm in ("linf", "l2") if any(row["norm"] == norm for row in attacked)]
    panels = len(norms) + (1 if corrupted else 0)
    fig = Figure(figsize=(6.5 * max(panels, 1), 4.5))
    for i, norm in enumerate(norms):
        ax = fig.add_subplot(1, max(panels, 1), i + 1)
        curves = dict.fromkeys((row["attack"], row["gradient"]) for row in attacked)
        for attack, gradient in curves:
            points = sorted(
                (row["epsilon"], row["accuracy"])
                for row in attacked
                if (row["norm"], row["attack"], row["gradient"]) == (norm, attack, gradient)
            )
            if points:
                label = attack if gradient == "none" else f"{attack} ({gradient})"
                ax.plot(*zip(*points, strict=True), marker="o", markersize=4, label=label)
        if clean:
            ax.axhline(clean[0], color="grey", linestyle=":", label="clean")
        name = "L-inf" if norm == "linf" else "L2"
        ax.set(title=f"{name} attacks", xlabel="epsilon", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(True, alpha=0.4)
        ax.legend(fontsize=8)
    if corrupted:
        ax = fig.add_subplot(1, panels, panels)
        names = list(dict.fromkeys(row["attack"] for row in corrupted))
        for severity in sorted({int(row["severity"]) for row in corrupted}):
            by_name = {
                row["attack"]: row["accuracy"]
                for row in corrupted
                if int(row["severity"]) == severity
            }
            ax.plot(
                range(len(names)),
                [by_name.get(name, math.nan) for name in names],
                marker="o",
                markersize=4,
                linestyle="none",
                label=f"severity {severity}",
            )
        means = [row["accuracy"] for row in rows if row["attack"] == "corruption_mean"]
        if means:
            ax.axhline(means[0], color="black", linestyle="--", label="mean")
        ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=70)
        ax.set(title="Corruptions", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(True, alpha=0.4)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_settling(traces: dict, title: str = "") -> Figure:
    """``utils_ep_fast.settling_trace`` drawn: one column per dynamics (sync and
    async side by side), the mean energy above its lowest value in the phase (top, log scale;
    absent without an energy) and ``max |s_t - s_(t-1)|`` (bottom, log scale) against the
    step, the free phase then the nudged phase after it (each phase with its own beta)."""
    names = list(traces)
    has_energy = traces[names[0]]["free_energy"] is not None
    nrows = 2 if has_energy else 1
    fig = Figure(figsize=(5.5 * len(names), 3.2 * nrows))
    for col, name in enumerate(names):
        trace = traces[name]
        free_steps = len(trace["free_change"])
        axes = [
            fig.add_subplot(nrows, len(names), row * len(names) + col + 1) for row in range(nrows)
        ]
        if has_energy:
            free, nudged = trace["free_energy"], trace["nudged_energy"]
            above_min = [(phase - phase.min()).clamp_min(1e-12) for phase in (free, nudged)]
            axes[0].semilogy(range(len(free)), above_min[0].numpy(), label="free phase")
            nudged_steps = range(free_steps, free_steps + len(nudged))
            axes[0].semilogy(nudged_steps, above_min[1].numpy(), label="nudged phase")
            axes[0].set(
                title=f"{name}: E - min E of the phase (mean E over images)", ylabel="energy gap"
            )
        change = axes[-1]
        change.semilogy(range(1, free_steps + 1), trace["free_change"].numpy(), label="free phase")
        nudged_change = trace["nudged_change"]
        change.semilogy(
            range(free_steps + 1, free_steps + 1 + len(nudged_change)),
            nudged_change.numpy(),
            label="nudged phase",
        )
        change.set(title=f"{name}: max |s_t - s_(t-1)|", xlabel="step t", ylabel="max change")
        for ax in axes:
            ax.grid(True, alpha=0.4)
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
