"""--tensorboard under torchrun: two processes write one event stream (rank 0's), whose epoch
tags equal results.csv's values."""

from __future__ import annotations

from helpers import DIGITS_CNN_BATCHED, only_run_dir, read_csv
from test_distributed import torchrun
from test_tensorboard_runs import BATCHES, CSV_TAGS, curve, events, f32


def test_two_processes_write_one_event_stream(tmp_path):
    argv = [*DIGITS_CNN_BATCHED, "--epochs", "2", "--save", "--tensorboard", "--log-every", "3",
            "--device", "cpu", "--results-dir", str(tmp_path / "results")]  # fmt: skip
    done = torchrun(2, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "results")
    files = sorted(path for path in (run_dir / "tb").rglob("*") if path.is_file())
    folders = [path.parent.relative_to(run_dir / "tb").as_posix() for path in files]
    assert folders == [".", "hparams"]  # one writer: the run's stream and its hparams sub-run
    log = events(run_dir / "tb")
    rows = read_csv(run_dir)
    for column, tag in CSV_TAGS.items():
        expected = [(BATCHES * (k + 1), f32(row[column])) for k, row in enumerate(rows)]
        assert curve(log, tag) == expected, tag
    assert [step for step, _ in curve(log, "train/running_acc")] == [3, 6, 9, 12]
