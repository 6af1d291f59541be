"""Shared test setup: the repository root importable, a headless matplotlib, and two torch
threads unless OMP_NUM_THREADS says otherwise."""

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
