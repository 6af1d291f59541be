"""Helpers the test files share: command lines of tiny runs, their run folders and outputs,
the seed README's commands, failures injected into training, child processes and the events
that tests wait on."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import main_fast
import utils_ep_fast

ROOT = Path(__file__).resolve().parents[1]
WAIT = 180  # seconds any child process may take (a slow, busy machine imports torch slowly)

# The seed README's four training commands, verbatim.
SEED_COMMANDS = {
    "rcnn": "python main_fast.py --model 'CNN' --task 'CIFAR10' --data-aug --channels 64 128 256 "
    "512 --kernels 3 3 3 3 --pools 'mmmm' --strides 1 1 1 1 --paddings 1 1 1 1 --fc 10 --optim "
    "'sgd' --lrs 0.25 0.15 0.1 0.08 0.05 --wds 3e-4 3e-4 3e-4 3e-4 3e-4  --mmt 0.9 --lr-decay "
    "--epochs 35 --act 'my_hard_sig' --todo 'train' --T1 250 --T2 50 --mbs 128 --alg 'EP' "
    "--betas 0.0 1.0 --thirdphase --loss 'cel' --softmax --save",
}
_LCA_SEED = (
    "python main_fast.py --model LCACNN --task CIFAR10 --data-aug --channels 64 256 512 "
    "--kernels 3 3 3 --pools immmm --strides 1 1 1 1 --paddings 1 1 1 1 --fc 10 --optim sgd "
    "--lrs 0.25 0.15 0.1 0.08 --wds 3e-4 3e-4 3e-4 3e-4 3e-4 --mmt 0.9 --lr-decay --epochs 120 "
    "--act my_hard_sig --todo train --T1 250 --T2 50 --mbs 128 --alg EP --betas 0.0 0.5 "
    "--scale 0.5 --thirdphase --loss cel --softmax --save --seed 2 --lca_feats 64 --lca_lambda "
    "0.25 --lca_tau 100 --lca_eta 0.05 --lca_iters 600 --lca_stride 2 --lca_ksize 9 "
    "--dict_training {mode}"
)
for _mode in ("pretrained", "finetune", "learn"):
    SEED_COMMANDS[_mode] = _LCA_SEED.format(mode=_mode)

# A tiny CNN on the bundled DIGITS data: 8x8 -> 4 maps of 4x4 -> 10 classes, one batch per epoch.
DIGITS_CNN = ["--model", "CNN", "--task", "DIGITS", "--channels", "4", "--kernels", "3",
              "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.1",
              "0.1", "--T1", "3", "--T2", "2", "--mbs", "720", "--seed", "0"]  # fmt: skip
LCACNN = ["--model", "LCACNN", "--task", "DIGITS", "--channels", "4", "8", "--kernels", "3",
          "--strides", "1", "--paddings", "1", "--pools", "im", "--fc", "10", "--lrs", "0.1",
          "0.1", "--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1", "--lca_iters", "5",
          "--T1", "3", "--T2", "2", "--mbs", "720"]  # fmt: skip


# The same CNN with six batches of 256 an epoch.
DIGITS_CNN_BATCHED = [*DIGITS_CNN[:-4], "--mbs", "256", "--seed", "0"]


def seed_argv(name: str) -> list[str]:
    return shlex.split(SEED_COMMANDS[name])[2:]


def only_run_dir(results: Path) -> Path:
    runs = sorted(results.glob("*/*/*/*/*/run_*"))
    assert len(runs) == 1, runs
    return runs[0]


def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_failing(argv: list[str], capsys, status: int = 2) -> str:
    """Run ``argv``, check the exit status and that stderr holds no traceback; return stderr."""
    assert main_fast.main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def run_dir_of(results: Path) -> Path:
    (run_dir,) = results.glob("*/*/*/*/*/run_*")
    return run_dir


def fail_in_epoch(monkeypatch, epoch: int, failure) -> None:
    """Make ``failure(model)`` happen right after the first batch of ``epoch`` (1 batch/epoch)."""
    real_train_batch = utils_ep_fast.train_batch
    calls = []

    def train_batch(model, *args, **kwargs):
        free = real_train_batch(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == epoch:
            failure(model)
        return free

    monkeypatch.setattr(utils_ep_fast, "train_batch", train_batch)


def start(argv: list[str], cwd: Path = ROOT, env: dict | None = None) -> subprocess.Popen:
    """A child ``python`` process running ``argv``, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition, what: str) -> None:
    """Poll ``condition`` (an event: a file appearing, a line printed) until it holds, for at
    most ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
