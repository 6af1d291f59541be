"""Shared test setup: the repository root importable, a headless matplotlib, and two torch
threads unless OMP_NUM_THREADS says otherwise; and the helpers of the command-line tests."""

import csv
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(2)


# A tiny digits CNN for command-line runs (one epoch takes a second or two).
DIGITS_CNN = ["--model", "CNN", "--task", "DIGITS", "--channels", "4", "--kernels", "3",
              "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.1",
              "0.1", "--T1", "3", "--T2", "2", "--mbs", "256", "--seed", "0"]  # fmt: skip


def only_run_dir(results: Path) -> Path:
    """The one run folder under a results directory."""
    runs = sorted(results.glob("*/*/*/*/*/run_*"))
    assert len(runs) == 1, runs
    return runs[0]


def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
