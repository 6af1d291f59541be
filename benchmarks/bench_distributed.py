"""Data-parallel training on the CPU: time per epoch with 1 and 2 gloo processes at the same
global batch, and the share of a training iteration spent in the gradient all-reduce.

    python benchmarks/bench_distributed.py [--procs 1 2] [--epochs 3] [--mbs 32]

Each process count is one ``torchrun --standalone`` of this script in worker mode, one thread
per process. A worker trains the digits RCNN of ``run/digits_experiments.sh`` (16 -> 32
channels, T1 = 20, T2 = 5) with EP through the engine's ``train_epoch`` on its part of every
global batch (``distributed.split_batches``), and times every call of
``distributed.average_gradients`` (the one flattened all-reduce of all gradients per batch),
after a barrier timed apart: ``wait`` is the time a rank waits for the slowest one (load
imbalance, other jobs), ``allreduce`` the reduction itself. Rank 0 reports medians over
``--epochs`` (the first, a warm-up, is left out when there are more), per iteration and as
shares of the training time, and the speed-up over the first process count. Last, each
process count times the all-reduce of a buffer the size of the seed RCNN's weights (1.57 M
floats, ``--seed-weights``), the cost that data-parallel training of the seed command adds to
every batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, load_average, print_table

import collectives  # noqa: E402
from experiment import (
    data_loading,
    distributed,  # noqa: E402
)
from learning.metrics import Metrics  # noqa: E402
from utils_ep_fast import EP, P_CNN, EPConfig, make_optimizer, train_epoch  # noqa: E402

MODEL = dict(in_size=8, in_channels=1, channels=[16, 32], kernels=[3, 3], strides=[1, 1],
             paddings=[1, 1], pools="mm", fc=[10], activation="my_hard_sig", softmax=True,
             loss="cel")  # fmt: skip
RULE = EP(EPConfig(alg="EP", T1=20, T2=5, betas=(0.0, 0.5), thirdphase=True))
SEED_RCNN_WEIGHTS = 1_571_466  # sum(p.numel() for p in common.seed_cnn().parameters())


def worker(epochs: int, mbs: int) -> int:
    """One rank: train ``epochs`` epochs, time them and the all-reduces; rank 0 prints JSON."""
    import torch

    torch.manual_seed(0)
    model = P_CNN(**MODEL)
    optimizer = make_optimizer(model, "sgd", [0.05, 0.03, 0.02], mmt=0.9)
    train_set, _ = data_loading.build_datasets("DIGITS", "./data", data_aug=False, download=False)
    loader = data_loading.make_loader(train_set, mbs, shuffle=True, seed=0)
    wait_seconds, reduce_seconds = [], []
    average = distributed.average_gradients

    def timed_average(*args) -> None:
        started = time.perf_counter()
        torch.distributed.barrier()
        waited = time.perf_counter()
        average(*args)
        wait_seconds.append(waited - started)
        reduce_seconds.append(time.perf_counter() - waited)

    distributed.average_gradients = timed_average  # split_batches' hook looks it up per call
    batches = distributed.split_batches(loader, optimizer)
    epoch_seconds, epoch_wait, epoch_reduce = [], [], []
    for _ in range(epochs):
        wait_seconds.clear()
        reduce_seconds.clear()
        started = time.perf_counter()
        train_epoch(model, optimizer, batches, RULE, Metrics(distributed.sum_totals))
        epoch_seconds.append(time.perf_counter() - started)
        epoch_wait.append(sum(wait_seconds))
        epoch_reduce.append(sum(reduce_seconds))
    seed_buffer = [torch.ones(SEED_RCNN_WEIGHTS)]
    seed_reduce = []
    for _ in range(10):
        torch.distributed.barrier()
        started = time.perf_counter()
        collectives.sum_over_ranks(seed_buffer)
        seed_reduce.append(time.perf_counter() - started)
    if distributed.is_main_process():
        weights = sum(p.numel() for p in model.parameters())
        record = {"epochs": epoch_seconds, "wait": epoch_wait, "reduce": epoch_reduce,
                  "batches": len(loader), "weights": weights,
                  "seed_reduce": statistics.median(seed_reduce[1:])}  # fmt: skip
        print("RESULT " + json.dumps(record), file=sys.__stdout__, flush=True)
    return 0


def launch(procs: int, epochs: int, mbs: int) -> dict:
    """``torchrun`` this script in worker mode with ``procs`` processes; rank 0's record."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), __file__, "--worker", "--epochs", str(epochs),
               "--mbs", str(mbs)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"torchrun with {procs} processes failed:\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mbs", type=int, default=32, help="global batch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.exit(distributed.run(lambda: worker(args.epochs, args.mbs), "cpu", False, 600))
    print(f"# digits RCNN 16-32, EP T1 20 T2 5 thirdphase, global batch {args.mbs}, "
          f"1 thread per process; load average {load_average()} before")  # fmt: skip
    rows, first_epoch, seed_rows = [], None, []
    for procs in args.procs:
        record = launch(procs, args.epochs, args.mbs)
        timed = slice(1, None) if len(record["epochs"]) > 1 else slice(None)
        epoch, wait, reduce = (statistics.median(record[key][timed])
                               for key in ("epochs", "wait", "reduce"))  # fmt: skip
        first_epoch = first_epoch or epoch
        per_batch = 1e3 / record["batches"]
        rows.append([
            str(procs), str(record["batches"]), f"{epoch:.2f}", f"{epoch * per_batch:.1f}",
            f"{wait * per_batch:.2f}", f"{reduce * per_batch:.2f}", f"{100 * wait / epoch:.1f}",
            f"{100 * reduce / epoch:.1f}", f"{first_epoch / epoch:.2f}", str(record["weights"]),
        ])  # fmt: skip
        seed_rows.append([str(procs), f"{1e3 * record['seed_reduce']:.1f}"])
    header = ["procs", "batches", "epoch_s", "iter_ms", "wait_ms", "allreduce_ms", "wait_%",
              "allreduce_%", "speedup", "weights"]  # fmt: skip
    print_table(header, rows)
    print()
    print_table(["procs", "seed_rcnn_allreduce_ms"], seed_rows)
    print(f"# load average {load_average()} after")


if __name__ == "__main__":
    main()
