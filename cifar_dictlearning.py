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
    dictlearning_state.pt what an interrupted run continues from (``experiment/records.py``),
                          after every epoch: dictionary, epochs done, flags, CSV rows, RNG
                          states
    tb/                   with --tensorboard, the TensorBoard log (``run_board``)

An interrupted run continues: the same command with the same ``--out-dir`` goes on from the
last finished epoch and learns, bit for bit, the dictionary the uninterrupted run learns (the
dictionary, the lambda schedule, the global and data-order RNGs and the CSV rows come back).
A flag that would change the result is refused (exit 2; ``--fresh`` starts over), ``--epochs``
may grow, and a finished run says so and exits 0, rewriting any of its files that are missing.

One process writes an output folder at a time. Exit statuses and one-line errors are those of
``experiment/entry.py``: 0 done, 1 the dictionary or its metrics stopped being finite (the last
finite epoch is kept), 2 bad input, 74 a file could not be written, 75 another process writes
the folder, 130 Ctrl-C, 143 SIGTERM. Signals are honoured at safe points (between batches, and
once an epoch's files are written), which keeps the last finished epoch and prints the command
that continues.

Under ``torchrun --nproc_per_node N cifar_dictlearning.py ...`` every batch of ``--mbs`` images
is split over the N processes, which sum the rule's batch terms before each update, so the
dictionary is the one a single process learns (``experiment/distributed.py``); rank 0 writes
the files.
"""

from __future__ import annotations

from experiment import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from tqdm import tqdm

import collectives
import data_utils
from experiment import distributed, records, run_board, storage
from experiment.data_loading import TASKS, build_datasets, canonical_task, make_loader, task_info
from experiment.entry import UsageError
from lca import LCAConv2D, compute_frac_active, compute_l1_sparsity, compute_l2_error

DICTIONARY_FILE = "dictionary.pt"
CSV_FILE = "dictlearning.csv"
GRID_FILE = "dictionary.png"
CURVES_FILE = "dictlearning_curves.png"
METRICS = ("recon_error", "l1_sparsity", "frac_active", "total_energy")
CSV_COLUMNS = ("epoch", "lambda") + METRICS + ("seconds",)
STATE_FILE = records.DICTLEARNING_STATE
# The flags that change the dictionary learnt (lambda_every as resolved); a continued run keeps them
RESULT_FLAGS = ("task", "seed", "subset_fraction", "mbs", "max_batches", "lca_feats", "lca_ksize",
                "lca_stride", "lca_lambda", "lambda_increment", "lambda_every", "lca_iters",
                "lca_tau", "lca_eta", "d_update_clip")  # fmt: skip
# Range of every float flag, by dest: (low, low excluded?, high, high excluded?); None: no bound.
FLOAT_RANGES = {
    "subset_fraction": (0, True, 1, False),
    "lca_lambda": (0, False, None, False),
    "lambda_increment": (None, False, None, False),
    "lca_tau": (0, True, None, False),
    "lca_eta": (0, False, None, False),
}
FLAGS = {"subset_fraction": "subset-fraction", "lambda_increment": "lambda-increment"}


class DictionaryDivergenceError(RuntimeError):
    """The dictionary or an epoch's metrics stopped being finite: learning cannot go on."""


ERROR_STATUSES = ((DictionaryDivergenceError, entry.EXIT_DIVERGED), *storage.ERROR_STATUSES)


@dataclasses.dataclass(frozen=True)
class DictionaryConfig:
    """Every setting of one dictionary-learning run: the checked flags, resolved
    (:func:`dictionary_config`).

    task              dataset, spelled as in ``TASKS``
    data_dir          where the datasets are (or go)
    download          whether a missing dataset may be downloaded (no ``--no-download``)
    out_dir           output folder (``--out-dir``, or ``dictionaries/<task>``)
    fresh             start over even if ``out_dir`` holds an earlier run (``--fresh``)
    device            the ``--device`` spec: GPU index, cuda[:N], auto or cpu
    seed              seed of the subset, the data order and the initial dictionary
    num_workers       data loader worker processes
    epochs            passes over the subset
    mbs               images per dictionary update
    subset_fraction   fraction of the training set learnt on, drawn at random
    max_batches       batches per epoch at most (None: all of them)
    lca_feats         dictionary features
    lca_ksize         feature size (odd)
    lca_stride        feature stride
    lca_lambda        LCA threshold of the first epoch
    lambda_increment  added to the threshold every ``lambda_every`` epochs
    lambda_every      epochs between threshold raises (0: never), resolved
    lambda_every_from_epochs  whether ``lambda_every`` is ``epochs // 7`` (no ``--lambda-every``)
    lca_iters         LCA iterations per batch
    lca_tau           LCA time constant
    lca_eta           dictionary learning rate
    d_update_clip     bound on each entry of a dictionary update (inf: none)
    tensorboard       whether to write a TensorBoard log in ``out_dir/tb/``
    """

    task: str
    data_dir: str
    download: bool
    out_dir: str
    fresh: bool
    device: str
    seed: int
    num_workers: int
    epochs: int
    mbs: int
    subset_fraction: float
    max_batches: int | None
    lca_feats: int
    lca_ksize: int
    lca_stride: int
    lca_lambda: float
    lambda_increment: float
    lambda_every: int
    lambda_every_from_epochs: bool
    lca_iters: int
    lca_tau: float
    lca_eta: float
    d_update_clip: float
    tensorboard: bool

    def result_settings(self) -> dict:
        """The settings that change the dictionary learnt (``RESULT_FLAGS``), as plain values:
        what ``dictlearning_state.pt`` keeps, and a continued run must match."""
        return {name: getattr(self, name) for name in RESULT_FLAGS}


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
    add("--fresh", action="store_true", help="start over, even if --out-dir holds an "
        "interrupted run (the same command otherwise continues it)")  # fmt: skip
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


def check_flags(flags: dict[str, Any]) -> None:
    """UsageError for flag values (parsed, by dest) that cannot run."""
    positive = ("epochs", "mbs", "lca_feats", "lca_ksize", "lca_stride", "lca_iters")
    for name in positive:
        if flags[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if flags["max_batches"] is not None and flags["max_batches"] < 1:
        raise UsageError("--max-batches must be at least 1")
    entry.check_numbers(flags, FLOAT_RANGES, FLAGS)
    entry.check_number("d-update-clip", flags["d_update_clip"], 0, low_open=True, allow_inf=True)
    if flags["lca_ksize"] % 2 == 0:
        raise UsageError("--lca_ksize must be odd (LCA uses 'same' padding)")
    if flags["lambda_every"] is not None and flags["lambda_every"] < 0:
        raise UsageError("--lambda-every must be >= 0")


def dictionary_config(flags: Mapping[str, Any]) -> DictionaryConfig:
    """The configuration of the parsed flag values ``flags`` (by dest, left unchanged), checked
    once (:func:`check_flags`, then the task's name): the task in its ``TASKS`` spelling, the
    default ``--out-dir`` and ``--lambda-every`` resolved."""
    flags = dict(flags)
    check_flags(flags)
    task = canonical_task(flags["task"])
    lambda_every = flags["lambda_every"]
    return DictionaryConfig(
        task=task,
        data_dir=flags["data_dir"],
        download=not flags["no_download"],
        out_dir=flags["out_dir"] or os.path.join("dictionaries", task),
        fresh=flags["fresh"],
        device=flags["device"],
        seed=flags["seed"],
        num_workers=flags["num_workers"],
        epochs=flags["epochs"],
        mbs=flags["mbs"],
        subset_fraction=flags["subset_fraction"],
        max_batches=flags["max_batches"],
        lca_feats=flags["lca_feats"],
        lca_ksize=flags["lca_ksize"],
        lca_stride=flags["lca_stride"],
        lca_lambda=flags["lca_lambda"],
        lambda_increment=flags["lambda_increment"],
        lambda_every=flags["epochs"] // 7 if lambda_every is None else lambda_every,
        lambda_every_from_epochs=lambda_every is None,
        lca_iters=flags["lca_iters"],
        lca_tau=flags["lca_tau"],
        lca_eta=flags["lca_eta"],
        d_update_clip=flags["d_update_clip"],
        tensorboard=flags["tensorboard"],
    )


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
        lca.apply_weight_update(*collectives.sum_over_ranks(lca.weight_update_terms(acts, errors)))

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


def run(config: DictionaryConfig, earlier_run_gone: Callable[[], None] = lambda: None) -> LCAConv2D:
    """Learn the dictionary of ``config`` (writing the files listed at the top), continuing the
    run that its ``out_dir`` holds unless ``fresh``; returns the LCA layer. ``earlier_run_gone``
    is called once nothing of an earlier run is left to discard (``--fresh`` is moot)."""
    with contextlib.ExitStack() as held:
        return learn(config, held, earlier_run_gone)


def learn(
    config: DictionaryConfig, held: contextlib.ExitStack, earlier_run_gone: Callable[[], None]
) -> LCAConv2D:
    """:func:`run`, holding the lock of the output folder in ``held``."""
    in_channels, height, width, _ = task_info(config.task)
    out_dir = config.out_dir
    device = distributed.device_for(config.device)
    if config.lca_ksize > min(height, width):
        print(
            f"warning: {config.lca_ksize}x{config.lca_ksize} features are larger than the "
            f"{height}x{width} images of {config.task}",
            file=sys.stderr,
        )

    storage.check_writable(out_dir, "out-dir")
    writes = distributed.is_main_process()
    if writes:
        held.enter_context(storage.FolderLock(out_dir))
    settings = config.result_settings()
    state = previous_state(config)
    train_set, _ = build_datasets(
        config.task, config.data_dir, data_aug=False, download=config.download
    )
    subset = draw_subset(len(train_set), config.subset_fraction, config.seed)
    loader = make_loader(train_set, config.mbs, shuffle=True, seed=config.seed,
                         num_workers=config.num_workers, indices=subset)  # fmt: skip
    batches = distributed.split_batches(loader)
    lca = build_lca(config, in_channels, device)
    files = OutputFolder(out_dir, config.task, subset)
    rows = [] if state is None else continue_from(state, lca, loader, files.state_path)
    if writes:
        files.prepare(lca, rows)
    board = run_board.dictionary_board(out_dir, config.tensorboard and writes, len(rows))
    board = held.enter_context(board)
    earlier_run_gone()  # the same command now continues this run
    if len(rows) == config.epochs:
        print(f"{out_dir}: the run is complete ({config.epochs} epochs); nothing to do (--fresh "
              f"learns it again)")  # fmt: skip
        return lca
    print(
        f"{config.task}: learning {config.lca_feats} features of {in_channels}x"
        f"{config.lca_ksize}x{config.lca_ksize} (stride {config.lca_stride}) on {len(subset)} of "
        f"{len(train_set)} training images, device {device}; writing to {out_dir}"
        + (f"; continuing after epoch {len(rows)}" if rows else "")
    )
    for epoch in range(len(rows), config.epochs):
        lca.lambda_ = lambda_at_epoch(
            epoch, config.lca_lambda, config.lambda_increment, config.lambda_every
        )
        start = time.perf_counter()
        metrics = learn_one_epoch(lca, batches, device, config.max_batches,
                                  desc=f"epoch {epoch + 1}/{config.epochs}")  # fmt: skip
        check_finite(lca, metrics, epoch + 1, out_dir, kept=len(rows))
        row = {"epoch": epoch + 1, "lambda": lca.lambda_, **metrics}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if writes:  # a stop asked for during the epoch waits for its files
            files.save_epoch(lca, rows, epoch_state(lca, rows, settings, loader))
            run_board.log_dictionary_epoch(board, row, lca.get_weights())
        print(
            f"epoch {epoch + 1}/{config.epochs}  lambda {lca.lambda_:.2f}  "
            + "  ".join(f"{name} {metrics[name]:.4f}" for name in METRICS)
            + f"  ({row['seconds']:.1f} s)"
        )
        distributed.stop_agreed()  # a safe point: the epoch is kept
    return lca


def check_finite(lca: LCAConv2D, metrics: dict, epoch: int, out_dir: str, kept: int) -> None:
    """Raise DictionaryDivergenceError if epoch ``epoch`` left a non-finite dictionary or metric;
    nothing of it has been written, so the folder keeps epoch ``kept``."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if not torch.isfinite(lca.get_weights()).all():
        bad.insert(0, "the dictionary")
    if bad:
        where = f"epoch {kept}'s dictionary is kept in {out_dir}" if kept else "nothing was kept"
        raise DictionaryDivergenceError(
            f"dictionary learning diverged in epoch {epoch}: {', '.join(bad)} not finite; "
            f"{where}; start again with --fresh and a smaller --lca_eta"
        )


def build_lca(config: DictionaryConfig, in_channels: int, device: torch.device) -> LCAConv2D:
    """The LCA layer to learn, its dictionary drawn after seeding torch with ``config.seed``."""
    torch.manual_seed(config.seed)
    return LCAConv2D(
        config.lca_feats,
        in_channels,
        kernel_size=config.lca_ksize,
        stride=config.lca_stride,
        lambda_=config.lca_lambda,
        tau=config.lca_tau,
        eta=config.lca_eta,
        lca_iters=config.lca_iters,
        pad="same",
        return_vars=["inputs", "acts", "recons", "recon_errors"],
        d_update_clip=config.d_update_clip,
    ).to(device)


# --------------------------------------------------------------------------------------------
# Continuing an interrupted run
# --------------------------------------------------------------------------------------------


def previous_state(config: DictionaryConfig) -> dict | None:
    """The state of the run in ``config.out_dir`` that this command continues (None: none, or
    ``fresh``), checked to be learnt with ``config``'s settings. Every process reads it."""
    path = os.path.join(config.out_dir, STATE_FILE)
    state = None
    if not config.fresh and os.path.exists(path):
        state = records.load_dictlearning_state(path)
        check_continues(state, config, path)
    check_processes_agree(0 if state is None else state["epoch"], config.out_dir)
    return state


def check_continues(state: dict, config: DictionaryConfig, path: str) -> None:
    """UsageError unless ``config`` continues the run of ``state`` (read from ``path``): the
    same ``RESULT_FLAGS``, and ``epochs`` at least the epochs it has."""
    settings = config.result_settings()
    for name in RESULT_FLAGS:
        saved, given = state["settings"].get(name), settings[name]
        if saved != given:
            raise UsageError(changed_flag_message(name, saved, given, config, path))
    done = state["epoch"]
    if done > config.epochs:
        raise UsageError(
            f"{path} holds {done} finished epochs, more than --epochs {config.epochs}: pass "
            f"--epochs {done} (or more) to continue that run, or --fresh to start over"
        )


def changed_flag_message(
    name: str, saved: object, given: object, config: DictionaryConfig, path: str
) -> str:
    """One line: which flag differs from the run in ``path``, and the two ways out."""
    flag = f"--{name.replace('_', '-')}"
    if name == "lambda_every" and config.lambda_every_from_epochs:
        now = f"--epochs {config.epochs} raises lambda every {given} epochs (epochs // 7)"
    else:
        now = f"this command has {f'no {flag}' if given is None else f'{flag} {given}'}"
    was = f"no {flag}" if saved is None else f"{flag} {saved}"
    keep = f"drop {flag}" if saved is None else f"pass {flag} {saved}"
    return (
        f"{path} holds a run learnt with {was}, but {now}: {keep} to continue it, or --fresh "
        f"to start over"
    )


def check_processes_agree(done: int, out_dir: str) -> None:
    """Under torchrun, a UsageError unless every process found ``done`` finished epochs in
    ``out_dir``. Its all-reduce also keeps the main process from rewriting the state before
    every process has read it."""
    if not distributed.active():
        return
    totals = distributed.sum_totals({"done": done, "square": done * done})
    # n * sum(d^2) == (sum d)^2 exactly when the n counts are equal (Cauchy-Schwarz)
    if totals["square"] * distributed.world_size() != totals["done"] ** 2:
        raise UsageError(
            f"the processes found different runs in {out_dir}: every process must read the "
            f"same --out-dir (a folder that every node shares)"
        )


def continue_from(
    state: dict, lca: LCAConv2D, loader: torch.utils.data.DataLoader, path: str
) -> list:
    """Put the dictionary, its lambda and the RNGs (global and data order) where ``state``
    (read from ``path``) left them; returns the CSV rows of its epochs."""
    weights, rows = state["weights"], [dict(row) for row in state["rows"]]
    fits = weights.shape == lca.weights.shape and weights.dtype == lca.weights.dtype
    if not fits or any(set(row) != set(CSV_COLUMNS) for row in rows):
        raise UsageError(
            f"{path} does not fit its own flags (its dictionary or rows are damaged); pass "
            f"--fresh to learn the dictionary again from epoch 1"
        )
    lca.assign_weight_values(weights.to(lca.weights.device), normalize=False)
    lca.lambda_ = rows[-1]["lambda"]
    records.restore_rng(state, loader)
    return rows


def epoch_state(
    lca: LCAConv2D, rows: list, settings: dict, loader: torch.utils.data.DataLoader
) -> dict:
    """What ``dictlearning_state.pt`` holds once the epochs of ``rows`` are done."""
    return {
        "epoch": len(rows),
        "settings": dict(settings),
        "weights": lca.get_weights().detach().cpu(),
        "rows": [dict(row) for row in rows],
        "rng_state": {
            "global": records.get_rng_state(),
            "train_loader": loader.generator.get_state(),
        },
    }


class OutputFolder:
    """The files of ``out_dir`` (the module docstring), written by the main process only."""

    def __init__(self, out_dir: str, task: str, subset: torch.Tensor) -> None:
        self.out_dir, self.task, self.subset = out_dir, task, subset
        self.dict_path = os.path.join(out_dir, DICTIONARY_FILE)
        self.csv_path = os.path.join(out_dir, CSV_FILE)
        self.state_path = os.path.join(out_dir, STATE_FILE)

    def prepare(self, lca: LCAConv2D, rows: list) -> None:
        """A new run (no ``rows``): the CSV and state of an earlier one go. A continued run:
        rewrite its files that are missing or do not match its state (a run stopped between
        its files, or files deleted since)."""
        if not rows:
            for path in (self.csv_path, self.state_path):
                if os.path.exists(path):
                    os.remove(path)
            return
        rewritten = []
        if not self.dictionary_matches(lca):
            records.save_dictionary(self.dict_path, lca, subset_indices=self.subset)
            rewritten.append(DICTIONARY_FILE)
        if not self.csv_matches(rows):
            storage.write_csv_rows(self.csv_path, rows, CSV_COLUMNS)
            rewritten.append(CSV_FILE)
        if not all(os.path.isfile(os.path.join(self.out_dir, f)) for f in (GRID_FILE, CURVES_FILE)):
            self.draw(lca, rows)
            rewritten += [GRID_FILE, CURVES_FILE]
        if rewritten:
            print(f"notice: rewrote {', '.join(rewritten)} from {STATE_FILE}")

    def save_epoch(self, lca: LCAConv2D, rows: list, state: dict) -> None:
        """The files of the epoch that ends ``rows``; the state last, so that a state vouches
        for the files of its epoch (a process killed before it redoes the epoch)."""
        records.save_dictionary(self.dict_path, lca, subset_indices=self.subset)
        storage.append_csv_row(self.csv_path, {name: rows[-1][name] for name in CSV_COLUMNS})
        self.draw(lca, rows)
        storage.atomic_save(state, self.state_path)

    def draw(self, lca: LCAConv2D, rows: list) -> None:
        """The dictionary grid and the curves of ``rows``."""
        title = f"{self.task} dictionary after epoch {len(rows)}"
        grid = data_utils.plot_dictionary(lca.get_weights(), title)
        storage.save_figure(grid, os.path.join(self.out_dir, GRID_FILE))
        curves = data_utils.plot_dictlearning_curves(rows, METRICS)
        storage.save_figure(curves, os.path.join(self.out_dir, CURVES_FILE))

    def dictionary_matches(self, lca: LCAConv2D) -> bool:
        """Whether ``dictionary.pt`` and ``subset_indices.pt`` hold ``lca``'s dictionary."""
        try:
            weights, config = records.load_dictionary(self.dict_path)
            indices = records.load_subset_indices(self.dict_path)
        except records.DictionaryError:
            return False
        same = torch.equal(weights, lca.get_weights().cpu()) and config == lca.settings()
        return same and torch.equal(indices, self.subset)

    def csv_matches(self, rows: list) -> bool:
        """Whether ``dictlearning.csv`` holds ``rows``, every value exactly."""
        if not os.path.isfile(self.csv_path):
            return False
        saved = storage.read_csv_rows(self.csv_path)
        return [[r.get(n) for n in CSV_COLUMNS] for r in saved] == [
            [r[n] for n in CSV_COLUMNS] for r in rows
        ]


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


STORAGE_FIX = "free space or pass a writable --out-dir; the dictionary of the last epoch is kept"
KEPT_NOTE = "; the dictionary of the last finished epoch is kept"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    distributed.quiet_unless_rank_zero()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        flags = build_parser().parse_args(argv)
    except UsageError as error:
        return entry.fail(str(error), entry.EXIT_USAGE)
    work = functools.partial(learn_reporting, vars(flags), argv)
    if distributed.launched():
        typed = flags.device != "auto"
        return distributed.run(work, flags.device, typed, flags.dist_timeout)
    return work()


def learn_reporting(flags: Mapping[str, Any], argv: Sequence[str]) -> int:
    """Check the parsed flag values ``flags`` into a :class:`DictionaryConfig` and :func:`run`
    it, every failure reported as one line (``entry``), an interruption with the command that
    continues the run; returns the exit status. The flags are checked inside
    ``entry.run_script``, after its first safe point (a stop requested while the libraries
    loaded comes first) and, under torchrun, once the processes have joined."""
    keeps_fresh = flags["fresh"]  # until nothing of the earlier run is left to discard

    def earlier_run_gone() -> None:
        nonlocal keeps_fresh
        keeps_fresh = False

    def work() -> LCAConv2D:
        return run(dictionary_config(flags), earlier_run_gone)

    status = entry.run_script(work, ERROR_STATUSES, STORAGE_FIX, KEPT_NOTE)
    if status in (entry.EXIT_INTERRUPTED, entry.EXIT_TERMINATED):
        print(f"continue with: {continue_command(argv, keeps_fresh)}", file=sys.stderr)
    return status


def continue_command(argv: Sequence[str], fresh: bool) -> str:
    """The command line that continues this run: this one, without ``--fresh`` unless the
    earlier run is still to be discarded (``fresh``); under torchrun with its launcher (one
    node's; on several nodes, with the job's own torchrun flags)."""
    launcher = "python"
    if distributed.launched():
        launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '1')}"
    kept = [arg for arg in argv if fresh or arg != "--fresh"]
    return entry.shell_command("cifar_dictlearning.py", kept, launcher)


if __name__ == "__main__":
    entry.exit_after_work(main())
