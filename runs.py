"""Run folders: their format on disk and their lifecycle, from creation to resume.

One run of ``main_fast.py --save`` lives in
``<results_dir>/<task>/<alg>/<model>/<dict_training|none>/<YYYY-MM-DD>/run_<N>/``:

    hyperparameters.txt   the command line, then ``name: value`` per argument; resumes and
                          evaluations are appended
    results.csv           one row per epoch (``epoch, train_acc, test_acc, <model metrics>,
                          lr, seconds``)
    *.png                 the figures of ``data_utils``, redrawn after every epoch
    checkpoint.pt         rewritten atomically after every epoch, to resume from
    model.pt              the epoch with the best test accuracy; final_model.pt the last one;
                          interrupted.pt the weights at a Ctrl-C or SIGTERM
    .lock                 the advisory lock of the process writing the folder (pid and host)

Checkpoint: ``model_config`` ({"model": a name of ``MODEL_CLASSES``, "kwargs": constructor
arguments}), ``model_state``, ``optimizer_state``, ``scheduler_state`` (or None), ``epoch``
(epochs done), ``rng_state`` ({"global": ``get_rng_state()``, "train_loader": the loader
generator's state or None}), ``history`` (the results.csv rows), ``best_test_acc`` and ``args``
(every argument, plain values) and ``train_indices`` (the training images EP uses, int64, or
None for all). A model record (``model.pt``, ``final_model.pt``, ``interrupted.pt``) holds
``model_config``, ``model_state``, ``epoch``, ``test_acc``, ``args`` and ``train_indices``.
All are plain tensors and containers, read back with ``torch.load(..., weights_only=True)``.

A dictionary of ``cifar_dictlearning.py`` is ``{"weights": (F, C, k, k), "config": LCA
settings}`` in ``dictionary.pt``, with ``subset_indices.pt`` (the training images it was learnt
on) beside it. Every file is written atomically: a reader sees the old file or the new one.

One process writes a folder at a time (:class:`FolderLock`); the next writer removes the
temporary files a killed one left. Files get the modes of the process's umask, as ``open`` gives.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import random
import re
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: FolderLock judges a lock by the process it names
    fcntl = None

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

import data_utils
from data_utils import UsageError, first_line, warn
from lca import LCAConv2D
from lca_utils_ep_fast import LCA_CNN
from utils_ep_fast import (
    P_CNN,
    P_MLP,
    DivergenceError,
    EnergyNet,
    EPConfig,
    check_finite,
    settle,
    settling_trace,
    train,
)
from vf_utils_ep_fast import VF_CNN, VF_LCA_CNN, VF_MLP

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
FINAL_MODEL = "final_model.pt"
INTERRUPTED = "interrupted.pt"
RESULTS_CSV = "results.csv"
HYPERPARAMETERS_TXT = "hyperparameters.txt"
SUBSET_FILENAME = "subset_indices.pt"
# The --model names, and VFLCACNN for --model LCACNN --vf (vector-field models: VF*)
MODEL_CLASSES: dict[str, type[EnergyNet]] = {
    "CNN": P_CNN,
    "LCACNN": LCA_CNN,
    "MLP": P_MLP,
    "VFCNN": VF_CNN,
    "VFMLP": VF_MLP,
    "VFLCACNN": VF_LCA_CNN,
}
MODEL_KEYS = ("model_config", "model_state", "epoch", "args")  # test_acc: absent in checkpoints
CHECKPOINT_KEYS = (*MODEL_KEYS, "optimizer_state", "rng_state", "history", "best_test_acc")
LOCK_FILE = ".lock"
RECON_IMAGES = 8
SETTLING_IMAGES = 8


class DictionaryError(UsageError):
    """A dictionary (or subset-indices) file is missing, unreadable or of the wrong shape."""


class FolderBusyError(Exception):
    """Another live process holds the lock of a run folder (exit status 75: try again later)."""


# What each kind of failure exits with (the first match counts); its message is one line.
ERROR_STATUSES: tuple[tuple[type[BaseException], int], ...] = (
    (DivergenceError, data_utils.EXIT_DIVERGED),
    (UsageError, data_utils.EXIT_USAGE),
    (FolderBusyError, data_utils.EXIT_BUSY),
    (data_utils.StorageError, data_utils.EXIT_STORAGE),
)


# --------------------------------------------------------------------------------------------
# Safe file I/O
# --------------------------------------------------------------------------------------------


TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Run ``write`` on a temp file next to ``path``, fsync it, then rename it onto ``path``.

    Readers see the old file or the complete new one, never a partial one; on error the temp
    file is removed and the old file is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide the file from the group
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable; folders cannot be opened this way on every platform.
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_figure(fig: Figure, path: str | Path) -> None:
    """A figure of ``data_utils`` written to ``path`` as a PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def safe_load(path: str | Path, what: str, error: type[UsageError] = UsageError) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, containers and plain
    values only, never arbitrary code. ``what`` names the file in errors ("checkpoint", ...).

    Raises:
        ``error`` (a UsageError): the file is missing, a folder, unreadable, corrupt or holds
        other objects.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path.resolve()} (check the path)")
    if not path.is_file():
        raise error(f"{what} path is a folder, not a file: {path.resolve()}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise error(
            f"cannot read {path.resolve()}: it is corrupt or not a {what} ({first_line(e)})"
        ) from e


