"""experiment/entry.py, the entry of every script: how it stops and what it exits with.
Real SIGTERMs and SIGINTs to real child processes (main_fast.py, robustness.py,
cifar_dictlearning.py), signals while the libraries load and in the interpreter's shutdown, a
stop at every kind of safe point resumed bit for bit, signals while a file is written, a third
signal, and the table of exit statuses in docs/runs.md. Every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from helpers import (
    DIGITS_CNN,
    ROOT,
    WAIT,
    printed_args,
    read_csv,
    robustness_argv,
    run_dir_of,
    saved_run,
    start,
    wait_for,
)
from matplotlib.figure import Figure

import cifar_dictlearning
import main_fast
import robustness
from experiment import entry, records, storage

# ------------------------------------------------------- SIGTERM and SIGINT to a child process


@pytest.mark.slow
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
    command = printed_args(err.strip().splitlines()[-1], "main_fast.py", ROOT)
    assert command == ["--load-path", str(run_dir), "--epochs", "100000"]
    done = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    assert torch.load(run_dir / "interrupted.pt", weights_only=True)["epoch"] == done >= 1
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", str(done + 1)]) == 0


@pytest.mark.slow
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
    assert printed_args(command, "robustness.py", ROOT)[:2] == ["--load-path", str(run_dir)]
    rows = storage.read_csv_rows(csv_path)
    assert rows[0]["attack"] == "clean" and rows[1]["attack"] == "pgd-linf"


@pytest.mark.slow
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


@pytest.mark.slow
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


# --------------------------------------- a signal while the libraries load, or in the shutdown


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    args = [str(run) if a == "RUN" else a for a in argv]
    done = signal_on_import(script, module, signame, *args)
    assert done.returncode == status and "Traceback" not in done.stderr, done.stderr
    first, *_, command = done.stderr.strip().splitlines()
    assert first.startswith("terminated (SIGTERM)" if status == 143 else "interrupted")
    assert printed_args(command.removeprefix("continue with: "), script, ROOT) == args
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


@pytest.mark.slow
def test_a_sigterm_in_the_interpreters_shutdown_leaves_a_finished_scripts_status():
    def ending_with(how: str) -> int:
        done = subprocess.run([sys.executable, "-c", SIGTERM_AT_SHUTDOWN, how], cwd=ROOT,
                              capture_output=True, text=True, timeout=WAIT)  # fmt: skip
        return done.returncode

    assert ending_with("sys") == -signal.SIGTERM, "the signal lands after Python's handlers"
    assert ending_with("entry") == 0


# ---------------------------------------------- a stop at every kind of safe point, in-process


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


@pytest.mark.xdist_group("entry_uninterrupted")
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


def run_verbatim(line: str, folder: Path) -> subprocess.CompletedProcess:
    """The shell line ``line``, as printed, run by a shell in ``folder``."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(line, shell=True, cwd=folder, env=environment, capture_output=True,
                          text=True, timeout=WAIT)  # fmt: skip


@pytest.mark.slow
@pytest.mark.xdist_group("entry_uninterrupted")
def test_printed_continue_commands_run_verbatim_from_another_folder(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    """Each script stopped in its work, launched from a folder of its own with relative paths
    that hold a space and an accent: the command it prints runs as printed, by a shell in
    another folder, and finishes the work (training: bit for bit)."""
    reference, sites = uninterrupted
    launch, elsewhere = tmp_path / "launch dir", tmp_path / "élsewhere"
    launch.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(launch)
    run = "rés ults/run 1"

    before_last_saves = [i for i, site in enumerate(sites, 1) if site == "__call__"][2]
    with monkeypatch.context() as patch:
        stop_at_call(patch, before_last_saves)
        assert main_fast.main([*TWO_EPOCHS, "--load-path", run]) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed_args(line, "main_fast.py", launch) == ["--load-path", run, "--epochs", "2"]
    resumed = run_verbatim(line, elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights_and_rows(launch / run, reference)

    evaluation = ["--load-path", run, "--device", "cpu", "--n-samples", "12", "--attacks",
                  "pgd-linf", "--gradients", "bptt", "--eps", "0", "0.1",
                  "--steps", "2"]  # fmt: skip
    with monkeypatch.context() as patch:
        stop_at_call(patch, 3)
        assert robustness.main(evaluation) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed_args(line, "robustness.py", launch) == evaluation
    continued = run_verbatim(line, elsewhere)
    assert continued.returncode == 0, continued.stderr
    rows = storage.read_csv_rows(launch / run / "robustness.csv")
    assert [row["attack"] for row in rows] == ["clean", "pgd-linf", "pgd-linf"]

    dictionary = ["--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
                  "--lca-iters", "5", "--batch-size", "64", "--max-batches", "2", "--epochs",
                  "2", "--device", "cpu", "--seed", "3", "--out-dir", "dict ionary"]  # fmt: skip
    with monkeypatch.context() as patch:
        stop_at_call(patch, 2)
        assert cifar_dictlearning.main(dictionary) == 143
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "continue with: " in line]
    line = line.removeprefix("continue with: ")
    assert printed_args(line, "cifar_dictlearning.py", launch) == dictionary
    continued = run_verbatim(line, elsewhere)
    assert continued.returncode == 0, continued.stderr
    assert len((launch / "dict ionary" / "dictlearning.csv").read_text().splitlines()) == 3


@pytest.mark.xdist_group("entry_uninterrupted")
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


@pytest.mark.slow
def test_a_third_sigterm_ends_the_process_at_once(tmp_path):
    argv = [*TWO_EPOCHS, "--load-path", str(tmp_path / "job")]
    done = subprocess.run(
        [sys.executable, "-c", THIRD_SIGNAL, *argv], cwd=ROOT, capture_output=True, text=True,
        timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert "terminated" not in done.stderr, "it ended at once, without the interrupt's saves"
    assert not (tmp_path / "job" / "interrupted.pt").exists()


# ------------------------------------------------------------------------------- exit statuses


def test_the_exit_status_table_names_every_status_of_the_scripts():
    section = (ROOT / "docs" / "runs.md").read_text().split("## Exit statuses")[1]
    table = section.split("\n## ")[0]
    listed = {int(n) for row in re.findall(r"^\| ([\d /]+) \|", table, re.MULTILINE)
              for n in row.split("/")}  # fmt: skip
    constants = {value for name, value in vars(entry).items() if name.startswith("EXIT_")}
    assert listed == constants
