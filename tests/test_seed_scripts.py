"""run/seeds.sh (one command over several seeds) and run/slurm_seeds.sh (a SLURM job-array
task), run with the scheduler's variables set by hand and a stand-in ``scontrol`` that records
its arguments: the seed each gives, the run folder a task resumes on its second start, and the
requeue after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiment import records, runs
from tests.helpers import DIGITS_CNN, ROOT, WAIT, wait_for

SEEDS_SH = ROOT / "run" / "seeds.sh"
SLURM_SH = ROOT / "run" / "slurm_seeds.sh"
# a command that writes its arguments (after the file name) to the file it is given
WRITE_ARGV = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')"
RECORD_ARGV = [sys.executable, "-c", WRITE_ARGV]


def bash(script: Path, *args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=WAIT, **kwargs)  # fmt: skip


@pytest.fixture
def slurm_env(tmp_path) -> dict:
    """An array task's variables, and ``scontrol`` on the PATH writing its arguments to
    ``scontrol.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
            "SLURM_ARRAY_JOB_ID": "1230", "SLURM_ARRAY_TASK_ID": "2"}  # fmt: skip


def test_seeds_sh_runs_the_command_once_per_seed(tmp_path):
    log = tmp_path / "argv.txt"
    done = bash(SEEDS_SH, 0, 1, 5, "--", *RECORD_ARGV, log, "--epochs", "3", "out{seed}")
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [
        f"--epochs 3 out{seed} --seed {seed}" for seed in (0, 1, 5)
    ]


def test_seeds_sh_keeps_a_given_seed_flag_and_reports_a_failure(tmp_path):
    log = tmp_path / "argv.txt"
    done = bash(SEEDS_SH, 3, 4, "--", *RECORD_ARGV, log, "--seed", "{seed}")
    assert done.returncode == 0
    assert log.read_text().splitlines() == ["--seed 3", "--seed 4"]
    failing = bash(SEEDS_SH, 1, 2, "--", "bash", "-c", "exit 3")
    assert failing.returncode == 3
    assert "seed 1 failed with status 3" in failing.stderr
    assert "seed 2 failed with status 3" in failing.stderr


def test_seeds_sh_refuses_a_bad_seed(tmp_path):
    done = bash(SEEDS_SH, 1, "x", "--", "true")
    assert done.returncode == 2 and "seed 'x'" in done.stderr


def test_slurm_task_takes_its_seed_from_the_array_index(tmp_path, slurm_env):
    log = tmp_path / "argv.txt"
    env = {**slurm_env, "SEED_OFFSET": "10"}
    done = bash(SLURM_SH, tmp_path / "runs", *RECORD_ARGV, log, "--epochs", "3", env=env)
    assert done.returncode == 0, done.stderr
    expected = f"--epochs 3 --seed 12 --save --load-path {tmp_path / 'runs' / 'seed_12'}"
    assert log.read_text().splitlines() == [expected]
    assert not (tmp_path / "scontrol.log").exists()  # finished: nothing requeued


def test_slurm_task_refuses_a_missing_index_and_a_seed_of_its_own(tmp_path, slurm_env):
    env = {**slurm_env, "SLURM_ARRAY_TASK_ID": ""}
    done = bash(SLURM_SH, tmp_path / "runs", "true", env=env)
    assert done.returncode == 2 and "SLURM_ARRAY_TASK_ID" in done.stderr
    done = bash(SLURM_SH, tmp_path / "runs", "true", "--seed", "1", env=slurm_env)
    assert done.returncode == 2 and "--seed" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_slurm_task_passes_sigterm_on_and_requeues_itself(tmp_path, slurm_env):
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
             f"pathlib.Path({str(ready)!r}).write_text('up')\n"
             "time.sleep(600)\n")  # fmt: skip
    task = subprocess.Popen(["bash", str(SLURM_SH), str(tmp_path / "runs"), sys.executable, "-c",
                             child], env={**os.environ, **slurm_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(ready.is_file, "the task's command to start")
        task.send_signal(signal.SIGTERM)
        out, _ = task.communicate(timeout=WAIT)
    finally:
        task.kill()
    assert task.returncode == 143
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "1230_2"]
    assert "requeueing 1230_2" in out


@pytest.mark.slow
def test_slurm_task_starts_a_run_and_a_second_start_resumes_it(tmp_path, slurm_env):
    runs_dir = tmp_path / "runs"
    flags = [a for a in DIGITS_CNN if a not in ("--seed", "0")]
    first = bash(SLURM_SH, runs_dir, sys.executable, "main_fast.py", *flags, "--epochs", "1",
                 env=slurm_env, cwd=ROOT)  # fmt: skip
    assert first.returncode == 0, first.stderr
    run_dir = runs_dir / "seed_2"
    checkpoint = records.load_checkpoint(run_dir)
    assert records.run_flags(checkpoint)["seed"] == 2 and checkpoint["epoch"] == 1
    first_row = runs.read_results(run_dir)[0]
    second = bash(SLURM_SH, runs_dir, sys.executable, "main_fast.py", *flags, "--epochs", "2",
                  env=slurm_env, cwd=ROOT)  # fmt: skip
    assert second.returncode == 0, second.stderr
    rows = runs.read_results(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2] and rows[0] == first_row
    assert "resumed:" in (run_dir / "hyperparameters.txt").read_text()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in runs_dir.iterdir()) == ["seed_2"]
