"""Running on a shared cluster: preemption by SIGTERM, one writer per run folder, failed writes,
archives and pickles from elsewhere, bad numbers, damaged checkpoints, resumes that change the
learning rates, file modes and leftovers, moved dictionaries. Signals are real signals sent to
real child processes; every wait is bounded."""

from __future__ import annotations

import errno
import io
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from fake_datasets import write_fake_cifar10
from helpers import (
    DIGITS_CNN,
    LCACNN,
    WAIT,
    fail_in_epoch,
    read_csv,
    run_dir_of,
    run_failing,
    start,
    wait_for,
)
from matplotlib.figure import Figure

import cifar_dictlearning
import main_fast
import robustness
from experiment import data_loading, entry, records, runs, storage

ROOT = Path(__file__).resolve().parents[1]


def saved_run(results: Path, capsys, *extra: str) -> Path:
    """A finished one-epoch DIGITS run folder under ``results`` (its output read away)."""
    assert main_fast.main(DIGITS_CNN + ["--save", "--results-dir", str(results), *extra]) == 0
    capsys.readouterr()
    return run_dir_of(results)


def one_error_line(err: str) -> str:
    """The error message that ends ``err`` (after any progress bars), asserting that it is
    one ``error:`` line and the only one."""
    lines = err.strip().splitlines()
    assert lines[-1].startswith(("error: ", "cifar_dictlearning.py: error: ")), err
    assert err.count("error: ") == 1, err
    return lines[-1]


# --------------------------------------------------------------- 1. archives from elsewhere


@pytest.mark.parametrize("unsafe", ["../escaped.txt", "/tmp/absolute.txt", "link"])
def test_archive_member_outside_the_data_folder_is_refused(tmp_path, unsafe):
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member = tarfile.TarInfo(unsafe)
        if unsafe == "link":  # a symlink pointing outside, then a file written through it
            member.type, member.linkname = tarfile.SYMTYPE, str(tmp_path)
            tar.addfile(member)
        else:
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
    with pytest.raises(entry.UsageError, match="refusing to unpack .* is unsafe"):
        data_loading.build_datasets("CIFAR10", data, download=False)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute.txt").exists()
    assert not (data / "cifar-10-batches-py").exists(), "nothing is unpacked from such an archive"


# --------------------------------------------------------------- 2. SIGTERM and early Ctrl-C


def test_sigterm_saves_the_weights_and_prints_the_resume_command(tmp_path):
    argv = DIGITS_CNN + ["--epochs", "100000", "--save", "--results-dir", str(tmp_path)]
    child = start(["main_fast.py", *argv])
    try:
        wait_for(lambda: list(tmp_path.rglob("results.csv")), "the first epoch")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert "terminated (SIGTERM); current weights saved to" in err and "Traceback" not in err
    run_dir = run_dir_of(tmp_path)
    command = err.strip().splitlines()[-1].strip()
    assert command == f"python main_fast.py --load-path {run_dir} --epochs 100000"
    done = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    assert torch.load(run_dir / "interrupted.pt", weights_only=True)["epoch"] == done >= 1
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", str(done + 1)]) == 0


def robustness_argv(run_dir: Path, *extra: str) -> list[str]:
    return ["robustness.py", "--load-path", str(run_dir), "--device", "cpu", "--n-samples",
            "20", "--attacks", "pgd-linf", "--gradients", "bptt", *extra]  # fmt: skip


def test_sigterm_stops_robustness_keeping_the_rows_measured(tmp_path, capsys):
    run_dir = saved_run(tmp_path, capsys)
    epsilons = [f"{0.01 * i:g}" for i in range(100)]
    child = start(robustness_argv(run_dir, "--steps", "50", "--eps", *epsilons))
    csv_path = run_dir / "robustness.csv"

    def attacked_or_ended() -> bool:  # the clean row and one attack's row, or an early exit
        rows = csv_path.read_text().splitlines() if csv_path.is_file() else []
        return len(rows) > 2 or child.poll() is not None

    try:
        wait_for(attacked_or_ended, "the first attack")
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 143 and "Traceback" not in err, err
    note, command = err.strip().splitlines()[-2:]
    assert (
        note
        == "terminated (SIGTERM); robustness.csv keeps the rows measured so far; continue with:"
    )
    assert command.strip().startswith("python robustness.py --load-path")
    rows = storage.read_csv_rows(csv_path)
    assert rows[0]["attack"] == "clean" and rows[1]["attack"] == "pgd-linf"


