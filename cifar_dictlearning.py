"""Learn a convolutional sparse-coding dictionary with LCA on a random part of a training set.

Each batch is coded by LCA (``lca.LCAConv2D``) and the dictionary takes one step of the
built-in rule ``D += eta * <a, s - D a> / (times_active + 1)`` followed by renormalisation.
The sparsity threshold starts at ``--lambda`` and rises by ``--lambda-increment`` every
``--lambda-every`` epochs (default ``epochs // 7``). The defaults are the original run:
64 features of 9x9 at stride 2 on a random half of CIFAR-10, 35 epochs of batches of 200,
600 LCA iterations, tau 100, eta 0.01, lambda 0.2 -> 0.8.

Written to ``--out-dir`` (default ``./dictionaries/<task>``):
    dictionary.pt         {"weights": (F, C, k, k), "config": LCA settings}, after every epoch
    subset_indices.pt     the training-set indices used here (EP training uses the others)
    dictlearning.csv      one row per epoch: lambda, recon_error, l1_sparsity, frac_active,
                          total_energy (means over the epoch's training samples), seconds
    dictionary.png        the features as a grid
    dictlearning_curves.png  the four metrics against the epoch
    tb/                   with --tensorboard, the TensorBoard log (``run_board``)

One process writes an output folder at a time. Exit statuses and one-line errors are those of
``entry.py``: 0 done, 2 bad input, 74 a file could not be written, 75 another process writes
the folder, 130 Ctrl-C, 143 SIGTERM (the dictionary of the last finished epoch is kept).

Under ``torchrun --nproc_per_node N cifar_dictlearning.py ...`` every batch of ``--mbs`` images
is split over the N processes, which sum the rule's batch terms before each update, so the
dictionary is the one a single process learns (``distributed.py``); rank 0 writes the files.
"""

from __future__ import annotations

import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import argparse
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Sequence
from itertools import islice

import torch
from tqdm import tqdm

import data_utils
import distributed
import records
import run_board
import storage
from data_loading import TASKS, build_datasets, canonical_task, make_loader, task_info
from entry import UsageError
from lca import LCAConv2D, compute_frac_active, compute_l1_sparsity, compute_l2_error

DICTIONARY_FILE = "dictionary.pt"
CSV_FILE = "dictlearning.csv"
GRID_FILE = "dictionary.png"
CURVES_FILE = "dictlearning_curves.png"
METRICS = ("recon_error", "l1_sparsity", "frac_active", "total_energy")
CSV_COLUMNS = ("epoch", "lambda") + METRICS + ("seconds",)
# Range of every float flag, by dest: (low, low excluded?, high, high excluded?); None: no bound.
FLOAT_RANGES = {
    "subset_fraction": (0, True, 1, False),
    "lca_lambda": (0, False, None, False),
    "lambda_increment": (None, False, None, False),
    "lca_tau": (0, True, None, False),
    "lca_eta": (0, False, None, False),
}
FLAGS = {"subset_fraction": "subset-fraction", "lambda_increment": "lambda-increment"}


