"""experiment/storage.py: files written whole or not at all (atomic saves, a pickle that
fails, the leftovers of an interrupted write, the umask), safe loading, one writer per folder (a
second writer refused with status 75, a stale lock taken over, a lock without flock), and failed
writes (a read-only folder, a full disk, robustness.csv) ending in one line with status 74."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_datasets import CodeRunningPickle
from helpers import (
    DIGITS_CNN,
    WAIT,
    first_line,
    one_error_line,
    robustness_argv,
    run_dir_of,
    run_failing,
    saved_run,
    start,
)

import cifar_dictlearning
import main_fast
import robustness
from experiment import storage
from experiment.entry import UsageError

# --------------------------------------------------------------- atomic saves and safe loading


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_round_trip_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    storage.atomic_save({"w": torch.arange(4.0), "epoch": 3}, path)
    assert os.listdir(path.parent) == ["model.pt"]
    loaded = storage.safe_load(path, "checkpoint")
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))

    with pytest.raises(RuntimeError, match="cannot pickle"):
        storage.atomic_save({"w": torch.ones(2), "bad": _FailsToPickle()}, path)
    assert os.listdir(path.parent) == ["model.pt"]
    assert torch.equal(storage.safe_load(path, "checkpoint")["w"], torch.arange(4.0))


def test_safe_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(UsageError, match="checkpoint not found") as err:
        storage.safe_load(missing, "checkpoint")
    assert str(missing) in str(err.value)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UsageError, match="corrupt or not a dictionary") as err:
        storage.safe_load(corrupt, "dictionary")
    assert str(corrupt) in str(err.value)

    # A pickled object of an arbitrary class is refused rather than executed.
    with_object = tmp_path / "object.pt"
    torch.save({"obj": CodeRunningPickle(str(tmp_path / "code_ran"))}, with_object)
    with pytest.raises(UsageError, match="not a checkpoint"):
        storage.safe_load(with_object, "checkpoint")
    assert not (tmp_path / "code_ran").exists()

    with pytest.raises(UsageError, match="folder"):
        storage.safe_load(tmp_path, "checkpoint")


def test_files_follow_the_umask_and_leftover_temp_files_are_removed(tmp_path, capsys):
    old_mask = os.umask(0o002)
    try:
        run_dir = saved_run(tmp_path, capsys)
    finally:
        os.umask(old_mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()}
    assert {"checkpoint.pt", "model.pt", "accuracy.png", "results.csv"} <= set(modes)
    assert set(modes.values()) == {0o664}, modes
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    leftover = run_dir / f".checkpoint.pt.k2j4x9.{int(gone.stdout)}@{host}.tmp"  # a killed write
    kept = {
        run_dir / f".robustness.csv.p0q1r2.{os.getpid()}@{host}.tmp": b"a live writer's rows",
        run_dir / f".checkpoint.pt.s3t4u5.{int(gone.stdout)}@another-host.tmp": b"not ours",
        run_dir / ".draft.tmp": b"the user's own file",
    }
    leftover.write_bytes(b"half a checkpoint")
    for path, content in kept.items():
        path.write_bytes(content)
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    assert not leftover.exists()
    out = capsys.readouterr().out
    assert f"removed {leftover.name}, left by an interrupted write" in out
    assert out.count("removed ") == 1
    assert {path: path.read_bytes() for path in kept} == kept


# ----------------------------------------------------------------------- one writer per folder


HOLD_LOCK = (
    "import sys, time; from experiment import storage; "
    "storage.FolderLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(600)"
)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    run_dir = saved_run(tmp_path, capsys)
    before = {
        name: (run_dir / name).read_bytes() for name in ("results.csv", "hyperparameters.txt")
    }
    holder = start(["-c", HOLD_LOCK, str(run_dir)])
    try:
        assert first_line(holder).strip() == "locked"
        err = run_failing(["--load-path", str(run_dir), "--epochs", "2"], capsys, status=75)
        line = one_error_line(err)
        assert f"{run_dir} is being written by process {holder.pid} on " in line
        assert {name: (run_dir / name).read_bytes() for name in before} == before
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait(timeout=WAIT)
    finally:
        holder.kill()
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    assert (
        f"took over the lock of {run_dir} left by process {holder.pid}" in capsys.readouterr().err
    )
    epochs = [line.split(",")[0] for line in (run_dir / "results.csv").read_text().splitlines()]
    assert epochs == ["epoch", "1", "2"]


def test_a_second_dictionary_writer_is_refused_with_status_75(tmp_path, capsys):
    out_dir = tmp_path / "dictionary"
    out_dir.mkdir()
    holder = start(["-c", HOLD_LOCK, str(out_dir)])
    try:
        assert first_line(holder).strip() == "locked"
        argv = [
            "--task",
            "DIGITS",
            "--lca_feats",
            "4",
            "--lca-iters",
            "5",
            "--out-dir",
            str(out_dir),
        ]
        assert cifar_dictlearning.main(argv) == 75
        line = one_error_line(capsys.readouterr().err)
        assert f"{out_dir} is being written by process {holder.pid} on " in line
        assert sorted(p.name for p in out_dir.iterdir()) == [".lock"], "nothing written"
    finally:
        holder.kill()


def test_without_flock_a_lock_is_judged_by_the_process_it_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(storage, "fcntl", None)  # as on a filesystem or system without flock
    host, lock_file = socket.gethostname(), tmp_path / ".lock"
    lock_file.write_text(f"{os.getppid()} {host}\n")  # alive: the process that started pytest
    with pytest.raises(storage.FolderBusyError, match=f"process {os.getppid()} on {host}"):
        storage.FolderLock(tmp_path).__enter__()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    lock_file.write_text(f"{int(exited.stdout)} {host}\n")
    with storage.FolderLock(tmp_path):
        assert lock_file.read_text() == f"{os.getpid()} {host}\n"
    assert lock_file.read_text() == "" and "took over the lock" in capsys.readouterr().err


# ------------------------------------------------------------------------------- failed writes


def read_only_folder(tmp_path: Path) -> Path:
    """A real folder this process cannot write to: a read-only tmpfs for root, else chmod."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip("root ignores folder modes and this machine cannot mount a read-only tmpfs")
    return folder


