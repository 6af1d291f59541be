"""main_fast.py on bad input, crashes and interrupts: a clear message, a non-zero exit, no
traceback, and a run folder that can still be resumed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DIGITS_CNN,
    LCACNN,
    ROOT,
    fail_in_epoch,
    one_error_line,
    printed_args,
    run_dir_of,
    run_failing,
    saved_run,
)

import main_fast
from experiment.records import save_dictionary
from lca import LCAConv2D


def with_flag(argv: list[str], flag: str, *values: str) -> list[str]:
    """``argv`` with the values of ``flag`` replaced (the flag is appended if absent)."""
    if flag not in argv:
        return [*argv, flag, *values]
    start = argv.index(flag)
    end = start + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return [*argv[:start], flag, *values, *argv[end:]]


@pytest.mark.parametrize(
    "flag, values, message",
    [
        ("--channels", ["4", "8"], r"--kernels needs 2 values \(one per conv layer: 2 for"),
        ("--fc", ["16", "10"], r"--lrs needs 3 values \(one per synapse, 3 here\)"),
        ("--pools", ["x"], r"--pools letters must be m, a or i; got x"),
        ("--pools", [""], r"--pools needs 1 values \(one per entry of --channels\)"),
        ("--act", ["relu"], r"argument --act: invalid choice: 'relu'"),
        ("--model", ["RNN"], r"argument --model: invalid choice: 'RNN'"),
        ("--task", ["CIFAR11"], r"unknown task 'CIFAR11'"),
        ("--optim", ["rmsprop"], r"argument --optim: invalid choice"),
        ("--betas", ["0.5"], r"--betas takes exactly two numbers"),
        ("--betas", ["0.0", "0.5", "1.0"], r"--betas takes exactly two numbers"),
        ("--betas", ["0.0", "0.0"], r"EP needs a nudging beta2 that is non-zero"),
        ("--betas", ["0.0", "nan"], r"--betas: beta2 is nan; give two finite numbers"),
        ("--lrs", ["0.1", "-1"], r"--lrs must be a finite number in \[0, 3.40282e\+38\], got -1"),
        ("--wds", ["0", "inf"], r"--wds must be a finite number in \[0, "),
        ("--mmt", ["1.5"], r"--mmt must be a finite number in \[0, 1\), got 1.5"),
        ("--lca_lambda", ["nan"], r"--lca_lambda must be a finite number in \[0, inf\), got nan"),
        ("--lca_tau", ["nan"], r"--lca_tau must be a finite number in \(0, inf\), got nan"),
        ("--lca_eta", ["-0.1"], r"--lca_eta must be a finite number in \[0, inf\), got -0.1"),
        ("--scale_feedback", ["nan"], r"--scale_feedback must be a finite number in \(-inf, inf\)"),
        ("--scale", ["nan"], r"--scale must be a finite number in \(0, inf\), got nan"),
        ("--fc", ["12"], r"the last --fc size must be the 10 classes of DIGITS"),
        ("--channels", ["4", "0"], r"--channels must be at least 1"),
        ("--epochs", ["0"], r"--epochs must be at least 1"),
        ("--T1", ["ten"], r"argument --T1: invalid int value: 'ten'"),
        ("--device", ["gpu"], r"--device takes a GPU index or 'cpu'"),
        ("--kernels", ["11"], r"conv layer 1 leaves no pixels"),
    ],
)
def test_bad_flag_values(flag, values, message, capsys):
    err = run_failing(with_flag(DIGITS_CNN, flag, *values), capsys)
    assert re.search(f"^error: {message}", err, re.M), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (LCACNN, "LCACNN needs --dict_training pretrained, finetune or learn"),
        (with_flag(LCACNN, "--lca_feats", "6") + ["--dict_training", "learn"],
         "must equal --lca_feats (6), got 4"),
        (with_flag(LCACNN, "--pools", "mm") + ["--dict_training", "learn"],
         "--pools must start with i (the copy layer)"),
        (with_flag(LCACNN, "--lca_ksize", "4") + ["--dict_training", "learn"],
         "--lca_ksize must be odd"),
        (["--model", "MLP", "--task", "DIGITS", "--archi", "784", "10", "--lrs", "0.1"],
         "--archi must start with the 64 input pixels of DIGITS"),
        (["--model", "MLP", "--task", "DIGITS", "--archi", "64", "10"], "--lrs is required"),
        (["--todo", "evaluate"], "--todo evaluate needs --load-path"),
        (with_flag(DIGITS_CNN, "--alg", "BPTT") + ["--T2", "5"], "T2 (5) > T1"),
    ],
)  # fmt: skip
def test_inconsistent_settings(argv, message, capsys):
    assert message in run_failing(argv, capsys)


def test_extra_trailing_values_are_dropped_with_a_warning(capsys):
    argv = with_flag(DIGITS_CNN, "--kernels", "3", "5", "7") + ["--wds", "0", "0", "1e-4"]
    assert main_fast.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: --kernels: one per conv layer: 1 for --channels 4, so the first 1 values " \
           "are used; ignoring 5 7" in err  # fmt: skip
    assert "warning: --wds: one per synapse, 2 here, so the first 2 values are used; " \
           "ignoring 0.0001" in err  # fmt: skip


def test_missing_dataset_names_folder_and_files(tmp_path, capsys):
    argv = ["--model", "CNN", "--task", "CIFAR10", "--channels", "4", "--kernels", "3",
            "--strides", "1", "--paddings", "1", "--pools", "m", "--lrs", "0.1", "0.1",
            "--data-dir", str(tmp_path), "--no-download"]  # fmt: skip
    err = run_failing(argv, capsys)
    assert str(tmp_path / "cifar-10-batches-py") in err and "data_batch_1" in err


def test_missing_and_corrupt_dictionary(tmp_path, capsys):
    dict_path = tmp_path / "dictionary.pt"
    argv = LCACNN + ["--dict_training", "pretrained", "--dict-path", str(dict_path)]
    err = run_failing(argv, capsys)
    assert f"'{dict_path}' not found: run cifar_dictlearning.py first" in err
    dict_path.write_bytes(b"not a dictionary")
    assert "could not be read" in run_failing(argv, capsys)
    save_dictionary(str(dict_path), LCAConv2D(6, 1, kernel_size=3, stride=1))
    assert "expected shape (4, 1, 3, 3), found (6, 1, 3, 3)" in run_failing(argv, capsys)
    # a dictionary of the right shape but no subset indices beside it
    save_dictionary(str(dict_path), LCAConv2D(4, 1, kernel_size=3, stride=1))
    assert "subset indices file" in run_failing(argv, capsys)


def test_missing_and_corrupt_checkpoint(tmp_path, capsys):
    err = run_failing(["--load-path", str(tmp_path), "--epochs", "2"], capsys)
    assert f"--load-path {tmp_path} is not a run folder to resume: it has no checkpoint.pt" in err
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    err = run_failing(["--load-path", str(tmp_path), "--epochs", "2"], capsys)
    assert "it is corrupt or not a checkpoint" in err
    torch.save({"epoch": 1}, tmp_path / "checkpoint.pt")
    err = run_failing(["--load-path", str(tmp_path), "--epochs", "2"], capsys)
    assert "is not a checkpoint written by main_fast.py" in err
    err = run_failing(["--todo", "evaluate", "--load-path", str(tmp_path)], capsys)
    assert f"model file not found: {tmp_path / 'final_model.pt'}" in err


def test_resume_of_a_finished_run_asks_for_more_epochs(tmp_path, capsys):
    assert main_fast.main(DIGITS_CNN + ["--save", "--results-dir", str(tmp_path)]) == 0
    run_dir = run_dir_of(tmp_path)
    err = run_failing(["--load-path", str(run_dir)], capsys)
    assert "already has 1 epochs; pass --epochs N with N > 1" in err


def test_a_requeue_of_a_finished_run_exits_0_writing_nothing(tmp_path, capsys):
    assert main_fast.main(DIGITS_CNN + ["--save", "--results-dir", str(tmp_path)]) == 0
    run_dir = run_dir_of(tmp_path)
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main_fast.main(DIGITS_CNN + ["--save", "--load-path", str(run_dir)]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(
            f"{run_dir}: the run is complete (1 epochs); nothing to do (pass --epochs N with N > 1 "
            "to train further)"
        )
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.mark.parametrize("save", [False, True])
def test_a_folder_that_is_not_a_run_is_left_as_it_was(tmp_path, capsys, save):
    """Exit 2 writes nothing: no lock, and the user's own hidden temp files stay."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / ".draft.tmp").write_text("half a thought")
    (notes / "results.csv").write_text("epoch,train_acc\n")  # with --save: not a new folder
    before = folder_contents(notes)
    err = run_failing(["--load-path", str(notes), "--epochs", "3", *(["--save"] if save else [])],
                      capsys)  # fmt: skip
    assert f"--load-path {notes} is not a run folder to resume" in one_error_line(err)
    assert folder_contents(notes) == before


