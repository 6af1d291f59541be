"""Helpers the test files share: command lines of tiny runs, their run folders and outputs,
the seed README's commands, failures injected into training, child processes and the events
that tests wait on, two-process runs under ``torchrun``, and the small classifier the attack
tests share, and the examples of docs/extending.md executed as written."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import main_fast
import utils_ep_fast

ROOT = Path(__file__).resolve().parents[1]
WAIT = 180  # seconds any child process may take (a slow, busy machine imports torch slowly)
TORCHRUN_TIMEOUT = 300  # seconds a two-process torchrun run may take


@contextmanager
def docs_example(defines: str, module_name: str, **names) -> Iterator[types.ModuleType]:
    """The python block of docs/extending.md that holds ``defines`` (e.g. ``"class SkipCNN"``),
    executed as written in a module of its own, ``module_name``, which first holds ``names``
    (what the block takes from the file it is written for); the module is in ``sys.modules``
    within the block (dataclasses look their module up)."""
    text = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [block for block in blocks if defines in block]
    module = types.ModuleType(module_name)
    module.__dict__.update(names)
    sys.modules[module_name] = module
    try:
        exec(compile(block, "docs/extending.md", "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module_name]


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


def first_line(child: subprocess.Popen) -> str:
    """The first line ``child`` prints (text mode), waited for at most ``WAIT`` seconds: a
    reader thread, so that a child that never prints fails the test instead of hanging it."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(child.stdout.readline()), daemon=True)
    reader.start()
    reader.join(WAIT)
    assert lines, "timed out waiting for the child's first line"
    return lines[0]


def wait_for(condition, what: str) -> None:
    """Poll ``condition`` (an event: a file appearing, a line printed) until it holds, for at
    most ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def saved_run(results: Path, capsys, *extra: str) -> Path:
    """A finished one-epoch DIGITS run folder under ``results`` (its output read away)."""
    assert main_fast.main(DIGITS_CNN + ["--save", "--results-dir", str(results), *extra]) == 0
    capsys.readouterr()
    return run_dir_of(results)


def one_error_line(err: str) -> str:
    """The error message that ends ``err`` (after any progress bars), asserting that it is
    one ``error:`` line and the only one."""
    lines = err.strip().splitlines()
    assert lines[-1].startswith(("error: ", "cifar_dictlearning.py: error: ")), err
    assert err.count("error: ") == 1, err
    return lines[-1]


def printed_args(line: str, script: str, launch: Path | None = None) -> list[str]:
    """The arguments of a printed continue command, ``cd LAUNCH && python /CHECKOUT/SCRIPT
    ARGS``, checked to start from ``launch`` (default: this process's folder) and to name the
    checkout's ``script`` by its absolute path."""
    cd, command = line.strip().split(" && ", 1)
    assert shlex.split(cd) == ["cd", str(launch or Path.cwd())], line
    words = shlex.split(command)
    assert words[:2] == ["python", str(ROOT / script)], line
    return words[2:]


def robustness_argv(run_dir: Path, *extra: str) -> list[str]:
    return ["robustness.py", "--load-path", str(run_dir), "--device", "cpu", "--n-samples",
            "20", "--attacks", "pgd-linf", "--gradients", "bptt", *extra]  # fmt: skip


def torchrun(
    nproc: int, argv: list[str], cwd: Path, script: Path = ROOT / "main_fast.py", env=None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc script argv`` in ``cwd``, one thread per
    process, killed after TORCHRUN_TIMEOUT seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(script), *argv]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=TORCHRUN_TIMEOUT,
    )  # fmt: skip


def digits_classifier(n_images: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A logistic regression on the 8x8 digits (float32), and ``n_images`` held-out images in
    [0, 1] with their labels."""
    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(pixels[:1500]), labels[:1500]).backward()
        optimizer.step()
    model.requires_grad_(False)
    return model.eval(), pixels[1500 : 1500 + n_images], labels[1500 : 1500 + n_images]


def autograd_gradient(model: nn.Module):
    """The reference input gradient: autograd of ``sum_b A(z_b)`` through ``model``."""

    def gradient(pixels, cost):
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(cost.value(model(pixels)).sum(), pixels)[0]

    return gradient


# --------------------------------------------------------------------------- legacy run folders

LEGACY_SOURCE = ROOT / "tests" / "legacy_runs"
LEGACY_RECORDS = "records.json"  # each saved .pt of a legacy run, as text


def decode_record(value):
    """A value of ``records.json`` back as ``torch.load`` gave it: tensors from their dtype,
    shape and raw bytes (base64), tuples and dicts with any keys from their tagged forms."""
    if isinstance(value, list):
        return [decode_record(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        raw = bytearray(base64.b64decode(value["tensor"]))
        dtype = getattr(torch, value["dtype"])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return flat.reshape(value["shape"]).clone()
    if "tuple" in value:
        return tuple(decode_record(item) for item in value["tuple"])
    return {decode_record(key): decode_record(item) for key, item in value["items"]}


def write_legacy_runs(target: Path) -> Path:
    """The legacy run folders of ``tests/legacy_runs`` written under ``target``: their text
    files copied, and each ``.pt`` file of ``records.json`` saved with ``torch.save`` in the
    format the older code wrote it. Returns ``target``."""
    for source in sorted(p for p in LEGACY_SOURCE.iterdir() if p.is_dir()):
        run_dir = target / source.name
        shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns(LEGACY_RECORDS))
        saved = json.loads((source / LEGACY_RECORDS).read_text())
        for filename, record in saved.items():
            torch.save(decode_record(record), run_dir / filename)
    return target