def build_parser() -> argparse.ArgumentParser:
    """The flags, spelled as ``main_fast.py`` spells the same things (``--lca_feats``,
    ``--mbs``, ``--num-workers``, ...); the older names (``--features``, ``--batch-size``,
    ``--workers``, ...) are kept as aliases. Every flag has dash and underscore spellings."""
    parser = entry.command_parser(
        "cifar_dictlearning.py",
        "Learn an LCA sparse-coding dictionary (defaults: the original CIFAR-10 run).",
    )

    def add(*names: str, **kwargs) -> None:
        dest = names[0][2:].replace("-", "_")
        parser.add_argument(*entry.flag_spellings(*names), dest=dest, **kwargs)

    tasks = ", ".join(TASKS)
    add("--task", default="CIFAR10", help=f"dataset, one of {tasks}")
    add("--data-dir", default="./data", help="where the datasets are (or go)")
    add("--out-dir", default=None, help="output folder; None means ./dictionaries/<task>")
    add("--no-download", action="store_true", help="never download the dataset")
    add("--seed", type=int, default=0, help="seed of the subset, the order and the init")
    add("--device", default="auto", help="GPU index, cuda[:N], auto or cpu")
    add("--num-workers", "--workers", type=int, default=0, help="data loader worker processes")
    add("--epochs", type=int, default=35, help="passes over the subset")
    add("--mbs", "--batch-size", type=int, default=200, help="images per dictionary update")
    add("--subset-fraction", type=float, default=0.5, help="fraction of the training set "
        "drawn at random to learn on")  # fmt: skip
    add("--max-batches", type=int, default=None, help="stop each epoch after N batches")
    add("--lca_feats", "--features", type=int, default=64, help="dictionary features")
    add("--lca_ksize", "--kernel-size", type=int, default=9, help="feature size (odd)")
    add("--lca_stride", "--stride", type=int, default=2, help="feature stride")
    add("--lca_lambda", "--lambda", type=float, default=0.2, help="LCA threshold, first epoch")
    add("--lambda-increment", type=float, default=0.1, help="added to lambda every "
        "--lambda-every epochs")  # fmt: skip
    add("--lambda-every", type=int, default=None, help="epochs between lambda raises; None "
        "means epochs // 7, 0 never")  # fmt: skip
    add("--lca_iters", type=int, default=600, help="LCA iterations per batch")
    add("--lca_tau", "--tau", type=float, default=100.0, help="LCA time constant")
    add("--lca_eta", "--eta", type=float, default=1e-2, help="dictionary learning rate")
    add("--d-update-clip", type=float, default=math.inf, help="clip each dictionary update "
        "entry to +-this")  # fmt: skip
    add("--tensorboard", action="store_true", help="a TensorBoard log in OUT_DIR/tb/")
    add("--dist-timeout", type=float, default=600.0, help="torchrun: collective timeout (s)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """UsageError for settings that cannot run."""
    positive = ("epochs", "mbs", "lca_feats", "lca_ksize", "lca_stride", "lca_iters")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_batches is not None and args.max_batches < 1:
        raise UsageError("--max-batches must be at least 1")
    entry.check_numbers(args, FLOAT_RANGES, FLAGS)
    entry.check_number("d-update-clip", args.d_update_clip, 0, low_open=True, allow_inf=True)
    if args.lca_ksize % 2 == 0:
        raise UsageError("--lca_ksize must be odd (LCA uses 'same' padding)")
    if args.lambda_every is not None and args.lambda_every < 0:
        raise UsageError("--lambda-every must be >= 0")


def lambda_at_epoch(epoch: int, start: float, increment: float, every: int) -> float:
    """Threshold of (0-based) ``epoch``: ``start + increment * (epoch // every)``; fixed if
    ``every`` is 0."""
    if every <= 0:
        return start
    return round(start + increment * (epoch // every), 12)


def draw_subset(n_items: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted int64 indices of ``round(fraction * n_items)`` items drawn without replacement."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * n_items))
    return torch.randperm(n_items, generator=generator)[:count].sort().values


def learn_one_epoch(
    lca: LCAConv2D,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    max_batches: int | None,
    desc: str,
) -> dict[str, float]:
    """Code every batch, update the dictionary after each; return per-sample means of the
    metrics of the codes (computed before each update). Data-parallel, ``loader`` gives this
    process's part of each batch, and the update and the means are those of whole batches."""
    sums = dict.fromkeys(METRICS, 0.0)
    seen = 0
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    progress = tqdm(islice(loader, total), total=total, desc=desc, leave=False, dynamic_ncols=True)
    for images, _ in progress:
        inputs, acts, recons, errors = lca(images.to(device, non_blocking=True))
        lca.apply_weight_update(*distributed.sum_over_ranks(lca.weight_update_terms(acts, errors)))

        n = images.shape[0]
        if n == 0:  # this process's part of a last batch smaller than the process count
            continue
        recon_error = compute_l2_error(inputs, recons).item()
        l1 = compute_l1_sparsity(acts, lca.lambda_).item()
        sums["recon_error"] += recon_error * n
        sums["l1_sparsity"] += l1 * n
        sums["frac_active"] += compute_frac_active(acts) * n
        sums["total_energy"] += (recon_error + l1) * n
        seen += n
        progress.set_postfix(recon=f"{recon_error:.3f}", l1=f"{l1:.3f}")
    progress.close()
    totals = distributed.sum_totals({"seen": seen, **sums})
    return {name: totals[name] / totals["seen"] for name in sums}


def run(args: argparse.Namespace) -> LCAConv2D:
    """Learn the dictionary (writing the files listed at the top); returns the LCA layer."""
    with contextlib.ExitStack() as held:
        return learn(args, held)


def learn(args: argparse.Namespace, held: contextlib.ExitStack) -> LCAConv2D:
    """:func:`run`, holding the lock of the output folder in ``held``."""
    check_args(args)
    task = canonical_task(args.task)
    in_channels, height, width, _ = task_info(task)
    out_dir = args.out_dir or os.path.join("dictionaries", task)
    device = distributed.device_for(args.device)
    every = args.epochs // 7 if args.lambda_every is None else args.lambda_every
    if args.lca_ksize > min(height, width):
        print(
            f"warning: {args.lca_ksize}x{args.lca_ksize} features are larger than the "
            f"{height}x{width} images of {task}",
            file=sys.stderr,
        )

    storage.check_writable(out_dir, "out-dir")
    train_set, _ = build_datasets(
        task, args.data_dir, data_aug=False, download=not args.no_download
    )
    subset = draw_subset(len(train_set), args.subset_fraction, args.seed)
    loader = make_loader(train_set, args.mbs, shuffle=True, seed=args.seed,
                         num_workers=args.num_workers, indices=subset)  # fmt: skip
    batches = distributed.split_batches(loader)

    torch.manual_seed(args.seed)
    lca = LCAConv2D(
        args.lca_feats,
        in_channels,
        kernel_size=args.lca_ksize,
        stride=args.lca_stride,
        lambda_=args.lca_lambda,
        tau=args.lca_tau,
        eta=args.lca_eta,
        lca_iters=args.lca_iters,
        pad="same",
        return_vars=["inputs", "acts", "recons", "recon_errors"],
        d_update_clip=args.d_update_clip,
    ).to(device)

    writes = distributed.is_main_process()
    if writes:
        held.enter_context(storage.FolderLock(out_dir))
    dict_path = os.path.join(out_dir, DICTIONARY_FILE)
    csv_path = os.path.join(out_dir, CSV_FILE)
    if writes:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(csv_path):  # the CSV holds this run's epochs only
            os.remove(csv_path)
    board = held.enter_context(run_board.dictionary_board(out_dir, args.tensorboard and writes))
    print(
        f"{task}: learning {args.lca_feats} features of {in_channels}x{args.lca_ksize}x"
        f"{args.lca_ksize} (stride {args.lca_stride}) on {len(subset)} of {len(train_set)} "
        f"training images, device {device}; writing to {out_dir}"
    )
    rows: list[dict[str, float]] = []
    for epoch in range(args.epochs):
        lca.lambda_ = lambda_at_epoch(epoch, args.lca_lambda, args.lambda_increment, every)
        start = time.perf_counter()
        metrics = learn_one_epoch(lca, batches, device, args.max_batches,
                                  desc=f"epoch {epoch + 1}/{args.epochs}")  # fmt: skip
        row = {"epoch": epoch + 1, "lambda": lca.lambda_, **metrics}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if not writes:
            continue
        records.save_dictionary(dict_path, lca, subset_indices=subset)
        storage.append_csv_row(csv_path, {name: row[name] for name in CSV_COLUMNS})
        grid = data_utils.plot_dictionary(
            lca.get_weights(), f"{task} dictionary after epoch {epoch + 1}"
        )
        storage.save_figure(grid, os.path.join(out_dir, GRID_FILE))
        curves = data_utils.plot_dictlearning_curves(rows, METRICS)
        storage.save_figure(curves, os.path.join(out_dir, CURVES_FILE))
        run_board.log_dictionary_epoch(board, row, lca.get_weights())
        print(
            f"epoch {epoch + 1}/{args.epochs}  lambda {lca.lambda_:.2f}  "
            + "  ".join(f"{name} {metrics[name]:.4f}" for name in METRICS)
            + f"  ({row['seconds']:.1f} s)"
        )
    return lca


STORAGE_FIX = "free space or pass a writable --out-dir; the dictionary of the last epoch is kept"
KEPT_NOTE = "; the dictionary of the last finished epoch is kept"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    distributed.quiet_unless_rank_zero()
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return entry.fail(str(error), entry.EXIT_USAGE)
    if distributed.launched():
        typed = args.device != "auto"
        return distributed.run(lambda: learn_reporting(args), args.device, typed, args.dist_timeout)
    return learn_reporting(args)


def learn_reporting(args: argparse.Namespace) -> int:
    """:func:`run`, every failure reported as one line (``entry``); returns the exit status."""
    work = functools.partial(run, args)
    return entry.run_script(work, storage.ERROR_STATUSES, STORAGE_FIX, KEPT_NOTE)


if __name__ == "__main__":
    sys.exit(main())