def test_unwritable_results_dir_fails_at_once_with_status_74(tmp_path, monkeypatch, capsys):
    folder = read_only_folder(tmp_path)
    try:
        monkeypatch.setattr(main_fast, "gdu_check", lambda *a: pytest.fail("work was done"))
        argv = DIGITS_CNN + ["--todo", "gducheck", "--save", "--results-dir", str(folder / "r")]
        line = one_error_line(run_failing(argv, capsys, status=74))
        assert f"cannot write or read a file ({folder / 'r'})" in line
        argv = DIGITS_CNN + ["--save", "--results-dir", str(folder)]
        assert "pass a writable --results-dir" in one_error_line(run_failing(argv, capsys, 74))
        assert cifar_dictlearning.main(["--task", "DIGITS", "--out-dir", str(folder)]) == 74
        assert "pass a writable --out-dir" in one_error_line(capsys.readouterr().err)
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_full_disk_keeps_the_last_checkpoint_and_exits_74(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer_state" in obj:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    argv = DIGITS_CNN + ["--epochs", "3", "--save", "--results-dir", str(tmp_path)]
    line = one_error_line(run_failing(argv, capsys, status=74))
    run_dir = run_dir_of(tmp_path)
    assert "No space left on device [ENOSPC]" in line
    assert f"the last good checkpoint (epoch 1) is in {run_dir}" in line
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))


def test_robustness_reports_a_failed_write_in_one_line(tmp_path, capsys, monkeypatch):
    run_dir = saved_run(tmp_path, capsys)

    def disk_full(path, rows, columns):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(storage, "write_csv_rows", disk_full)
    assert robustness.main(robustness_argv(run_dir, "--steps", "1", "--eps", "0")[1:]) == 74
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write or read a file ({run_dir / 'robustness.csv'})")
    assert "No space left on device [ENOSPC]" in line
