"""Shared test setup: the repository root importable, a headless matplotlib, and one torch
thread, for the tests and the processes they start, unless OMP_NUM_THREADS says otherwise.

The suite's tensors are tiny (8x8 digits, a few channels): a second thread only adds
synchronisation, and when the machine is busy (a second copy of the suite beside it, a
two-process torchrun test) threads that wait on each other make a test many times slower."""

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
    os.environ["OMP_NUM_THREADS"] = "1"  # the child processes read it
    torch.set_num_threads(1)