def test_robustness_reports_a_failed_write_in_one_line(tmp_path, capsys, monkeypatch):
    run_dir = saved_run(tmp_path, capsys)

    def disk_full(path, rows, columns):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(storage, "write_csv_rows", disk_full)
    assert robustness.main(robustness_argv(run_dir, "--steps", "1", "--eps", "0")[1:]) == 74
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write or read a file ({run_dir / 'robustness.csv'})")
    assert "No space left on device [ENOSPC]" in line


def test_sigterm_stops_dictionary_learning_keeping_the_last_dictionary(tmp_path):
    argv = ["--task", "DIGITS", "--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1",
            "--lca-iters", "5", "--epochs", "100000", "--out-dir", str(tmp_path)]  # fmt: skip
    child = start(["cifar_dictlearning.py", *argv])
    try:
        wait_for(lambda: (tmp_path / "dictlearning.csv").is_file(), "the first epoch")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 143 and "Traceback" not in err, err
    assert "terminated (SIGTERM); the dictionary of the last finished epoch is kept" in err
    weights, _ = records.load_dictionary(tmp_path / "dictionary.pt", expected_shape=(4, 1, 3, 3))
    assert torch.isfinite(weights).all()


# A script whose import of module argv[2] sends the signal argv[3] to itself, then runs the
# script argv[1] with argv[4:] as its command line: a signal while the libraries load.
SIGNAL_ON_IMPORT = """
import os, runpy, signal, sys
script, module, signame = sys.argv[1:4]
sys.argv = [script, *sys.argv[4:]]
sys.path.insert(0, os.getcwd())
class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, signame))
        return None
sys.meta_path.insert(0, SignalOnImport())
runpy.run_path(script, run_name="__main__")
"""


def signal_on_import(script: str, module: str, signame: str, *argv: str):
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_ON_IMPORT, script, module, signame, *argv], cwd=ROOT,
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "signame", "status", "said"),
    [("torch", "SIGTERM", 143, "terminated (SIGTERM)"), ("matplotlib", "SIGTERM", 143,
     "terminated (SIGTERM)"), ("torch", "SIGINT", 130, "interrupted")],
)  # fmt: skip
def test_a_signal_while_the_libraries_load_stops_quietly(module, signame, status, said, tmp_path):
    argv = [*DIGITS_CNN, "--save", "--results-dir", str(tmp_path)]
    done = signal_on_import("main_fast.py", module, signame, *argv)
    assert done.returncode == status and done.stderr.strip() == said, done.stderr
    assert list(tmp_path.iterdir()) == [], "it stopped before any work"


@pytest.mark.parametrize(
    ("script", "module", "signame", "status", "argv"),
    [("robustness.py", "torch", "SIGTERM", 143, ["--load-path", "RUN", "--device", "cpu"]),
     ("cifar_dictlearning.py", "matplotlib", "SIGINT", 130, ["--task", "DIGITS", "--out-dir",
                                                              "RUN"])],
)  # fmt: skip
def test_the_other_scripts_stop_quietly_while_the_libraries_load(
    script, module, signame, status, argv, tmp_path
):
    run = tmp_path / "run"
    done = signal_on_import(script, module, signame, *[str(run) if a == "RUN" else a for a in argv])
    assert done.returncode == status and "Traceback" not in done.stderr, done.stderr
    first, *_, command = done.stderr.strip().splitlines()
    assert first.startswith("terminated (SIGTERM)" if status == 143 else "interrupted")
    assert command.endswith(f"python {script} {shlex.join(argv).replace('RUN', str(run))}")
    assert not run.exists(), "it stopped before any work"


# A script that installs the handlers and ends with argv[1] ("entry": entry.exit_after_work,
# "sys": sys.exit), an object torn down with the modules sending it SIGTERM as it goes: the
# signal lands in the interpreter's shutdown, after the work, once Python gave the handled
# signals their default action back.
SIGTERM_AT_SHUTDOWN = """
import os, signal, sys, types
sys.path.insert(0, os.getcwd())
from experiment import entry
entry.install_stop_handlers()
class SendsSigtermWhenTornDown:
    def __del__(self, kill=os.kill, pid=os.getpid(), sigterm=signal.SIGTERM):
        kill(pid, sigterm)
holder = types.ModuleType("holder")
holder.late = SendsSigtermWhenTornDown()
sys.modules["holder"] = holder
entry.exit_after_work(0) if sys.argv[1] == "entry" else sys.exit(0)
"""


