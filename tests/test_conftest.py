"""tests/conftest.py: the suite and the processes it starts run one torch thread unless
OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import (
    ROOT,
    WAIT,
)


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
