"""Storage primitives: files written whole or not at all, read back safely, one writer a folder.

- ``atomic_write`` / ``atomic_save`` / ``save_figure``: a temp file beside the target, fsynced
  and renamed onto it, so a reader sees the old file or the complete new one.
- ``safe_load``: ``torch.load(..., weights_only=True)``, tensors and plain containers only.
- ``FolderLock``: the advisory lock (``.lock``) of the one process writing a folder; taking
  it removes the temp files a killed writer left (``remove_temp_files``). Temp files are
  owned: their names carry the writer's process and host, and only those of a process that is
  gone are removed, so a lock of another name beside it (an evaluation's, beside a training
  run's) and the user's own ``.*.tmp`` files are never touched.
- ``check_writable``: a folder is created and probed before long work starts.
- ``append_text``, ``append_csv_row``, ``read_csv_rows``: text and CSV logs, fsynced rows;
  ``write_csv_rows`` rewrites a whole CSV atomically.
- ``StorageError`` (exit status 74) and ``FolderBusyError`` (75); ``ERROR_STATUSES`` maps
  them, and ``UsageError``, to their exit statuses for ``entry.run_script``.

Files get the modes of the process's umask, as ``open`` gives.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: FolderLock judges a lock by the process it names
    fcntl = None

import numpy as np
import torch
from torch import Tensor

from experiment import entry
from experiment.entry import UsageError, first_line, storage_message, warn

LOCK_FILE = ".lock"
TEMP_SUFFIX = ".tmp"
# a temp file of atomic_write: .<name>.<random>.<pid>@<host>.tmp
_TEMP_NAME = re.compile(rf"\..+\.(\d+)@([^@/]+){re.escape(TEMP_SUFFIX)}")


class StorageError(Exception):
    """A file could not be written or read (disk full, read-only folder, permissions); the
    message says which, what was kept and what to do (exit status 74)."""


class FolderBusyError(Exception):
    """Another live process holds the lock of a folder (exit status 75: try again later)."""


# What each kind of failure exits with (the first match counts); its message is one line.
ERROR_STATUSES: entry.Statuses = (
    (UsageError, entry.EXIT_USAGE),
    (FolderBusyError, entry.EXIT_BUSY),
    (StorageError, entry.EXIT_STORAGE),
)


# --------------------------------------------------------------------------------------------
# Whole files
# --------------------------------------------------------------------------------------------


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_temp_suffix())
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


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure (those of ``data_utils``) written to ``path`` as a PNG, atomically."""
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


def _temp_suffix() -> str:
    """``.<pid>@<host>.tmp``: the end of this process's temp file names, naming their writer."""
    return f".{os.getpid()}@{socket.gethostname()}{TEMP_SUFFIX}"


def temp_file_writer(path: str | Path) -> tuple[int, str] | None:
    """``(pid, host)`` of the process that wrote the temp file ``path`` (a name ending in
    :func:`_temp_suffix`), or None for any other name."""
    match = _TEMP_NAME.fullmatch(Path(path).name)
    return None if match is None else (int(match.group(1)), match.group(2))


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves in ``folder`` when its process is
    killed mid-write (``.<name>.<random>.<pid>@<host>.tmp``) and whose writer is gone: a
    process of this host that no longer runs. Returns them. A live writer's files, another
    host's (whose processes cannot be checked) and any other ``.*.tmp`` file stay."""
    host = socket.gethostname()
    leftovers = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        writer = temp_file_writer(path)
        if writer is None or writer[1] != host or _process_alive(writer[0]):
            continue
        if path.is_file():
            path.unlink(missing_ok=True)
            leftovers.append(path)
    return leftovers


def check_writable(folder: str | Path, flag: str) -> None:
    """Create ``folder`` (and its parents) and a probe file in it, before any long work, so
    that an unwritable ``--flag`` folder fails at once (StorageError) rather than after it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".probe."):
            pass
    except OSError as error:
        raise StorageError(
            storage_message(error, f"pass a writable --{flag} (here {folder})")
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
    gone is taken over too. Taking the lock removes the temporary files that killed writers
    left (:func:`remove_temp_files`: only those whose writer is gone, so a lock of another
    ``name`` beside a writer's ``.lock``, such as an evaluation's, leaves that writer's
    half-written files alone), unless ``clean_temp_files`` is False.

    Raises:
        FolderBusyError: another live process holds the lock.
    """

    def __init__(self, folder: str | Path, name: str = LOCK_FILE, clean_temp_files: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.clean_temp_files = clean_temp_files
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
        for leftover in remove_temp_files(self.folder) if self.clean_temp_files else []:
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
# Text and CSV logs
# --------------------------------------------------------------------------------------------


def append_text(folder: str | Path, filename: str, text: str) -> None:
    """Append ``text`` (plus a newline if it lacks one) to ``folder/filename``."""
    with open(Path(folder) / filename, "a") as f:
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


def write_csv_rows(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``rows`` as the whole CSV file ``path`` (header ``columns``, a missing cell empty),
    written atomically: a reader sees the previous rows or all of these."""

    def write(f: IO[bytes]) -> None:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(columns)
        writer.writerows([_plain(row.get(k, "")) for k in columns] for row in rows)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def read_csv_rows(
    path: str | Path, fix: str = "restore it from a copy or move it aside"
) -> list[dict]:
    """Rows of the CSV file ``path`` as dicts; numbers as float, empty cells as NaN, other text
    as str. A row cut short by a crash mid-write is skipped. UsageError if the file is missing,
    or is not a CSV text (not UTF-8, a NUL byte): its message names the file and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"results file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [
                {k: _parse_cell(v) for k, v in row.items()}
                for row in reader
                if None not in row and None not in row.values()
            ]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UsageError(
            f"cannot read {path.resolve()}: it is not a CSV text file ({first_line(error)}); {fix}"
        ) from error