# --------------------------------------------------------------------------------------------
# One writer per folder
# --------------------------------------------------------------------------------------------


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves in ``folder`` when its process is
    killed mid-write (``.<name>.<random>.tmp``); returns them. Only for a folder's lock holder."""
    leftovers = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def is_unstarted(folder: str | Path) -> bool:
    """Whether ``folder`` holds no run that finished an epoch (no checkpoint, no results.csv):
    ``--save --load-path`` starts a new run there."""
    return not (Path(folder) / CHECKPOINT).exists() and not (Path(folder) / RESULTS_CSV).exists()


def check_writable(folder: str | Path, flag: str) -> None:
    """Create ``folder`` (and its parents) and a probe file in it, before any long work, so
    that an unwritable ``--flag`` folder fails at once (StorageError) rather than after it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".probe."):
            pass
    except OSError as error:
        raise data_utils.StorageError(
            data_utils.storage_message(error, f"pass a writable --{flag} (here {folder})")
        ) from error


def _holder(fd: int) -> list[str]:
    """``[pid, host]`` of the lock file open at ``fd``; empty when nobody holds it."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 256).decode(errors="replace").split()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class FolderLock:
    """Make this process the only writer of ``folder``: a context manager holding an advisory
    lock on ``folder/.lock``.

    The lock is ``flock`` (POSIX), which the kernel drops when its holder dies, even by
    ``kill -9``; the file also names the holder (``pid host``) and is emptied on release, so a
    non-empty file with a free lock is a stale lock, taken over with a notice. Where ``flock``
    is missing or unsupported (some network filesystems) a lock on this host whose process is
    gone is taken over too. Taking the lock removes the temporary files a killed writer left.

    Raises:
        FolderBusyError: another live process holds the lock.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            taken = self._lock(fd)
            holder = " on ".join(_holder(fd)[:2])
            if not taken:
                raise FolderBusyError(
                    f"{self.folder} is being written by process {holder or '(unknown)'}: one "
                    f"writer per run folder; wait for it to end (or stop it), then run this again"
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if holder:  # a holder that did not release: killed
            warn(f"took over the lock of {self.folder} left by process {holder}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        for leftover in remove_temp_files(self.folder):
            print(f"notice: removed {leftover.name}, left by an interrupted write")
        return self

    @staticmethod
    def _lock(fd: int) -> bool:
        """Whether the lock was taken (False: a live holder has it)."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError:  # flock unsupported here: judge by the recorded holder
                pass
        previous = _holder(fd)
        if len(previous) < 2 or not previous[0].isdigit():
            return True
        pid, host = int(previous[0]), previous[1]
        return host == socket.gethostname() and not _process_alive(pid)  # stale: take it

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean release leaves no holder behind
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# --------------------------------------------------------------------------------------------
# Results folders, text logs and CSV files
# --------------------------------------------------------------------------------------------


def make_run_dir(
    results_dir: str | Path,
    task: str,
    alg: str,
    model: str,
    dict_training: str | None,
    date: datetime.date | None = None,
) -> Path:
    """Create and return ``<results_dir>/<task>/<alg>/<model>/<dict_training>/<date>/run_<N>/``.

    ``dict_training`` None or empty becomes ``none``; ``date`` defaults to today (YYYY-MM-DD).
    N is one more than the highest existing ``run_<N>`` there (1 for the first run), so runs
    sort in the order they started; two processes starting at once still get different folders.
    """
    day = (date or datetime.date.today()).isoformat()
    parent = Path(results_dir) / task / alg / model / (dict_training or "none") / day
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"run_(\d+)", p.name))]
    n = max(taken, default=0) + 1
    while True:
        run_dir = parent / f"run_{n}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1


def find_runs(results_dir: str | Path) -> list[Path]:
    """Every ``run_<N>`` folder under ``results_dir`` (at any depth) that has a ``results.csv``,
    i.e. that finished at least one epoch; folders without one (a GDU check, a run stopped in
    its first epoch) are left out. Sorted by parent folder, then by N as a number. A missing
    ``results_dir`` gives an empty list."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    runs = [
        path.parent
        for path in root.rglob(RESULTS_CSV)
        if re.fullmatch(r"run_\d+", path.parent.name)
    ]
    return sorted(runs, key=lambda run: (str(run.parent), int(run.name.removeprefix("run_"))))


def write_hyperparameters(run_dir: str | Path, argv: list[str], args: dict) -> None:
    """Write ``run_dir/hyperparameters.txt``: ``shlex.join(argv)`` on the first line, then one
    ``name: value`` line per entry of ``args`` in its order."""
    lines = [shlex.join([str(a) for a in argv])]
    lines += [f"{key}: {value}" for key, value in args.items()]
    (Path(run_dir) / HYPERPARAMETERS_TXT).write_text("\n".join(lines) + "\n")


def append_text(run_dir: str | Path, filename: str, text: str) -> None:
    """Append ``text`` (plus a newline if it lacks one) to ``run_dir/filename``."""
    with open(Path(run_dir) / filename, "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def _plain(value: Any) -> Any:
    """A one-element tensor / numpy scalar as a Python number, anything else unchanged."""
    if isinstance(value, (Tensor, np.generic, np.ndarray)):
        return value.item()
    return value


def append_csv_row(path: str | Path, row: dict) -> None:
    """Append ``row`` to the CSV file ``path`` and fsync it; the header (the keys of the first
    row) is written when the file is new. Later rows must have the same keys (any order)."""
    path = Path(path)
    header = list(row)
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if set(header) != set(row):
            raise ValueError(
                f"{path} has columns {header}, the new row has {list(row)}; they must match"
            )
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow([_plain(row[k]) for k in header])
        f.flush()
        os.fsync(f.fileno())


def _parse_cell(text: str) -> float | str:
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text


def read_csv_rows(path: str | Path) -> list[dict]:
    """Rows of the CSV file ``path`` as dicts; numbers as float, empty cells as NaN, other text
    as str. A row cut short by a crash mid-write is skipped. UsageError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"results file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [
            {k: _parse_cell(v) for k, v in row.items()}
            for row in reader
            if None not in row and None not in row.values()
        ]