def test_a_sigterm_in_the_interpreters_shutdown_leaves_a_finished_scripts_status():
    def ending_with(how: str) -> int:
        done = subprocess.run([sys.executable, "-c", SIGTERM_AT_SHUTDOWN, how], cwd=ROOT,
                              capture_output=True, text=True, timeout=WAIT)  # fmt: skip
        return done.returncode

    assert ending_with("sys") == -signal.SIGTERM, "the signal lands after Python's handlers"
    assert ending_with("entry") == 0


# ----------------------------------------------- 2b. a stop at every kind of safe point, in-process

TWO_EPOCHS = [*DIGITS_CNN, "--epochs", "2", "--save"]  # two batches (720 + 717 images) an epoch


def stop_at_call(monkeypatch, k: int, record: list[str] | None = None) -> None:
    """Request a stop (as SIGTERM's handler does) at the ``k``-th safe point from now on; with
    ``record``, append the name of the function of every safe point to it."""
    real = entry.raise_if_stopped
    calls = []

    def safe_point() -> None:
        calls.append(1)
        if record is not None:
            record.append(sys._getframe(1).f_code.co_name)
        if len(calls) == k:
            entry.request_stop(signal.SIGTERM)
        real()

    monkeypatch.setattr(entry, "raise_if_stopped", safe_point)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[str]]:
    """The run folder of TWO_EPOCHS, never stopped, and the function of every safe point it
    passed, in order."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "job"
    sites: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at_call(monkeypatch, 0, sites)
        assert main_fast.main([*TWO_EPOCHS, "--load-path", str(run_dir)]) == 0
    return run_dir, sites


def without_seconds(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_csv(run_dir)]


def assert_same_weights_and_rows(run_dir: Path, reference: Path) -> None:
    """final_model.pt's tensors equal bit for bit, results.csv equal but for the seconds."""
    state = torch.load(run_dir / "final_model.pt", weights_only=True)["model_state"]
    expected = torch.load(reference / "final_model.pt", weights_only=True)["model_state"]
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], value) for name, value in expected.items())
    assert without_seconds(run_dir) == without_seconds(reference)


# (function of the safe point, which of its passes): every kind the training run has
MOMENTS = {
    "first": ("with_signals", 1),
    "between phase steps": ("run_phase", 3),
    "at a batch boundary": ("stop_agreed", 2),
    "before a batch": ("train_epoch", 3),
    "before the epoch's saves": ("__call__", 1),
    "after the epoch's saves": ("__call__", 2),
    "before the last epoch's saves": ("__call__", 3),
    "after the last epoch's saves": ("__call__", 4),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_stop_at_any_safe_point_saves_and_the_same_command_resumes_bit_for_bit(
    moment, uninterrupted, tmp_path, monkeypatch, capsys
):
    reference, sites = uninterrupted
    name, nth = MOMENTS[moment]
    k = [i for i, site in enumerate(sites, 1) if site == name][nth - 1]
    argv = [*TWO_EPOCHS, "--load-path", str(tmp_path / "job")]
    stop_at_call(monkeypatch, k)
    assert main_fast.main(argv) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    if (tmp_path / "job" / "hyperparameters.txt").exists():  # the run had started
        saved = torch.load(tmp_path / "job" / "interrupted.pt", weights_only=True)
        # the recorder passes two safe points an epoch, before and after its saves
        assert saved["epoch"] == sites[:k].count("__call__") // 2
    monkeypatch.undo()
    assert main_fast.main(argv) == 0  # the same command, requeued
    out = capsys.readouterr().out
    assert ("all 2 epochs are done; writing the final files" in out) == (nth == 4)
    assert_same_weights_and_rows(tmp_path / "job", reference)


@pytest.mark.parametrize("signals", [1, 2], ids=["one signal", "two signals"])
@pytest.mark.parametrize("writer", ["savefig", "torch.save"])
def test_sigterm_while_a_file_is_written_lets_the_write_finish(
    writer, signals, uninterrupted, tmp_path, monkeypatch, capsys
):
    """Real SIGTERMs to this process from inside matplotlib's or torch's writer (the first
    write of the epoch-end saves): the file is written whole, the run stops after its saves
    with 143 and resumes to the uninterrupted result."""
    owner, attribute = (Figure, "savefig") if writer == "savefig" else (torch, "save")
    real, calls = getattr(owner, attribute), []

    def signalled_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, signalled_write)
    argv = [*TWO_EPOCHS, "--load-path", str(tmp_path / "job")]
    assert main_fast.main(argv) == 143
    assert "terminated (SIGTERM); current weights saved" in capsys.readouterr().err
    run_dir = tmp_path / "job"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    for png in run_dir.glob("*.png"):  # every figure whole
        assert matplotlib.image.imread(png).ndim == 3, png
    monkeypatch.undo()
    assert main_fast.main(argv) == 0
    assert_same_weights_and_rows(run_dir, reference=uninterrupted[0])


