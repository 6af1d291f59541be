"""Shared test setup: the repository root importable, a headless matplotlib, and one torch
thread, for the tests and the processes they start, unless OMP_NUM_THREADS says otherwise;
under pytest-xdist the slow tests start first, and without it the suite runs in one process.

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


def pytest_addoption(parser, pluginmanager):
    """pyproject.toml's addopts run the suite on two pytest-xdist workers (``-n 2 --dist
    loadgroup``). Without pytest-xdist (not installed, or ``-p no:xdist``) these two options
    are accepted here and ignored, and the tests run in this one process."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist", "without pytest-xdist: accepted and ignored")
    # ``-n`` is a lowercase short option, which only pytest's private _addoption allows
    # (pytest-xdist registers it the same way)
    group._addoption("-n", "--numprocesses", dest="numprocesses", default=None)
    group.addoption("--dist", dest="dist", default="no")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the slow tests first (a stable sort): the long runs start early and
    the short tests fill the workers' last minutes, instead of one long test running alone at
    the end. Without xdist the order is the files' own."""
    if hasattr(config, "workerinput"):  # an xdist worker; every worker sorts the same way
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
