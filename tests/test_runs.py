"""experiment/runs.py: run folders (layout and numbering), hyperparameters.txt and
results.csv, one command line that starts a run and, after a preemption, resumes it, and resumes
that change the learning rates and weight decays."""

from __future__ import annotations

import datetime
import math
import shlex

import numpy as np
import pytest
import torch
from helpers import (
    DIGITS_CNN,
    fail_in_epoch,
    saved_run,
)

import main_fast
from experiment import entry, records, runs, storage
from experiment.entry import UsageError

# ------------------------------------------------------------------------ run folders and logs


def test_make_run_dir_layout_and_numbering(tmp_path):
    day = datetime.date(2024, 5, 6)
    first = runs.make_run_dir(tmp_path, "CIFAR10", "EP", "LCACNN", "learn", date=day)
    assert first == tmp_path / "CIFAR10" / "EP" / "LCACNN" / "learn" / "2024-05-06" / "run_1"
    assert first.is_dir()
    assert runs.make_run_dir(tmp_path, "CIFAR10", "EP", "LCACNN", "learn", date=day).name == "run_2"
    (first.parent / "run_7").mkdir()
    (first.parent / "notes_9").mkdir()
    assert runs.make_run_dir(tmp_path, "CIFAR10", "EP", "LCACNN", "learn", date=day).name == "run_8"
    none = runs.make_run_dir(tmp_path, "MNIST", "EP", "CNN", None)
    assert none.parent.parent.name == "none"
    assert none.parent.name == datetime.date.today().isoformat() and none.name == "run_1"


def test_write_hyperparameters_and_append_text(tmp_path):
    argv = ["main_fast.py", "--model", "CNN", "--note", "two words", "--lrs", "0.1", "0.05"]
    runs.write_hyperparameters(
        tmp_path, argv, {"model": "CNN", "note": "two words", "lrs": [0.1, 0.05]}
    )
    lines = (tmp_path / "hyperparameters.txt").read_text().splitlines()
    assert lines[0] == "main_fast.py --model CNN --note 'two words' --lrs 0.1 0.05"
    assert shlex.split(lines[0]) == argv
    assert lines[1:] == ["model: CNN", "note: two words", "lrs: [0.1, 0.05]"]

    storage.append_text(tmp_path, "log.txt", "epoch 1")
    storage.append_text(tmp_path, "log.txt", "epoch 2\n")
    assert (tmp_path / "log.txt").read_text() == "epoch 1\nepoch 2\n"


def test_results_csv_round_trip(tmp_path):
    runs.append_results_row(
        tmp_path,
        {"epoch": 1, "train_acc": 0.1234567890123, "test_acc": torch.tensor(0.5), "lr": 0.1},
    )
    runs.append_results_row(
        tmp_path, {"lr": 0.05, "epoch": 2, "test_acc": 0.75, "train_acc": np.float32(0.25)}
    )
    text = (tmp_path / "results.csv").read_text().splitlines()
    assert text[0] == "epoch,train_acc,test_acc,lr" and len(text) == 3
    rows = runs.read_results(tmp_path)
    assert rows == [
        {"epoch": 1.0, "train_acc": 0.1234567890123, "test_acc": 0.5, "lr": 0.1},
        {"epoch": 2.0, "train_acc": 0.25, "test_acc": 0.75, "lr": 0.05},
    ]
    with pytest.raises(ValueError, match="columns"):
        runs.append_results_row(tmp_path, {"epoch": 3, "train_acc": 0.3})
    # A row cut short by a crash is dropped, the complete ones are kept.
    with open(tmp_path / "results.csv", "a") as f:
        f.write("3,0.5")
    assert len(runs.read_results(tmp_path)) == 2
    with pytest.raises(UsageError, match="not found"):
        runs.read_results(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------- resumes


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
    assert records.run_flags(checkpoint)["lrs"] == [0.05, 0.02]
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