THIRD_SIGNAL = """
import os, runpy, signal, sys
from matplotlib.figure import Figure
def three_signals(*args, **kwargs):
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
Figure.savefig = three_signals
sys.argv = ["main_fast.py", *sys.argv[1:]]
runpy.run_path("main_fast.py", run_name="__main__")
"""


def test_a_third_sigterm_ends_the_process_at_once(tmp_path):
    argv = [*TWO_EPOCHS, "--load-path", str(tmp_path / "job")]
    done = subprocess.run(
        [sys.executable, "-c", THIRD_SIGNAL, *argv], cwd=ROOT, capture_output=True, text=True,
        timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert "terminated" not in done.stderr, "it ended at once, without the interrupt's saves"
    assert not (tmp_path / "job" / "interrupted.pt").exists()


def test_sigint_mid_training_exits_130_and_saves(tmp_path):
    argv = DIGITS_CNN + ["--epochs", "100000", "--save", "--results-dir", str(tmp_path)]
    child = start(["main_fast.py", *argv])
    try:
        wait_for(lambda: list(tmp_path.rglob("checkpoint.pt")), "the first checkpoint")
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; current weights saved to" in err
    assert (run_dir_of(tmp_path) / "interrupted.pt").is_file()


def test_the_exit_status_table_names_every_status_of_the_scripts():
    table = (ROOT / "docs" / "runs.md").read_text().split("## Exit statuses")[1]
    listed = {int(n) for row in re.findall(r"^\| ([\d /]+) \|", table, re.MULTILINE)
              for n in row.split("/")}  # fmt: skip
    constants = {value for name, value in vars(entry).items() if name.startswith("EXIT_")}
    assert listed == constants


def test_one_command_line_starts_and_after_a_preemption_resumes(tmp_path, monkeypatch, capsys):
    def preempt(model):
        raise entry.Terminated

    run_dir = tmp_path / "job"
    argv = DIGITS_CNN + ["--mbs", "1437", "--epochs", "3", "--save", "--load-path", str(run_dir)]
    fail_in_epoch(monkeypatch, 2, preempt)
    assert main_fast.main(argv) == 143
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert main_fast.main(argv) == 0  # the requeued job: the same line
    out, err = capsys.readouterr()
    assert "ignored" not in err and "notice: --lrs" not in out
    assert [row["epoch"] for row in runs.read_results(run_dir)] == [1, 2, 3]


# --------------------------------------------------------------- 3. one writer per run folder

HOLD_LOCK = (
    "import sys, time; from experiment import storage; "
    "storage.FolderLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(600)"
)


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    run_dir = saved_run(tmp_path, capsys)
    before = {
        name: (run_dir / name).read_bytes() for name in ("results.csv", "hyperparameters.txt")
    }
    holder = start(["-c", HOLD_LOCK, str(run_dir)])
    try:
        assert holder.stdout.readline().strip() == "locked"
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
        assert holder.stdout.readline().strip() == "locked"
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


# --------------------------------------------------------------- 4. failed writes


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


def test_download_into_an_unwritable_data_dir_is_a_storage_error(tmp_path, monkeypatch, capsys):
    def denied(url, download_root, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), download_root)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", denied)
    argv = DIGITS_CNN + ["--task", "CIFAR10", "--data-dir", str(tmp_path), "--channels", "4"]
    line = one_error_line(run_failing([*argv, "--kernels", "3"], capsys, status=74))
    assert f"({tmp_path}): Permission denied [EACCES]" in line