def append_results_row(run_dir: str | Path, row: dict) -> None:
    """Append one epoch's ``row`` to ``run_dir/results.csv`` (see :func:`append_csv_row`)."""
    append_csv_row(Path(run_dir) / RESULTS_CSV, row)


def read_results(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/results.csv`` (see :func:`read_csv_rows`)."""
    return read_csv_rows(Path(run_dir) / RESULTS_CSV)


# --------------------------------------------------------------------------------------------
# Random number generator state
# --------------------------------------------------------------------------------------------


def get_rng_state() -> dict:
    """State of Python's ``random``, numpy's global RNG, torch's CPU RNG and, when available,
    every CUDA device's RNG, made only of tensors, ints and strings so that it round-trips
    through ``torch.save`` + ``torch.load(weights_only=True)``.

    Layout: ``python``: {version: int, state: int64 (625,), gauss_next: float64 (0,) or (1,)};
    ``numpy``: {kind: str, keys: int64 (624,), pos: int, has_gauss: int, cached_gaussian:
    float64 ()}; ``torch``: uint8 tensor; ``cuda`` (only with CUDA): list of uint8 tensors.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": torch.tensor(
                [] if gauss_next is None else [gauss_next], dtype=torch.float64
            ),
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": torch.tensor(float(cached), dtype=torch.float64),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators from :func:`get_rng_state`'s dict; CUDA states are restored for the
    devices present (ignored without CUDA)."""
    py = state["python"]
    gauss = py["gauss_next"].tolist()
    random.setstate((py["version"], tuple(py["state"].tolist()), gauss[0] if gauss else None))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (npst["kind"], keys, npst["pos"], npst["has_gauss"], float(npst["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def seed_everything(seed: int | None) -> None:
    """Seed Python's, numpy's and torch's RNGs (all devices); nothing when ``seed`` is None."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def restore_rng(checkpoint: dict, train_loader) -> None:
    """Put every RNG (and the data order) where the checkpointed run left them."""
    state = checkpoint["rng_state"]
    try:
        set_rng_state(state["global"])
        if state["train_loader"] is not None and train_loader.generator is not None:
            train_loader.generator.set_state(state["train_loader"])
    except (ValueError, RuntimeError, TypeError, KeyError) as error:
        raise UsageError(f"the checkpoint's RNG state is damaged: {first_line(error)}") from error


# --------------------------------------------------------------------------------------------
# Dictionary files
# --------------------------------------------------------------------------------------------


def subset_indices_path(dict_path: str | Path) -> str:
    """The ``subset_indices.pt`` file that sits next to a dictionary file."""
    return os.path.join(os.path.dirname(os.path.abspath(dict_path)), SUBSET_FILENAME)


def save_dictionary(path: str | Path, lca: LCAConv2D, subset_indices: Tensor | None = None) -> None:
    """Write ``{"weights": (F, C, kh, kw) tensor, "config": lca.settings()}`` to ``path``.

    When given, ``subset_indices`` (1-D integer tensor: the training examples the dictionary
    was learned on) goes to ``subset_indices.pt`` in the same folder. Both writes are atomic.
    """
    if subset_indices is not None:
        if subset_indices.dim() != 1 or subset_indices.is_floating_point():
            raise ValueError(
                f"subset_indices must be a 1-D integer tensor, got {subset_indices.dtype} of "
                f"shape {tuple(subset_indices.shape)}."
            )
        indices = subset_indices.detach().to(device="cpu", dtype=torch.int64).clone()
        atomic_save(indices, subset_indices_path(path))
    record = {"weights": lca.get_weights().cpu(), "config": lca.settings()}
    atomic_save(record, path)


def dictionary_file(path: str | Path) -> str:
    """``--dict-path``: a dictionary file, or the folder cifar_dictlearning.py wrote it in."""
    return str(Path(path) / "dictionary.pt") if Path(path).is_dir() else str(path)


