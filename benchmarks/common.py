"""Shared pieces of the benchmarks: the seed models, interleaved timing, and the table printer.

Timing on a shared machine: every repeat runs each variant once, one after the other, so that
load from other jobs falls on all of them alike; a table reports medians over the repeats and,
for ratios, the median of the per-repeat ratios (each taken within one repeat).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lca_utils_ep_fast import LCA_CNN  # noqa: E402
from utils_ep_fast import P_CNN  # noqa: E402

# The seed README's commands (CIFAR-10, 32x32x3 images, 10 classes).
# fmt: off
SEED_CNN = dict(
    in_size=32, in_channels=3,
    channels=[64, 128, 256, 512], kernels=[3] * 4, strides=[1] * 4, paddings=[1] * 4,
    pools="mmmm", fc=[10], activation="my_hard_sig", softmax=True, loss="cel",
)
SEED_LCACNN = dict(
    in_size=32, in_channels=3,
    lca_feats=64, lca_ksize=9, lca_stride=2, lca_lambda=0.25, lca_tau=100, lca_eta=0.05,
    lca_iters=600,
    channels=[64, 256, 512], kernels=[3, 3], strides=[1, 1], paddings=[1, 1], pools="imm",
    fc=[10], activation="my_hard_sig", softmax=True, loss="cel", scale=0.5,
)
# fmt: on


def seed_cnn(seed: int = 0) -> P_CNN:
    """The seed RCNN: 3 -> 64 -> 128 -> 256 -> 512 on 32x32, max-pools, softmax readout 10."""
    torch.manual_seed(seed)
    return P_CNN(**SEED_CNN)


def seed_lcacnn(seed: int = 0, **overrides) -> LCA_CNN:
    """The seed LCACNN: LCA 64 features 9x9 stride 2 (16x16 code), copy layer, convs 256, 512."""
    torch.manual_seed(seed)
    return LCA_CNN(**{**SEED_LCACNN, **overrides})


def cifar_like_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (B, 3, 32, 32) in [0, 1] and labels (B,)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x, y


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> str:
    """The 1-minute load average (other jobs on the machine slow every timing)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def interleaved_times(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of every variant, ``repeats`` times each, the variants taken in turn."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of ``numerator[r] / denominator[r]`` (both timed in repeat r)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    line = "  ".join(f"{name:>{width}}" for name, width in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{cell:>{width}}" for cell, width in zip(row, widths, strict=True)))