# ------------------------------------ 5. bad numbers (main_fast.py: test_cli_errors.py)


@pytest.mark.parametrize("flag", ["--lambda", "--tau", "--eta", "--d-update-clip"])
def test_dictionary_learning_refuses_nan(tmp_path, capsys, flag):
    out = tmp_path / "out"
    argv = ["--task", "DIGITS", "--epochs", "1", "--lca-iters", "2", "--out-dir", str(out)]
    assert cifar_dictlearning.main([*argv, flag, "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a" in err and "got nan" in err
    assert not (out / "dictionary.pt").exists()


# --------------------------------------------------------------- 6. damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("finished")
    assert main_fast.main(DIGITS_CNN + ["--save", "--results-dir", str(results)]) == 0
    return run_dir_of(results)


def rng_without_torch(checkpoint):
    checkpoint["rng_state"]["global"]["torch"] = torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c["model_config"].update(model="RNN"), "model_config does not name one of"),
        (lambda c: c["model_config"]["kwargs"].update(bogus=1), "the saved model does not rebuild"),
        (lambda c: c.update(args=[1, 2]), "args is not the dict of the run's arguments"),
        (lambda c: c.update(epoch="1"), "epoch is '1', not a number of epochs"),
        (lambda c: c.update(epoch=0.5), "epoch is 0.5, not a number of epochs"),
        (lambda c: c.update(rng_state={}), "rng_state is not"),
        (rng_without_torch, "rng_state lacks the Python, numpy or torch generator states"),
        (lambda c: c["rng_state"]["global"]["numpy"].update(kind="MT0"), "RNG state is damaged"),
    ],
)
def test_damaged_checkpoint_is_refused_before_anything_is_written(
    finished_run, tmp_path, capsys, damage, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"}
    line = one_error_line(run_failing(["--load-path", str(run_dir), "--epochs", "2"], capsys))
    assert message in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"} == before


# --------------------------------------------------------------- 7. new rates on a resume


def test_resume_applies_typed_learning_rates_and_weight_decays(tmp_path, capsys):
    run_dir = saved_run(tmp_path, capsys, "--lr-decay")
    argv = ["--load-path", str(run_dir), "--epochs", "2", "--lrs", "0.05", "0.02"]
    assert main_fast.main([*argv, "--wds", "1e-3", "2e-3"]) == 0
    out, err = capsys.readouterr()
    assert "notice: --lrs 0.05 0.02 replaces the saved values from epoch 1 on" in out
    assert "ignored" not in err

    def cosine(lr: float, epoch: int) -> float:  # CosineAnnealingLR(T_max=100, eta_min=1e-5)
        return 1e-5 + (lr - 1e-5) * (1 + math.cos(math.pi * epoch / 100)) / 2

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    groups = checkpoint["optimizer_state"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([cosine(0.05, 2), cosine(0.02, 2)])
    assert [g["weight_decay"] for g in groups] == [1e-3, 2e-3]
    assert checkpoint["scheduler_state"]["base_lrs"] == [0.05, 0.02]
    assert checkpoint["args"]["lrs"] == [0.05, 0.02]
    rows = runs.read_results(run_dir)
    assert rows[1]["lr"] == pytest.approx(cosine(0.05, 1))  # the rate epoch 2 trained with
    text = (run_dir / "hyperparameters.txt").read_text()
    assert "lrs: [0.05, 0.02] (from epoch 1)\nwds: [0.001, 0.002] (from epoch 1)" in text


def test_resume_of_a_vector_field_run_gives_backward_weights_their_synapse_rates(tmp_path, capsys):
    """VFCNN here: conv W_0, readout W_1 and the readout's backward weights B_1, three param
    groups for two synapses. ``--lrs`` / ``--wds`` on a resume take one value per synapse, and
    B_1 takes W_1's (as a new run gives it)."""
    run_dir = saved_run(tmp_path, capsys, "--model", "VFCNN", "--lr-decay")
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(saved["optimizer_state"]["param_groups"]) == 3
    assert "backward_synapses.0.weight" in saved["model_state"]
    argv = ["--load-path", str(run_dir), "--epochs", "2", "--lrs", "0.05", "0.02"]
    assert main_fast.main([*argv, "--wds", "1e-3", "2e-3"]) == 0
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    groups = checkpoint["optimizer_state"]["param_groups"]
    decayed = (1 + math.cos(math.pi * 2 / 100)) / 2  # CosineAnnealingLR(T_max=100) at epoch 2
    expected = [1e-5 + (lr - 1e-5) * decayed for lr in (0.05, 0.02, 0.02)]
    assert [g["lr"] for g in groups] == pytest.approx(expected, abs=1e-15)
    assert [g["weight_decay"] for g in groups] == [1e-3, 2e-3, 2e-3]
    assert checkpoint["scheduler_state"]["base_lrs"] == [0.05, 0.02, 0.02]


# --------------------------------------------------------------- 8. leftovers and file modes


def test_files_follow_the_umask_and_leftover_temp_files_are_removed(tmp_path, capsys):
    old_mask = os.umask(0o002)
    try:
        run_dir = saved_run(tmp_path, capsys)
    finally:
        os.umask(old_mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()}
    assert {"checkpoint.pt", "model.pt", "accuracy.png", "results.csv"} <= set(modes)
    assert set(modes.values()) == {0o664}, modes
    leftover = run_dir / ".checkpoint.pt.k2j4x9.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    assert not leftover.exists()
    assert f"removed {leftover.name}, left by an interrupted write" in capsys.readouterr().out


# --------------------------------------------------------------- 9. a moved dictionary folder


def test_run_with_a_moved_dictionary_folder_evaluates_and_resumes(tmp_path, capsys):
    dictionary = tmp_path / "dictionary"
    learn = ["--task", "DIGITS", "--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1",
             "--epochs", "1", "--lca-iters", "5", "--subset-fraction", "0.3", "--max-batches", "1",
             "--out-dir", str(dictionary)]  # fmt: skip
    assert cifar_dictlearning.main(learn) == 0
    results = tmp_path / "results"
    argv = LCACNN + ["--dict_training", "pretrained", "--dict-path", str(dictionary), "--save"]
    assert main_fast.main([*argv, "--results-dir", str(results)]) == 0
    run_dir = run_dir_of(results)
    dictionary.rename(tmp_path / "moved")
    capsys.readouterr()
    for load_path in (run_dir, run_dir / "checkpoint.pt"):
        assert main_fast.main(["--todo", "evaluate", "--load-path", str(load_path)]) == 0
    out = capsys.readouterr().out
    assert "evaluate model.pt (epoch 1" in out and "evaluate checkpoint.pt (epoch 1" in out
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0


# --------------------------------------------------------------- 10. missing data: one line


def test_missing_dataset_is_one_line(tmp_path, capsys):
    argv = with_cifar = DIGITS_CNN + ["--task", "CIFAR10", "--no-download"]
    argv = [*with_cifar, "--data-dir", str(tmp_path), "--channels", "4", "--kernels", "3"]
    line = one_error_line(run_failing(argv, capsys))
    assert f"CIFAR10 data not found in {tmp_path} (downloading is off): put data_batch_1" in line
    assert "--task DIGITS" in line


# --------------------------------------------------------------- 11. foreign pickles


def test_modified_cifar_files_are_checked_before_torchvision_unpickles_them(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    order = []
    real_check = data_loading._DataOnlyUnpickler.load
    real_load = pickle.load

    def checked(self):
        order.append("restricted")
        return real_check(self)

    def unrestricted(*args, **kwargs):
        order.append("unrestricted")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data_loading._DataOnlyUnpickler, "load", checked)
    monkeypatch.setattr(tv_cifar.pickle, "load", unrestricted)
    with pytest.warns(UserWarning, match="official checksums"):
        data_loading.build_datasets("CIFAR10", tmp_path, download=False)
    assert order[:7] == ["restricted"] * 7 and "unrestricted" in order


# --------------------------------------------------------------- test setup


@pytest.mark.parametrize(("given", "threads"), [("2", "2 2"), (None, "1 1")])
def test_conftest_gives_one_thread_unless_omp_num_threads_is_set(given, threads):
    code = (
        "import conftest, os, torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update({} if given is None else {"OMP_NUM_THREADS": given})
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "tests", env=env, capture_output=True, text=True,
        timeout=WAIT,
    )  # fmt: skip
    assert result.stdout.strip() == threads, result.stderr