def _load_dictionary_file(path: str | Path, what: str) -> Any:
    if not os.path.isfile(path):
        raise DictionaryError(
            f"{what} file '{path}' not found: run cifar_dictlearning.py first, or pass "
            f"--dict-path with the folder it wrote dictionary.pt and subset_indices.pt in."
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise DictionaryError(
            f"{what} file '{path}' could not be read ({first_line(error)}); re-create it with "
            f"cifar_dictlearning.py."
        ) from error


def load_dictionary(
    path: str | Path, expected_shape: Sequence[int] | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Load ``(weights, config)`` written by ``save_dictionary`` (safely: weights_only).

    Raises ``DictionaryError`` if the file is missing, unreadable, not such a record, or (with
    ``expected_shape``) holds weights of another shape.
    """
    record = _load_dictionary_file(path, "dictionary")
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("weights"), Tensor)
        or not isinstance(record.get("config"), dict)
    ):
        raise DictionaryError(
            f"dictionary file '{path}' does not hold a dictionary record "
            f"({{'weights': tensor, 'config': dict}}, found {type(record).__name__}); "
            f"re-create it with cifar_dictlearning.py."
        )
    weights = record["weights"]
    if weights.dim() != 4 or not weights.is_floating_point():
        raise DictionaryError(
            f"dictionary file '{path}' holds a {weights.dtype} tensor of shape "
            f"{tuple(weights.shape)}, expected a float tensor (features, channels, k, k)."
        )
    if expected_shape is not None and tuple(weights.shape) != tuple(expected_shape):
        raise DictionaryError(
            f"dictionary file '{path}': expected shape {tuple(expected_shape)}, found "
            f"{tuple(weights.shape)}; use matching LCA settings or re-run cifar_dictlearning.py "
            f"with them."
        )
    return weights, record["config"]


def load_subset_indices(dict_path: str | Path) -> Tensor:
    """The training indices saved next to the dictionary at ``dict_path`` (1-D int64)."""
    path = subset_indices_path(dict_path)
    indices = _load_dictionary_file(path, "subset indices")
    if (
        not isinstance(indices, Tensor)
        or indices.dim() != 1
        or indices.is_floating_point()
        or indices.dtype == torch.bool
    ):
        raise DictionaryError(
            f"subset indices file '{path}' does not hold a 1-D integer tensor; re-create it "
            f"with cifar_dictlearning.py."
        )
    return indices.to(torch.int64)


def training_indices(
    args: argparse.Namespace, n_train: int, record: dict | None = None
) -> Tensor | None:
    """Which training images EP uses: those a saved ``record`` names; else, with a pretrained or
    finetuned dictionary, those it was not learnt on; otherwise all of them (None)."""
    if record is not None and "train_indices" in record:
        indices = record["train_indices"]
        if indices is not None and len(indices) and int(indices.max()) >= n_train:
            raise UsageError(
                f"the saved run trained on images up to {int(indices.max())}, but "
                f"{args.task} in {args.data_dir} has {n_train}: is it the same dataset?"
            )
        return indices
    if args.model != "LCACNN":
        return None
    if args.dict_training == "learn":
        if Path(subset_indices_path(args.dict_path)).is_file():
            print(f"learn: training on all {n_train} images (the dictionary subset is not used)")
        return None
    try:
        indices = ep_training_indices(n_train, args.dict_path)
    except IndexError as error:
        raise UsageError(
            f"the subset indices next to {args.dict_path} do not fit the {n_train} training "
            f"images of {args.task}: was the dictionary learnt on another task?"
        ) from error
    if len(indices) == 0:
        raise UsageError(f"the dictionary {args.dict_path} was learnt on every training image")
    print(
        f"EP trains on {len(indices)} of {n_train} training images (the other "
        f"{n_train - len(indices)} were used to learn the dictionary)"
    )
    return indices


def load_model_dictionary(model: LCA_CNN, dict_path: str | Path) -> None:
    """Start ``model``'s LCA layer from the dictionary file at ``dict_path``."""
    weights, _ = load_dictionary(dict_path, expected_shape=tuple(model.lca.weights.shape))
    model.load_dictionary(weights)


def ep_training_indices(num_train: int, dict_path: str | Path) -> Tensor:
    """Indices of the training images NOT used to pretrain the dictionary at ``dict_path``.

    The dictionary was learnt on the subset saved next to it (``subset_indices.pt``); EP trains
    on the rest so that the two never see the same images.
    """
    used = load_subset_indices(dict_path)
    mask = torch.ones(num_train, dtype=torch.bool)
    mask[used] = False
    return mask.nonzero().flatten()


# --------------------------------------------------------------------------------------------
# Model records and checkpoints
# --------------------------------------------------------------------------------------------

SESSION_FLAGS = {"todo", "load_path"}
# The flags that LCA_CNN takes under their own names, on top of the CNN's.
LCA_ARGUMENTS = (
    *("lca_feats", "lca_ksize", "lca_stride", "lca_lambda", "lca_tau", "lca_eta", "lca_iters"),
    *("scale_feedback", "dict_training"),
)


def model_config_from_args(args: argparse.Namespace) -> dict:
    """``{"model": name, "kwargs": constructor arguments}`` in plain Python types."""
    in_channels, height, _, _ = data_utils.task_info(args.task)
    common = {
        "activation": args.act,
        "softmax": args.softmax,
        "loss": args.loss,
        "scale": args.scale,
    }
    model_name = "VFLCACNN" if args.model == "LCACNN" and args.vf else args.model
    if model_name.startswith("VF"):
        common["same_update"] = args.same_update
    if args.model in ("MLP", "VFMLP"):
        return {"model": model_name, "kwargs": {"archi": list(args.archi), **common}}
    kwargs = {
        "in_size": height,
        "in_channels": in_channels,
        "channels": list(args.channels),
        "kernels": list(args.kernels),
        "strides": list(args.strides),
        "paddings": list(args.paddings),
        "pools": args.pools,
        "fc": list(args.fc),
        **common,
    }
    if args.model == "LCACNN":
        kwargs.update({name: getattr(args, name) for name in LCA_ARGUMENTS})
    return {"model": model_name, "kwargs": kwargs}


def saved_args(
    saved: dict, typed: argparse.Namespace, explicit: set[str], overrides: set[str]
) -> argparse.Namespace:
    """The saved run's arguments, with the typed flags among ``overrides`` on top."""
    # defaults first, for any flag newer than the saved run
    args = argparse.Namespace(**{**vars(typed), **saved})
    ignored = []
    for name in sorted(explicit - SESSION_FLAGS):
        if name in overrides:
            setattr(args, name, getattr(typed, name))
        elif getattr(typed, name) != saved.get(name):
            ignored.append(f"--{name}")
    if ignored:
        allowed = ", ".join(f"--{name}" for name in sorted(overrides))
        warn(
            f"{', '.join(ignored)} ignored: the settings of {typed.load_path} are used "
            f"(here only {allowed} can change)"
        )
    args.todo, args.load_path = typed.todo, typed.load_path
    if args.dict_path:
        args.dict_path = dictionary_file(args.dict_path)
    return args


def new_run_dir(args: argparse.Namespace) -> Path:
    """A fresh ``<results-dir>/<task>/<alg>/<model>/<dict_training|none>/<date>/run_<N>``."""
    return make_run_dir(args.results_dir, args.task, args.alg, args.model, args.dict_training)


def build_model(model_config: dict) -> EnergyNet:
    """The network described by ``model_config`` ({"model": name, "kwargs": arguments})."""
    try:
        return MODEL_CLASSES[model_config["model"]](**model_config["kwargs"])
    except TypeError as error:  # arguments the class does not take: a damaged record
        raise UsageError(f"the saved model does not rebuild: {first_line(error)}") from error


def model_record(model: EnergyNet, model_config: dict, epoch: int, test_acc, args) -> dict:
    """What ``model.pt``, ``final_model.pt`` and ``interrupted.pt`` hold (``train_indices``
    is added by the recorder)."""
    return {
        "model_config": model_config,
        "model_state": model.state_dict(),
        "epoch": epoch,
        "test_acc": test_acc,
        "args": vars(args),
    }


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rng_state_problem(state: Any) -> str | None:
    """What is wrong with a checkpoint's ``rng_state`` (None: it has get_rng_state's layout)."""
    if not isinstance(state, dict) or not isinstance(state.get("global"), dict):
        return "rng_state is not {'global': ..., 'train_loader': ...}"
    common = state["global"]
    python, numpy = common.get("python"), common.get("numpy")
    if not (
        isinstance(python, dict)
        and isinstance(python.get("state"), Tensor)
        and python["state"].numel() == 625
        and isinstance(numpy, dict)
        and isinstance(numpy.get("keys"), Tensor)
        and numpy["keys"].numel() == 624
        and isinstance(common.get("torch"), Tensor)
        and common["torch"].dtype == torch.uint8
        and common["torch"].numel() > 0
    ):
        return "rng_state lacks the Python, numpy or torch generator states"
    loader = state.get("train_loader")
    if loader is not None and not (isinstance(loader, Tensor) and loader.dtype == torch.uint8):
        return "rng_state's train_loader state is not a byte tensor"
    return None


def record_problem(record: dict, checkpoint: bool) -> str | None:
    """What is wrong with the contents of a loaded model record or (``checkpoint``) checkpoint,
    or None: every entry of the module docstring has its type."""
    config, state = record["model_config"], record["model_state"]
    if not (
        isinstance(config, dict)
        and config.get("model") in MODEL_CLASSES
        and isinstance(config.get("kwargs"), dict)
    ):
        return f"model_config does not name one of the models {', '.join(MODEL_CLASSES)}"
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        return "model_state is not a dict of tensors"
    if not _is_count(record["epoch"]):
        return f"epoch is {record['epoch']!r}, not a number of epochs"
    if not isinstance(record["args"], dict) or not {"task", "model"} <= set(record["args"]):
        return "args is not the dict of the run's arguments"
    indices = record.get("train_indices")
    if indices is not None and not (
        isinstance(indices, Tensor) and indices.dim() == 1 and indices.dtype == torch.int64
    ):
        return "train_indices is not a 1-D int64 tensor"
    if not checkpoint:
        return None
    optimizer_state = record["optimizer_state"]
    if not isinstance(optimizer_state, dict) or "param_groups" not in optimizer_state:
        return "optimizer_state is not an optimizer's state_dict"
    history = record["history"]
    if not isinstance(history, list) or len(history) != record["epoch"]:
        return f"history does not hold one row per epoch ({record['epoch']})"
    if not all(isinstance(row, dict) for row in history):
        return "history rows are not dicts"
    if not isinstance(record["best_test_acc"], (int, float)):
        return "best_test_acc is not a number"
    return _rng_state_problem(record["rng_state"])


def load_record(path: str | Path, what: str, keys: Sequence[str]) -> dict:
    """A dict saved by ``main_fast.py`` at ``path``, checked to hold ``keys`` of the right
    types (a UsageError names the first problem)."""
    record = safe_load(path, what)
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise UsageError(f"{path} is not a {what} written by main_fast.py (keys missing)")
    problem = record_problem(record, checkpoint="optimizer_state" in keys)
    if problem:
        raise UsageError(f"{path} is damaged or from another program: {problem}")
    return record


def load_model_file(load_path: str | Path) -> tuple[dict, Path]:
    """``model.pt`` of a run folder (else ``final_model.pt``), or the model file given (a
    checkpoint too: it holds the model)."""
    path = Path(load_path)
    if path.is_dir():
        path = path / BEST_MODEL if (path / BEST_MODEL).is_file() else path / FINAL_MODEL
    return load_record(path, "model file", MODEL_KEYS), path


def load_checkpoint(run_dir: str | Path) -> dict:
    """``checkpoint.pt`` of the run folder ``run_dir``."""
    return load_record(Path(run_dir) / CHECKPOINT, "checkpoint", CHECKPOINT_KEYS)


def restore_model(record: dict, device: torch.device | str = "cpu") -> EnergyNet:
    """The model of a saved record, rebuilt from its configuration, on ``device``."""
    try:
        model = build_model(record["model_config"])
        model.load_state_dict(record["model_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UsageError(f"the saved model does not rebuild: {first_line(error)}") from error
    saved = record["args"]  # runs saved before --dynamics and --tol existed: the defaults
    model.set_dynamics(saved.get("dynamics", "sync"), saved.get("tol"))
    return model.to(device)


def restore_training_state(checkpoint: dict, model, optimizer, scheduler) -> None:
    """Weights, optimizer (momentum buffers, rates) and scheduler as the checkpoint left them."""
    try:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        if scheduler is not None and checkpoint.get("scheduler_state") is not None:
            scheduler.load_state_dict(checkpoint["scheduler_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UsageError(
            f"the checkpoint does not fit its own model: {first_line(error)}"
        ) from error


def override_rates(
    optimizer: torch.optim.Optimizer, scheduler, lrs: Sequence[float], wds: Sequence[float] | None
) -> None:
    """Replace a resumed run's learning rates and weight decays (None: 0), one per synapse
    (param group).

    ``lrs`` become the initial rates; with cosine decay (``CosineAnnealingLR``, T_max, eta_min)
    the rate at the epoch e reached is ``eta_min + (lr - eta_min) (1 + cos(pi e / T_max)) / 2``,
    as if the run had started with ``lrs``.
    """
    decay = isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    wds = wds or [0.0] * len(lrs)
    for group, lr, wd in zip(optimizer.param_groups, lrs, wds, strict=True):
        group["initial_lr"], group["weight_decay"] = lr, wd
        group["lr"] = lr
        if decay:
            progress = (1 + math.cos(math.pi * scheduler.last_epoch / scheduler.T_max)) / 2
            group["lr"] = scheduler.eta_min + (lr - scheduler.eta_min) * progress
    if scheduler is not None:
        scheduler.base_lrs = list(lrs)


# --------------------------------------------------------------------------------------------
# Per-epoch records of a training run
# --------------------------------------------------------------------------------------------


def csv_row(metrics: dict) -> dict:
    """results.csv columns: epoch, accuracies, the model's extra metrics, lr, seconds."""
    first, last = ("epoch", "train_acc", "test_acc"), ("lr", "seconds")
    extra = [name for name in metrics if name not in first + last]
    return {name: metrics[name] for name in (*first, *extra, *last)}


def sync_results_csv(run_dir: Path, history: list[dict]) -> None:
    """Make results.csv hold exactly the checkpoint's rows (a crash may leave one extra)."""
    path = run_dir / RESULTS_CSV
    rows = read_results(run_dir) if path.is_file() else []
    if len(rows) == len(history):
        return
    warn(f"{path} did not match the checkpoint's {len(history)} epochs; rewriting it")
    path.unlink(missing_ok=True)
    for row in history:
        append_results_row(run_dir, row)


@torch.no_grad()
def neural_activity_figure(model: EnergyNet, probe: tuple[Tensor, Tensor], T: int) -> Figure:
    """Histograms of the free-phase states (and the LCA code) on the probe batch."""
    device = next(model.parameters()).device
    x, y = probe[0].to(device), probe[1].to(device)
    encoding, neurons = settle(model, x, y, T)
    names = [
        f"layer {k + 1} ({link.name}, {'x'.join(map(str, link.shape))})"
        for k, link in enumerate(model.links)
    ]
    if isinstance(model, LCA_CNN):
        neurons, names = [encoding.code, *neurons], ["LCA code", *names]
    return data_utils.plot_neural_activity(neurons, names)


def settling_figure(model: EnergyNet, probe: tuple[Tensor, Tensor], args) -> Figure:
    """Energy and max|ds| per step of the free and nudged phases, sync and async, on a few
    probe images (``SETTLING_IMAGES``)."""
    device = next(model.parameters()).device
    x, y = probe[0][:SETTLING_IMAGES].to(device), probe[1][:SETTLING_IMAGES].to(device)
    traces = settling_trace(model, x, y, args.T1, args.T2, tuple(args.betas))
    title = f"{len(y)} test images, T1 {args.T1}, T2 {args.T2}, betas {args.betas}"
    return data_utils.plot_settling(traces, title)


@torch.no_grad()
def reconstructions_figure(model: LCA_CNN, images: Tensor) -> Figure:
    """Test images and their LCA reconstructions with the initial and the final dictionary."""
    images = images[:RECON_IMAGES].to(model.initial_dictionary.device)
    final = model.lca.get_weights()
    inputs, final_recon = model.reconstruct(images)
    if model.dict_training == "pretrained":
        rows = {"LCA reconstruction": final_recon}
    else:
        model.lca.assign_weight_values(model.initial_dictionary.clone(), normalize=False)
        _, initial_recon = model.reconstruct(images)
        model.lca.assign_weight_values(final, normalize=False)
        rows = {"initial dictionary": initial_recon, "final dictionary": final_recon}
    return data_utils.plot_reconstructions(inputs, rows, n_images=RECON_IMAGES)


@dataclass
class RunRecorder:
    """Writes a run folder's per-epoch files; ``train`` calls it after every epoch.

    run_dir is the run folder; model, model_config, optimizer and scheduler what is trained;
    the train_loader's generator state goes into the checkpoint; probe is (images, labels) of a
    fixed test batch for the figures; args the run's arguments (a Namespace). history, the
    best test accuracy and the epochs done carry over a resume.
    """

    run_dir: Path
    model: EnergyNet
    model_config: dict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: torch.utils.data.DataLoader
    probe: tuple[Tensor, Tensor]
    args: argparse.Namespace
    history: list[dict] = field(default_factory=list)
    best_test_acc: float = -1.0
    epoch: int = 0

    def resume_from(self, checkpoint: dict, command: list[str], changed: Sequence[str]) -> None:
        """Carry on the checkpointed run's records; note the resume in hyperparameters.txt,
        with the new values of the arguments ``changed`` on the resume (``--lrs``, ...)."""
        self.history = list(checkpoint["history"])
        self.best_test_acc = checkpoint["best_test_acc"]
        self.epoch = checkpoint["epoch"]
        sync_results_csv(self.run_dir, self.history)
        lines = [f"resumed: {shlex.join(command)}"]
        lines += [
            f"{name}: {getattr(self.args, name)} (from epoch {self.epoch})" for name in changed
        ]
        append_text(self.run_dir, HYPERPARAMETERS_TXT, "\n".join(lines))

    def start(self, command: list[str]) -> None:
        """The files of a new run: its command line and arguments, the starting dictionary."""
        write_hyperparameters(self.run_dir, command, vars(self.args))
        if isinstance(self.model, LCA_CNN):
            pretrained = self.args.dict_training == "pretrained"
            filename = "dictionary.png" if pretrained else "dictionary_epoch0.png"
            self.plot_dictionary(filename, "initial dictionary")

    def plot_dictionary(self, filename: str, title: str) -> None:
        """The LCA dictionary as it is now, as a grid of features."""
        fig = data_utils.plot_dictionary(self.model.lca.get_weights(), title)
        save_figure(fig, self.run_dir / filename)

    def __call__(self, epoch: int, metrics: dict) -> None:
        check_finite(self.model)
        row = csv_row(metrics)
        self.history.append(row)
        if row["test_acc"] > self.best_test_acc:
            self.best_test_acc = row["test_acc"]
            self.save_model(BEST_MODEL, epoch, row["test_acc"])
        atomic_save(self.checkpoint(epoch), self.run_dir / CHECKPOINT)
        self.epoch = epoch
        append_results_row(self.run_dir, row)
        for filename, fig in data_utils.plot_metrics(self.history).items():
            save_figure(fig, self.run_dir / filename)
        activity = neural_activity_figure(self.model, self.probe, self.args.T1)
        save_figure(activity, self.run_dir / "neural_activity.png")
        save_figure(
            settling_figure(self.model, self.probe, self.args), self.run_dir / "settling.png"
        )
        if isinstance(self.model, LCA_CNN) and self.args.dict_training != "pretrained":
            self.plot_dictionary(f"dictionary_epoch{epoch}.png", f"dictionary after epoch {epoch}")

    def checkpoint(self, epoch: int) -> dict:
        """Everything needed to carry on after ``epoch`` exactly (see the module docstring)."""
        generator = self.train_loader.generator
        return {
            "model_config": self.model_config,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": epoch,
            "rng_state": {
                "global": get_rng_state(),
                "train_loader": generator.get_state() if generator is not None else None,
            },
            "history": self.history,
            "best_test_acc": self.best_test_acc,
            "args": vars(self.args),
            "train_indices": self.train_indices(),
        }

    def train_indices(self) -> Tensor | None:
        """The training images EP uses (int64), or None when it uses them all."""
        dataset = self.train_loader.dataset
        if not isinstance(dataset, torch.utils.data.Subset):
            return None
        return torch.as_tensor(list(dataset.indices), dtype=torch.int64)

    def save_model(self, filename: str, epoch: int, test_acc) -> None:
        """The current weights and configuration, written atomically to ``filename``."""
        record = model_record(self.model, self.model_config, epoch, test_acc, self.args)
        record["train_indices"] = self.train_indices()
        atomic_save(record, self.run_dir / filename)

    def finish(self) -> None:
        """After the last epoch: ``final_model.pt`` and, with LCA, the reconstructions."""
        test_acc = self.history[-1]["test_acc"] if self.history else None
        self.save_model(FINAL_MODEL, self.epoch, test_acc)
        if isinstance(self.model, LCA_CNN):
            fig = reconstructions_figure(self.model, self.probe[0])
            save_figure(fig, self.run_dir / "reconstructions.png")


def _resume_command(run_dir: Path, args: argparse.Namespace, *extra: str) -> str:
    argv = ["python", "main_fast.py", "--load-path", str(run_dir), "--epochs", str(args.epochs)]
    return shlex.join([*argv, *extra])


def _kept(recorder: RunRecorder | None) -> str:
    if recorder is None or recorder.epoch == 0:
        return "no epoch finished, so there is no checkpoint"
    return f"the last good checkpoint (epoch {recorder.epoch}) is in {recorder.run_dir}"


def start_recording(
    held: contextlib.ExitStack,
    run_dir: Path | None,
    parts: tuple,
    args: argparse.Namespace,
    command: list[str],
    checkpoint: dict | None,
    changed: Sequence[str],
) -> RunRecorder:
    """The recorder of a run with ``--save`` (``parts``: RunRecorder's arguments between the
    folder and ``args``), in ``run_dir`` or, when None, in a new run folder locked in ``held``;
    it carries on ``checkpoint`` (with the arguments ``changed`` on the resume) or starts."""
    if run_dir is None:
        run_dir = new_run_dir(args)
        held.enter_context(FolderLock(run_dir))
    recorder = RunRecorder(run_dir, *parts, args)
    if checkpoint:
        recorder.resume_from(checkpoint, command, changed)
    else:
        recorder.start(command)
    print(f"run folder: {run_dir}")
    return recorder


def train_run(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loaders: tuple,
    config: EPConfig,
    device: torch.device,
    start_epoch: int,
    recorder: RunRecorder | None,
    args: argparse.Namespace,
    sum_totals: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> int:
    """Train from ``start_epoch`` to ``args.epochs`` on ``loaders`` (train, test), recording
    each epoch (``sum_totals``: see ``utils_ep_fast.train_epoch``); returns the exit status. A
    divergence (DivergenceError), a failed write
    (StorageError), Ctrl-C or SIGTERM (status 130 or 143) keeps what was saved and says how to
    carry on."""
    try:
        train(
            model,
            optimizer,
            *loaders,
            config,
            args.epochs,
            device,
            scheduler,
            start_epoch,
            recorder,
            **({} if sum_totals is None else {"sum_totals": sum_totals}),
        )
        if recorder is not None:
            recorder.finish()
    except DivergenceError as error:
        raise DivergenceError(divergence_message(error, recorder)) from error
    except KeyboardInterrupt as interrupt:
        report_interrupt(recorder, args, interrupt)
        return data_utils.exit_status_of(interrupt)
    except OSError as error:
        raise data_utils.StorageError(storage_failure_message(error, recorder)) from error
    if recorder is not None:
        print(f"best test accuracy {recorder.best_test_acc:.4f}; results in {recorder.run_dir}")
    return 0


def divergence_message(error: DivergenceError, recorder: RunRecorder | None) -> str:
    """The engine's diagnosis, where the last good checkpoint is, and what to change: with a
    checkpoint, the command that resumes it with half the learning rates."""
    advice = "Try lower --lrs or smaller --betas."
    if recorder is not None and recorder.epoch > 0:
        halved = [f"{lr / 2:g}" for lr in recorder.args.lrs]
        command = _resume_command(recorder.run_dir, recorder.args, "--lrs", *halved)
        advice = f"Resume with lower rates, e.g.: {command}"
    return f"training diverged: {error}; {_kept(recorder)}. {advice}"


def storage_failure_message(error: OSError, recorder: RunRecorder | None) -> str:
    """A failed write during training: which file and why, and what is kept."""
    where = (
        "--results-dir" if recorder is None else f"--results-dir (run folder {recorder.run_dir})"
    )
    return data_utils.storage_message(
        error, f"{_kept(recorder)}; free space or make {where} writable, then resume"
    )


def report_interrupt(
    recorder: RunRecorder | None, args: argparse.Namespace, interrupt: KeyboardInterrupt
) -> None:
    """Ctrl-C or SIGTERM: save the current weights and say how to resume."""
    what = "terminated (SIGTERM)" if isinstance(interrupt, data_utils.Terminated) else "interrupted"
    if recorder is None:
        print(f"\n{what}; nothing was saved (no --save)", file=sys.stderr)
        return
    recorder.save_model(INTERRUPTED, recorder.epoch, None)
    saved = recorder.run_dir / INTERRUPTED
    if recorder.epoch == 0:
        resume = "no epoch finished, so there is no checkpoint: run the command again"
    else:
        resume = (
            f"resume from epoch {recorder.epoch} with:\n  {_resume_command(recorder.run_dir, args)}"
        )
    print(f"\n{what}; current weights saved to {saved}; {resume}", file=sys.stderr)