def test_a_damaged_checkpoint_names_the_fix_and_the_intact_weights(tmp_path, capsys):
    """A requeued job meets a damaged checkpoint.pt on every try: each time the message says
    how to carry on and which weights files are intact, and nothing in the run changes."""
    run_dir = saved_run(tmp_path, capsys)
    shutil.copy(run_dir / "model.pt", run_dir / "interrupted.pt")  # as a stop leaves it
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    before = folder_contents(run_dir)
    for _ in range(2):
        err = run_failing(["--save", "--load-path", str(run_dir), "--epochs", "2"], capsys)
        line = one_error_line(err)
        assert line.startswith(f"error: cannot read {run_dir / 'checkpoint.pt'}: it is corrupt")
        assert "put back a good checkpoint.pt (a copy or backup)" in line
        assert f"to start it over, move {run_dir} aside and run the same command again" in line
        intact = "model.pt (best, epoch 1), interrupted.pt (at a stop, epoch 1), final_model.pt"
        assert f"its weights are intact in {intact} (last, epoch 1)" in line
        assert folder_contents(run_dir) == before


READ_ONLY_SIZE = "size=16m"


@pytest.fixture
def read_only_run(tmp_path, capsys):
    """A finished one-epoch run on a tmpfs that is then made read-only."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", READ_ONLY_SIZE, "tmpfs", str(folder)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("this machine cannot mount a tmpfs to make read-only")
    try:
        run_dir = saved_run(folder, capsys)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield run_dir
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_finished_read_only_run_requeues_and_evaluates(read_only_run, capsys):
    run_dir = read_only_run
    assert main_fast.main(["--save", "--load-path", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir}: the run is complete (1 epochs); nothing to do" in out
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "evaluate model.pt (epoch 1, T1 3, sync): train_acc" in captured.out
    (warning,) = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert f"({run_dir / 'hyperparameters.txt'}): Read-only file system" in warning
    assert "the result above is not recorded in hyperparameters.txt" in warning
    assert "error" not in captured.err


def test_a_results_csv_that_is_not_text_is_refused_with_its_fix(tmp_path, capsys):
    run_dir = saved_run(tmp_path, capsys)
    (run_dir / "results.csv").write_bytes(b"epoch,train_acc\n\xff\xfe1,0.5\n")
    err = run_failing(["--load-path", str(run_dir), "--epochs", "2"], capsys)
    line = one_error_line(err)
    assert line.startswith(f"error: cannot read {run_dir / 'results.csv'}: it is not a CSV text")
    assert line.endswith("move it aside: resuming the run writes it again from checkpoint.pt")


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    def poison(model):
        with torch.no_grad():
            model.synapses[1].weight[0, 0] = float("nan")

    fail_in_epoch(monkeypatch, 2, poison)
    argv = DIGITS_CNN + ["--mbs", "1437", "--epochs", "3", "--save", "--results-dir", str(tmp_path)]
    err = run_failing(argv, capsys, status=1)
    run_dir = run_dir_of(tmp_path)
    assert "training diverged: parameter synapses.1.weight is NaN/inf" in err
    assert f"the last good checkpoint (epoch 1) is in {run_dir}" in err and "--lrs" in err
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())
    assert len((run_dir / "results.csv").read_text().splitlines()) == 2


def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    def interrupt(model):
        raise KeyboardInterrupt

    fail_in_epoch(monkeypatch, 2, interrupt)
    argv = DIGITS_CNN + ["--mbs", "1437", "--epochs", "3", "--save", "--results-dir", str(tmp_path)]
    err = run_failing(argv, capsys, status=130)
    run_dir = run_dir_of(tmp_path)
    saved = torch.load(run_dir / "interrupted.pt", weights_only=True)
    assert saved["epoch"] == 1 and set(saved["model_state"]) == {
        f"synapses.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")
    }
    line = re.search(r"^  (cd .* && python .*main_fast.py .*)$", err, re.M).group(1)
    command = printed_args(line, "main_fast.py")
    assert command == ["--load-path", str(run_dir), "--epochs", "3"]

    monkeypatch.undo()
    assert main_fast.main(command) == 0
    assert torch.load(run_dir / "final_model.pt", weights_only=True)["epoch"] == 3
    assert len((run_dir / "results.csv").read_text().splitlines()) == 4


def test_interrupt_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer_state" in obj:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    argv = DIGITS_CNN + ["--mbs", "1437", "--epochs", "3", "--save", "--results-dir", str(tmp_path)]
    run_failing(argv, capsys, status=130)
    run_dir = run_dir_of(tmp_path)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_entry_point_exits_non_zero_without_traceback():
    result = subprocess.run(
        [sys.executable, "main_fast.py", *DIGITS_CNN, "--betas", "0.0", "0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: EP needs a nudging beta2 that is non-zero")
    assert "Traceback" not in result.stderr
